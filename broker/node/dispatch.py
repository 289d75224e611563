"""Per (topic, group) delivery loops on this node: credit from consumers' prefetch, batched claims, fan-out.

A ``Consumer`` is one subscription of one connection (or an in-process handler) to one (topic, group). The
``GroupDispatcher`` claims up to each consumer's free credit and hands the deliveries over; credit returns on ack,
nack or requeue. Acks and nacks from every consumer of a group are coalesced into one script call per flush.

Each ``GroupDispatcher`` also keeps **one timer** at the earliest time its group has work coming due (a retry or a
delayed message in its delayed set, a lease deadline), learnt from the scripts' replies: when it fires, one sweep
step for the group (expire + promote) moves exactly what is due and reports the next head, where the timer is armed
again; the group's loop is woken when something moved. So a due retry is claimed within milliseconds, and an idle
group with nothing due costs no Redis call (docs/design.md, "Timers").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

import structlog

from broker.core.config import Settings
from broker.core.errors import BrokerError, UnavailableError
from broker.core.model import AckItem, Delivery, NackItem, now_ms
from broker.runtime import metrics
from broker.runtime.batching import Coalescer
from broker.runtime.supervisor import Loop, Supervisor, watch_task
from broker.store import AckOutcome, ClaimRequest, NackOutcome, RedisStore, Swept

log = structlog.get_logger("broker.dispatch")
T = TypeVar("T")
# A group's timer fires at most once per this many ms (from one sweep step's start to the next): under load the retry
# set holds many due times a few milliseconds apart (S4: ~400 retries/s), and a step per due time was a step (two
# script calls, one round trip, a wake) per ~1.4 retries. With the gap a step moves everything due by then; a retry
# waits at most this much longer, and a lone one (no step in the last gap) not at all.
TIMER_GAP_MS = 5


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    """``event.wait()`` for at most ``timeout_s``. ``asyncio.timeout``, not ``wait_for``: on Python 3.11 ``wait_for``
    makes a task per call, and a delivery loop waits once or twice per message when messages come one by one. Like
    ``wait_for``, it always yields to the loop once, even when the event is already set."""
    if event.is_set():
        await asyncio.sleep(0)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()


class Outlet(Protocol):
    """Where a consumer's deliveries go (a WebSocket session)."""

    def send_delivery(self, consumer: Consumer, delivery: Delivery) -> None: ...

    def congested(self) -> bool: ...

    def holds(self, msg_id: str, receipt: str) -> bool:
        """True while one of this outlet's consumers holds a delivery under (msg_id, receipt)."""
        ...


_consumer_seq = itertools.count(1)


class Consumer:
    __slots__ = ("active", "batch", "group", "id", "inflight", "lease_ms", "outlet", "prefetch", "topic")
    pull: ClassVar[bool] = False  # a pull consumer (broker/pull.py) is told the outcome of each claim made for it

    def __init__(self, outlet: Outlet, conn_id: str, topic: str, group: str, prefetch: int, lease_ms: int) -> None:
        self.id = f"{conn_id}.{next(_consumer_seq)}"
        self.outlet = outlet
        self.topic = topic
        self.group = group
        self.prefetch = prefetch
        self.lease_ms = lease_ms
        # message id -> (receipt, attempt, lease deadline ms, published_at ms)
        self.inflight: dict[str, tuple[str, int, int, int]] = {}
        self.active = True
        self.batch = False  # deliveries go out as `messages` frames

    def credit(self, clock: Callable[[], int] = now_ms) -> int:
        """Deliveries this consumer may take now; ``clock`` (epoch ms, the dispatch's) tells expired leases."""
        if not self.active or self.outlet.congested():
            return 0
        free = self.prefetch - len(self.inflight)
        if free <= 0:
            # Leases that ran out are no longer this consumer's: Redis reschedules them, the credit comes back.
            now = clock()
            for msg_id in [i for i, (_, _, deadline, _) in self.inflight.items() if deadline < now]:
                del self.inflight[msg_id]
            free = self.prefetch - len(self.inflight)
        return free

    def claimed(self, got: int) -> None:
        """After a claim made for this consumer (its deliveries already handed over); only pull consumers care."""


