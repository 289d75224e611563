"""A TCP proxy on loopback that can cut, blackhole, hang, delay or restore the path to a real server (fault injection
for mission-critical tests, instead of mocks). Runs its own event loop in a thread so test code may block freely.

Modes: ``pass`` forwards; ``cut`` drops every connection and refuses new ones (a dead server); ``blackhole`` drops
every connection, then accepts new ones and forwards nothing; ``hang`` keeps every connection open, takes every
byte and never answers (a hung server or network: only timeouts notice; ``restore`` then drops those connections,
whose streams are out of step); ``delay`` forwards every chunk ``delay_s`` after it arrived (a slow path).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType

from .support import free_port


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.mode = "pass"  # pass | cut | blackhole | hang | delay (module docstring)
        self.delay_s = 0.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> TcpProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "cut":
            writer.close()
            return
        self._writers.add(writer)
        try:
            if self.mode == "blackhole":
                while await reader.read(65536):
                    pass
                return
            up_r, up_w = await asyncio.open_connection(*self.target)
            self._writers.add(up_w)
            await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer), return_exceptions=True)
        except OSError:
            pass
        finally:
            for w in (writer,):
                self._writers.discard(w)
                w.close()

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        # Chunks go through a queue with their arrival time, so a delay shifts each one by delay_s instead of adding
        # up along the stream.
        chunks: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def write() -> None:
            while (item := await chunks.get()) is not None:
                at, data = item
                if self.mode == "delay":
                    await asyncio.sleep(max(0.0, at + self.delay_s - self._loop.time()))
                w.write(data)
                await w.drain()

        writer = asyncio.ensure_future(write())
        try:
            while data := await r.read(65536):
                if self.mode == "hang":
                    continue  # taken, never answered
                if self.mode not in ("pass", "delay"):
                    break
                chunks.put_nowait((self._loop.time(), data))
            chunks.put_nowait(None)
            await writer
        finally:
            writer.cancel()
            self._writers.discard(w)
            w.close()

    def _drop_all(self) -> None:
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._writers.clear()

    def cut(self) -> None:
        """Drop every connection and refuse new ones (Redis 'down')."""
        self.mode = "cut"
        self._loop.call_soon_threadsafe(self._drop_all)

    def blackhole(self) -> None:
        """Keep connections open but forward nothing (a hung network: only timeouts notice)."""
        self.mode = "blackhole"
        self._loop.call_soon_threadsafe(self._drop_all)

    def hang(self) -> None:
        """Keep every connection open, take every byte, answer nothing (new connections too)."""
        self.mode = "hang"

    def delay(self, seconds: float) -> None:
        """Forward every chunk, in both directions, ``seconds`` after it arrived."""
        self.delay_s = seconds
        self.mode = "delay"

    def restore(self) -> None:
        hung = self.mode == "hang"
        self.mode = "pass"
        if hung:  # what was swallowed left those streams out of step: end them, as a network reset would
            self._loop.call_soon_threadsafe(self._drop_all)

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            self._drop_all()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in others:  # pipes still waiting (a delayed chunk, a hung read): end them before the loop closes
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
