"""RedisStore against fakeredis and a real redis-server: one test body, two backends (fixture ``store``).

Each test follows the delivery table in ``broker/core/model.py``: publish -> claim -> ack | nack | release | expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from broker.core.config import Settings
from broker.core.errors import BrokerError, StoreRefusedError, UnavailableError
from broker.core.model import AckItem, NackItem, PublishRequest, PublishResult, now_ms
from broker.store import ClaimRequest, NackOutcome, RedisStore, connect_redis
from broker.store.keys import topics_key

from .conftest import StoreFactory
from .support import FakeClock, free_port, make_store

T = "orders"


def req(payload: str = '{"n":1}', topic: str = T, **kw: object) -> PublishRequest:
    return PublishRequest(topic=topic, payload=payload, **kw)  # type: ignore[arg-type]


async def publish(store: RedisStore, *payloads: str, topic: str = T, **kw: object) -> list[str]:
    res = await store.publish_many([req(p, topic, **kw) for p in payloads])
    assert all(not r.duplicate for r in res)
    return [r.id for r in res]


async def keys_of(store: RedisStore) -> set[str]:
    return {k async for k in store.redis.scan_iter(match=f"{store.prefix}:*", count=1000)}


def fast_retry(settings: Settings | None = None, **retry: object) -> Settings:
    """Settings whose retry backoff is a few ms with no jitter, so promotion can be awaited in a test."""
    values: dict[str, object] = {"backoff_base_ms": 20, "backoff_multiplier": 1.0, "backoff_cap_ms": 20, "jitter": 0.0}
    values.update(retry)
    return (settings or Settings()).replace("retry", **values)


async def depth(store: RedisStore, group: str = "g1", topic: str = T) -> tuple[int, int, int, int]:
    (d,) = await store.depths([(topic, group)])
    return d.ready, d.leased, d.delayed, d.dead


# ---- publish / claim / ack ----------------------------------------------------------------------------------------


async def test_publish_claim_ack_leaves_nothing_behind(store: RedisStore) -> None:
    # Given a topic with one group and one published message
    await store.ensure_group(T, "g1")
    (mid,) = await publish(store, '{"a":1}')
    k = store.keys(T)
    g = k.group("g1")
    assert await store.redis.exists(k.body(mid)) == 1
    # When a consumer claims and acks it
    (d,) = await store.claim(T, "g1", 10, 30_000, "c1")
    assert (d.id, d.payload, d.attempt, d.topic, d.group) == (mid, '{"a":1}', 1, T, "g1")
    # (a first delivery's lease state is one field of the group's held hash: no delivery hash is written for it)
    assert await store.redis.exists(g.delivery(mid)) == 0
    assert await store.redis.hget(g.held, mid) == f"{d.receipt}|test-node|c1|"
    assert await store.ack_many(T, "g1", [AckItem(mid, d.receipt)]) == [True]
    # Then neither the body nor the delivery state nor any other key for the message remains
    assert await store.redis.exists(k.body(mid), g.delivery(mid), g.held) == 0
    remaining = await keys_of(store)
    assert not [key for key in remaining if mid in key]
    assert remaining == {topics_key(store.prefix), k.groups}
    assert await depth(store) == (0, 0, 0, 0)


async def test_every_group_gets_every_message(store: RedisStore) -> None:
    # Given two groups on one topic
    await store.ensure_group(T, "g1")
    await store.ensure_group(T, "g2")
    # When three messages are published
    ids = await publish(store, "1", "2", "3")
    # Then each group claims all three, independently
    got1 = [d.id for d in await store.claim(T, "g1", 10, 30_000, "c1")]
    got2 = [d.id for d in await store.claim(T, "g2", 10, 30_000, "c2")]
    assert got1 == ids
    assert got2 == ids


async def test_publish_reports_group_count(store: RedisStore) -> None:
    # Given two groups
    await store.ensure_group(T, "g1")
    await store.ensure_group(T, "g2")
    # When a message is published, Then the result says it was stored for both
    (r,) = await store.publish_many([req()])
    assert r.groups == 2 and not r.duplicate


async def test_body_outlives_the_first_group_ack(store: RedisStore) -> None:
    # Given a message held by two groups
    await store.ensure_group(T, "g1")
    await store.ensure_group(T, "g2")
    (mid,) = await publish(store, '"x"')
    (d1,) = await store.claim(T, "g1", 1, 30_000, "c1")
    # When only the first group acks
    assert await store.ack_many(T, "g1", [AckItem(mid, d1.receipt)]) == [True]
    # Then the body stays for the second group, which still gets the payload; its ack removes the body
    assert await store.redis.exists(store.keys(T).body(mid)) == 1
    (d2,) = await store.claim(T, "g2", 1, 30_000, "c2")
    assert d2.payload == '"x"'
    assert await store.ack_many(T, "g2", [AckItem(mid, d2.receipt)]) == [True]
    assert await store.redis.exists(store.keys(T).body(mid)) == 0


async def test_claim_is_fifo(store: RedisStore) -> None:
    # Given messages published in one batch and then one by one
    await store.ensure_group(T, "g1")
    ids = await publish(store, *[str(i) for i in range(5)])
    for i in range(5, 10):
        ids += await publish(store, str(i))
    # When claimed in small batches
    got: list[str] = []
    for _ in range(4):
        got += [d.id for d in await store.claim(T, "g1", 3, 30_000, "c1")]
    # Then they come out in publish order, and the queue is then empty
    assert got == ids
    assert await store.claim(T, "g1", 3, 30_000, "c1") == []


async def test_batch_keeps_order_within_each_topic(store: RedisStore) -> None:
    # Given one publish batch interleaving two topics
    await store.ensure_group("a", "g1")
    await store.ensure_group("b", "g1")
    res = await store.publish_many([req(str(i), topic="ab"[i % 2]) for i in range(8)])
    # When each topic is claimed
    got_a = [d.id for d in await store.claim("a", "g1", 10, 30_000, "c")]
    got_b = [d.id for d in await store.claim("b", "g1", 10, 30_000, "c")]
    # Then each got its own messages, in batch order, and the results line up with the requests
    assert got_a == [res[i].id for i in range(0, 8, 2)]
    assert got_b == [res[i].id for i in range(1, 8, 2)]


async def test_competing_claims_never_share_a_message(store_factory: StoreFactory) -> None:
    # Given 300 messages and four store instances (as four broker nodes) sharing the data
    stores = [await store_factory() for _ in range(4)]
    await stores[0].ensure_group(T, "g1")
    ids = await publish(stores[0], *[str(i) for i in range(300)])

    # When 20 consumers claim concurrently until the queue is empty
    async def consumer(i: int) -> list[str]:
        s = stores[i % len(stores)]
        got: list[str] = []
        while batch := await s.claim(T, "g1", 7, 30_000, f"c{i}"):
            got += [d.id for d in batch]
            await asyncio.sleep(0)
        return got

    results = await asyncio.gather(*(consumer(i) for i in range(20)))
    # Then every message was claimed exactly once
    claimed = [mid for r in results for mid in r]
    assert len(claimed) == len(set(claimed)) == 300
    assert set(claimed) == set(ids)


async def test_big_batch_publish_in_one_script_call(store: RedisStore) -> None:
    # Given one group, When 10,000 messages are published in one batch (more than Lua's unpack() limit of ~8000)
    await store.ensure_group(T, "g1")
    res = await store.publish_many([req(str(i)) for i in range(10_000)])
    # Then all are stored, in order
    assert len({r.id for r in res}) == 10_000
    assert await depth(store) == (10_000, 0, 0, 0)
    first = await store.claim(T, "g1", 3, 30_000, "c")
    assert [d.payload for d in first] == ["0", "1", "2"]


async def test_empty_publish_batch(store: RedisStore) -> None:
    # Given nothing to publish, When publish_many([]) runs, Then it returns nothing and stores nothing
    assert await store.publish_many([]) == []
    assert await keys_of(store) == set()


# ---- idempotency and delayed publish ------------------------------------------------------------------------------


async def test_idempotency_key_dedups(store: RedisStore) -> None:
    # Given a message published with an idempotency key
    await store.ensure_group(T, "g1")
    (first,) = await store.publish_many([req('{"v":1}', idempotency_key="k-1")])
    # When the same key is published again (a publisher retry), alone and twice within one batch
    (again,) = await store.publish_many([req('{"v":2}', idempotency_key="k-1")])
    a, b = await store.publish_many([req(idempotency_key="k-2"), req(idempotency_key="k-2")])
    # Then the retry returns the first id, flagged duplicate, and only one message per key is queued
    assert not first.duplicate
    assert again.id == first.id and again.duplicate
    assert not a.duplicate and b.duplicate and b.id == a.id
    assert await depth(store) == (2, 0, 0, 0)
    got = await store.claim(T, "g1", 10, 30_000, "c")
    assert [d.payload for d in got] == ['{"v":1}', '{"n":1}']
    # And the idempotency record carries a TTL
    ttl = await store.redis.ttl(store.keys(T).idem("k-1"))
    assert 0 < ttl <= Settings().delivery.idempotency_ttl_s


async def test_delayed_publish_is_promoted_only_when_due(store_factory: StoreFactory, clock: FakeClock) -> None:
    # Given a message published with delay_ms=200
    store = await store_factory(clock=clock)
    await store.ensure_group(T, "g1")
    before = clock()
    (mid,) = await publish(store, '"later"', delay_ms=200)
    g = store.keys(T).group("g1")
    # Then it sits in the delayed set, due at about now + 200 ms, and cannot be claimed
    score = await store.redis.zscore(g.delayed, mid)
    assert score is not None and before + 200 <= score <= clock() + 200
    assert await depth(store) == (0, 0, 1, 0)
    assert await store.claim(T, "g1", 10, 30_000, "c") == []
    # When the sweep runs before the due time, Then nothing is promoted
    assert await store.sweep([(T, "g1")]) == [(0, 0, 0)]
    # When the sweep runs after the due time, Then it is promoted and claimable
    clock.advance(score - clock() + 20)
    assert await store.sweep([(T, "g1")]) == [(0, 0, 1)]
    (d,) = await store.claim(T, "g1", 10, 30_000, "c")
    assert d.id == mid and d.attempt == 1


# ---- topics without a group ---------------------------------------------------------------------------------------


async def test_publish_without_group_defaults_to_default_group(store: RedisStore) -> None:
    # Given a topic nobody subscribed to, under the default policy
    # When a message is published
    (r,) = await store.publish_many([req('"hi"')])
    # Then it is stored for group "default"
    assert r.groups == 1
    assert await store.groups(T) == ["default"]
    assert T in await store.topics()
    (d,) = await store.claim(T, "default", 10, 30_000, "c")
    assert d.id == r.id and d.payload == '"hi"'


async def test_publish_without_group_rejected_by_policy(store_factory: StoreFactory) -> None:
    # Given the "reject" policy and a topic with no group
    store = await store_factory(Settings().replace("delivery", publish_without_group="reject"))
    # When messages are published
    res = await store.publish_many([req('"hi"'), req('"ho"', idempotency_key="k")])
    # Then each result says groups=-1 and nothing about the messages is stored
    assert [r.groups for r in res] == [-1, -1]
    assert await store.groups(T) == []
    keys = await keys_of(store)
    assert keys <= {topics_key(store.prefix)}
    # And a topic that has a group is stored normally under the same policy
    await store.ensure_group("other", "g1")
    (ok,) = await store.publish_many([req(topic="other")])
    assert ok.groups == 1


# ---- ack with a stale receipt -------------------------------------------------------------------------------------


async def test_ack_with_wrong_receipt_changes_nothing(store: RedisStore) -> None:
    # Given one leased message
    await store.ensure_group(T, "g1")
    (mid,) = await publish(store, "1")
    (d,) = await store.claim(T, "g1", 1, 30_000, "c")
    g = store.keys(T).group("g1")
    before = await store.redis.hgetall(g.delivery(mid))
    # When it is acked with a wrong receipt, or an unknown id
    res = await store.ack_many(T, "g1", [AckItem(mid, "0-999"), AckItem("nope", d.receipt)])
    # Then both are refused and the lease is untouched
    assert res == [False, False]
    assert await store.redis.hgetall(g.delivery(mid)) == before
    assert await depth(store) == (0, 1, 0, 0)
    assert await store.redis.exists(store.keys(T).body(mid)) == 1
    # And the right receipt still works, once
    assert await store.ack_many(T, "g1", [AckItem(mid, d.receipt)]) == [True]
    assert await store.ack_many(T, "g1", [AckItem(mid, d.receipt)]) == [False]


# ---- nack -----------------------------------------------------------------------------------------------------------


async def test_nack_with_delay_goes_to_retry_then_is_promoted(store_factory: StoreFactory, clock: FakeClock) -> None:
    # Given one leased message
    store = await store_factory(clock=clock)
    await store.ensure_group(T, "g1")
    (mid,) = await publish(store, "1")
    (d,) = await store.claim(T, "g1", 1, 30_000, "c1")
    g = store.keys(T).group("g1")
    # When it is nacked with delay_ms=150
    before = clock()
    out = await store.nack_many(T, "g1", [(NackItem(mid, d.receipt, "boom", delay_ms=150), d.attempt, "c1")])
    # Then it waits in the delayed set, due about now + 150 ms, with the error recorded
    assert out == [NackOutcome.RETRY]
    score = await store.redis.zscore(g.delayed, mid)
    assert score is not None and before + 150 <= score <= clock() + 150
    errors = json.loads("[" + await store.redis.hget(g.delivery(mid), "errors") + "]")
    assert [(e["attempt"], e["error"], e["consumer"]) for e in errors] == [(1, "boom", "c1")]
    assert await depth(store) == (0, 0, 1, 0)
    # When swept before and after the due time, Then it is promoted only after, and redelivered as attempt 2
    assert await store.sweep([(T, "g1")]) == [(0, 0, 0)]
    clock.advance(score - clock() + 20)
    assert await store.sweep([(T, "g1")]) == [(0, 0, 1)]
    (d2,) = await store.claim(T, "g1", 1, 30_000, "c2")
    assert d2.id == mid and d2.attempt == 2 and d2.receipt != d.receipt


async def test_nack_without_delay_goes_back_to_the_head(store: RedisStore) -> None:
    # Given two messages, the first leased
    await store.ensure_group(T, "g1")
    a, b = await publish(store, '"a"', '"b"')
    (d,) = await store.claim(T, "g1", 1, 30_000, "c")
    # When the first is nacked with delay 0
    out = await store.nack_many(T, "g1", [(NackItem(a, d.receipt, "later", delay_ms=0), d.attempt, "c")])
    # Then it is ready again ahead of the second, as attempt 2
    assert out == [NackOutcome.READY]
    got = await store.claim(T, "g1", 10, 30_000, "c")
    assert [(x.id, x.attempt) for x in got] == [(a, 2), (b, 1)]


async def test_nack_with_default_delay_uses_backoff(store: RedisStore) -> None:
    # Given a leased message, When it is nacked without a delay (None: the backoff policy decides)
    await store.ensure_group(T, "g1")
    (mid,) = await publish(store, "1")
    (d,) = await store.claim(T, "g1", 1, 30_000, "c")
    before = now_ms()
    out = await store.nack_many(T, "g1", [(NackItem(mid, d.receipt, "x"), d.attempt, "c")])
    # Then it is due after the attempt-1 backoff: base 1000 ms +/- 20 %
    assert out == [NackOutcome.RETRY]
    score = await store.redis.zscore(store.keys(T).group("g1").delayed, mid)
    assert score is not None and before + 800 <= score <= now_ms() + 1200


async def test_nack_dead_parks_a_self_contained_dead_letter(store: RedisStore) -> None:
    # Given a message with headers and a key, leased
    await store.ensure_group(T, "g1")
    (mid,) = await publish(store, '{"p":1}', headers='{"h":"v"}', key="cust-7")
    (d,) = await store.claim(T, "g1", 1, 30_000, "c9")
    assert d.key == "cust-7" and d.headers == '{"h":"v"}'
    k = store.keys(T)
    g = k.group("g1")
    # When it is nacked with dead=true
    out = await store.nack_many(T, "g1", [(NackItem(mid, d.receipt, "poison", dead=True), d.attempt, "c9")])
    # Then a dead letter hash holds everything, carries a TTL of about dlq.ttl_s, and is indexed
    assert out == [NackOutcome.DEAD]
    dl = await store.redis.hgetall(g.dead_letter(mid))
    assert dl["payload"] == '{"p":1}' and dl["headers"] == '{"h":"v"}' and dl["key"] == "cust-7"
    assert dl["reason"] == "rejected" and dl["attempts"] == "1" and dl["last_consumer"] == "c9"
    assert (dl["id"], dl["topic"], dl["group"]) == (mid, T, "g1")
    errors = json.loads(dl["errors"])
    assert [(e["attempt"], e["error"]) for e in errors] == [(1, "poison")]
    ttl_s = Settings().dlq.ttl_s
    assert ttl_s - 10 <= await store.redis.ttl(g.dead_letter(mid)) <= ttl_s
    assert await store.redis.zscore(g.dead, mid) is not None
    # And the body and delivery state are gone (no other group holds the message)
    assert await store.redis.exists(k.body(mid), g.delivery(mid)) == 0
    assert await depth(store) == (0, 0, 0, 1)
    # And a late ack of the dead delivery is refused
    assert await store.ack_many(T, "g1", [AckItem(mid, d.receipt)]) == [False]


async def test_dead_letter_keeps_the_body_for_other_groups(store: RedisStore) -> None:
    # Given a message held by two groups, When group g1 dead-letters it
    await store.ensure_group(T, "g1")
    await store.ensure_group(T, "g2")
    (mid,) = await publish(store, '"m"')
    (d,) = await store.claim(T, "g1", 1, 30_000, "c")
    await store.nack_many(T, "g1", [(NackItem(mid, d.receipt, "e", dead=True), 1, "c")])
    # Then g2 still gets the message
    assert await store.redis.exists(store.keys(T).body(mid)) == 1
    (d2,) = await store.claim(T, "g2", 1, 30_000, "c")
    assert d2.payload == '"m"'


async def test_attempts_exhausted_goes_dead_with_every_error(store_factory: StoreFactory) -> None:
    # Given max_attempts=2 and one message
    store = await store_factory(Settings().replace("retry", max_attempts=2))
    await store.ensure_group(T, "g1")
    (mid,) = await publish(store, "1")
    g = store.keys(T).group("g1")
    # When it fails twice
    (d1,) = await store.claim(T, "g1", 1, 30_000, "c")
    out1 = await store.nack_many(T, "g1", [(NackItem(mid, d1.receipt, "e1", delay_ms=0), d1.attempt, "c")])
    (d2,) = await store.claim(T, "g1", 1, 30_000, "c")
    out2 = await store.nack_many(T, "g1", [(NackItem(mid, d2.receipt, "e2", delay_ms=0), d2.attempt, "c")])
    # Then the second failure dead-letters it for max_attempts, with both errors in order
    assert (out1, out2) == ([NackOutcome.READY], [NackOutcome.DEAD])
    assert d2.attempt == 2
    dl = await store.redis.hgetall(g.dead_letter(mid))
    assert dl["reason"] == "max_attempts" and dl["attempts"] == "2"
    errors = json.loads(dl["errors"])
    assert [(e["attempt"], e["error"]) for e in errors] == [(1, "e1"), (2, "e2")]
    assert await depth(store) == (0, 0, 0, 1)


async def test_nack_with_stale_receipt_is_refused(store: RedisStore) -> None:
    # Given a leased message, When it is nacked with a wrong receipt
    await store.ensure_group(T, "g1")
    (mid,) = await publish(store, "1")
    await store.claim(T, "g1", 1, 30_000, "c")
    out = await store.nack_many(T, "g1", [(NackItem(mid, "0-1", "e", dead=True), 1, "c")])
    # Then nothing moves
    assert out == [NackOutcome.STALE]
    assert await depth(store) == (0, 1, 0, 0)


# ---- lease expiry, release, extend --------------------------------------------------------------------------------


async def test_lease_expiry_retries_and_refuses_the_late_ack(store_factory: StoreFactory, clock: FakeClock) -> None:
    # Given a message leased for 200 ms, with a fast retry backoff
    store = await store_factory(fast_retry(), clock=clock)
    await store.ensure_group(T, "g1")
    (mid,) = await publish(store, "1")
    (d,) = await store.claim(T, "g1", 1, 200, "slow")
    g = store.keys(T).group("g1")
    # When the lease runs out and the sweep runs
    assert await store.sweep([(T, "g1")]) == [(0, 0, 0)]  # not yet due
    clock.advance(d.lease_expires_at - clock() + 30)
    assert await store.sweep([(T, "g1")]) == [(1, 0, 0)]
    # Then the delivery waits for a retry with a "lease expired" error naming the consumer
    assert await depth(store) == (0, 0, 1, 0)
    errors = json.loads("[" + await store.redis.hget(g.delivery(mid), "errors") + "]")
    assert [(e["attempt"], e["error"], e["consumer"]) for e in errors] == [(1, "lease expired", "slow")]
    # And the late ack with the old receipt is refused
    assert await store.ack_many(T, "g1", [AckItem(mid, d.receipt)]) == [False]
    assert await store.extend(T, "g1", mid, d.receipt, 10_000) is None
    # When the retry is due, Then it is redelivered as attempt 2, and the old receipt still cannot ack it
    clock.advance(50)
    assert await store.sweep([(T, "g1")]) == [(0, 0, 1)]
    (d2,) = await store.claim(T, "g1", 1, 30_000, "fast")
    assert d2.id == mid and d2.attempt == 2
    assert await store.ack_many(T, "g1", [AckItem(mid, d.receipt)]) == [False]
    assert await store.ack_many(T, "g1", [AckItem(mid, d2.receipt)]) == [True]


async def test_lease_expiry_on_last_attempt_dead_letters(store_factory: StoreFactory, clock: FakeClock) -> None:
    # Given max_attempts=1 and a message leased for 50 ms
    store = await store_factory(Settings().replace("retry", max_attempts=1), clock=clock)
    await store.ensure_group(T, "g1")
    (mid,) = await publish(store, '"z"')
    await store.claim(T, "g1", 1, 50, "c")
    # When the lease expires and the sweep runs
    clock.advance(100)
    assert await store.sweep([(T, "g1")]) == [(0, 1, 0)]
    # Then it is dead for max_attempts with the expiry recorded
    dl = await store.redis.hgetall(store.keys(T).group("g1").dead_letter(mid))
    assert dl["reason"] == "max_attempts" and dl["payload"] == '"z"'
    assert [e["error"] for e in json.loads(dl["errors"])] == ["lease expired"]


async def test_release_returns_to_head_without_counting_the_attempt(store: RedisStore) -> None:
    # Given three messages; the first two leased, then the first redelivered once so it is on attempt 2
    await store.ensure_group(T, "g1")
    a, b, c = await publish(store, '"a"', '"b"', '"c"')
    (da,) = await store.claim(T, "g1", 1, 30_000, "x")
    await store.nack_many(T, "g1", [(NackItem(a, da.receipt, "e", delay_ms=0), 1, "x")])
    got = await store.claim(T, "g1", 2, 30_000, "x")
    assert [(d.id, d.attempt) for d in got] == [(a, 2), (b, 1)]
    # When both are released (claimed but never sent), plus one with a stale receipt
    n = await store.release(T, "g1", [AckItem(d.id, d.receipt) for d in got] + [AckItem(c, "0-1")])
    # Then exactly the two go back to the head, in order, with their attempt numbers unchanged
    assert n == 2
    assert await depth(store) == (3, 0, 0, 0)
    again = await store.claim(T, "g1", 3, 30_000, "y")
    assert [(d.id, d.attempt) for d in again] == [(a, 2), (b, 1), (c, 1)]
    # And the released receipts are stale now
    assert await store.ack_many(T, "g1", [AckItem(d.id, d.receipt) for d in got]) == [False, False]
    assert await store.release(T, "g1", []) == 0


async def test_extend_pushes_the_deadline(store_factory: StoreFactory, clock: FakeClock) -> None:
    # Given a message leased for 100 ms
    store = await store_factory(clock=clock)
    await store.ensure_group(T, "g1")
    (mid,) = await publish(store, "1")
    (d,) = await store.claim(T, "g1", 1, 100, "c")
    g = store.keys(T).group("g1")
    # When the lease is extended to 10 s
    deadline = await store.extend(T, "g1", mid, d.receipt, 10_000)
    # Then the lease set holds the new deadline and a sweep after the old deadline expires nothing
    assert deadline is not None and deadline >= d.lease_expires_at + 9_000
    assert await store.redis.zscore(g.leased, mid) == deadline
    # (a first delivery: its deadline is its score alone, its lease record and delivery hash are untouched)
    assert await store.redis.hget(g.held, mid) == f"{d.receipt}|test-node|c|"
    assert await store.redis.exists(g.delivery(mid)) == 0
    clock.advance(150)
    assert await store.sweep([(T, "g1")]) == [(0, 0, 0)]
    assert await store.ack_many(T, "g1", [AckItem(mid, d.receipt)]) == [True]
    # And extending with a wrong receipt, or after the ack, is refused
    assert await store.extend(T, "g1", mid, d.receipt, 10_000) is None
    assert await store.extend(T, "g1", mid, "0-0", 10_000) is None


async def test_claim_reports_lease_deadline(store: RedisStore) -> None:
    # Given a message, When it is claimed with a 5 s lease
    await store.ensure_group(T, "g1")
    before = now_ms()
    (mid,) = await publish(store, "1")
    (d,) = await store.claim(T, "g1", 1, 5_000, "c")
    # Then the delivery's deadline and published_at are epoch ms, and the lease set agrees
    assert before + 5_000 <= d.lease_expires_at <= now_ms() + 5_000
    assert before <= d.published_at <= now_ms()
    assert await store.redis.zscore(store.keys(T).group("g1").leased, mid) == d.lease_expires_at


async def test_claim_skips_an_id_whose_body_is_gone(store: RedisStore) -> None:
    # Given a queued id whose body was deleted by hand, followed by a normal message
    await store.ensure_group(T, "g1")
    a, b = await publish(store, "1", "2")
    await store.redis.delete(store.keys(T).body(a))
    # When claimed, Then the orphan id is dropped and the next message is delivered
    got = await store.claim(T, "g1", 10, 30_000, "c")
    assert [d.id for d in got] == [b]
    assert await depth(store) == (0, 1, 0, 0)


# ---- inspection ---------------------------------------------------------------------------------------------------


async def test_depths_count_each_state(store: RedisStore) -> None:
    # Given five messages: one acked, one leased, one retrying, one dead, one ready
    await store.ensure_group(T, "g1")
    await publish(store, *"12345")
    d = await store.claim(T, "g1", 4, 30_000, "c")
    await store.ack_many(T, "g1", [AckItem(d[0].id, d[0].receipt)])
    await store.nack_many(
        T,
        "g1",
        [
            (NackItem(d[2].id, d[2].receipt, "e", delay_ms=60_000), 1, "c"),
            (NackItem(d[3].id, d[3].receipt, "e", dead=True), 1, "c"),
        ],
    )
    # When depths are read, Then each state has its count; an unknown pair counts zeros
    assert await depth(store) == (1, 1, 1, 1)
    (z,) = await store.depths([(T, "nobody")])
    assert (z.topic, z.group, z.ready, z.leased, z.delayed, z.dead) == (T, "nobody", 0, 0, 0, 0)


async def test_all_pairs_lists_every_topic_and_group(store: RedisStore) -> None:
    # Given no topics, Then there are no pairs
    assert await store.all_pairs() == []
    # Given groups on two topics and a default group created by publish
    await store.ensure_group("b", "g2")
    await store.ensure_group("b", "g1")
    await store.ensure_group("a", "g1")
    await store.publish_many([req(topic="c")])
    # Then all pairs are listed, sorted
    assert await store.all_pairs() == [("a", "g1"), ("b", "g1"), ("b", "g2"), ("c", "default")]
    assert await store.topics() == ["a", "b", "c"]


async def test_payload_round_trips_byte_identical(store: RedisStore) -> None:
    # Given a ~200 KB payload with integers beyond 64 bits, exponents, unicode and escapes, as JSON text
    payload = (
        '{"big":123456789012345678901234567890,"neg":-98765432109876543210987654321,'
        '"float":1.000000000000000000001e-7,"uni":"h\u00e9llo \U0001f30d \u2028 \u4e2d","esc":"\\u0000\\"\\n",'
        '"items":[' + ",".join(f'{{"i":{i},"s":"\u00fc{i}"}}' for i in range(12_000)) + "]}"
    )
    assert len(payload.encode()) > 150_000
    headers = '{"trace":"\u00e9"}'
    await store.ensure_group(T, "g1")
    # When it is published and claimed
    await publish(store, payload, headers=headers)
    (d,) = await store.claim(T, "g1", 1, 30_000, "c")
    # Then the JSON text comes back exactly as stored, byte for byte, and still parses to the same value
    assert d.payload.encode() == payload.encode()
    assert d.headers == headers
    assert orjson.loads(d.payload)["uni"] == "h\u00e9llo \U0001f30d \u2028 \u4e2d"
    assert json.loads(d.payload)["big"] == 123456789012345678901234567890


async def test_schema_and_heartbeat(store: RedisStore) -> None:
    # Given a fresh prefix, When the schema is initialised twice, Then the first call saw nothing, the second "1"
    assert await store.init_schema() is None
    assert await store.init_schema() == "1"
    # When a node heartbeats, Then it is in the nodes set with a recent time
    await store.heartbeat()
    score = await store.redis.zscore(f"{store.prefix}:nodes", "test-node")
    assert score is not None and abs(score - now_ms()) < 5_000
    assert await store.ping() is True


async def test_scripts_reload_after_script_flush(store: RedisStore) -> None:
    # Given a store that has run its scripts, When Redis forgets them (restart, SCRIPT FLUSH)
    await store.ensure_group(T, "g1")
    await publish(store, "1")
    await store.redis.script_flush()
    # Then single calls and pipelined calls reload them (NOSCRIPT is handled) and work as before
    (mid,) = await publish(store, "2")
    await store.redis.script_flush()
    got = await store.claim(T, "g1", 10, 30_000, "c")
    assert [d.payload for d in got] == ["1", "2"] and got[1].id == mid
    await store.redis.script_flush()
    assert await store.sweep([(T, "g1")]) == [(0, 0, 0)]


# ---- failures -----------------------------------------------------------------------------------------------------


async def test_redis_errors_do_not_leak_out_of_the_store(store: RedisStore) -> None:
    # Given a key of the wrong type where the topic's group set should be
    await store.redis.set(store.keys(T).groups, "not a set")
    # When publishing to that topic alongside a healthy topic
    (bad, good) = await store.publish_many([req(), PublishRequest("healthy", "1")])
    # Then that message gets a BrokerError (not a redis-py exception) in place, and the other topic is stored
    assert type(bad) is BrokerError and bad.code == "internal"
    assert isinstance(good, PublishResult) and good.groups == 1


async def test_store_unavailable_then_breaker_opens() -> None:
    # Given a store pointed at a port nobody listens on (real redis-py client)
    settings = Settings().replace("breakers", redis_fail_max=3, redis_reset_timeout_s=30.0)
    store = make_store(connect_redis(f"redis://127.0.0.1:{free_port()}/0", settings), settings)
    try:
        # When publish fails fail_max times, Then each failure is an UnavailableError
        for _ in range(3):
            with pytest.raises(UnavailableError) as ei:
                await store.publish_many([req()])
            assert not isinstance(ei.value, StoreRefusedError)
            assert ei.value.retry_after_ms is not None
        # Then the breaker is open, and the next call fails fast with a retry hint near the reset timeout
        assert store.breaker.state == "open"
        t0 = time.monotonic()
        with pytest.raises(UnavailableError) as ei:
            await store.claim(T, "g1", 1, 1_000, "c")
        assert time.monotonic() - t0 < 0.2
        assert "breaker open" in ei.value.message
        assert ei.value.retry_after_ms is not None and 25_000 <= ei.value.retry_after_ms <= 30_000
    finally:
        await store.close()


async def test_refusal_maps_to_store_refused(redis_server: object) -> None:
    # Given a real redis-server at maxmemory 1 byte with noeviction (a write is refused with OOM)
    from .support import RedisServer

    assert isinstance(redis_server, RedisServer)
    settings = Settings().replace("redis", key_prefix="oom")
    store = make_store(connect_redis(redis_server.url, settings), settings)
    redis_server.cli("CONFIG", "SET", "maxmemory-policy", "noeviction")
    redis_server.cli("CONFIG", "SET", "maxmemory", "1")
    try:
        # When a publish runs, Then it fails as StoreRefusedError (an UnavailableError with a retry hint)
        with pytest.raises(StoreRefusedError) as ei:
            await store.publish_many([req()])
        assert ei.value.code == "unavailable" and ei.value.retry_after_ms
    finally:
        redis_server.cli("CONFIG", "SET", "maxmemory", "0")
        await store.close()


def test_message_ids_are_unique_and_sortable_across_a_fork() -> None:
    # Given ids minted in this process, When a forked child mints ids in the same millisecond
    import os

    from broker.core.model import new_message_id

    ms = now_ms()
    mine = [new_message_id(ms) for _ in range(3)]
    assert mine == sorted(mine) and len(set(mine)) == 3 and all(len(i) == 28 for i in mine)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: write its ids and leave at once
        os.write(w, ",".join(new_message_id(ms) for _ in range(3)).encode())
        os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    child = os.read(r, 4096).decode().split(",")
    os.close(r)
    # Then the child's ids differ from the parent's next ones (a new process tag)
    assert status == 0 and len(child) == 3
    assert not set(child) & {*mine, *(new_message_id(ms) for _ in range(3))}


async def test_claims_ride_on_a_publish_round_trip(store: RedisStore) -> None:
    # Given two groups, and a backlog of one message in g1
    await store.ensure_group(T, "g1")
    await store.ensure_group(T, "g2")
    (old,) = await publish(store, '"old"')
    (g2_old,) = await store.claim(T, "g2", 10, 30_000, "c2")
    await store.ack_many(T, "g2", [AckItem(g2_old.id, g2_old.receipt)])
    # When a publish carries a claim for each group
    claims = [ClaimRequest(T, "g1", 10, 30_000, "c1"), ClaimRequest(T, "g2", 1, 30_000, "c2")]
    (res,) = await store.publish_many([req('"new"')], claims)
    # Then each claim ran after the publish, oldest first, within its own limit
    g1, g2 = claims
    assert isinstance(g1.result, list) and [d.payload for d in g1.result] == ['"old"', '"new"']
    assert isinstance(g2.result, list) and [(d.id, d.attempt) for d in g2.result] == [(res.id, 1)]
    assert g1.result[0].id == old
    assert await depth(store, "g1") == (0, 2, 0, 0)


async def test_claims_on_a_failed_publish_are_reconciled(store_factory: StoreFactory) -> None:
    store = await store_factory()
    await store.ensure_group(T, "g1")
    await publish(store, '"waiting"')
    claim = ClaimRequest(T, "g1", 10, 30_000, "c1")

    # Given a publish round trip whose reply is lost after Redis ran it
    real = store.scripts.eval_many

    async def lost(calls: object, **kw: bool) -> list[object]:
        await real(calls, **kw)  # type: ignore[arg-type]
        raise UnavailableError("connection lost after the pipeline ran")

    store.scripts.eval_many = lost  # type: ignore[method-assign]
    with pytest.raises(UnavailableError):
        await store.publish_many([req('"new"')], [claim])
    store.scripts.eval_many = real  # type: ignore[method-assign]
    assert claim.result is None
    # Then the claim is given back when Redis answers again: nothing stays leased by a consumer that got nothing
    assert await depth(store, "g1") == (0, 2, 0, 0)
    assert await store.reconcile_claims() == 2
    assert await depth(store, "g1") == (2, 0, 0, 0)
    again = await store.claim(T, "g1", 10, 30_000, "c1")
    assert [d.attempt for d in again] == [1, 1]  # the lost claim did not count an attempt


async def test_a_lost_claim_reply_gives_back_only_that_claims_deliveries(store_factory: StoreFactory) -> None:
    # Given a claim whose reply was lost, and right after it (same millisecond, same consumer and lease) a normal
    # claim of the same consumer that did reach it
    store = await store_factory()
    await store.ensure_group(T, "g1")
    await publish(store, '"a"', '"b"')
    lost = ClaimRequest(T, "g1", 1, 30_000, "c1")
    now = now_ms()
    script, keys, args = store.messages.claim_call(lost, now)
    await store.scripts.eval_many([(script, keys, args)])
    store.messages.uncertain(lost, now)
    ok = ClaimRequest(T, "g1", 1, 30_000, "c1")
    script, keys, args = store.messages.claim_call(ok, now)
    (flat,) = await store.scripts.eval_many([(script, keys, args)])
    (held,) = store.messages.deliveries(T, "g1", flat, now + 30_000)
    # When the lost claim is reconciled, Then only its delivery goes back; the held one stays leased (its ack works)
    assert await store.reconcile_claims() == 1
    assert await store.ack_many(T, "g1", [AckItem(held.id, held.receipt)]) == [True]
    (again,) = await store.claim(T, "g1", 10, 30_000, "c2")
    assert again.payload == '"a"' and again.attempt == 1


async def test_a_refused_publish_keeps_the_deliveries_of_claims_that_ran(store_factory: StoreFactory) -> None:
    # Given Redis refusing the publish script (as at maxmemory) but not the claim that rides with it
    store = await store_factory()
    await store.ensure_group(T, "g1")
    await publish(store, '"waiting"')
    claim = ClaimRequest(T, "g1", 10, 30_000, "c1")
    real = store.scripts.eval_many

    async def refuse_publish(calls: list[tuple[object, list[str], list[object]]], **kw: bool) -> list[object]:
        res = await real(calls[1:], **kw)  # type: ignore[arg-type]
        return [ResponseError("OOM command not allowed when used memory > 'maxmemory'."), *res]

    store.scripts.eval_many = refuse_publish  # type: ignore[assignment]
    (res,) = await store.publish_many([req('"new"')], [claim])
    store.scripts.eval_many = real  # type: ignore[method-assign]
    # Then the publish is refused (not stored, said so), and the claim's delivery is handed over, not discarded
    assert isinstance(res, StoreRefusedError)
    assert isinstance(claim.result, list) and [d.payload for d in claim.result] == ['"waiting"']
    assert store.refused_at is not None
    assert await store.reconcile_claims() == 0  # nothing was uncertain


async def test_a_damaged_group_does_not_stop_the_sweep_of_the_others(
    store_factory: StoreFactory, clock: FakeClock
) -> None:
    # Given two groups with an expired lease each, and one group's delayed set damaged (a string: WRONGTYPE)
    store = await store_factory(clock=clock)
    await store.ensure_group(T, "g1")
    await store.ensure_group(T, "g2")
    await publish(store, '"a"')
    await store.claim(T, "g1", 1, 1, "c1")
    await store.claim(T, "g2", 1, 1, "c2")
    await store.redis.set(store.keys(T).group("g1").delayed, "damaged")
    clock.advance(10)
    # When swept with a list for failures, Then g2 is swept and g1 is named with its error
    failed: list[str] = []
    assert await store.sweep([(T, "g1"), (T, "g2")], failed=failed) == [(0, 0, 0), (1, 0, 0)]
    assert len(failed) == 1 and failed[0].startswith(f"{T}/g1: ") and "WRONGTYPE" in failed[0]
    # And without the list the call fails as before (the caller asked for all or nothing)
    with pytest.raises(BrokerError):
        await store.sweep([(T, "g1")])


# ---- first deliveries: the lease record (g:<group>:held) -------------------------------------------------------


async def test_a_failed_first_delivery_gets_its_delivery_hash_and_the_retry_uses_it(
    store_factory: StoreFactory, clock: FakeClock
) -> None:
    # Given two first deliveries (held: no delivery hash)
    store = await store_factory(clock=clock)
    await store.ensure_group(T, "g1")
    a, b = await publish(store, '"a"', '"b"')
    g = store.keys(T).group("g1")
    da, _ = await store.claim(T, "g1", 2, 1_000, "c1")
    assert await store.redis.hlen(g.held) == 2
    # When one is nacked and the other's lease runs out
    assert await store.nack_many(T, "g1", [(NackItem(a, da.receipt, "boom", 5_000), 1, "c1")]) == [NackOutcome.RETRY]
    clock.advance(1_001)
    assert await store.sweep([(T, "g1")]) == [(1, 0, 0)]
    # Then each failure wrote its delivery hash (attempt 1, its error) and left no lease record behind
    assert await store.redis.exists(g.held) == 0
    for mid, err in ((a, "boom"), (b, "lease expired")):
        dlv = await store.redis.hgetall(g.delivery(mid))
        assert dlv["attempts"] == "1" and dlv["claims"] == "1" and dlv["consumer"] == "c1", dlv
        assert json.loads(f"[{dlv['errors']}]")[-1]["error"] == err
    # And the retries are attempt 2 under a new receipt; their ack deletes the delivery hashes
    clock.advance(10_000)
    await store.sweep([(T, "g1")])
    again = await store.claim(T, "g1", 2, 30_000, "c2")
    assert sorted((d.id, d.attempt) for d in again) == [(a, 2), (b, 2)]
    assert all(d.receipt.endswith("-2") for d in again)
    assert await store.redis.exists(g.held) == 0
    assert await store.ack_many(T, "g1", [AckItem(d.id, d.receipt) for d in again]) == [True, True]
    assert await store.redis.exists(g.delivery(a), g.delivery(b), store.keys(T).body(a)) == 0


async def test_a_released_first_delivery_goes_back_uncounted(store: RedisStore) -> None:
    await store.ensure_group(T, "g1")
    (mid,) = await publish(store, '"a"')
    g = store.keys(T).group("g1")
    (d,) = await store.claim(T, "g1", 1, 30_000, "c1")
    assert await store.release(T, "g1", [AckItem(mid, d.receipt)]) == 1
    # its state moved to a delivery hash (attempt uncounted, claim count kept), as for any released delivery
    assert await store.redis.exists(g.held, g.leased) == 0
    assert await store.redis.hmget(g.delivery(mid), "attempts", "claims") == ["0", "1"]
    (again,) = await store.claim(T, "g1", 1, 30_000, "c1")
    assert again.attempt == 1 and again.receipt != d.receipt and again.receipt.endswith("-2")
    assert await store.ack_many(T, "g1", [AckItem(mid, d.receipt)]) == [False]  # the old receipt is stale
    assert await store.ack_many(T, "g1", [AckItem(mid, again.receipt)]) == [True]


async def test_an_id_twice_in_one_ack_batch_is_acked_once(store: RedisStore) -> None:
    await store.ensure_group(T, "g1")
    await store.ensure_group(T, "g2")  # the body has two references: a double ack would drop the other group's
    (mid,) = await publish(store, '"a"')
    (d,) = await store.claim(T, "g1", 1, 30_000, "c1")
    assert await store.ack_many(T, "g1", [AckItem(mid, d.receipt), AckItem(mid, d.receipt)]) == [True, False]
    (other,) = await store.claim(T, "g2", 1, 30_000, "c2")
    assert other.payload == '"a"'


async def test_stored_times_counts_and_receipts_are_exact_strings(store_factory: StoreFactory) -> None:
    # The scripts write numbers as strings made once per call (publish: published_at, refs; claim: the deadline, a
    # first delivery's receipt; ack: the refs decrement): the stored bytes are those an integer prints as.
    clock = FakeClock(start_ms=1_718_000_000_123)
    store = await store_factory(clock=clock)
    await store.ensure_group(T, "g1")
    await store.ensure_group(T, "g2")
    a, b = await publish(store, '"a"', '"b"', key="k")
    k = store.keys(T)
    g = k.group("g1")
    assert await store.redis.hmget(k.body(a), "published_at", "refs") == ["1718000000123", "2"]
    # b waits behind a (same ordering key): claim a, ack it, then b goes live
    (da,) = await store.claim(T, "g1", 2, 30_000, "c1")
    assert da.id == a and da.attempt == 1 and da.receipt.endswith("-1")
    assert await store.redis.hget(g.held, a) == f"{da.receipt}|test-node|c1|k"
    assert await store.redis.zscore(g.leased, a) == 1_718_000_030_123
    assert await store.ack_many(T, "g1", [AckItem(a, da.receipt)]) == [2]
    assert await store.redis.hget(k.body(a), "refs") == "1"  # g2 still holds it
    # a later attempt keeps its state in the delivery hash: exact deadline, claim sequence 2
    (db,) = await store.claim(T, "g1", 1, 30_000, "c1")
    await store.nack_many(T, "g1", [(NackItem(b, db.receipt, "x", 0), 1, "c1")])
    clock.advance(5)
    (again,) = await store.claim(T, "g1", 1, 30_000, "c2")
    assert again.id == b and again.attempt == 2 and again.receipt.endswith("-2")
    h = await store.redis.hgetall(g.delivery(b))
    assert (h["attempts"], h["claims"], h["receipt"], h["consumer"]) == ("2", "2", again.receipt, "c2")
    assert h["leased_until"] == "1718000030128"
    # the first deliveries of one claim share its receipt (g2: a is live, b waits behind it, c and d have no key)
    c, d = await publish(store, '"c"', '"d"')
    got = await store.claim(T, "g2", 4, 30_000, "c3")
    assert [x.id for x in got] == [a, c, d]
    assert len({x.receipt for x in got}) == 1 and got[0].receipt.endswith("-1")
    assert await store.redis.hget(k.group("g2").held, c) == f"{got[0].receipt}|test-node|c3|"


async def test_extending_a_retry_moves_its_delivery_hash_deadline_too(store: RedisStore) -> None:
    await store.ensure_group(T, "g1")
    (mid,) = await publish(store, '"a"')
    g = store.keys(T).group("g1")
    (d,) = await store.claim(T, "g1", 1, 30_000, "c1")
    await store.nack_many(T, "g1", [(NackItem(mid, d.receipt, "x", 0), 1, "c1")])
    (r,) = await store.claim(T, "g1", 1, 30_000, "c1")
    deadline = await store.extend(T, "g1", mid, r.receipt, 60_000)
    assert deadline is not None
    assert await store.redis.hget(g.delivery(mid), "leased_until") == str(deadline)
    assert await store.redis.zscore(g.leased, mid) == deadline


@contextlib.asynccontextmanager
async def counted_store() -> AsyncIterator[tuple[RedisStore, aioredis.Redis]]:
    """A store on a redis-server of its own, and a second client to read that server's command counts."""
    from .support import RedisServer

    with RedisServer() as server:
        settings = Settings()
        store = make_store(connect_redis(server.url, settings), settings)
        counter = connect_redis(server.url, settings)
        try:
            yield store, counter
        finally:
            await counter.aclose()
            await store.close()


