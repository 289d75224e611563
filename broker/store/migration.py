"""Script calls whose slot is on the move (resharding a Redis Cluster): sent again until the move ends, then refused.

While a slot migrates (``SETSLOT MIGRATING`` / ``IMPORTING`` and ``MIGRATE`` batches, what ``redis-cli --cluster
reshard`` does), every script call of a topic in that slot is refused before it writes anything
(``cluster.MIGRATING_GUARD``, or Redis's own ``TRYAGAIN`` for declared keys split across the two masters): the
call did not run. That is not an outage (both masters answer; the breaker must not count it: an open breaker would
stop every topic for one topic's move), so such calls come back as values and ``settle`` sends them again, outside
the breaker, with a short jittered backoff, for at most ``SETTLE_S`` (a slot with a few thousand keys moves in about
a second). One still refused then is answered ``unavailable`` (retry after ``RETRY_AFTER_MS``): the publisher
retries with its idempotency key, a claim is tried on the next poll, an ack is retried by its consumer or the
message comes again after its lease.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from broker.runtime import metrics
from broker.runtime.resilience import repeat_while_left
from broker.store.cluster import is_migrating
from broker.store.replication import Wait, for_part

__all__ = ["RETRY_AFTER_MS", "SETTLE_S", "is_migrating", "settle"]

SETTLE_S = 3.0
RETRY_AFTER_MS = 500

Call = Any  # one script call, sent as is by ``send``
Send = Callable[[Sequence[Call], "Wait | None"], Awaitable[list[Any]]]


async def settle(replies: list[Any], calls: Sequence[Call], wait: Wait | None, send: Send, what: str) -> list[Any]:
    """``replies`` with each call that did not run because its slot is moving sent again (``send``: the calls and
    the ``WAIT`` for the publishes among them, which come first) until it runs or ``SETTLE_S`` passed. The replies
    of calls still refused stay ``is_migrating`` errors (the gateway answers them ``unavailable``). Each refusal
    sent again is counted (``broker_store_slot_moving_total{op=what}``)."""
    out = list(replies)

    def moving() -> list[int]:
        return [i for i, x in enumerate(out) if is_migrating(x)]

    async def once() -> bool:
        again = moving()
        metrics.child(metrics.slot_moving, what).inc(len(again))
        rewait = for_part(wait, again)
        for i, x in zip(again, await send([calls[i] for i in again], rewait), strict=True):
            out[i] = x
        return bool(moving())  # still refused: again, after a wait (an exception, e.g. an outage, is raised)

    if moving():  # out of time: the refusals stay in ``out``
        await repeat_while_left(once, deadline_s=SETTLE_S, initial_s=0.02, max_s=0.25)
    return out
