"""A node keeps a group's dispatcher (its delivery loop's state, its ack and nack coalescers) only while the group
has consumers here: a group whose last consumer left is forgotten, so groups that come and go (an ephemeral group per
``broker consume --ephemeral``) leave nothing behind, and a publish flush walks only the groups consumed now."""

from __future__ import annotations

import asyncio

from broker.core.config import Settings
from broker.core.model import AckItem, PublishRequest
from broker.node.dispatch import Consumer, Dispatch
from broker.store import RedisStore

from .conftest import StoreFactory
from .support import until
from .test_dispatch_clock import Outlet  # a consumer's outlet that sends nowhere

T = "membership-topic"


async def two_delivered(store_factory: StoreFactory) -> tuple[RedisStore, Dispatch, Consumer]:
    """A group consumed on this node by one consumer holding two deliveries."""
    store = await store_factory()
    dispatch = Dispatch(store, Settings())
    consumer = Consumer(Outlet(), "conn", T, "g", prefetch=10, lease_ms=30_000)
    await dispatch.add(consumer)
    await store.publish_many([PublishRequest(T, '"a"', "{}", None), PublishRequest(T, '"b"', "{}", None)])
    dispatch.wake(T)
    await until(lambda: len(consumer.inflight) == 2, "both delivered to the consumer")
    return store, dispatch, consumer


async def test_a_group_whose_last_consumer_left_is_forgotten_with_its_coalescers(store_factory: StoreFactory) -> None:
    # Given a group consumed on this node, whose consumer has acked a delivery (the group has an ack coalescer)
    store, dispatch, consumer = await two_delivered(store_factory)
    first, second = (AckItem(msg_id, held[0]) for msg_id, held in list(consumer.inflight.items()))
    assert await dispatch.ack_many(consumer, [first]) == [True]
    flusher = dispatch._acks[(T, "g")]._task
    assert flusher is not None and not flusher.done()
    # When its last consumer leaves (its delivery loop is running)
    dispatch.remove(consumer)
    # Then the group is forgotten once the loop has ended: no dispatcher, no ack coalescer, its flusher ended
    await until(lambda: (T, "g") not in dispatch.dispatchers, "the group's dispatcher to be dropped")
    assert (T, "g") not in dispatch._acks
    await asyncio.sleep(0)
    assert flusher.done() and not flusher.cancelled()
    # And a delivery sent before can still be acked (a new coalescer), and is
    assert await dispatch.ack_many(consumer, [second]) == [True]
    assert await store.claim(T, "g", 10, 30_000, "c2") == []
    # And a consumer that comes back gets the group delivered again
    again = Consumer(Outlet(), "conn2", T, "g", prefetch=10, lease_ms=30_000)
    await dispatch.add(again)
    assert dispatch.dispatchers[(T, "g")].consumers == [again]
    await dispatch.stop(5)


async def test_a_consumer_that_leaves_holding_deliveries_leaves_nothing_behind(store_factory: StoreFactory) -> None:
    # Given a group consumed on this node whose only consumer holds two deliveries it never settled
    store, dispatch, consumer = await two_delivered(store_factory)
    # When it leaves (its connection dropped): both go back as failed attempts through the nack coalescer
    dispatch.requeue_all(consumer, set(), "consumer disconnected")
    await until(lambda: (T, "g") not in dispatch.dispatchers, "the group's dispatcher to be dropped")
    # Then both are back in the queue for the next consumer, and nothing of the group stays on the node: no ack or
    # nack coalescer, whose parked flusher would otherwise wait forever
    await until(lambda: (T, "g") not in dispatch._nacks and (T, "g") not in dispatch._acks, "the coalescers to go")
    assert len(await store.claim(T, "g", 10, 30_000, "c2")) == 2
    await dispatch.stop(5)
