"""A TCP proxy on loopback that can cut, blackhole or restore the path to a real server (fault injection for
mission-critical tests, instead of mocks). Runs its own event loop in a thread so test code may block freely."""

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
        self.mode = "pass"  # pass | cut (refuse and drop) | blackhole (accept, forward nothing)
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
        try:
            while data := await r.read(65536):
                if self.mode != "pass":
                    break
                w.write(data)
                await w.drain()
        finally:
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

    def restore(self) -> None:
        self.mode = "pass"

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            self._drop_all()

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
