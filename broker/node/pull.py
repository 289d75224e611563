"""Pull consume: a client asks for up to N deliveries of a (topic, group) and waits up to W ms for them.

A connection gets one ``PullConsumer`` per (topic, group) it pulls from, registered with the group's dispatcher like
any subscription: its credit is what the oldest waiting pull still asks for, so the ``GroupDispatcher`` claims for it
round robin with the push consumers of the group, through the same claim script. Pulled deliveries live in the
consumer's ``inflight`` like pushed ones, so ack, nack, extend, lease expiry, retries, the DLQ and the requeue on
disconnect are the push paths, unchanged.

A pull is answered (``pulled``) by the first claim that finds anything for it, with what that claim took (at most
``min(max, delivery.claim_batch)``), or with no items when its wait runs out. Pulls of one (topic, group) are served
oldest first; a connection may have ``server.max_pulls_per_connection`` waiting at once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Protocol

from broker.core import protocol
from broker.core.config import Settings
from broker.core.errors import BrokerError, ForbiddenError, ProtocolError, UnavailableError
from broker.core.model import AckItem, Delivery, now_ms
from broker.node.auth import Principal
from broker.node.dispatch import Consumer, Dispatch
from broker.runtime import metrics


class Connection(Protocol):
    """What pulls need of their connection (a ``Session``): its parts, its consumers, and its public replies."""

    conn_id: str
    principal: Principal
    settings: Settings
    dispatch: Dispatch
    consumers: list[Consumer]

    def send(self, frame: str) -> None: ...

    def reply_error(self, e: BrokerError, ref: protocol.Ref = None, msg_id: str | None = None) -> None: ...

    def forbidden(self, verb: str, topic: str) -> ForbiddenError: ...

    def congested(self) -> bool: ...

    def holds(self, msg_id: str, receipt: str) -> bool: ...


class PendingPull:
    """One pull request waiting for its answer."""

    __slots__ = ("done", "lease_ms", "max", "ref", "timer", "wait_ms")

    def __init__(self, req: protocol.Pull, lease_ms: int) -> None:
        self.ref = req.ref
        self.max = req.max
        self.wait_ms = req.wait_ms
        self.lease_ms = lease_ms
        self.timer: asyncio.TimerHandle | None = None
        self.done = False


class PullFrame(str):
    """A ``pulled`` answer in the session's outbox. The writer sends it as the text it is; ``Session.unsent`` reads
    which deliveries it carries, so the ones never written go back uncounted on disconnect, as pushed ones do."""

    consumer: PullConsumer
    ids: tuple[str, ...]


class PullConsumer(Consumer):
    """The pulls of one connection on one (topic, group); also its own ``Outlet``."""

    __slots__ = ("_items", "_serving", "_stray", "dispatch", "pending", "session")
    pull = True

    def __init__(self, session: Connection, topic: str, group: str) -> None:
        d = session.settings.delivery
        # The prefetch is the ceiling on pulled deliveries held unsettled: pulls wait while it is reached.
        super().__init__(self, session.conn_id, topic, group, d.max_prefetch, d.lease_ms)
        self.session = session
        self.dispatch = session.dispatch
        self.pending: deque[PendingPull] = deque()
        self._serving: PendingPull | None = None  # the pull the claim in flight is for
        self._items: list[Delivery] = []  # handed over by the claim in flight
        self._stray: list[AckItem] = []

    # ---- what the GroupDispatcher calls -----------------------------------------------------------------------

    def credit(self, clock: Callable[[], int] = now_ms) -> int:
        if not self.pending:
            return 0
        free = super().credit(clock)
        if free <= 0:
            return 0
        p = self.pending[0]
        self._serving = p
        self.lease_ms = p.lease_ms  # the claim that follows uses this consumer's lease
        return min(p.max, free)

    def send_delivery(self, consumer: Consumer, delivery: Delivery) -> None:
        p = self._serving
        if p is None or p.done:  # its wait ran out while the claim was in flight: give it back, uncounted
            self.inflight.pop(delivery.id, None)
            self._stray.append(AckItem(delivery.id, delivery.receipt))
        else:
            self._items.append(delivery)

    def claimed(self, got: int) -> None:
        p, self._serving = self._serving, None
        if self._stray:
            self.dispatch.release_items(self.topic, self.group, self._stray)
            self._stray = []
        items, self._items = self._items, []
        if p is not None and not p.done and (items or p.wait_ms == 0):
            self._answer(p, items)

    def congested(self) -> bool:
        return self.session.congested()

    def holds(self, msg_id: str, receipt: str) -> bool:
        return self.session.holds(msg_id, receipt)

    def delivery_paused(self, topic: str, group: str, err: BrokerError) -> None:
        """Claims for the group fail (Redis down): every waiting pull is told so now rather than answered empty."""
        while self.pending:
            self._fail(self.pending[0], err)

    # ---- requests ---------------------------------------------------------------------------------------------

    def add(self, req: protocol.Pull, lease_ms: int) -> None:
        p = PendingPull(req, lease_ms)
        if req.wait_ms == 0 and (self.pending or super().credit(self.dispatch.clock) <= 0):
            self.pending.append(p)  # no wait, and it cannot be served right now: answered empty at once
            self._answer(p, [])
            return
        if req.wait_ms > 0:
            p.timer = asyncio.get_running_loop().call_later(req.wait_ms / 1000, self._expire, p)
        self.pending.append(p)
        gd = self.dispatch.dispatchers.get((self.topic, self.group))
        if gd is not None:
            gd.wake.set()

    def _expire(self, p: PendingPull) -> None:
        if not p.done:
            self._answer(p, [])

    def _finish(self, p: PendingPull) -> None:
        p.done = True
        if p.timer is not None:
            p.timer.cancel()
        if self.pending and self.pending[0] is p:
            self.pending.popleft()
        else:
            self.pending.remove(p)

    def _answer(self, p: PendingPull, items: list[Delivery]) -> None:
        self._finish(p)
        frame = PullFrame(protocol.pulled(p.ref, self.topic, self.group, [protocol.message_bytes(d) for d in items]))
        frame.consumer = self
        frame.ids = tuple(d.id for d in items)
        metrics.child(metrics.pulls, "messages" if items else "empty").inc()
        self.session.send(frame)

    def _fail(self, p: PendingPull, err: BrokerError) -> None:
        self._finish(p)
        metrics.child(metrics.pulls, "error").inc()
        self.session.reply_error(err, p.ref)

    def close(self) -> None:
        """The connection ended: waiting pulls are dropped without an answer (nobody is left to read it)."""
        for p in self.pending:
            p.done = True
            if p.timer is not None:
                p.timer.cancel()
        self.pending.clear()


async def handle_pull(session: Connection, req: protocol.Pull) -> None:
    """Check a ``pull`` request (a refusal raises its ``BrokerError``) and queue it on the connection's pull consumer
    for its (topic, group)."""
    if not session.principal.may_subscribe(req.topic):
        raise session.forbidden("pull from", req.topic)
    s = session.settings
    pullers = [c for c in session.consumers if isinstance(c, PullConsumer) and c.active]
    cap = s.server.max_pulls_per_connection
    if sum(len(c.pending) for c in pullers) >= cap:
        raise ProtocolError(f"more than server.max_pulls_per_connection ({cap}) pulls waiting")
    dispatch = session.dispatch
    if dispatch.stopping:
        raise UnavailableError("broker shutting down", retry_after_ms=1_000)
    pc = next((c for c in pullers if c.topic == req.topic and c.group == req.group), None)
    if pc is None:
        pairs = {(c.topic, c.group) for c in session.consumers if c.active}
        limit = s.server.max_subscriptions_per_connection
        if len(pairs | {(req.topic, req.group)}) > limit:
            raise ProtocolError(f"more than server.max_subscriptions_per_connection ({limit}) on one connection")
        pc = PullConsumer(session, req.topic, req.group)
        await dispatch.add(pc)
        session.consumers.append(pc)
    gd = dispatch.dispatchers.get((req.topic, req.group))
    if gd is not None and gd.paused_reason is not None:
        raise UnavailableError(f"delivery paused: {gd.paused_reason}", retry_after_ms=1_000)
    pc.add(req, req.lease_ms or s.delivery.lease_ms)
