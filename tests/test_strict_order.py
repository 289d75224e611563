"""Strict-order groups (seed 004's FIFO-across-retries): one delivery in flight per group across all nodes, and a
retry holds the head of the queue so nothing behind it overtakes it. Runs on fakeredis and a real redis-server.

Time is a ``FakeClock`` the stores read (every script gets its "now" from it): a test steps it past a retry or a
lease instead of sleeping on the wall clock."""

from __future__ import annotations

from broker.core.config import Settings
from broker.core.model import AckItem, NackItem, PublishRequest

from .conftest import StoreFactory
from .support import FakeClock

T = "fifo"


def strict_settings() -> Settings:
    return Settings().replace("delivery", strict_order_groups=(f"{T}/g",))




async def test_one_in_flight_and_retry_holds_the_head(store_factory: StoreFactory) -> None:
    # Given a strict-order group with 5 messages, and a second node on the same Redis
    clock = FakeClock()
    store = await store_factory(strict_settings(), clock)
    other = await store_factory(strict_settings(), clock)
    await store.ensure_group(T, "g")
    await store.publish_many([PublishRequest(T, str(i)) for i in range(5)])
    # When a consumer asks for 10
    first = await store.claim(T, "g", 10, 30_000, "c1")
    # Then it gets only the head, and nobody (on any node) gets anything while it is leased
    assert [d.payload for d in first] == ["0"]
    assert await other.claim(T, "g", 10, 30_000, "c2") == []
    # When the head fails and is retried after 300 ms
    await store.nack_many(T, "g", [(NackItem(first[0].id, first[0].receipt, "boom", delay_ms=300), 1, "c1")])
    # Then nothing behind it is delivered before its retry is due
    assert await other.claim(T, "g", 10, 30_000, "c2") == []
    clock.advance(350)
    again = await other.claim(T, "g", 10, 30_000, "c2")
    assert [(d.payload, d.attempt) for d in again] == [("0", 2)]
    # And after its ack, order continues with the next message
    assert await other.ack_many(T, "g", [AckItem(again[0].id, again[0].receipt)]) == [True]
    nxt = await store.claim(T, "g", 10, 30_000, "c1")
    assert [d.payload for d in nxt] == ["1"]


async def test_expired_lease_in_strict_group_keeps_the_head(store_factory: StoreFactory) -> None:
    settings = strict_settings().replace("retry", backoff_base_ms=200, jitter=0.0)
    clock = FakeClock()
    store = await store_factory(settings, clock)
    await store.ensure_group(T, "g")
    await store.publish_many([PublishRequest(T, str(i)) for i in range(3)])
    # Given the head leased for 50 ms and never acked
    (d,) = await store.claim(T, "g", 10, 50, "c1")
    clock.advance(80)
    # When the lease expires
    assert await store.sweep([(T, "g")]) == [(1, 0, 0)]
    # Then the head waits for its backoff (200 ms) and nothing overtakes it
    assert await store.claim(T, "g", 10, 30_000, "c1") == []
    clock.advance(250)
    (again,) = await store.claim(T, "g", 10, 30_000, "c1")
    assert (again.id, again.attempt) == (d.id, 2)


async def test_concurrent_groups_are_unaffected(store_factory: StoreFactory) -> None:
    store = await store_factory(strict_settings())
    await store.ensure_group(T, "other")
    await store.publish_many([PublishRequest(T, str(i)) for i in range(5)])
    # A group not listed as strict still takes a batch
    assert len(await store.claim(T, "other", 10, 30_000, "c1")) == 5


async def test_ordering_keys_do_not_reorder_a_strict_group(store_factory: StoreFactory) -> None:
    # Given a strict-order group, two messages of key A and then an unkeyed one
    store = await store_factory(strict_settings())
    await store.ensure_group(T, "g")
    await store.publish_many([PublishRequest(T, "k1", key="A"), PublishRequest(T, "k2", key="A")])
    await store.publish_many([PublishRequest(T, "m3")])
    # When each is acked in turn, Then they come in publish order (the key does not send k2 behind m3)
    seen = []
    for _ in range(3):
        (d,) = await store.claim(T, "g", 10, 30_000, "c1")
        seen.append(d.payload)
        assert await store.ack_many(T, "g", [AckItem(d.id, d.receipt)]) == [True]
    assert seen == ["k1", "k2", "m3"]
    assert not [k async for k in store.redis.scan_iter(match=f"{store.prefix}:*key:*")]
