"""Acks that ride (``node/dispatch.py``, "Acks that ride"): an ack nobody waits on shares the next script write, and
an ack someone waits on (a frame with a ref) is sent at once, taking the riders waiting with it."""

from __future__ import annotations

import asyncio

from broker.core.config import Settings
from broker.core.model import AckItem, PublishRequest
from broker.node.dispatch import Consumer, Dispatch, GroupDispatcher

from .conftest import StoreFactory
from .test_dispatch_clock import Outlet  # a consumer's outlet that sends nowhere

T = "ride-topic"


async def test_an_ack_with_a_waiter_sends_the_riding_ones_at_once(store_factory: StoreFactory) -> None:
    store = await store_factory()
    await store.ensure_group(T, "g")
    await store.publish_many([PublishRequest(T, f'"{i}"', "{}", None) for i in range(2)])
    first, second = await store.claim(T, "g", 2, 30_000, "c1")
    dispatch = Dispatch(store, Settings())
    dispatch.dispatchers[(T, "g")] = GroupDispatcher(dispatch, T, "g")
    consumer = Consumer(Outlet(), "conn", T, "g", prefetch=10, lease_ms=30_000)
    for d in (first, second):
        consumer.inflight[d.id] = (d.receipt, d.attempt, d.lease_expires_at, d.published_at)
    store.scripts.pipe._ride_s = 3600.0  # a rider goes only with company (or when sent)
    # Given an ack frame without a ref: it rides, and nothing goes to Redis for it yet
    riding = dispatch.ack_many(consumer, [AckItem(first.id, first.receipt)], ride=True)
    for _ in range(20):
        await asyncio.sleep(0)
    assert not riding.done()
    assert consumer.inflight.keys() == {second.id}  # its credit came back at once all the same
    # When an ack someone waits on comes (a frame with a ref)
    waited = dispatch.ack_many(consumer, [AckItem(second.id, second.receipt)])
    # Then both are acked, without waiting for a publish or the riders' timer
    assert await asyncio.wait_for(waited, 30) == [True]
    assert await asyncio.wait_for(riding, 30) == [True]
    assert await store.claim(T, "g", 10, 30_000, "c2") == []
    await dispatch.stop(5)


async def test_acks_of_a_group_with_ordering_keys_never_ride(store_factory: StoreFactory) -> None:
    # Given a group that delivered a message with an ordering key (its ack lets the key's next message go)
    store = await store_factory()
    await store.ensure_group(T, "g")
    await store.publish_many([PublishRequest(T, f'"{i}"', "{}", None, key="k") for i in range(2)])
    dispatch = Dispatch(store, Settings())
    gd = dispatch.dispatchers[(T, "g")] = GroupDispatcher(dispatch, T, "g")
    consumer = Consumer(Outlet(), "conn", T, "g", prefetch=10, lease_ms=30_000)
    gd.consumers.append(consumer)
    (first,) = await store.claim(T, "g", 10, 30_000, consumer.id)
    gd._hand_over(consumer, [first])
    store.scripts.pipe._ride_s = 3600.0  # a rider would go only with company
    # When its consumer acks without a ref
    acked = dispatch.ack_many(consumer, [AckItem(first.id, first.receipt)], ride=True)
    # Then the ack goes at once (no company, no timer), and the key's next message is claimable
    assert await asyncio.wait_for(acked, 30) == [True]
    (second,) = await store.claim(T, "g", 10, 30_000, "c2")
    assert second.payload == '"1"'
    await dispatch.stop(5)