class GroupDispatcher:
    def __init__(self, dispatch: Dispatch, topic: str, group: str) -> None:
        self.dispatch = dispatch
        self.topic = topic
        self.group = group
        self.pair = f"{topic}/{group}"  # its key in Dispatch.counts
        self.consumers: list[Consumer] = []
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.paused_reason: str | None = None
        self._rr = 0
        self.claiming = False  # a claim round of this loop is in flight
        self.eager: ClaimRequest | None = None  # a claim riding on a publish round trip (ride_claim)
        self.eager_over = asyncio.Event()  # set when that claim's answer has been handed over
        # The ready list may hold messages: cleared when a claim came back short (it was empty then), set by every
        # wake-up. While it is clear and the node's wake-up listener is subscribed, the idle poll calls no Redis:
        # whatever makes a message claimable wakes the loop (locally, or by a note on the topic's wake channel).
        self.maybe_ready = True
        # The timer: armed at ``due`` (epoch ms), the earliest work due that this node knows of; ``timed`` once a
        # sweep step of this group (the periodic sweep's first, then the timer's own) told its heads: from then on
        # the periodic sweep leaves the group to the timer, until the timer fails or the last consumer leaves.
        self.due: int | None = None
        self.quiet_until = 0  # (epoch ms, the dispatch clock) no step before: TIMER_GAP_MS after the last one began
        self.timed = False
        self.keyed = False  # it has delivered a message with an ordering key: its acks never ride (Dispatch.ack)
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self.task is None or self.task.done():
            sup = self.dispatch.supervisor
            poll_s = self.dispatch.settings.delivery.poll_interval_ms / 1000
            loop = sup.loop(f"dispatch:{self.topic}/{self.group}", poll_s)
            self.task = sup.run(loop, lambda: self._deliver(loop), self._should_run)
            self.task.add_done_callback(self._ended)

    def _should_run(self) -> bool:
        return not self.dispatch.stopping and bool(self.consumers)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self.task is task:
            self.task = None
            if not self.consumers:  # its last consumer left while the loop ran: nothing keeps the group here
                self.dispatch.forget(self)

    async def _deliver(self, loop: Loop) -> None:
        """Claim rounds while this node has consumers for the group. Redis unavailable: consumers get ``paused``
        once, the loop waits (the breaker's retry hint, at most 5 s) and sends ``resumed`` after the next good
        claim. Any other failure goes to the supervisor (logged, counted, backoff; /readyz after repeated ones)."""
        d = self.dispatch
        poll = loop.interval_s
        batch = d.settings.delivery.claim_batch
        while not d.stopping and self.consumers:
            loop.beat()
            if self.eager is not None:  # a publish is claiming for this group: one claim at a time keeps order
                loop.beat(poll)
                await _wait(self.eager_over, poll)
                if self.eager is None and not self.wake.is_set():  # nothing new meanwhile: back to waiting
                    loop.beat(poll)
                    await _wait(self.wake, poll)
                continue
            if not self.wake.is_set() and not self._poll_claims():
                loop.beat(poll)  # nothing can be waiting: no claim, only a wake-up or the next poll
                await _wait(self.wake, poll)
                continue
            self.wake.clear()  # before the round: a wake-up that arrives during it starts the next round
            self.maybe_ready = True
            try:
                self.claiming = True
                got_all = await self._claim_round(batch)
            except UnavailableError as e:
                if self.paused_reason is None:
                    log.warning("delivery_paused", topic=self.topic, group=self.group, reason=e.message)
                    self.paused_reason = e.message
                    d.notify_paused(self, e)
                metrics.store_errors.labels("claim", e.code).inc()
                wait = min(5.0, (e.retry_after_ms or 1000) / 1000)
                loop.beat(wait)
                await d.pause(wait)
                continue
            except Exception as e:
                wait = loop.failed(e)
                loop.beat(wait)
                await d.pause(wait)
                continue
            finally:
                self.claiming = False
            loop.succeeded()
            if self.paused_reason is not None:
                log.info("delivery_resumed", topic=self.topic, group=self.group)
                self.paused_reason = None
                d.notify_resumed(self)
            if got_all:
                await asyncio.sleep(0)  # let acks and publishes in
                continue
            loop.beat(poll)
            await _wait(self.wake, poll)

    def _poll_claims(self) -> bool:
        """Whether a poll (no wake-up came) claims: when the ready list may hold messages, when a wake-up note may
        have been missed (the listener is not subscribed), and always in a strict-order group (its claims wait on a
        lease held elsewhere, which no note announces)."""
        return self.maybe_ready or not self.dispatch.wakes_live or self.dispatch.store.is_strict(self.topic, self.group)

    async def _claim_round(self, batch: int) -> bool:
        """One claim per consumer with credit, round robin. True when every claim came back full."""
        full = True
        any_credit = False
        n = len(self.consumers)
        for i in range(n):
            c = self.consumers[(self._rr + i) % n]
            if not full:
                # The list was empty just now: the other consumers would claim nothing. A pull consumer is told so
                # (as after an empty claim of its own), so a pull that waits for nothing is answered now, not left
                # for a later round that, with nothing to wake it, may not come.
                if c.pull and c.credit(self.dispatch.clock) > 0:
                    c.claimed(0)
                continue
            want = min(c.credit(self.dispatch.clock), batch)
            if want <= 0:
                continue
            any_credit = True
            deliveries = await self.dispatch.store.claim(self.topic, self.group, want, c.lease_ms, c.id)
            if len(deliveries) < want:
                full = False
                self.maybe_ready = self.wake.is_set()  # it was empty (unless something arrived meanwhile)
            if deliveries:
                self._hand_over(c, deliveries)
            if c.pull:
                c.claimed(len(deliveries))
        self._rr = (self._rr + 1) % max(1, n)
        return any_credit and full

    # ---- a claim riding on a publish (broker/node/publish.py) ------------------------------------------------

    def ride_claim(self) -> tuple[Consumer, ClaimRequest] | None:
        """A claim for the next consumer with credit, to send with a publish, if this group is idle (no claim in
        flight, not paused, its loop running). Its loop then holds off until ``claim_rode`` hands the answer over."""
        if self.claiming or self.eager is not None or self.paused_reason or self.task is None:
            return None
        n = len(self.consumers)
        batch = self.dispatch.settings.delivery.claim_batch
        for i in range(n):
            c = self.consumers[(self._rr + i) % n]
            want = min(c.credit(self.dispatch.clock), batch)
            if want > 0:
                self._rr = (self._rr + i + 1) % n
                self.eager = ClaimRequest(self.topic, self.group, want, c.lease_ms, c.id)
                self.eager_over.clear()
                return c, self.eager
        return None

    def claim_rode(self, c: Consumer, req: ClaimRequest) -> None:
        """Hand over what a riding claim got (none if its publish failed) and let this group's loop claim again: at
        once when it came back full or failed (there may be more, or the loop must see the error)."""
        res = req.result
        try:
            # A short answer does not say the list is empty: when the publish's script had to be loaded (NOSCRIPT)
            # it was sent again after the claim had run, so the claim may not have seen it. The next poll claims.
            self.maybe_ready = True
            if isinstance(res, list):
                if res:
                    self._hand_over(c, res)
                if c.pull:
                    c.claimed(len(res))
        finally:  # whatever happened, the group's own loop takes over again
            self.eager = None
            self.eager_over.set()
            if not isinstance(res, list) or len(res) >= req.n:
                self.wake.set()

    def _hand_over(self, c: Consumer, deliveries: list[Delivery]) -> None:
        if not c.active:
            self.dispatch.release_later(self.topic, self.group, deliveries)
            return
        back = []
        deadline = min(dv.lease_expires_at for dv in deliveries)
        if deadline > self.dispatch.clock():
            self.arm(deadline)  # their leases' expiry
        for dv in deliveries:
            if c.outlet.holds(dv.id, dv.receipt):
                # A connection settles by (id, receipt) alone. Another group of this topic claimed the same message
                # in the same millisecond for this connection, so the receipts are equal: an ack could not say which
                # group it settles. Give this one back (attempt not counted); it is claimed again, new receipt.
                back.append(dv)
                continue
            c.inflight[dv.id] = (dv.receipt, dv.attempt, dv.lease_expires_at, dv.published_at)
            if dv.key:
                self.keyed = True
            c.outlet.send_delivery(c, dv)
        if back:
            self.dispatch.release_later(self.topic, self.group, back)
        sent = len(deliveries) - len(back)
        metrics.tally(metrics.delivered, self.topic, self.group).n += sent  # per message: a plain int (Tally)
        self.dispatch.count(self.pair, "delivered", sent)

    # ---- the timer -----------------------------------------------------------------------------------------

    def arm(self, due: int) -> None:
        """Make the timer fire at ``due`` (epoch ms) at the latest: it only ever moves earlier; a fire that finds
        nothing due costs one sweep step, which arms the timer at the true next head."""
        self.dispatch.note_due(self.topic, self.group, due)
        if not self.consumers or self.dispatch.stopping:
            return
        if self._timer is not None and self.due is not None and self.due <= due:
            return
        if self._timer is not None:
            self._timer.cancel()
        self.due = due
        delay = max(0.001, (max(due, self.quiet_until) - self.dispatch.clock()) / 1000)
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self.due, self.timed = None, None, False

    def _fire(self) -> None:
        due, self._timer, self.due = self.due, None, None
        if due is not None and due > self.dispatch.clock():  # early (the loop's clock is not the wall clock)
            self.arm(due)
            return
        self.quiet_until = self.dispatch.clock() + TIMER_GAP_MS
        self.dispatch.spawn(self._step())

    async def _step(self) -> None:
        """One sweep step for this group (expire + promote, atomic scripts, safe next to other nodes' sweeps)."""
        d = self.dispatch
        try:
            (swept,) = await d.store.sweep_due([(self.topic, self.group)])
        except Exception as e:
            # Not lost: the periodic sweep covers a group without a working timer; try again after its interval.
            code = e.code if isinstance(e, BrokerError) else "internal"
            metrics.store_errors.labels("timer", code).inc()
            if self.timed or code != "unavailable":  # an outage is loud already (breaker, /readyz): once
                log.warning(
                    "group_timer_failed",
                    topic=self.topic,
                    group=self.group,
                    error=e.message if isinstance(e, BrokerError) else repr(e),
                    exc_info=not isinstance(e, BrokerError),
                )
            self.timed = False
            self.arm(d.clock() + d.settings.delivery.sweep_interval_ms)
            return
        d.swept(self.topic, self.group, swept)


