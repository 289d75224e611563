"""Dispatch reads time from its injected clock (epoch ms): a consumer's lapsed leases free its credit when that clock
says so, not when the wall clock does."""

from __future__ import annotations

from broker.core.config import Settings
from broker.core.model import Delivery
from broker.node.dispatch import Consumer, Dispatch, GroupDispatcher

from .support import FakeClock


class Outlet:
    def send_delivery(self, consumer: Consumer, delivery: Delivery) -> None:
        pass

    def congested(self) -> bool:
        return False

    def holds(self, msg_id: str, receipt: str) -> bool:
        return False


class ClaimLog:
    """A store that records the claims it is asked for and has nothing to deliver."""

    def __init__(self) -> None:
        self.claims: list[int] = []

    async def claim(self, topic: str, group: str, n: int, lease_ms: int, consumer: str) -> list[Delivery]:
        self.claims.append(n)
        return []


async def test_lapsed_leases_free_credit_on_the_dispatch_clock() -> None:
    # Given a consumer with prefetch 1 holding one delivery leased for 1 s, on a dispatch with a stepped clock
    clock = FakeClock()
    store = ClaimLog()
    dispatch = Dispatch(store, Settings(), clock=clock)  # type: ignore[arg-type]
    gd = GroupDispatcher(dispatch, "t", "g")
    consumer = Consumer(Outlet(), "c1", "t", "g", prefetch=1, lease_ms=1_000)
    consumer.inflight["m1"] = ("r-1", 1, clock() + 1_000, clock())
    gd.consumers.append(consumer)
    # When a claim round runs before the lease's end: no credit, no claim
    await gd._claim_round(10)
    assert store.claims == []
    # When the clock passes the lease's end (no real time passes): the credit is back and the round claims it
    clock.advance(1_001)
    await gd._claim_round(10)
    assert store.claims == [1] and "m1" not in consumer.inflight
