"""One pipelined Redis connection for the script calls: callers queue their ``EVALSHA``s, everything queued goes in
one write and the replies are taken in order.

Why: through redis-py's client every call pays its execute path (pool checkout, retry wrapper, command parsing,
packing, a socket write and a wake-up per call), about a tenth of the broker's CPU per message. Here a call costs a
queue append and a future; every call queued while the previous batch was in Redis goes in the next write (so
batches grow with load and cost nothing extra when idle).

Two ways to run a batch, one switch (``_kick``), everything else shared (the queue, ``_take``, riders, NOSCRIPT,
the answers):

- **The protocol path** (the usual one): ``run`` packs and writes a batch at once when none is in flight, and the
  connection's ``Replies`` protocol (``pipe_wire.py``: a ``hiredis.Reader`` fed in ``data_received``) hands each
  reply over as it completes; the reply that completes a batch answers its callers' futures and writes the next
  batch, there and then. No task, no ``Event``, no ``StreamReader``: at a low rate, where every message travels
  alone, a script call costs one write, one read and no loop turn of its own (it was 2-3 more: the writer woken, the
  reply waking the writer, the callers' futures set from it). The breaker is asked without an await
  (``Breaker.begin``/``end``), the deadline is one loop timer for all batches (armed at the batch in flight's, moved
  on when it fires; never one per batch), the latency metric and the error translation are ``Gateway``'s.
- **The writer task** (``_write_loop``: the batch through ``Gateway.call``, written with ``send_packed_command``,
  replies read with redis-py's ``read_response``) connects: the first batch, and the first after a dropped
  connection, go this way; when it is answered the connection is taken over (``pipe_wire.take_over``) and the task
  ends. Where the protocol path cannot serve, every batch goes this way, as before: ``rediss://`` (TLS), a client
  whose connections are not the hiredis-packing ones (no hiredis, fakeredis), a gateway on a cluster (no one
  breaker; the pipe is not used there anyway), or ``ScriptPipe(callbacks=False)``.

The connection is one of the client's pool, checked out for the pipe as before (no client added to Redis), set up by
redis-py (AUTH, HELLO, SELECT, CLIENT SETINFO, timeouts: the pool's ``connection_kwargs``) before it is taken over.

- **Order**: one batch is in Redis at a time and calls are sent in the order queued, so two calls queued one after
  the other run in that order (a publish before the claim that rides on it, an ack flush before the next). One
  exception: a call answered NOSCRIPT (below) runs again after the rest of its batch, so after the calls queued behind
  it in that batch (only after a Redis restart or ``SCRIPT FLUSH``; never after a later batch).
- **Breaker**: one batch is one breaker call (``Gateway.call``, or ``Breaker.begin``/``end`` on the protocol path): a
  batch that times out or loses its connection is one failure, a batch that was answered is one success, whatever its
  error replies (they are values, for the caller; but not those redis-py takes for a connection error: ``LOADING``,
  ``NOAUTH``, ``WRONGPASS``, max clients, alone or first in an array, which drop the connection as below); an open
  breaker answers the batch's callers ``unavailable`` with
  its ``retry_after`` at once, unsent; in half-open the batch is the one trial.
- **Timeouts**: the batch runs inside the breaker's call timeout, and it is written and its replies are read within
  ``redis.socket_timeout_ms`` (one deadline for both; on the protocol path the batch's deadline is the nearer of the
  two, from its write); either drops the connection (its stream can no longer be
  trusted) and fails every waiter of the batch with ``unavailable``. Calls queued behind it go out in the next batch
  on a new connection (or are refused at once by an open breaker). So a hung Redis answers a caller after at most the
  batch in flight plus its own, as before.
- **A dropped connection** (reset, EOF, a reply that cannot be parsed) fails every waiter of the batch in flight with
  ``unavailable`` (its calls may have run: the callers treat that as today, e.g. a claim's deliveries are
  reconciled); the next batch reconnects. A connection that ends while no batch is in flight costs no breaker failure.
- **A call that cannot be sent** (a caller's bug: no keys, an argument that cannot be packed) is found before the
  breaker is asked: its caller alone hears an internal error (``BrokerError``, logged and counted in
  ``broker_store_errors_total{op="script_pipe",kind="bad_call"}``); the rest of its batch goes, the breaker and the
  connection never see it. Whatever fails after the breaker was asked ends that breaker call (a half-open trial is
  never left held) and answers the batch's callers. A reply that comes with no batch in flight is logged as an error,
  counted (``kind="unexpected_reply"``) and drops the connection.
- **NOSCRIPT** (a Redis restart or ``SCRIPT FLUSH``): the calls answered so are sent again behind a ``SCRIPT LOAD``
  of their scripts in one more write, within the same batch; they did not run the first time.
- A caller that gives up (cancelled) before its calls were taken loses nothing: they are skipped, never sent. (On the
  protocol path calls are taken at once when no batch is in flight: only calls queued behind one can be skipped.)
- **Close** answers every caller still waiting, the batch in flight included, ``unavailable`` (not a breaker outcome)
  and gives the connection back to the pool; with a batch in flight its socket is aborted first, so nothing of it
  still buffered reaches Redis after its callers were told.
- **Riders** (``run(..., ride=True)``: acks nobody waits on) are not worth a round trip of their own: they wait for the
  next batch that goes anyway (a publish, a claim) and share its write, or for ``RIDE_S`` at the longest. At a low
  rate, where every message travels alone, an ack then costs no write, read or wake-up of its own, in the broker or
  in Redis. A call that is not a rider (or ``send_riders``) sends every rider queued with it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.core.errors import BrokerError, UnavailableError
from broker.runtime import metrics
from broker.runtime.resilience import Breaker, BreakerOpenError
from broker.runtime.supervisor import watch_task
from broker.store.connection import pack, send_under_deadline
from broker.store.gateway import Gateway
from broker.store.pipe_wire import Replies, take_over

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


@dataclass(slots=True)
class _InFlight:
    """The batch written on the protocol path, waiting for its replies (``expected`` of them, in ``replies``)."""

    batch: list[_Waiting]
    calls: list[ScriptCall]
    cmds: list[tuple[Any, ...]]
    what: str
    trial: bool  # the breaker's half-open trial (``Breaker.begin``)
    t0: float  # perf_counter at the write (the latency metric)
    deadline: float  # loop time
    replies: list[Any]
    expected: int
    again: list[int] | None = None  # the calls answered NOSCRIPT, sent again behind ``loads`` script loads
    loads: int = 0


class ScriptPipe:
    def __init__(
        self, gateway: Gateway, max_calls: int = MAX_BATCH_CALLS, ride_s: float = RIDE_S, callbacks: bool = True
    ) -> None:
        """``callbacks``: read replies in a protocol callback where the connection allows it (see the module);
        False keeps the writer task for every batch (tests compare the two)."""
        self.gateway = gateway
        self._callbacks = callbacks
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
        self._wire: Replies | None = None  # the connection read in callbacks (None: the writer task reads)
        self._flight: _InFlight | None = None
        self._timer: asyncio.TimerHandle | None = None  # at the deadline of the batch in flight (or an earlier one's)
        self._releasing: set[asyncio.Task[None]] = set()
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
            self._pump()  # written now (protocol path), or the writer task started to connect
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
        err = UnavailableError("redis connection closed (shutdown)", retry_after_ms=1_000)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        flight, self._flight = self._flight, None
        if flight is not None:  # neither a success nor a failure of Redis: as a cancelled call
            self._fail(flight.batch, err)
            # its unsent bytes must not reach Redis after its callers were told "shutdown", nor a half-read stream
            # go back to redis-py: the transport is aborted (not closed gracefully, which drains the write buffer)
            self._drop_wire()
            self._end(flight, None, counted=False)
        self._fail_queued(err)
        await self._drop()
        for t in list(self._releasing):
            with contextlib.suppress(Exception):
                await t

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
                if self._hand_over():
                    break
        except BaseException as e:  # cancelled (close) or a bug: no waiter is left hanging
            err = e if isinstance(e, Exception) else UnavailableError("redis connection closed", retry_after_ms=1_000)
            self._fail(batch, err)
            self._fail_queued(err)
            raise
        finally:
            self._task = None
        self._pump()  # what was queued meanwhile goes on the protocol path

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
        self._answer(batch, replies)

    async def _exchange(self, calls: list[ScriptCall]) -> list[Any]:
        """One write of every call, the replies read in order (error replies in place); the calls answered
        NOSCRIPT once more behind a load of their scripts. Any failure drops the connection."""
        conn = self._conn
        if conn is None:
            # one of the client's pooled connections, kept for the pipe (an idle one when there is: the pipe adds no
            # client to Redis, whose every client costs memory that counts against maxmemory)
            conn = self._conn = await self.gateway.client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            cmds = [_evalsha(c) for c in calls]
            replies = await self._send(conn, cmds)
            again, load = _reloads(calls, replies)
            if again:
                retried = await self._send(conn, [*load, *(cmds[i] for i in again)])
                for i, x in zip(again, retried[len(load) :], strict=True):
                    replies[i] = x
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
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.give_back()
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._release(conn)

    # ---- the protocol path: batches written at once, replies taken in ``Replies.data_received`` --------------

    def _hand_over(self) -> bool:
        """After a batch the writer task ran: move the connection to the protocol path if it can serve (then the
        task ends; it runs again only to connect)."""
        conn = self._conn
        if not self._callbacks or conn is None or self._closed or not isinstance(self.gateway.breaker, Breaker):
            return False
        self._wire = take_over(conn, self._on_reply, self._on_lost)
        return self._wire is not None

    def _pump(self) -> None:
        """Write the next batch if none is in flight (from ``run``, a rider's timer, or the reply that ended the
        previous batch); without a connection, the writer task connects and runs it."""
        while self._flight is None and (self._urgent or self._riders_due) and not self._closed:
            if self._wire is None:
                if self._task is None:
                    self._wake = asyncio.Event()
                    self._task = watch_task(asyncio.create_task(self._write_loop(), name="redis-pipe"))
                return
            batch = self._take()
            if batch:
                self._write(batch)

    def _write(self, batch: list[_Waiting]) -> None:
        breaker = self.gateway.breaker
        assert isinstance(breaker, Breaker) and self._wire is not None and self._conn is not None
        # Everything that can fail on a caller's calls (a call that cannot be packed: DataError, keys=None...) is done
        # before the breaker is asked: such a caller alone hears it, the rest of the batch goes, and neither the
        # breaker nor the connection sees it.
        kept: list[_Waiting] = []
        calls: list[ScriptCall] = []
        cmds: list[tuple[Any, ...]] = []
        packed: list[bytes] = []
        for w in batch:
            try:
                wc = [_evalsha(c) for c in w.calls]
                wp = [pack(c) for c in wc]
            except Exception as e:  # a bug of that caller's: told to it, logged and counted
                log.error("redis_pipe_bad_call", what=w.what, error=repr(e))
                metrics.child(metrics.store_errors, w.what, "bad_call").inc()
                self._fail([w], BrokerError(f"internal error: {w.what} could not be sent to redis ({e!r})"))
                continue
            kept.append(w)
            calls.extend(w.calls)
            cmds.extend(wc)
            packed.extend(wp)
        if not kept:
            return
        batch = kept
        what = batch[0].what if len(batch) == 1 else "batch"
        try:
            trial = breaker.begin()
        except BreakerOpenError as e:  # refused at once, never sent
            self._fail(batch, self.gateway.unavailable(e, what))
            return
        # From here every failure ends the breaker call it began (``_lose``): a half-open trial is never left held.
        flight = _InFlight(batch, calls, cmds, what, trial, time.perf_counter(), math.inf, [], len(cmds))
        try:
            loop = asyncio.get_running_loop()
            # today's two limits, the socket timeout over the write and its replies, the breaker's over the call
            limits = [t for t in (self._conn.socket_timeout, breaker.call_timeout_s) if t]
            flight.deadline = loop.time() + min(limits) if limits else math.inf
            self._flight = flight
            self._wire.write(b"".join(packed))
            if self._timer is None and flight.deadline != math.inf:
                self._timer = loop.call_at(flight.deadline, self._on_deadline)
        except BaseException as e:  # a transport gone, or a bug: the batch fails as a lost one, the trial is ended
            self._lose(flight, e if isinstance(e, Exception) else RedisConnectionError(repr(e)))
            if not isinstance(e, Exception):
                raise

    def _on_reply(self, reply: Any) -> None:
        flight = self._flight
        if flight is None:  # a reply nobody asked for: the stream cannot be trusted
            log.error("redis_pipe_unexpected_reply", reply=repr(reply)[:200])
            metrics.child(metrics.store_errors, "script_pipe", "unexpected_reply").inc()
            self._lose_wire(RedisConnectionError("redis sent a reply the script pipe did not ask for"))
            return
        try:
            self._take_reply(flight, reply)
        except Exception as e:  # a bug here: the batch's callers hear it, the stream (half read) is dropped
            log.error("redis_pipe_reply_failed", what=flight.what, calls=len(flight.calls), error=repr(e))
            metrics.child(metrics.store_errors, "script_pipe", "internal").inc()
            if self._flight is flight:
                self._lose(flight, e, internal=True)

    def _take_reply(self, flight: _InFlight, reply: Any) -> None:
        # An error reply redis-py's parser raises as a connection error (LOADING, NOAUTH, WRONGPASS, max clients;
        # alone or first in an array: redis/_parsers/hiredis.py) is an outage, not a value for the caller.
        first = reply[0] if isinstance(reply, list) and reply else reply
        if isinstance(first, RedisConnectionError):
            self._lose(flight, first)
            return
        flight.replies.append(reply)
        if len(flight.replies) < flight.expected:
            return
        replies = flight.replies
        if flight.again is None:
            again, load = _reloads(flight.calls, replies)
            if again:  # load the scripts and send the calls again, within the batch
                flight.again, flight.loads = again, len(load)
                flight.expected += len(load) + len(again)
                assert self._wire is not None
                self._wire.write(b"".join([pack(c) for c in [*load, *(flight.cmds[i] for i in again)]]))
                return
        else:
            n = len(flight.cmds)
            for i, x in zip(flight.again, replies[n + flight.loads :], strict=True):
                replies[i] = x
            del replies[n:]
        self._flight = None
        self._answer(flight.batch, replies)  # the callers first: whatever the breaker does, none is left waiting
        try:
            self._end(flight, None)
        finally:
            self._pump()

    def _on_lost(self, err: Exception) -> None:
        """The connection ended (EOF, reset, garbage) while attached."""
        self._lose_wire(err)

    def _on_deadline(self) -> None:
        self._timer = None
        flight = self._flight
        if flight is None:
            return
        loop = asyncio.get_running_loop()
        if flight.deadline > loop.time():
            self._timer = loop.call_at(flight.deadline, self._on_deadline)
            return
        self._lose(flight, RedisTimeoutError("Timeout reading from redis (script pipe)"))

    def _lose_wire(self, err: Exception) -> None:
        flight = self._flight
        if flight is not None:
            self._lose(flight, err)
        else:  # idle: no caller and no breaker outcome; the next batch reconnects
            log.info("redis_pipe_connection_closed_idle", error=repr(err))
            self._drop_wire()
            self._pump()

    def _lose(self, flight: _InFlight, err: Exception, *, internal: bool = False) -> None:
        """The batch in flight failed without its answer (timeout, connection lost): one failure of the breaker,
        every waiter answered ``unavailable``, the connection dropped; the next batch reconnects. ``internal``: a
        bug of the pipe's, not Redis's: the callers hear an internal error, the breaker no outcome."""
        self._flight = None
        self._drop_wire()
        if internal:
            self._fail(flight.batch, BrokerError(f"internal error during {flight.what} ({err!r})"))
        else:
            self._fail(flight.batch, self.gateway.unavailable(err, flight.what))
        try:
            self._end(flight, None if internal else err, counted=not internal)
        finally:
            self._pump()

    def _end(self, flight: _InFlight, err: Exception | None, *, counted: bool = True) -> None:
        """The breaker's outcome and the latency metric of a batch on the protocol path (as ``Gateway.call``)."""
        metrics.child(metrics.redis_latency, flight.what).observe(time.perf_counter() - flight.t0)
        breaker = self.gateway.breaker
        assert isinstance(breaker, Breaker)
        breaker.end(flight.trial, err, counted=counted)

    def _drop_wire(self) -> None:
        """Drop the protocol path's connection at once (no await); redis-py closes it and the pool takes it back in
        a task."""
        wire, self._wire = self._wire, None
        conn, self._conn = self._conn, None
        if wire is not None:
            wire.give_back()
            if wire.transport is not None:
                wire.transport.abort()
        if conn is not None:
            task = watch_task(asyncio.get_running_loop().create_task(self._release(conn), name="redis-pipe-release"))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)

    async def _release(self, conn: AbstractConnection) -> None:
        try:
            await conn.disconnect(nowait=True)
        except Exception as e:  # closing a broken socket: nothing left to save, but say so
            log.debug("redis_pipe_disconnect_failed", error=repr(e))
        await self.gateway.client.connection_pool.release(conn)

    def _answer(self, batch: Sequence[_Waiting], replies: list[Any]) -> None:
        """A batch was answered: each waiter gets its calls' replies (one breaker call, counted in ``batches``)."""
        self.batches += 1
        i = 0
        for w in batch:
            n = len(w.calls)
            if not w.fut.done():
                w.fut.set_result(replies[i : i + n])
            i += n

    @staticmethod
    def _fail(waiting: Sequence[_Waiting], err: BaseException) -> None:
        for w in waiting:
            if not w.fut.done():
                w.fut.set_exception(err)


def _evalsha(call: ScriptCall) -> tuple[Any, ...]:
    script, keys, args = call
    return ("EVALSHA", script.sha, len(keys), *keys, *args)


def _reloads(calls: Sequence[ScriptCall], replies: list[Any]) -> tuple[list[int], list[tuple[Any, ...]]]:
    """The calls answered NOSCRIPT (their indexes) and the ``SCRIPT LOAD`` of their scripts, once each: sent before
    those calls go again (a Redis restart or ``SCRIPT FLUSH``; they did not run)."""
    again = [i for i, x in enumerate(replies) if isinstance(x, NoScriptError)]
    if not again:
        return again, []
    scripts = list({calls[i][0].sha: calls[i][0] for i in again}.values())
    log.info("redis_scripts_loaded", scripts=len(scripts), calls=len(again))
    return again, [("SCRIPT", "LOAD", s.script) for s in scripts]