class Dispatch:
    """All dispatchers of this node, plus the coalesced ack/nack paths. ``clock`` (epoch ms) is the time the node
    reads for lease deadlines and latencies (tests step it; the store has its own)."""

    def __init__(
        self,
        store: RedisStore,
        settings: Settings,
        supervisor: Supervisor | None = None,
        *,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.supervisor = supervisor if supervisor is not None else Supervisor(settings.loops)
        self.dispatchers: dict[tuple[str, str], GroupDispatcher] = {}
        self.stopping = False
        self._stopped = asyncio.Event()  # cuts the waits of delivery loops short at shutdown
        # per group: (ack, ride) -> acked; ride: nobody waits on the answer (an ack frame without a ref)
        self._acks: dict[tuple[str, str], Coalescer[tuple[AckItem, bool], bool]] = {}
        self._nacks: dict[tuple[str, str], Coalescer[tuple[NackItem, int, str], NackOutcome]] = {}
        self._bg: set[asyncio.Task[None]] = set()
        self.wakes_live = False  # the node's wake-up listener is subscribed (recovery.py): idle polls need no claim
        # Per (topic, group): the earliest work due that this node knows of (epoch ms; None: none), from sweep
        # steps (exact) and from what this node did since (earlier only). The periodic sweep visits a group without
        # a timer here only when this is due or unknown (recovery.py).
        self.known_due: dict[tuple[str, str], int | None] = {}
        # totals since start, per "topic/group" (published: per topic), shown as rates by `broker stats`
        self.counts: dict[str, dict[str, int]] = {}

    def count(self, pair: str, what: str, n: int = 1) -> None:
        c = self.counts.get(pair)
        if c is None:
            c = self.counts[pair] = {}
        c[what] = c.get(what, 0) + n

    # ---- membership ----------------------------------------------------------------------------------------

    async def add(self, consumer: Consumer) -> None:
        await self.store.ensure_group(consumer.topic, consumer.group)
        key = (consumer.topic, consumer.group)
        gd = self.dispatchers.get(key)
        if gd is None:
            gd = self.dispatchers[key] = GroupDispatcher(self, consumer.topic, consumer.group)
        gd.consumers.append(consumer)
        gd.start()
        gd.wake.set()

    def remove(self, consumer: Consumer) -> None:
        consumer.active = False
        gd = self.dispatchers.get((consumer.topic, consumer.group))
        if gd is not None and consumer in gd.consumers:
            gd.consumers.remove(consumer)
            if not gd.consumers:
                gd.stop_timer()  # the periodic sweep covers the group again
                gd.wake.set()  # lets the loop see it has no consumers and end (then forgotten, ``_ended``)
                if gd.task is None or gd.task.done():
                    self.forget(gd)

    def forget(self, gd: GroupDispatcher) -> None:
        """A group without consumers here any more: drop its dispatcher and retire its idle ack and nack coalescers
        (each holds a parked flusher task). Otherwise every group ever consumed on this node (an ephemeral group per
        ``broker consume --ephemeral``) would stay, and each publish flush walks the dispatchers. A coalescer busy now,
        or a new one for a settlement that comes later (a delivery acked after its unsubscribe, the nacks of a consumer
        that left holding deliveries), ends once its queue is empty (``_let_go``)."""
        key = (gd.topic, gd.group)
        if gd.consumers or self.dispatchers.get(key) is not gd:
            return
        del self.dispatchers[key]
        ack_co = self._acks.get(key)
        if ack_co is not None and ack_co.retire():
            del self._acks[key]
        nack_co = self._nacks.get(key)
        if nack_co is not None and nack_co.retire():
            del self._nacks[key]

    def _let_go(self, key: tuple[str, str], table: dict[tuple[str, str], Any], co: Coalescer[Any, Any]) -> bool:
        """A settlement coalescer has emptied its queue: a group forgotten meanwhile (it was busy then, or the ack or
        nack came after the group's last consumer left, e.g. the redeliveries of a consumer that left holding
        messages) lets it go, so its flusher ends instead of parking for good."""
        if key in self.dispatchers:
            return False
        if table.get(key) is co:
            del table[key]
        return True

    def wake(self, topic: str, group: str | None = None) -> None:
        for (t, g), gd in self.dispatchers.items():
            if t == topic and (group is None or g == group):
                gd.wake.set()

    def wake_all(self) -> None:
        for gd in self.dispatchers.values():
            gd.wake.set()

    def arm(self, topic: str, due: int, group: str | None = None) -> None:
        """Work comes due at ``due`` (epoch ms) in these groups (all of the topic's with None): arm their timers,
        and tell the periodic sweep about the groups that have none here."""
        if group is not None:
            gd = self.dispatchers.get((topic, group))
            if gd is not None:
                gd.arm(due)
            self.note_due(topic, group, due)
            return
        for (t, _), gd in self.dispatchers.items():
            if t == topic:
                gd.arm(due)
        for t, g in list(self.known_due):
            if t == topic:
                self.note_due(t, g, due)

    def note_due(self, topic: str, group: str, due: int) -> None:
        key = (topic, group)
        if key in self.known_due:  # unknown stays unknown: the sweep visits it anyway
            known = self.known_due[key]
            self.known_due[key] = due if known is None else min(known, due)

    def sweep_wanted(self, topic: str, group: str, now: int) -> bool:
        """Whether the periodic sweep should visit the group now (its full pass aside): no timer here, and work is
        due or not known."""
        if self.timed(topic, group):
            return False
        key = (topic, group)
        if key not in self.known_due:
            return True
        due = self.known_due[key]
        return due is not None and due <= now

    def timed(self, topic: str, group: str) -> bool:
        """True while this node's timer keeps the group's due work moving (the periodic sweep may leave it)."""
        gd = self.dispatchers.get((topic, group))
        return gd is not None and gd.timed and bool(gd.consumers)

    def swept(self, topic: str, group: str, s: Swept) -> None:
        """A sweep step of one group ran (the group's timer or the periodic sweep): count and report what moved,
        wake the group's loop when something became claimable or credit came back, arm its timer at the next head."""
        if s.retried or s.dead:
            metrics.lease_expired.labels(topic, group, "retry").inc(s.retried)
            metrics.lease_expired.labels(topic, group, "dead").inc(s.dead)
            log.warning("leases_expired", topic=topic, group=group, to_retry=s.retried, to_dlq=s.dead)
        if s.promoted:
            metrics.promoted.labels(topic, group).inc(s.promoted)
        if s.failed:  # nothing is known: the next pass tries again
            self.known_due.pop((topic, group), None)
            return
        self.known_due[(topic, group)] = s.next_due
        gd = self.dispatchers.get((topic, group))
        if gd is None:
            return
        # promoted: claimable now; dead: the next message of its ordering key may be; retried: credit held by an
        # expired lease comes back (Consumer.credit); strict order: a retry waiting at the head may be due
        if s.promoted or s.dead or s.retried or self.store.is_strict(topic, group):
            gd.wake.set()
        gd.timed = True
        if s.next_due is not None:
            gd.arm(s.next_due)

    def notify_paused(self, gd: GroupDispatcher, err: BrokerError) -> None:
        for c in gd.consumers:
            notify = getattr(c.outlet, "delivery_paused", None)
            if notify is not None:
                notify(gd.topic, gd.group, err)

    def notify_resumed(self, gd: GroupDispatcher) -> None:
        for c in gd.consumers:
            notify = getattr(c.outlet, "delivery_resumed", None)
            if notify is not None:
                notify(gd.topic, gd.group)

    # ---- settlement ----------------------------------------------------------------------------------------

    # Wake-ups on settlement: when a consumer that had used all its credit gets some back (at once: the credit is
    # local), and after each ack/nack flush that finished something (the next message of an ordering key may have
    # gone live). Not on every settle: a claim round per ack would mostly come back empty and delay the claim a
    # publish needs.
    #
    # Acks that ride: an ack nobody waits on (``ride``: an ack frame without a ref; its credit came back at once) is
    # not worth a Redis round trip of its own. Its script call waits to share the next script batch's write (a
    # publish, a claim), for at most ``pipe.RIDE_S``: at a low rate, where every message travels alone, this saves
    # one round trip per message. Its lease is held in Redis that much longer; nothing else changes (at-least-once:
    # an ack lost with the node, before Redis ran it, is a redelivery, as for any ack not yet in Redis). Acks of a
    # strict-order group, or of a group that has delivered messages with an ordering key, never ride: there the ack
    # is what lets the next message go (one in flight per group or per key), so it goes at once.

    def ack(self, consumer: Consumer, item: AckItem, *, ride: bool = False) -> asyncio.Future[bool]:
        ride = ride and self._may_ride(consumer)
        return self._ack_coalescer(consumer, [item], ride).submit((item, ride))

    def ack_many(
        self, consumer: Consumer, items: Sequence[AckItem], *, ride: bool = False
    ) -> asyncio.Future[list[bool | BaseException]]:
        """Ack several deliveries of one consumer with one waiter (one ack frame): a result per item, in order.
        ``ride``: the caller does not wait on the answer soon (see "Acks that ride" above)."""
        ride = ride and self._may_ride(consumer)
        return self._ack_coalescer(consumer, items, ride).submit_many([(it, ride) for it in items])

    def ack_then(
        self,
        consumer: Consumer,
        items: Sequence[AckItem],
        fn: Callable[[T, list[bool | BaseException]], None],
        arg: T,
        *,
        ride: bool = False,
    ) -> None:
        """``ack_many`` answering by ``fn(arg, results)``, called in the flush that has them (the session's ack
        path: no future and no done callback per ack frame). ``items`` must not be empty."""
        ride = ride and self._may_ride(consumer)
        self._ack_coalescer(consumer, items, ride).submit_many_call([(it, ride) for it in items], fn, arg)

    def _may_ride(self, consumer: Consumer) -> bool:
        gd = self.dispatchers.get((consumer.topic, consumer.group))
        return gd is not None and not gd.keyed and not self.store.is_strict(consumer.topic, consumer.group)

    def _ack_coalescer(
        self, consumer: Consumer, items: Sequence[AckItem], ride: bool
    ) -> Coalescer[tuple[AckItem, bool], bool]:
        """Take ``items`` out of the consumer's credit (waking its group if that frees credit it had used up). An
        ack someone waits on sends the riders waiting in the pipe (an ack flush of the group among them) at once."""
        was_full = len(consumer.inflight) >= consumer.prefetch
        now = self.clock()
        observe = metrics.publish_to_ack.observe
        for item in items:
            held = consumer.inflight.pop(item.id, None)
            if held is not None:
                observe(max(0.0, (now - held[3]) / 1000))
        key = (consumer.topic, consumer.group)
        co = self._acks.get(key)
        if co is None:
            pair = f"{key[0]}/{key[1]}"
            co = self._acks[key] = Coalescer(lambda acks: self._ack_flush(key, pair, acks), 1000)
            co.on_idle = functools.partial(self._let_go, key, self._acks, co)
        if was_full:
            self._wake_key(key)
        if not ride:
            self.store.send_riders()
        return co

    async def _ack_flush(self, key: tuple[str, str], pair: str, acks: Sequence[tuple[AckItem, bool]]) -> list[bool]:
        if len(acks) == 1:  # an ack alone (every one, at a low rate)
            item, ride = acks[0]
            items = [item]
        else:
            items = [it for it, _ in acks]
            ride = all(r for _, r in acks)
        res = await self.store.ack_many(key[0], key[1], items, ride=ride)
        n = len(res) - res.count(AckOutcome.STALE)
        metrics.tally(metrics.acked, *key).n += n
        self.count(pair, "acked", n)
        if AckOutcome.ACKED_NEXT_LIVE in res or (n and self.store.is_strict(*key)):
            self._wake_key(key)  # the next message of a key, or of a strict-order group, may be claimed now
        if AckOutcome.ACKED_NEXT_DELAYED in res:  # the next message of a key waits for its publish delay
            self.arm(key[0], self.clock(), key[1])  # (its due time is not in the reply: a sweep step reads it)
        return [bool(r) for r in res]

    def nack(self, consumer: Consumer, item: NackItem, attempt: int) -> asyncio.Future[NackOutcome]:
        was_full = len(consumer.inflight) >= consumer.prefetch
        consumer.inflight.pop(item.id, None)
        return self._nack(consumer.topic, consumer.group, item, attempt, consumer.id, was_full)

    def _nack(
        self, topic: str, group: str, item: NackItem, attempt: int, who: str, wake: bool = False
    ) -> asyncio.Future[NackOutcome]:
        key = (topic, group)
        co = self._nacks.get(key)
        if co is None:
            co = self._nacks[key] = Coalescer(lambda items: self._nack_flush(key, items), 500)
            co.on_idle = functools.partial(self._let_go, key, self._nacks, co)
        if wake:
            self._wake_key(key)
        return co.submit((item, attempt, who))

    async def _nack_flush(
        self, key: tuple[str, str], items: Sequence[tuple[NackItem, int, str]]
    ) -> Sequence[NackOutcome]:
        reply = await self.store.nack_due(key[0], key[1], items)
        res = reply.outcomes
        if reply.due is not None:
            self.arm(key[0], reply.due, key[1])
        for outcome in res:
            metrics.nacked.labels(key[0], key[1], outcome.value).inc()
        self.count(f"{key[0]}/{key[1]}", "nacked", len(res))
        if any(o is NackOutcome.READY or o is NackOutcome.DEAD for o in res):
            self._wake_key(key)
        return res

    async def extend(self, consumer: Consumer, msg_id: str, receipt: str, lease_ms: int) -> int | None:
        deadline = await self.store.extend(consumer.topic, consumer.group, msg_id, receipt, lease_ms)
        held = consumer.inflight.get(msg_id)
        if deadline is not None and held is not None:
            consumer.inflight[msg_id] = (held[0], held[1], deadline, held[3])
        return deadline

    def _wake_key(self, key: tuple[str, str]) -> None:
        gd = self.dispatchers.get(key)
        if gd is not None:
            gd.wake.set()

    def requeue_all(self, consumer: Consumer, unsent: set[str], reason: str) -> None:
        """A consumer left: deliveries never sent go back as they were; sent ones are redelivered at once
        (the attempt counts: a message that keeps killing consumers must end in the DLQ). When this node is shutting
        down it is the broker that leaves, not the consumer that failed: everything goes back as it was, no attempt
        counted (``shutdown_inflight_cut`` says how many)."""
        self.remove(consumer)
        if not consumer.inflight:
            return
        back = [AckItem(i, held[0]) for i, held in consumer.inflight.items() if self.stopping or i in unsent]
        if back:
            self.spawn(self._release(consumer.topic, consumer.group, back))
        for msg_id, (receipt, attempt, *_) in list(consumer.inflight.items()):
            if self.stopping or msg_id in unsent:
                continue
            fut = self._nack(consumer.topic, consumer.group, NackItem(msg_id, receipt, reason, 0), attempt, consumer.id)
            fut.add_done_callback(_log_requeue_failure)
            metrics.requeued.labels(consumer.topic, consumer.group).inc()
        consumer.inflight.clear()

    def release_later(self, topic: str, group: str, deliveries: Sequence[Delivery]) -> None:
        self.release_items(topic, group, [AckItem(d.id, d.receipt) for d in deliveries])

    def release_items(self, topic: str, group: str, items: list[AckItem]) -> None:
        if items:
            self.spawn(self._release(topic, group, items))

    async def _release(self, topic: str, group: str, items: list[AckItem]) -> None:
        try:
            n = await self.store.release(topic, group, items)
            metrics.released.labels(topic, group).inc(n)
            self._wake_key((topic, group))
        except BrokerError as e:
            log.warning(
                "release_failed",
                topic=topic,
                group=group,
                count=len(items),
                error=e.message,
                note="the leases will expire and the messages will be redelivered",
            )

    def spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = watch_task(asyncio.create_task(coro))
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def pause(self, seconds: float) -> None:
        """Sleep, unless the node stops meanwhile."""
        if not self.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), seconds)

    async def stop(self, timeout_s: float) -> None:
        self.stopping = True
        self._stopped.set()
        for gd in self.dispatchers.values():
            gd.stop_timer()
        self.wake_all()
        tasks = [gd.task for gd in self.dispatchers.values() if gd.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        for ack_co in list(self._acks.values()):  # (copies: a group forgotten meanwhile leaves the dicts)
            await ack_co.drain(timeout_s)
        for nack_co in list(self._nacks.values()):
            await nack_co.drain(timeout_s)
        if self._bg:
            await asyncio.wait(list(self._bg), timeout=timeout_s)


def _log_requeue_failure(fut: asyncio.Future[NackOutcome]) -> None:
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is not None:
        log.warning("requeue_failed", error=str(exc), note="the lease will expire and the message will be redelivered")
