"""One WebSocket connection: frames in -> broker operations, replies and deliveries out (an ``Outlet``).

The reader never waits on Redis for a publish: publishes go to the node's ``Publisher`` and their confirmations
are sent when Redis has them, so one connection can keep up to ``max_unconfirmed_publishes`` in flight. Outgoing
frames go through one bounded outbox; a consumer whose outbox is over the high-water mark gets no new deliveries.

Frames in are served in the connection's read callback (``take_frame``, offered by ``node/server``'s
``BrokerConnection``) whenever that needs no waiting and nothing is queued ahead of them: no task wake-up per frame.
A request that may wait (subscribe, pull, status, a publish over the window) is declined there and served by the
reader task, and every frame behind it waits its turn on that path, so frames are always served in order. Frames out
are written by ``_flush``, scheduled once per loop turn by whatever queues one, not by a writer task.

A session gets the few parts of the node it works with (``SessionParts``), not the node. ``pull`` and ``status``
requests answer through its public side: ``send``, ``reply_error``, ``forbidden``.

A shutdown closes a session with ``goodbye``: every publish it took is answered (``published`` or ``unavailable``,
never left without an answer) and those answers and the other replies queued so far leave before the close frame;
deliveries not written yet are withheld and given back uncounted.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK
from websockets.protocol import OPEN

from broker.core import protocol
from broker.core.config import Settings
from broker.core.errors import (
    BrokerError,
    ForbiddenError,
    NotFoundError,
    ProtocolError,
    RateLimitedError,
    StaleReceiptError,
    UnavailableError,
)
from broker.core.limits import TokenBucket
from broker.core.model import AckItem, Delivery, NackItem, PublishResult
from broker.core.protocol import Limits
from broker.node.auth import ANONYMOUS, Principal
from broker.node.dispatch import Consumer, Dispatch
from broker.node.publish import Publisher
from broker.node.pull import PullConsumer, PullFrame, handle_pull
from broker.node.status import handle_status
from broker.runtime import metrics
from broker.runtime.supervisor import watch_task
from broker.store import NackOutcome, RedisStore

log = structlog.get_logger("broker.session")
_conn_seq = itertools.count(1)
WRITE_BURST = 256  # most frames written per socket write
# Requests the read callback serves at once (``Session.take_frame``); the others (subscribe, pull, status) may
# wait on Redis or on a semaphore and go through the reader task. Publishes are served at once while the connection
# has room for more unconfirmed ones.
_NOW = frozenset({protocol.Publish, protocol.PublishBatch, protocol.Ack, protocol.Nack, protocol.Extend,
                  protocol.Unsubscribe, protocol.Ping})  # fmt: skip
_PUBLISHES = (protocol.Publish, protocol.PublishBatch)
_FRAMES_OUT = metrics.tally(metrics.frames_out)
LOOKUPS_IN_FLIGHT = 8  # status requests of one connection reading Redis at once; beyond it the reader waits
# Codes with a counter of their own (broker_stale_receipts_total, broker_publish_failed_total), not counted again in
# broker_frame_errors_total (docs/operations.md).
_OWN_COUNTER = frozenset({StaleReceiptError.code, NotFoundError.code})


class _Marker(str):
    """An outbox entry that is no frame (compared by identity)."""


_GOODBYE = _Marker("goodbye")  # the writer stops at it: every frame queued before it has been written (``goodbye``)


@dataclass(frozen=True)
class SessionParts:
    """What a connection works with on its node."""

    settings: Settings
    limits: Limits  # what a frame may hold
    publisher: Publisher
    dispatch: Dispatch
    store: RedisStore  # read-only lookups (``status``)


class Session:
    def __init__(
        self, parts: SessionParts, ws: ServerConnection, conn_id: str, principal: Principal = ANONYMOUS
    ) -> None:
        self.settings = parts.settings
        self.publisher = parts.publisher
        self.dispatch = parts.dispatch
        self.store = parts.store
        self.principal = principal
        self.ws = ws
        self.conn_id = conn_id
        self.log = log.bind(conn_id=conn_id)
        s = parts.settings
        self.limits = parts.limits
        self.high_water = s.server.outbox_high_water
        self.out: deque[str | tuple[Consumer, Delivery]] = deque()
        self._loop = asyncio.get_running_loop()
        # node/server's BrokerConnection frames text itself; any other connection through websockets' protocol
        self._write_texts = getattr(ws, "write_texts", None) or self._write_through_protocol
        self._flush_due = False  # a flush of the outbox is scheduled (call_soon) for this loop turn
        self._leaving = False  # goodbye() started: deliveries are withheld, not written
        self._withheld: list[str | tuple[Consumer, Delivery]] = []  # deliveries kept back by goodbye() (unsent)
        self._written_all = asyncio.Event()  # the writer reached the goodbye marker
        self._max_unconfirmed = s.server.max_unconfirmed_publishes
        self._unconfirmed = 0  # publishes of this connection not answered yet
        self._room = asyncio.Event()  # set while _unconfirmed < _max_unconfirmed
        self._room.set()
        self.lookups = asyncio.Semaphore(LOOKUPS_IN_FLIGHT)
        self.consumers: list[Consumer] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._reading = False  # the reader task is serving a frame: later frames queue behind it (take_frame)
        self._declined: tuple[str, protocol.Request] | None = None  # parsed by take_frame, served by the reader
        self._frames_in: dict[type, metrics.Tally] = {}  # per request type
        self._was_congested = False
        self._bad_frames = 0
        self._abusive = False
        self._bucket = TokenBucket(s.server.publish_rate_per_s, s.server.publish_burst, time.monotonic())

    # ---- Outlet --------------------------------------------------------------------------------------------

    def send_delivery(self, consumer: Consumer, delivery: Delivery) -> None:
        if self._leaving:
            self._withheld.append((consumer, delivery))
            return
        self.out.append((consumer, delivery))
        if not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._flush)

    def holds(self, msg_id: str, receipt: str) -> bool:
        return self._find(msg_id, receipt) is not None

    def congested(self) -> bool:
        if len(self.out) >= self.high_water or self._closed:
            self._was_congested = True
            return True
        return False

    def delivery_paused(self, topic: str, group: str, err: BrokerError) -> None:
        self.send(
            protocol.reply(
                "paused", None, topic=topic, group=group, reason=err.message, retry_after_ms=err.retry_after_ms
            )
        )

    def delivery_resumed(self, topic: str, group: str) -> None:
        self.send(protocol.reply("resumed", None, topic=topic, group=group))

    # ---- I/O -----------------------------------------------------------------------------------------------

    def send(self, frame: str) -> None:
        if self._leaving and isinstance(frame, PullFrame):
            self._withheld.append(frame)
            return
        self.out.append(frame)
        if not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._flush)

    async def goodbye(self, code: int, reason: str) -> None:
        """Shutdown (the node's publisher is stopped first, so every publish of this connection gets its answer
        soon): wait for those answers, let every reply queued before them leave, then close with ``code``.
        Deliveries not written yet are withheld: given back uncounted when the session ends. Unbounded on its own
        (a client that reads nothing never takes the replies): the caller bounds it and aborts the connection."""
        self._leaving = True
        queued = list(self.out)
        self.out.clear()
        for item in queued:
            if isinstance(item, str) and not isinstance(item, PullFrame):
                self.out.append(item)
            else:
                self._withheld.append(item)
        while self._unconfirmed > 0 and not self._closed:  # noqa: ASYNC110 (each is answered within a loop turn)
            await asyncio.sleep(0.005)
        self.send(_GOODBYE)
        if not self._closed:
            await self._written_all.wait()
        await self.ws.close(code, reason)

    def _flush(self) -> None:
        """Write the outbox: scheduled once per loop turn by whatever queues a frame (``call_soon``, no writer task),
        so every frame queued in that turn leaves in one socket write (framed by the connection's ``write_texts``).
        Consecutive deliveries of batch subscriptions share one ``messages`` frame.

        Flow control as websockets' ``send_context`` does it: while the transport's buffer is over its high-water
        mark nothing is written (the outbox fills, the consumers' credit stops at ``outbox_high_water``) and the
        connection calls ``on_writable`` when it drains. A connection that is no longer open writes nothing: what is
        still queued is given back unsent when the session ends."""
        self._flush_due = False
        ws = self.ws
        out = self.out
        if not out or self._closed or self._written_all.is_set() or ws.protocol.state is not OPEN:
            return
        write = self._write_texts
        frames = 0
        try:
            while out and not ws.paused:
                texts: list[bytes] = []
                batch: list[bytes] = []
                for _ in range(min(len(out), WRITE_BURST)):
                    item = out.popleft()
                    if item is _GOODBYE:
                        self._written_all.set()
                        break
                    if isinstance(item, str):
                        data = item.encode()
                    else:
                        c, dv = item
                        if not (c.active and dv.id in c.inflight):
                            continue
                        if c.batch:
                            batch.append(protocol.message_bytes(dv))
                            continue
                        data = protocol.message_bytes(dv)
                    if batch:
                        texts.append(protocol.messages_bytes(batch))
                        batch = []
                    texts.append(data)
                if batch:
                    texts.append(protocol.messages_bytes(batch))
                if texts:
                    write(texts)
                    frames += len(texts)
                if self._written_all.is_set():
                    break  # goodbye: nothing after its marker is written
        except Exception as exc:  # a bug or a failed socket write: the connection is cut, as send_context does
            self.log.exception("write_failed")
            metrics.task_errors.inc()
            ws.set_connection_exc(exc)
            ws.transport.abort()
            return
        finally:
            _FRAMES_OUT.n += frames
        if self._was_congested and not out:
            self._was_congested = False
            for c in self.consumers:
                self.dispatch.wake(c.topic, c.group)

    def _write_through_protocol(self, texts: list[bytes]) -> None:
        for data in texts:
            self.ws.protocol.send_text(data)
        self.ws.send_data()

    async def run(self) -> None:
        ws = self.ws
        hooks: Any = ws if hasattr(ws, "frame_sink") else None  # a BrokerConnection (node/server) has the hooks
        close_reason = "client closed"
        idle = self.settings.server.idle_timeout_s
        if hooks is not None:
            hooks.on_writable = self._kick
            if idle <= 0:  # with an idle timeout every frame passes through recv(), which that timeout watches
                hooks.frame_sink = self.take_frame
        try:
            if idle <= 0:
                async for frame in ws:
                    self._reading = True
                    try:
                        await self.handle(frame)
                    finally:
                        self._reading = False
            else:
                while True:
                    try:
                        async with asyncio.timeout(idle):
                            frame = await self.ws.recv()
                    except TimeoutError:
                        close_reason = f"idle for {idle:g}s (server.idle_timeout_s)"
                        await self.ws.close(1000, "idle timeout")
                        break
                    await self.handle(frame)
        except ConnectionClosedOK:
            pass
        except ConnectionClosed as e:
            close_reason = f"connection lost: {e}"
        finally:
            self._closed = True
            if hooks is not None:
                hooks.frame_sink = None
                hooks.on_writable = None
            self._give_back("consumer disconnected")
            self.log.info("connection_closed", reason=close_reason, code=self.ws.close_code)

    def unsent(self) -> dict[Consumer, set[str]]:
        unsent: dict[Consumer, set[str]] = {}
        for item in itertools.chain(self.out, self._withheld):
            if not isinstance(item, str):
                unsent.setdefault(item[0], set()).add(item[1].id)
            elif isinstance(item, PullFrame):
                unsent.setdefault(item.consumer, set()).update(item.ids)
        return unsent

    def _give_back(self, reason: str) -> None:
        unsent = self.unsent()
        for c in self.consumers:
            if isinstance(c, PullConsumer):
                c.close()
            self.dispatch.requeue_all(c, unsent.get(c, set()), reason)

    def _spawn(self, coro: Any) -> None:
        t = watch_task(asyncio.create_task(coro))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ---- frames --------------------------------------------------------------------------------------------

    def _kick(self) -> None:
        if not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._flush)

    def take_frame(self, frame: str) -> bool:
        """The connection's read callback offers each text frame that has nothing queued ahead of it: served here
        at once when that needs no waiting (True), else declined (False) and served by the reader task in its
        turn (``handle``), with every frame behind it. No task, no wake-up of the reader, per frame."""
        if self._reading:
            return False
        if self._abusive:
            return True  # closing with 1008: nothing more from this client is served
        try:
            req = protocol.parse_frame(frame, self.limits)
        except ProtocolError:
            return False  # answered (and counted as a bad frame) by the reader
        t = type(req)
        if t not in _NOW or (t in _PUBLISHES and self._unconfirmed >= self._max_unconfirmed):
            self._declined = (frame, req)  # not parsed twice
            return False
        counted = self._frames_in.get(t)
        if counted is None:
            counted = self._frames_in[t] = metrics.tally(metrics.frames_in, t.__name__.lower())
        counted.n += 1
        try:
            if t is protocol.Publish:
                self._publish_now(req)  # type: ignore[arg-type]
            elif t is protocol.Ack:
                self._ack(req)  # type: ignore[arg-type]
            elif t is protocol.PublishBatch:
                self._publish_batch_now(req)  # type: ignore[arg-type]
            elif t is protocol.Nack:
                self._nack(req)  # type: ignore[arg-type]
            elif t is protocol.Extend:
                self._spawn(self._extend(req))  # type: ignore[arg-type]
            elif t is protocol.Unsubscribe:
                self._unsubscribe(req)  # type: ignore[arg-type]
            else:
                self.send(protocol.reply("pong", req.ref))
        except BrokerError as e:  # the request is refused as a whole (forbidden, rate limited, over a cap, ...)
            self.reply_error(e, req.ref)
        except Exception:  # a bug: the connection ends as when the reader task fails (1011), never silently
            self.log.exception("frame_failed", op=t.__name__.lower())
            metrics.task_errors.inc()
            self._abusive = True  # nothing more from this connection is served
            self._spawn(self.ws.close(1011, "internal error"))
        return True

    async def handle(self, frame: str | bytes) -> None:
        if self._abusive:
            return  # closing with 1008: nothing more from this client is served
        declined, self._declined = self._declined, None
        try:
            if declined is not None and declined[0] == frame:
                req = declined[1]
            else:
                req = protocol.parse_frame(frame, self.limits)
        except ProtocolError as e:
            metrics.frames_in.labels("invalid").inc()
            self.reply_error(e)
            self._bad_frames += 1
            if self._bad_frames > self.settings.server.max_bad_frames:  # abuse, not a mistake: 1008
                self._abusive = True
                self.log.warning("connection_closed_abuse", bad_frames=self._bad_frames)
                self._spawn(self.ws.close(1008, "too many invalid frames"))
            return
        op = type(req).__name__.lower()
        metrics.child(metrics.frames_in, op).inc()
        try:
            await self._serve(req)
        except BrokerError as e:  # the request is refused as a whole (forbidden, rate limited, over a cap, ...)
            self.reply_error(e, req.ref)

    async def _serve(self, req: protocol.Request) -> None:
        if isinstance(req, protocol.Publish):
            await self._publish(req)
        elif isinstance(req, protocol.PublishBatch):
            await self._publish_batch(req)
        elif isinstance(req, protocol.Ack):
            self._ack(req)
        elif isinstance(req, protocol.Nack):
            self._nack(req)
        elif isinstance(req, protocol.Extend):
            self._spawn(self._extend(req))
        elif isinstance(req, protocol.Subscribe):
            await self._subscribe(req)
        elif isinstance(req, protocol.Unsubscribe):
            self._unsubscribe(req)
        elif isinstance(req, protocol.Pull):
            await handle_pull(self, req)
        elif isinstance(req, protocol.Status):
            await self.lookups.acquire()  # backpressure, as for publishes: a flood of lookups stops the reader
            self._spawn(handle_status(self, req))
        else:
            self.send(protocol.reply("pong", req.ref))

    # ---- replies (also what pull and status answer through) -----------------------------------------------

    def reply_error(self, e: BrokerError, ref: protocol.Ref = None, msg_id: str | None = None) -> None:
        """An ``error`` frame for ``e`` (its class gives the code), answering ``ref`` / message ``msg_id``."""
        if e.code not in _OWN_COUNTER:
            metrics.child(metrics.frame_errors, e.code).inc()
        self.send(protocol.error_from(e, ref, msg_id))

    def forbidden(self, verb: str, topic: str) -> ForbiddenError:
        """The error for a request this connection's token may not make (logged: who tried what)."""
        self.log.info("request_forbidden", verb=verb, topic=topic, principal=self.principal.name)
        return ForbiddenError(f"token {self.principal.name!r} may not {verb} topic {topic!r}")

    def _take_rate(self, n: int) -> None:
        """Raises ``RateLimitedError`` when ``n`` publishes now would go over this connection's rate."""
        wait_ms = self._bucket.take(n, time.monotonic())
        if wait_ms:
            limit = self.settings.server.publish_rate_per_s
            raise RateLimitedError(
                f"over {limit:g} publishes/s on this connection; nothing stored", retry_after_ms=wait_ms
            )

    def _stale(self, op: str, ref: protocol.Ref, msg_id: str) -> None:
        metrics.stale.labels(op).inc()
        err = StaleReceiptError(f"{op} refused: this connection holds no lease for it under that receipt")
        self.reply_error(err, ref, msg_id)

    # ---- publish -------------------------------------------------------------------------------------------

    async def _publish(self, req: protocol.Publish) -> None:
        if not self.principal.may_publish(req.topic):
            raise self.forbidden("publish to", req.topic)
        self._take_rate(1)
        if self._unconfirmed >= self._max_unconfirmed:
            await self._wait_for_room()
        self._submit(req)

    def _publish_now(self, req: protocol.Publish) -> None:
        """``_publish`` when the connection has room (``take_frame``): the same checks, in the same order."""
        if not self.principal.may_publish(req.topic):
            raise self.forbidden("publish to", req.topic)
        self._take_rate(1)
        self._submit(req)

    def _submit(self, req: protocol.Publish) -> None:
        self._unconfirmed += 1
        self.publisher.submit_then(req.to_request(), self._published, req)

    async def _publish_batch(self, req: protocol.PublishBatch) -> None:
        self._batch_checks(req)
        if self._unconfirmed >= self._max_unconfirmed:
            await self._wait_for_room()
        self._submit_batch(req)

    def _publish_batch_now(self, req: protocol.PublishBatch) -> None:
        self._batch_checks(req)
        self._submit_batch(req)

    def _batch_checks(self, req: protocol.PublishBatch) -> None:
        for p in req.items:  # all or nothing: one forbidden topic refuses the frame
            if not self.principal.may_publish(p.topic):
                raise self.forbidden("publish to", p.topic)
        self._take_rate(len(req.items))

    def _submit_batch(self, req: protocol.PublishBatch) -> None:
        self._unconfirmed += len(req.items)  # a batch is let in whole: at most one batch over the limit
        submit = self.publisher.submit
        futs = [submit(p.to_request()) for p in req.items]
        self._spawn(self._batch_published(req, futs))

    async def _batch_published(self, req: protocol.PublishBatch, futs: list[asyncio.Future[PublishResult]]) -> None:
        """One ``published`` reply with a result per message, in order: ``{id, duplicate?}`` or ``{error}``."""
        done = await asyncio.gather(*futs, return_exceptions=True)
        self._confirmed(len(futs))
        results: list[dict[str, Any]] = []
        for res in done:
            if isinstance(res, BaseException):
                results.append({"error": protocol.error_fields(_publish_error(res))})
            else:
                results.append({"id": res.id, "duplicate": True} if res.duplicate else {"id": res.id})
        self.send(protocol.reply("published", req.ref, results=results))

    async def _wait_for_room(self) -> None:
        """Backpressure: the reader stops reading this client while too many of its publishes are in flight."""
        while self._unconfirmed >= self._max_unconfirmed:
            self._room.clear()
            await self._room.wait()

    def _confirmed(self, n: int) -> None:
        self._unconfirmed -= n
        if self._unconfirmed < self._max_unconfirmed:
            self._room.set()

    def _published(self, req: protocol.Publish, res: PublishResult | BaseException) -> None:
        """Confirm one publish, or answer why not (the ``Publisher`` has counted it either way). Called by the
        publisher's flush (``submit_then``)."""
        self._confirmed(1)
        if isinstance(res, BaseException):
            if not isinstance(res, BrokerError | asyncio.CancelledError):
                self.log.error("publish_failed", topic=req.topic, error=repr(res))
            self.reply_error(_publish_error(res), req.ref)
        else:
            self.send(protocol.published(req.ref, res.id, res.duplicate))

    def _find(self, msg_id: str, receipt: str) -> Consumer | None:
        for c in self.consumers:
            held = c.inflight.get(msg_id)
            if held is not None and held[0] == receipt:
                return c
        return None

    def _ack(self, req: protocol.Ack) -> None:
        """One waiter per consumer of the frame (normally one), not one per item; answered in the ack flush."""
        ride = req.ref is None  # nobody waits on the answer: the ack may share the next Redis write
        if len(req.items) == 1:  # the common frame: one delivery, no grouping needed
            it = req.items[0]
            c = self._find(it.id, it.receipt)
            if c is None:
                self._stale("ack", req.ref, it.id)
                return
            self.dispatch.ack_then(c, req.items, self._acked, (req.ref, [it.id]), ride=ride)
            return
        held: dict[Consumer, list[AckItem]] = {}
        for it in req.items:
            c = self._find(it.id, it.receipt)
            if c is None:
                self._stale("ack", req.ref, it.id)
                continue
            held.setdefault(c, []).append(it)
        if not held:
            return
        ids = [it.id for items in held.values() for it in items]
        if len(held) == 1:
            ((c, items),) = held.items()
            self.dispatch.ack_then(c, items, self._acked, (req.ref, ids), ride=ride)
            return
        futs = [self.dispatch.ack_many(c, items, ride=ride) for c, items in held.items()]
        self._spawn(self._acked_all(req.ref, futs, ids))

    async def _acked_all(
        self, ref: protocol.Ref, futs: list[asyncio.Future[list[bool | BaseException]]], ids: list[str]
    ) -> None:
        results: list[bool | BaseException] = []
        for f in futs:
            results += await f
        self._ack_answer(ref, ids, results)

    def _acked(self, arg: tuple[protocol.Ref, list[str]], results: list[bool | BaseException]) -> None:
        """The ack flush's answer to one ack frame (``Dispatch.ack_then``)."""
        self._ack_answer(arg[0], arg[1], results)

    def _ack_answer(self, ref: protocol.Ref, ids: list[str], results: list[bool | BaseException]) -> None:
        """Each refused item gets its own error frame; with a ref, ``acked`` then names the ids that were acked."""
        acked = []
        for msg_id, res in zip(ids, results, strict=True):
            if res is True:
                acked.append(msg_id)
            elif isinstance(res, asyncio.CancelledError):  # the broker is shutting down: not settled, say so
                self.reply_error(
                    UnavailableError("ack not confirmed (broker shutting down)", retry_after_ms=1_000), ref, msg_id
                )
            elif isinstance(res, BaseException):
                self.reply_error(res if isinstance(res, BrokerError) else BrokerError(repr(res)), ref, msg_id)
            else:
                self._stale("ack", ref, msg_id)
        if ref is not None and acked:
            self.send(protocol.reply("acked", ref, ids=acked))

    def _nack(self, req: protocol.Nack) -> None:
        c = self._find(req.id, req.receipt)
        if c is None:
            self._stale("nack", req.ref, req.id)
            return
        attempt = c.inflight[req.id][1]
        fut = self.dispatch.nack(c, NackItem(req.id, req.receipt, req.error, req.delay_ms, req.dead), attempt)
        fut.add_done_callback(partial(self._nacked, req))

    def _nacked(self, req: protocol.Nack, fut: asyncio.Future[NackOutcome]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self.reply_error(exc if isinstance(exc, BrokerError) else BrokerError(repr(exc)), req.ref, req.id)
            return
        outcome = fut.result()
        if outcome is NackOutcome.STALE:
            self._stale("nack", req.ref, req.id)
        elif req.ref is not None:
            self.send(protocol.reply("nacked", req.ref, id=req.id, outcome=outcome.value))

    async def _extend(self, req: protocol.Extend) -> None:
        c = self._find(req.id, req.receipt)
        if c is None:
            self._stale("extend", req.ref, req.id)
            return
        try:
            deadline = await self.dispatch.extend(c, req.id, req.receipt, req.lease_ms)
        except BrokerError as e:
            self.reply_error(e, req.ref, req.id)
            return
        if deadline is None:
            c.inflight.pop(req.id, None)
            self._stale("extend", req.ref, req.id)
        elif req.ref is not None:
            self.send(protocol.reply("extended", req.ref, id=req.id, lease_expires_at=deadline))

    async def _subscribe(self, req: protocol.Subscribe) -> None:
        for topic in req.topics:
            if not self.principal.may_subscribe(topic):
                raise self.forbidden("subscribe to", topic)
        cap = self.settings.server.max_subscriptions_per_connection
        active = {(c.topic, c.group) for c in self.consumers if c.active}
        if len(active | {(t, req.group) for t in req.topics}) > cap:
            raise ProtocolError(f"more than server.max_subscriptions_per_connection ({cap}) on one connection")
        d = self.settings.delivery
        prefetch = req.prefetch or d.prefetch
        lease_ms = req.lease_ms or d.lease_ms
        added = []
        for topic in req.topics:
            existing = [
                c for c in self.consumers if c.active and not c.pull and c.topic == topic and c.group == req.group
            ]
            if existing:  # already subscribed: idempotent, and the new prefetch/lease apply from the next claim
                existing[0].prefetch, existing[0].lease_ms, existing[0].batch = prefetch, lease_ms, req.batch
                self.dispatch.wake(topic, req.group)
                continue
            c = Consumer(self, self.conn_id, topic, req.group, prefetch, lease_ms)
            c.batch = req.batch
            await self.dispatch.add(c)  # a failure answers the request (the topics before it stay subscribed)
            self.consumers.append(c)
            added.append(topic)
        self.log.info("subscribed", topics=list(req.topics), group=req.group, prefetch=prefetch)
        self.send(
            protocol.reply(
                "subscribed", req.ref, topics=list(req.topics), group=req.group, prefetch=prefetch, lease_ms=lease_ms
            )
        )

    def _unsubscribe(self, req: protocol.Unsubscribe) -> None:
        n = 0
        for c in self.consumers:
            if c.active and not c.pull and c.topic in req.topics and c.group == req.group:
                self.dispatch.remove(c)  # deliveries already sent stay ackable until the connection closes
                unsent = self.unsent().get(c, set())
                if unsent:  # claimed but not written yet: back to the queue as they were, no attempt counted
                    back = [AckItem(i, c.inflight.pop(i)[0]) for i in unsent if i in c.inflight]
                    self.dispatch.release_items(c.topic, c.group, back)
                n += 1
        self.send(protocol.reply("unsubscribed", req.ref, topics=list(req.topics), group=req.group, removed=n))


def _publish_error(exc: BaseException) -> BrokerError:
    """The error a publish that failed with ``exc`` is answered with. Cancelled means the broker is shutting down:
    ``unavailable`` (retryable), never ``internal``."""
    if isinstance(exc, BrokerError):
        return exc
    if isinstance(exc, asyncio.CancelledError):
        return UnavailableError("publish cancelled (broker shutting down); not confirmed", retry_after_ms=1_000)
    return BrokerError(f"internal error: {exc!r}; not confirmed")


_NODE_PREFIX = os.urandom(2).hex()  # conn ids are unique across nodes and restarts (logs from many nodes merge)


def new_conn_id() -> str:
    return f"{_NODE_PREFIX}-c{next(_conn_seq)}"
