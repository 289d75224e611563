"""One publish, from a validated request to its confirmation: the node's whole publish path in one place.

A session hands a checked ``PublishRequest`` (authorised, within its rate and its unconfirmed-publish window) to
``Publisher.submit`` and gets a future: the ``PublishResult`` once Redis holds the message (or a duplicate was
recognised), or the ``BrokerError`` to answer with. In between, here:

1. **Coalescing**: publishes submitted while a flush is in flight form the next flush (up to ``MAX_BATCH``), one
   script round trip each; one flush at a time, so submission order is Redis order (first delivery order).
2. **Claims riding on a small flush**: a flush of up to ``EAGER_CLAIM_MAX_BATCH`` publishes carries one claim for
   each idle group of its topics with a waiting consumer on this node (``GroupDispatcher.ride_claim``), so the new
   messages reach it in the publish's own round trip. A big flush means load: the groups' loops claim in parallel.
3. **The wake-up**: after the flush, what the riding claims got is handed over and the other groups of its topics
   are woken, whatever the flush's outcome.
4. **The answer per publish**: a topic with no group under ``delivery.publish_without_group = "reject"`` is a
   ``NotFoundError`` (nothing stored), never a sentinel; the confirmation metrics (``broker_published_total``,
   ``broker_publish_failed_total``, the per-topic count ``broker stats`` shows) are counted here, once per publish.
5. **Shutdown** (``stop``): a publish is answered ``unavailable`` (retryable), never ``internal`` and never left
   unanswered. From ``stop`` on nothing new goes to Redis: a new or still-unflushed publish is refused as not stored;
   the flush already in Redis gets the rest of the budget, and if Redis has not answered by then its publishes are
   answered ``unavailable`` as not confirmed (they may be stored: a retry with the same idempotency key is safe).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TypeVar

from broker.core.errors import BrokerError, NotFoundError, UnavailableError
from broker.core.model import PublishRequest, PublishResult
from broker.node.dispatch import Consumer, Dispatch, GroupDispatcher
from broker.runtime import metrics
from broker.runtime.batching import Coalescer
from broker.store import ClaimRequest, RedisStore

SHUTDOWN_RETRY_AFTER_MS = 1_000  # a refused publish may go to another node (or this one, restarted) at once
MAX_BATCH = 1000  # publishes per flush (one script round trip)
EAGER_CLAIM_MAX_BATCH = 8  # flushes up to this size carry claims for idle groups (see the module's docstring)

T = TypeVar("T")
Riding = tuple[GroupDispatcher, Consumer, ClaimRequest]  # a claim sent with a publish flush, for one group


class Publisher:
    def __init__(self, store: RedisStore, dispatch: Dispatch) -> None:
        self.store = store
        self.dispatch = dispatch
        self._coalescer: Coalescer[PublishRequest, PublishResult] = Coalescer(self._flush, MAX_BATCH)
        self.stopping = False

    def __len__(self) -> int:
        """Publishes submitted and not yet flushed."""
        return len(self._coalescer)

    def submit(self, req: PublishRequest) -> asyncio.Future[PublishResult]:
        """Queue a validated publish: its future holds the ``PublishResult`` or the ``BrokerError`` to answer."""
        if self.stopping:
            metrics.publish_failed.labels(UnavailableError.code).inc()
            fut: asyncio.Future[PublishResult] = asyncio.get_running_loop().create_future()
            fut.set_exception(_refused())
            return fut
        return self._coalescer.submit(req)

    def submit_then(self, req: PublishRequest, fn: Callable[[T, PublishResult | BaseException], None], arg: T) -> None:
        """``submit`` that answers by calling ``fn(arg, result)`` (or ``fn(arg, error)``) as soon as the flush has
        it, instead of through a future (the session's per-publish path: no future, no done callback per publish).
        Refused at once (``fn`` called before this returns) while stopping."""
        if self.stopping:
            metrics.publish_failed.labels(UnavailableError.code).inc()
            fn(arg, _refused())
            return
        self._coalescer.submit_call(req, fn, arg)

    async def stop(self, timeout_s: float) -> int:
        """Shutdown: take nothing new, give the flush in Redis up to ``timeout_s``, then answer every publish still
        waiting ``unavailable``. Returns how many were cut that way (0: Redis answered all of them in time)."""
        self.stopping = True
        if await self._coalescer.drain(timeout_s):
            return 0
        cut = self._coalescer.fail_all(
            UnavailableError(
                "broker shutting down before Redis answered; not confirmed (it may be stored: publish again with "
                "the same idempotency_key)",
                retry_after_ms=SHUTDOWN_RETRY_AFTER_MS,
            )
        )
        metrics.publish_failed.labels(UnavailableError.code).inc(cut)
        return cut

    async def _flush(self, reqs: Sequence[PublishRequest]) -> list[PublishResult | BrokerError]:
        if self.stopping:  # queued before the stop, not sent to Redis yet: refused as not stored
            metrics.publish_failed.labels(UnavailableError.code).inc(len(reqs))
            return [_refused()] * len(reqs)
        topics = {r.topic for r in reqs}
        claims = self._riding_claims(topics) if len(reqs) <= EAGER_CLAIM_MAX_BATCH else []
        try:
            res = await self.store.publish_many(reqs, [req for _, _, req in claims])
        except asyncio.CancelledError:
            raise  # shutdown: answered as "not confirmed" by the session, not counted as a failure
        except BaseException as e:
            code = e.code if isinstance(e, BrokerError) else BrokerError.code
            metrics.publish_failed.labels(code).inc(len(reqs))
            raise
        finally:
            self._wake_up(topics, claims)
        out: list[PublishResult | BrokerError] = []
        confirmed: dict[str, int] = {}  # per topic: confirmed publishes (duplicates included), one metric step each
        now = self.dispatch.clock()  # not before the store's own `now`: the timers fire at or after the due time
        due: dict[str, int] = {}  # per topic: its earliest delayed publish, where its groups' timers are armed
        for r, one in zip(reqs, res, strict=True):
            if r.delay_ms and isinstance(one, PublishResult) and one.groups > 0 and not one.duplicate:
                due[r.topic] = min(due.get(r.topic, now + r.delay_ms), now + r.delay_ms)
            if isinstance(one, PublishResult) and one.groups < 0:  # the store's "no group, policy reject"
                one = NotFoundError(
                    f"topic {r.topic!r} has no group and delivery.publish_without_group is 'reject'; nothing stored"
                )
            if isinstance(one, BrokerError):
                metrics.publish_failed.labels(one.code).inc()
            else:
                confirmed[r.topic] = confirmed.get(r.topic, 0) + 1
                if one.groups > 0 and not one.duplicate:
                    self.dispatch.count(r.topic, "published")
            out.append(one)
        for topic, n in confirmed.items():
            metrics.tally(metrics.published, topic).n += n  # per message: a plain int, no lock (Tally)
        for topic, at in due.items():
            self.dispatch.arm(topic, at)
        return out

    def _riding_claims(self, topics: set[str]) -> list[Riding]:
        """One claim for each idle group of these topics with a waiting consumer on this node."""
        out: list[Riding] = []
        try:
            for (topic, _), gd in self.dispatch.dispatchers.items():
                if topic in topics and (claim := gd.ride_claim()) is not None:
                    out.append((gd, *claim))
        except BaseException:
            self._handed_over(out)  # never leave a group waiting for a claim that will not be made
            raise
        return out

    def _wake_up(self, topics: set[str], claims: list[Riding]) -> None:
        """After the flush: hand over what the riding claims got, and wake the other groups of its topics."""
        try:
            self._handed_over(claims)
        finally:
            riding = {id(gd) for gd, _, _ in claims}
            for (topic, _), gd in self.dispatch.dispatchers.items():
                if topic in topics and id(gd) not in riding:
                    gd.wake.set()

    @staticmethod
    def _handed_over(claims: list[Riding]) -> None:
        failed: Exception | None = None
        for gd, c, req in claims:
            try:
                gd.claim_rode(c, req)
            except Exception as e:  # the other groups are still handed over and released
                failed = failed or e
        if failed is not None:
            raise failed


def _refused() -> UnavailableError:
    return UnavailableError("broker shutting down; not stored", retry_after_ms=SHUTDOWN_RETRY_AFTER_MS)