@pytest.mark.parametrize(
    ("max_attempts", "backoff_base_ms"), [(None, None), (None, 50), (3, None), (3, 50)], ids=["none", "b", "m", "mb"]
)
async def test_a_body_is_written_with_one_hset_its_retry_policy_included(
    max_attempts: int | None, backoff_base_ms: int | None
) -> None:
    async with counted_store() as (store, counter):  # its own Redis: the test counts every HSET it runs
        # Given a topic with a group
        await store.ensure_group("t", "g")
        await counter.config_resetstat()
        # When a message with (or without) its own retry policy is published
        (res,) = await store.publish_many(
            [PublishRequest("t", '"x"', max_attempts=max_attempts, backoff_base_ms=backoff_base_ms)]
        )
        # Then its body took one HSET, and holds the policy it was given
        assert (await counter.info("commandstats"))["cmdstat_hset"]["calls"] == 1
        body = await counter.hgetall(store.keys("t").body(res.id))
        assert body.get("max_attempts") == (None if max_attempts is None else str(max_attempts))
        assert body.get("backoff_base_ms") == (None if backoff_base_ms is None else str(backoff_base_ms))
        assert body["payload"] == '"x"'


async def test_a_claim_reads_no_delivery_hash_after_the_ones_that_exist() -> None:
    async with counted_store() as (store, counter):  # its own Redis: the test counts every HMGET it runs
        # Given a queue of 10 messages whose first one is a retry (nacked with delay 0: back at the head)
        await store.ensure_group("t", "g")
        await store.publish_many([PublishRequest("t", str(n)) for n in range(10)])
        (first,) = await store.claim("t", "g", 1, 30_000, "c1")
        await store.nack_many("t", "g", [(NackItem(first.id, first.receipt, "again", delay_ms=0), 1, "c1")])
        await counter.config_resetstat()
        # When one claim takes all ten
        got = await store.claim("t", "g", 10, 30_000, "c1")
        # Then the retry is attempt 2 and the others attempt 1, and besides the ten bodies only the retry's
        # delivery hash was read (the others have none: EXISTS counted one)
        assert [d.attempt for d in got] == [2] + [1] * 9 and got[0].id == first.id
        assert (await counter.info("commandstats"))["cmdstat_hmget"]["calls"] == 10 + 1
