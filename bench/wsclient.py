"""Load-generator building blocks: a WebSocket client for the broker protocol, a windowed publisher, an acking
consumer and a delivery tracker (missing / duplicated / latency). All of it runs in the bench process.

Timing uses ``time.perf_counter``: the publisher stamps it into every payload right before sending and the consumer
(same process, same clock) subtracts it on receipt.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from . import BenchError

Frame = dict[str, Any]
perf = time.perf_counter

#: Error codes worth a resend (after ``retry_after_ms``); anything else fails the run.
RETRYABLE_CODES = frozenset({"unavailable", "rate_limited"})
MAX_PUBLISH_ATTEMPTS = 5
MAX_ACK_ITEMS = 1_000  # the broker's limit on items in one batched ack


async def open_ws(url: str, timeout_s: float) -> ClientConnection:
    """The same client settings for the broker and the relay: no compression, no proxy, no keepalive pings."""
    if not url.startswith(("ws://127.0.0.1:", "ws://localhost:", "ws://[::1]:")):
        raise BenchError(f"refusing non-loopback URL {url}")
    try:
        return await connect(
            url,
            open_timeout=timeout_s,
            compression=None,
            proxy=None,
            ping_interval=None,
            close_timeout=2,
            max_size=4 * 1_048_576,
        )
    except (OSError, TimeoutError, ConnectionClosed) as e:
        raise BenchError(f"cannot connect to {url}: {e!r}") from None
    except Exception as e:  # websockets' handshake errors (InvalidStatus, InvalidMessage, ...)
        raise BenchError(f"WebSocket handshake with {url} failed: {e!r}") from None


def payload_text(seq: int, stamp: float, size: int) -> str:
    """``{"s":seq,"t":stamp,"p":"xxx..."}`` padded so the JSON text is exactly ``size`` bytes (when size >= ~40)."""
    head = f'{{"s":{seq},"t":{stamp!r},"p":"'
    return head + "x" * max(0, size - len(head) - 2) + '"}'


def publish_frame(seq: int, topic: str, size: int, keys: int = 0, extra: str = "") -> str:
    """A publish frame with ``ref = seq``, stamped now; with ``keys``, ordering key ``k<seq % keys>``; ``extra``
    is more fields as JSON text starting with a comma (e.g. ``,"backoff_base_ms":50``)."""
    key = f',"key":"k{seq % keys}"' if keys else ""
    return f'{{"op":"publish","ref":{seq},"topic":"{topic}"{key}{extra},"payload":{payload_text(seq, perf(), size)}}}'


class Abort:
    """Set once by whatever fails first (lost connection, fatal error reply); every wait in a run watches it."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()

    def check(self) -> None:
        if self.event.is_set():
            raise BenchError(self.reason)


@contextlib.asynccontextmanager
async def before(deadline: float, what: str) -> AsyncIterator[None]:
    """Bound a block by ``deadline`` (a perf_counter value); a timeout becomes a BenchError naming ``what``."""
    try:
        async with asyncio.timeout(max(0.0, deadline - perf())):
            yield
    except TimeoutError:
        raise BenchError(f"timed out {what}") from None


