"""One pipelined Redis connection for the script calls: callers queue their ``EVALSHA``s, one writer packs everything
queued into one write and reads the replies in order.

Why: through redis-py's client every call pays its execute path (pool checkout, retry wrapper, command parsing,
packing, a socket write and a wake-up per call), about a tenth of the broker's CPU per message. Here a call costs a
queue append and a future; the writer takes every call queued while the previous batch was in Redis (so batches grow
with load and cost nothing extra when idle), writes them with one ``send_packed_command`` and reads the replies with
``read_response``.

- **Order**: one batch is in Redis at a time and calls are sent in the order queued, so two calls queued one after
  the other run in that order (a publish before the claim that rides on it, an ack flush before the next).
- **Breaker**: one batch is one breaker call (``Gateway.call``): a batch that times out or loses its connection is one
  failure, a batch that was answered is one success, whatever its error replies (they are values, for the caller).
- **Timeouts**: the batch runs inside the breaker's call timeout, and it is written and its replies are read within
  ``redis.socket_timeout_ms`` (one deadline for both); either drops the connection (its stream can no longer be
  trusted) and fails every waiter of the batch with ``unavailable``. Calls queued behind it go out in the next batch
  on a new connection (or are refused at once by an open breaker). So a hung Redis answers a caller after at most the
  batch in flight plus its own, as before.
- **A dropped connection** fails every waiter of the batch in flight with ``unavailable`` (its calls may have run:
  the callers treat that as today, e.g. a claim's deliveries are reconciled); the next batch reconnects.
- **NOSCRIPT** (a Redis restart or ``SCRIPT FLUSH``): the calls answered so are sent again behind a ``SCRIPT LOAD``
  of their scripts in one more write, within the same batch; they did not run the first time.
- A caller that gives up (cancelled) before its calls were taken loses nothing: they are skipped, never sent.
- **Riders** (``run(..., ride=True)``: acks nobody waits on) are not worth a round trip of their own: they wait for the
  next batch that goes anyway (a publish, a claim) and share its write, or for ``RIDE_S`` at the longest. At a low
  rate, where every message travels alone, an ack then costs no write, read or wake-up of its own, in the broker or
  in Redis. A call that is not a rider (or ``send_riders``) sends every rider queued with it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from broker.core.errors import UnavailableError
from broker.runtime.supervisor import watch_task
from broker.store.connection import send_under_deadline
from broker.store.gateway import Gateway

log = structlog.get_logger("broker.store")

ScriptCall = tuple[AsyncScript, list[str], list[Any]]  # (script, keys, args)
MAX_BATCH_CALLS = 1000  # script calls per write (a batch never splits one caller's calls)
RIDE_S = 0.01  # the longest a rider waits for a batch to share (then it goes alone)


@dataclass(slots=True)
class _Waiting:
    calls: Sequence[ScriptCall]
    what: str
    fut: asyncio.Future[list[Any]]
    ride: bool


class ScriptPipe:
    def __init__(self, gateway: Gateway, max_calls: int = MAX_BATCH_CALLS, ride_s: float = RIDE_S) -> None:
        self.gateway = gateway
        self._max = max_calls
        self._ride_s = ride_s
        self._queue: deque[_Waiting] = deque()
        self._urgent = 0  # waiters queued that are not riders: the writer sends as soon as there is one
        self._riders_due = False  # riders go without company (their timer ran out, or send_riders)
        self._ride_timer: asyncio.TimerHandle | None = None
        self._conn: AbstractConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False
        self.batches = 0  # batches written (tests; a batch is one breaker call)

    def run(self, calls: Sequence[ScriptCall], what: str, ride: bool = False) -> asyncio.Future[list[Any]]:
        """Queue ``calls`` (in order, in one batch); the future holds one reply per call, an error reply as a
        ``ResponseError`` value in its place, or fails with ``UnavailableError`` (Redis unreachable, timed out,
        breaker open, connection dropped: the calls may or may not have run). A rider (``ride``) goes with the next
        batch that is not only riders, or after ``RIDE_S``; order is kept all the same (the queue's)."""
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if self._closed:
            fut.set_exception(UnavailableError(f"redis connection closed during {what}", retry_after_ms=1_000))
            return fut
        if not calls:
            fut.set_result([])
            return fut
        self._queue.append(_Waiting(calls, what, fut, ride))
        if not ride:
            self._urgent += 1
        elif self._ride_timer is None:
            self._ride_timer = asyncio.get_running_loop().call_later(self._ride_s, self.send_riders)
            return fut
        else:
            return fut
        self._kick()
        return fut

    def send_riders(self) -> None:
        """Send the riders queued now, without waiting for company (their timer ran out, or a caller waits on one
        of them)."""
        if self._ride_timer is not None:
            self._ride_timer.cancel()
            self._ride_timer = None
        if self._closed or not self._queue:
            return
        self._riders_due = True
        self._kick()

    def _kick(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = watch_task(asyncio.create_task(self._write_loop(), name="redis-pipe"))
        elif self._wake is not None and not self._wake.is_set():
            self._wake.set()

    async def close(self) -> None:
        """Stop the writer (shutdown); whatever still waits is answered ``unavailable``."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_queued(UnavailableError("redis connection closed (shutdown)", retry_after_ms=1_000))
        await self._drop()

    def _fail_queued(self, err: BaseException) -> None:
        """Answer every queued waiter ``err`` and empty the queue (riders and their timer included)."""
        self._fail(list(self._queue), err)
        self._queue.clear()
        self._urgent = 0
        self._riders_due = False
        if self._ride_timer is not None:
            self._ride_timer.cancel()
            self._ride_timer = None

    # ---- the writer ----------------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        batch: list[_Waiting] = []
        try:
            while not self._closed:
                if not self._urgent and not self._riders_due:  # nothing, or riders waiting for company
                    assert self._wake is not None
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                batch = self._take()
                if batch:
                    await self._run_batch(batch)
                batch = []
        except BaseException as e:  # cancelled (close) or a bug: no waiter is left hanging
            err = e if isinstance(e, Exception) else UnavailableError("redis connection closed", retry_after_ms=1_000)
            self._fail(batch, err)
            self._fail_queued(err)
            raise
        finally:
            self._task = None

    def _take(self) -> list[_Waiting]:
        """The next batch: the waiters queued, in order, riders included, up to ``max_calls`` calls (at least one
        waiter); waiters whose caller gave up are dropped unsent."""
        out: list[_Waiting] = []
        n = 0
        while self._queue:
            w = self._queue[0]
            if out and not w.fut.done() and n + len(w.calls) > self._max:
                break
            self._queue.popleft()
            if not w.ride:
                self._urgent -= 1
            if w.fut.done():
                continue
            out.append(w)
            n += len(w.calls)
        if self._queue:  # cut by max_calls: the rest goes next, riders included (they waited already)
            self._riders_due = True
        else:
            self._riders_due = False
            if self._ride_timer is not None:
                self._ride_timer.cancel()
                self._ride_timer = None
        return out

    async def _run_batch(self, batch: list[_Waiting]) -> None:
        what = batch[0].what if len(batch) == 1 else "batch"
        calls = [c for w in batch for c in w.calls]
        try:
            replies = await self.gateway.call(lambda _: self._exchange(calls), what)
        except Exception as e:  # UnavailableError (outage, timeout, breaker open), or a bug: every waiter hears it
            self._fail(batch, e)
            return
        self.batches += 1
        i = 0
        for w in batch:
            n = len(w.calls)
            if not w.fut.done():
                w.fut.set_result(replies[i : i + n])
            i += n

    async def _exchange(self, calls: list[ScriptCall]) -> list[Any]:
        """One write of every call, the replies read in order (error replies in place); the calls answered
        NOSCRIPT once more behind a load of their scripts. Any failure drops the connection."""
        conn = self._conn
        if conn is None:
            # one of the client's pooled connections, kept for the pipe (an idle one when there is: the pipe adds no
            # client to Redis, whose every client costs memory that counts against maxmemory)
            conn = self._conn = await self.gateway.client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            cmds = [("EVALSHA", s.sha, len(keys), *keys, *args) for s, keys, args in calls]
            replies = await self._send(conn, cmds)
            again = [i for i, x in enumerate(replies) if isinstance(x, NoScriptError)]
            if again:
                scripts = list({calls[i][0].sha: calls[i][0] for i in again}.values())
                load = [("SCRIPT", "LOAD", s.script) for s in scripts]
                retried = await self._send(conn, [*load, *(cmds[i] for i in again)])
                for i, x in zip(again, retried[len(load) :], strict=True):
                    replies[i] = x
                log.info("redis_scripts_loaded", scripts=len(scripts), calls=len(again))
            return replies
        except BaseException:
            await self._drop()
            raise

    @staticmethod
    async def _send(conn: AbstractConnection, cmds: list[tuple[Any, ...]]) -> list[Any]:
        out: list[Any] = []
        # One deadline for the write and all its replies (not a timer for the write, then one per reply); the write
        # and the reads themselves wait forever (math.inf: redis-py's "no per-read timeout") inside it.
        async with asyncio.timeout(conn.socket_timeout or None):
            await send_under_deadline(conn, conn.pack_commands(cmds))
            for _ in cmds:
                try:
                    out.append(await conn.read_response(timeout=math.inf))
                except ResponseError as e:
                    out.append(e)
        return out

    async def _drop(self) -> None:
        """Disconnect the pipe's connection (its stream can no longer be trusted) and hand it back to the pool, which
        connects it again when it is next used."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.disconnect(nowait=True)
            except Exception as e:  # closing a broken socket: nothing left to save, but say so
                log.debug("redis_pipe_disconnect_failed", error=repr(e))
            await self.gateway.client.connection_pool.release(conn)

    @staticmethod
    def _fail(waiting: Sequence[_Waiting], err: BaseException) -> None:
        for w in waiting:
            if not w.fut.done():
                w.fut.set_exception(err)