async def wait_for_event(ev: asyncio.Event, abort: Abort, deadline: float, what: str) -> None:
    """Wait for ``ev`` until ``deadline`` (a perf_counter value); raise BenchError on abort or timeout."""
    if ev.is_set():
        return
    abort.check()
    waiters = [asyncio.ensure_future(ev.wait()), asyncio.ensure_future(abort.event.wait())]
    try:
        await asyncio.wait(waiters, timeout=max(0.0, deadline - perf()), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    if ev.is_set():
        return
    abort.check()
    raise BenchError(f"timed out waiting for {what}")


class DeliveryTracker:
    """Counts which sequence numbers arrived, how often, and the publish->receipt latency of each delivery."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.seen = bytearray(expected)
        self.unique = 0
        self.duplicates = 0
        self.unknown = 0
        self.latencies: list[float] = []  # seconds
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.complete = asyncio.Event()
        if expected == 0:
            self.complete.set()

    def record(self, payload: Any, now: float) -> None:
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        try:
            seq = payload["s"]
            self.latencies.append(now - payload["t"])
        except (TypeError, KeyError, IndexError):
            self.unknown += 1
            return
        if not isinstance(seq, int) or not 0 <= seq < self.expected:
            self.unknown += 1
            return
        count = self.seen[seq]
        if count == 0:
            self.unique += 1
            if self.unique == self.expected:
                self.complete.set()
        else:
            self.duplicates += 1
        if count < 255:
            self.seen[seq] = count + 1

    @property
    def missing(self) -> int:
        return self.expected - self.unique

    def problems(self, label: str) -> list[str]:
        out = []
        if self.missing:
            out.append(f"{label}: {self.missing} of {self.expected} messages never delivered")
        if self.duplicates:
            out.append(f"{label}: {self.duplicates} duplicate deliveries")
        if self.unknown:
            out.append(f"{label}: {self.unknown} deliveries with an unknown or malformed payload")
        return out

    def summary(self) -> dict[str, int]:
        return {
            "expected": self.expected,
            "delivered_unique": self.unique,
            "missing": self.missing,
            "duplicates": self.duplicates,
            "unknown": self.unknown,
        }


class BrokerConn:
    """One WebSocket to the broker, with a reader task that dispatches every incoming frame:

    - ``op == "message"`` -> ``on_message(frame, receipt_time)``
    - otherwise ``on_reply(frame)`` first (fast paths: publish confirms, ack replies); if it returns False,
      the future of ``request()`` waiting on that ``ref``; anything left is kept in ``unexpected``.
    """

    def __init__(self, ws: ClientConnection, name: str, abort: Abort) -> None:
        self.ws = ws
        self.name = name
        self.abort = abort
        self.on_message: Callable[[Frame, float], None] | None = None
        self.on_reply: Callable[[Frame], bool] | None = None
        self.unexpected: list[Frame] = []
        self.unexpected_count = 0
        self._pending: dict[str | int, asyncio.Future[Frame]] = {}
        self._refs = itertools.count(1)
        self._closing = False
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, url: str, name: str, abort: Abort, timeout_s: float) -> BrokerConn:
        conn = cls(await open_ws(url, timeout_s), name, abort)
        conn._reader = asyncio.create_task(conn._read(), name=f"reader-{name}")
        return conn

    async def _read(self) -> None:
        loads = orjson.loads
        recv = self.ws.recv
        try:
            while True:
                raw = await recv(decode=False)
                now = perf()
                d = loads(raw)
                if not isinstance(d, dict):
                    self._keep({"op": "?", "frame": d})
                    continue
                op = d.get("op")
                if op == "message":
                    if self.on_message is not None:
                        self.on_message(d, now)
                    continue
                if op == "messages":  # batch subscriptions: several deliveries in one frame
                    if self.on_message is not None:
                        for item in d.get("items", ()):
                            self.on_message(item, now)
                    continue
                if self.on_reply is not None and self.on_reply(d):
                    continue
                fut = self._pending.pop(d.get("ref"), None)  # type: ignore[arg-type]
                if fut is not None and not fut.done():
                    fut.set_result(d)
                else:
                    self._keep(d)
        except ConnectionClosed as e:
            if not self._closing:
                self.abort.set(f"connection {self.name} lost: {e}")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.abort.set(f"connection {self.name}: reader failed: {e!r}")
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(BenchError(f"connection {self.name} closed"))

    def _keep(self, d: Frame) -> None:
        self.unexpected_count += 1
        if len(self.unexpected) < 20:
            self.unexpected.append(d)

    async def send(self, text: str | bytes) -> None:
        try:
            await self.ws.send(text, text=True)
        except ConnectionClosed as e:
            self.abort.set(f"connection {self.name} closed while sending: {e}")
            raise BenchError(self.abort.reason) from None

    async def request(self, frame: Frame, timeout_s: float) -> Frame:
        """Send ``frame`` with a fresh ref and return the reply carrying that ref."""
        ref = f"{self.name}-{next(self._refs)}"
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[ref] = fut
        await self.send(orjson.dumps({**frame, "ref": ref}))
        try:
            async with asyncio.timeout(timeout_s):
                return await fut
        except TimeoutError:
            raise BenchError(f"no reply to {frame.get('op')} on {self.name} within {timeout_s}s") from None
        finally:
            self._pending.pop(ref, None)

    async def subscribe(self, topic: str, group: str, prefetch: int, timeout_s: float, batch: bool = False) -> Frame:
        frame: Frame = {"op": "subscribe", "topic": topic, "group": group, "prefetch": prefetch}
        if batch:
            frame["batch"] = True
        reply = await self.request(frame, timeout_s)
        if reply.get("op") != "subscribed":
            raise BenchError(f"subscribe {topic}/{group} failed: {reply}")
        return reply

    def unexpected_problems(self) -> list[str]:
        if not self.unexpected_count:
            return []
        return [f"{self.name}: {self.unexpected_count} unexpected frames, e.g. {self.unexpected[0]}"]

    async def close(self) -> None:
        self._closing = True
        with contextlib.suppress(Exception):
            async with asyncio.timeout(3):
                await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader


@dataclass(slots=True)
class _Inflight:
    frame: str
    sent_at: float
    attempts: int = 1


class WindowedPublisher:
    """Publishes ``ref = seq`` frames with at most ``window`` unconfirmed at once (a semaphore released by each
    ``published`` or final ``error`` reply). Retryable errors are resent after ``retry_after_ms`` (same slot)."""

    def __init__(
        self,
        conn: BrokerConn,
        topic: str,
        window: int,
        payload_bytes: int,
        stall_timeout: float,
        keys: int = 0,
        extra: str = "",
    ) -> None:
        self.conn = conn
        self.keys = keys  # > 0: every message carries ordering key k<seq % keys>
        self.extra = extra  # more publish fields, JSON text starting with a comma
        self.topic = topic
        self.payload_bytes = payload_bytes
        self.window = window
        self.stall_timeout = stall_timeout
        self.sem = asyncio.Semaphore(window)
        self.inflight: dict[int, _Inflight] = {}
        self.idle = asyncio.Event()
        self.idle.set()
        self.sent = 0
        self.confirmed = 0
        self.retries = 0
        self.errors: list[str] = []
        self.confirm_latencies: list[float] = []  # send -> published, seconds
        self._tasks: set[asyncio.Task[None]] = set()
        conn.on_reply = self._on_reply

    async def publish(self, seq: int) -> float:
        """Wait for a window slot, send message ``seq`` and return its send stamp."""
        # The caller bounds the whole send loop in time (``before``); a full window additionally has the stall limit.
        if self.sem.locked():
            await self._acquire_slow()
        else:
            await self.sem.acquire()
        frame = publish_frame(seq, self.topic, self.payload_bytes, self.keys, self.extra)
        now = perf()
        self.inflight[seq] = _Inflight(frame, now)
        self.idle.clear()
        self.sent += 1
        await self.conn.send(frame)
        return now

    async def _acquire_slow(self) -> None:
        abort = self.conn.abort
        acquire = asyncio.ensure_future(self.sem.acquire())
        aborted = asyncio.ensure_future(abort.event.wait())
        try:
            await asyncio.wait([acquire, aborted], timeout=self.stall_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            aborted.cancel()
            if not acquire.done():
                acquire.cancel()
        if acquire.done() and not acquire.cancelled():
            return
        abort.check()
        raise BenchError(
            f"publisher stalled: no confirmation for {self.stall_timeout}s with {len(self.inflight)} unconfirmed"
        )

    def _on_reply(self, d: Frame) -> bool:
        ref = d.get("ref")
        entry = self.inflight.get(ref) if type(ref) is int else None
        if entry is None:
            return False
        op = d.get("op")
        if op == "published":
            del self.inflight[ref]  # type: ignore[arg-type]
            self.confirmed += 1
            self.confirm_latencies.append(perf() - entry.sent_at)
            self._release()
            return True
        if op != "error":
            return False
        code = d.get("code")
        if code in RETRYABLE_CODES and entry.attempts < MAX_PUBLISH_ATTEMPTS:
            entry.attempts += 1
            self.retries += 1
            delay_ms = d.get("retry_after_ms")
            delay = min(max(int(delay_ms) if isinstance(delay_ms, int) else 100, 1), 2_000) / 1000
            asyncio.get_running_loop().call_later(delay, self._spawn_resend, entry)
            return True
        del self.inflight[ref]  # type: ignore[arg-type]
        self.errors.append(f"publish ref={ref}: {code}: {d.get('message')}")
        self.conn.abort.set(f"broker refused a publish: {code}: {d.get('message')}")
        self._release()
        return True

    def _spawn_resend(self, entry: _Inflight) -> None:
        task = asyncio.create_task(self._resend(entry))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resend(self, entry: _Inflight) -> None:
        with contextlib.suppress(BenchError):
            await self.conn.send(entry.frame)  # same payload (and stamp): latency includes the retry

    def _release(self) -> None:
        self.sem.release()
        if not self.inflight:
            self.idle.set()

    async def wait_confirmed(self, deadline: float) -> None:
        await wait_for_event(self.idle, self.conn.abort, deadline, f"publish confirmations on {self.conn.name}")

    def summary(self) -> dict[str, Any]:
        return {"sent": self.sent, "confirmed": self.confirmed, "retries": self.retries, "errors": self.errors[:10]}


class AckingConsumer:
    """Records every delivery in a ``DeliveryTracker`` and acks it.

    A background task sends the acks: with ``ack_batch`` 1 (the default) one ``{"op":"ack","id","receipt"}`` frame
    per delivery, as soon as it is recorded; with more, one ``{"op":"ack","items":[...]}`` frame per ``ack_batch``
    deliveries or whatever has accumulated after ``ack_interval`` seconds. With ``confirm_acks`` every ack frame
    carries a ``ref`` and the run is done when the broker has answered all of them; without, the consumer sends a
    ``ping`` after its last ack and the run is done when the ``pong`` arrives (the server has read every ack, like
    a NATS client's ``flush()``). ``t_done`` is that moment.
    """

    def __init__(
        self,
        conn: BrokerConn,
        expected: int,
        *,
        ack_batch: int,
        ack_interval: float,
        confirm_acks: bool,
    ) -> None:
        self.conn = conn
        self.tracker = DeliveryTracker(expected)
        self.ack_batch = max(1, min(ack_batch, MAX_ACK_ITEMS))
        self.ack_interval = ack_interval
        self.confirm_acks = confirm_acks
        self.batch: list[Frame] = []
        self.acks_pending: dict[str, int] = {}
        self.acked = 0
        self.ack_frames = 0
        self.ack_errors: list[str] = []
        self.done = asyncio.Event()
        self.t_done: float | None = None
        self._kick = asyncio.Event()
        self._refs = itertools.count(1)
        self._flusher: asyncio.Task[None] | None = None
        conn.on_message = self._on_message
        conn.on_reply = self._on_reply

    def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_loop(), name=f"acks-{self.conn.name}")

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(BaseException):
                await self._flusher

    def _on_message(self, d: Frame, now: float) -> None:
        self.tracker.record(d.get("payload"), now)
        self.batch.append({"id": d.get("id"), "receipt": d.get("receipt")})
        if len(self.batch) >= self.ack_batch:
            self._kick.set()

    def _on_reply(self, d: Frame) -> bool:
        ref = d.get("ref")
        if not isinstance(ref, str) or ref not in self.acks_pending:
            return False
        n = self.acks_pending.pop(ref)
        if d.get("op") == "error":
            self.ack_errors.append(f"{d.get('code')}: {d.get('message')}")
        else:
            self.acked += n
        self._check_done()
        return True

    def _check_done(self) -> None:
        if self.tracker.complete.is_set() and not self.batch and not self.acks_pending and not self.done.is_set():
            if self.confirm_acks:
                self.t_done = perf()
                self.done.set()
            else:
                self._kick.set()  # the flush loop ends with a ping round trip

    async def _finish_with_ping(self) -> None:
        if self.done.is_set() or not self.tracker.complete.is_set() or self.batch or self.acks_pending:
            return
        try:
            await self.conn.request({"op": "ping"}, 15.0)
        except BenchError as e:
            self.ack_errors.append(f"ping after the last ack: {e}")
            return
        if not self.done.is_set():
            self.t_done = perf()
            self.done.set()

    async def _flush_loop(self) -> None:
        while True:
            if self.ack_batch == 1:
                await self._kick.wait()  # every delivery kicks: nothing to wait for on a timer
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.ack_interval):
                        await self._kick.wait()
            self._kick.clear()
            while self.batch:
                items = self.batch[: self.ack_batch]
                del self.batch[: self.ack_batch]
                frame: Frame = {"op": "ack", "items": items} if len(items) > 1 else {"op": "ack", **items[0]}
                if self.confirm_acks:
                    ref = f"ack-{next(self._refs)}"
                    frame["ref"] = ref
                    self.acks_pending[ref] = len(items)
                else:
                    self.acked += len(items)
                self.ack_frames += 1
                try:
                    await self.conn.send(orjson.dumps(frame))
                except BenchError:
                    return
            self._check_done()
            if not self.confirm_acks:
                await self._finish_with_ping()

    def problems(self, label: str) -> list[str]:
        out = self.tracker.problems(label)
        if self.ack_errors:
            out.append(f"{label}: {len(self.ack_errors)} ack errors, e.g. {self.ack_errors[0]}")
        return out + self.conn.unexpected_problems()

    def progress(self) -> str:
        t = self.tracker
        return (
            f"{self.conn.name}: {t.unique:,}/{t.expected:,} delivered, {t.duplicates} duplicates, "
            f"{self.acked:,} acks answered, {len(self.acks_pending)} ack frames unanswered"
        )

    def summary(self) -> dict[str, Any]:
        return {
            **self.tracker.summary(),
            "acked": self.acked,
            "ack_frames": self.ack_frames,
            "ack_errors": self.ack_errors[:10],
        }
