"""Per-key ordering (seed 003: per-customer order with one timer per customer) and per-message retry policy
(seed 004). Store level, on fakeredis and a real redis-server; the multi-consumer, multi-node proof is in
``mission_critical/test_key_order.py``."""

from __future__ import annotations

import random

from broker.core.config import Settings
from broker.core.model import AckItem, Delivery, NackItem, PublishRequest
from broker.store import AckOutcome, NackOutcome, RedisStore

from .conftest import StoreFactory
from .support import FakeClock

T = "accounts"


def keyed(key: str | None, payload: str, **kw: object) -> PublishRequest:
    return PublishRequest(T, payload, key=key, **kw)  # type: ignore[arg-type]


async def claim(store: RedisStore, n: int = 100, group: str = "g", lease_ms: int = 30_000) -> list[Delivery]:
    return await store.claim(T, group, n, lease_ms, "c1")


async def ack(store: RedisStore, ds: list[Delivery], group: str = "g") -> None:
    res = await store.ack_many(T, group, [AckItem(d.id, d.receipt) for d in ds])
    assert len(res) == len(ds) and all(res)


async def test_one_message_per_key_in_flight_in_publish_order(store: RedisStore) -> None:
    # Given a group and messages of two keys, interleaved with unkeyed ones, published in one batch
    await store.ensure_group(T, "g")
    await store.publish_many(
        [keyed("a", '"a1"'), keyed("b", '"b1"'), keyed(None, '"x1"'), keyed("a", '"a2"'), keyed("a", '"a3"')]
    )
    await store.publish_many([keyed("b", '"b2"'), keyed(None, '"x2"')])
    # When a consumer asks for everything
    first = await claim(store)
    # Then it gets the head of each key and every unkeyed message, in publish order, and nothing else
    assert [d.payload for d in first] == ['"a1"', '"b1"', '"x1"', '"x2"']
    assert await claim(store) == []
    # When a1 is acked, a2 goes live (at the tail; the ack says so, so the broker claims again); b1 holds b2 back
    assert await store.ack_many(T, "g", [AckItem(first[0].id, first[0].receipt)]) == [AckOutcome.ACKED_NEXT_LIVE]
    assert [d.payload for d in await claim(store)] == ['"a2"']
    await ack(store, [first[1]])
    assert [d.payload for d in await claim(store)] == ['"b2"']


async def test_a_lease_from_a_build_without_the_key_copy_still_moves_its_key_line(store: RedisStore) -> None:
    # Given a keyed lease as builds before claim.lua copied the ordering key into the delivery hash left it
    await store.ensure_group(T, "g")
    await store.publish_many([keyed("a", '"a1"'), keyed("a", '"a2"'), keyed(None, '"x"')])
    a1, x = await claim(store)
    gb = f"{store.prefix}:{{{T}}}:g:g:"
    # (what this build writes for a first delivery: the key in its lease record of the group's held hash)
    assert await store.redis.hget(gb + "held", a1.id) == f"{a1.receipt}|test-node|c1|a"
    assert await store.redis.hget(gb + "held", x.id) == f"{x.receipt}|test-node|c1|"
    # the older build's lease of a1: a delivery hash without the key
    await store.redis.hdel(gb + "held", a1.id)
    await store.redis.hset(
        gb + f"dlv:{a1.id}",
        mapping={"attempts": 1, "claims": 1, "receipt": a1.receipt, "consumer": "c1", "node": "test-node"},
    )
    # When it is acked, Then ack.lua reads the key from the body: a2 goes live and the ack says so
    assert await store.ack_many(T, "g", [AckItem(a1.id, a1.receipt)]) == [AckOutcome.ACKED_NEXT_LIVE]
    assert [d.payload for d in await claim(store)] == ['"a2"']
    # And the unkeyed one acks as plain ACKED, leaving no delivery hash or body behind
    assert await store.ack_many(T, "g", [AckItem(x.id, x.receipt)]) == [AckOutcome.ACKED]
    assert not await store.redis.exists(gb + f"dlv:{x.id}", f"{store.prefix}:{{{T}}}:msg:{x.id}")


async def test_a_retry_holds_its_key_but_not_other_keys(store_factory: StoreFactory, clock: FakeClock) -> None:
    settings = Settings().replace("retry", backoff_base_ms=150, backoff_cap_ms=150, jitter=0.0)
    store = await store_factory(settings, clock=clock)
    await store.ensure_group(T, "g")
    await store.publish_many([keyed("a", '"a1"'), keyed("a", '"a2"'), keyed("b", '"b1"'), keyed("b", '"b2"')])
    a1, b1 = await claim(store)
    # When a1 fails (backoff 150 ms) and b1 succeeds
    (outcome,) = await store.nack_many(T, "g", [(NackItem(a1.id, a1.receipt, "boom"), 1, "c1")])
    assert outcome is NackOutcome.RETRY
    await ack(store, [b1])
    # Then b2 is delivered at once, a2 is not (a1 waits for its retry)
    assert [d.payload for d in await claim(store)] == ['"b2"']
    clock.advance(200)
    assert (await store.sweep([(T, "g")]))[0][2] == 1
    # And the retry of a1 comes before a2
    (again,) = await claim(store)
    assert (again.payload, again.attempt) == ('"a1"', 2)
    await ack(store, [again])
    assert [d.payload for d in await claim(store)] == ['"a2"']


async def test_dead_letter_releases_the_key_and_reprocess_rejoins_its_line(store_factory: StoreFactory) -> None:
    store = await store_factory(Settings().replace("retry", max_attempts=1))
    await store.ensure_group(T, "g")
    await store.publish_many([keyed("a", '"a1"'), keyed("a", '"a2"'), keyed("a", '"a3"')])
    (a1,) = await claim(store)
    # When a1 fails its only attempt it is dead-lettered, and a2 goes live
    (outcome,) = await store.nack_many(T, "g", [(NackItem(a1.id, a1.receipt, "bad"), 1, "c1")])
    assert outcome is NackOutcome.DEAD
    (a2,) = await claim(store)
    assert a2.payload == '"a2"'
    # When the operator reprocesses a1 while a2 is in flight, a1 joins the end of key a's line: not live yet
    from broker.store.dead_letters import DeadLetters

    assert await DeadLetters(store).reprocess(T, "g", [a1.id]) == [True]
    assert await claim(store) == []
    await ack(store, [a2])
    (a3,) = await claim(store)
    await ack(store, [a3])
    (back,) = await claim(store)
    assert (back.id, back.payload) == (a1.id, '"a1"')
    await ack(store, [back])
    # And nothing of key a is left in Redis
    assert not [k async for k in store.redis.scan_iter(match=f"{store.prefix}:*key:*")]


async def test_lease_expiry_and_release_keep_the_key_line(store_factory: StoreFactory, clock: FakeClock) -> None:
    store = await store_factory(clock=clock)
    await store.ensure_group(T, "g")
    await store.publish_many([keyed("a", '"a1"'), keyed("a", '"a2"')])
    # Given a1 claimed but never sent (released), then claimed with a short lease that runs out
    (a1,) = await claim(store)
    assert await store.release(T, "g", [AckItem(a1.id, a1.receipt)]) == 1
    (a1,) = await claim(store, lease_ms=30)
    clock.advance(60)
    await store.sweep([(T, "g")])
    # Then a2 never overtakes a1
    for _ in range(100):
        got = await claim(store)
        if got:
            break
        clock.advance(30)
        await store.sweep([(T, "g")])
    assert [(d.payload, d.attempt) for d in got] == [('"a1"', 2)]


async def test_delayed_keyed_message_holds_its_line_until_due(store_factory: StoreFactory, clock: FakeClock) -> None:
    store = await store_factory(clock=clock)
    await store.ensure_group(T, "g")
    # Given a1 delayed 150 ms and a2 published right after with no delay
    await store.publish_many([keyed("a", '"a1"', delay_ms=150), keyed("a", '"a2"'), keyed("b", '"b1"', delay_ms=150)])
    await store.publish_many([keyed("b", '"b2"')])
    # Then nothing of a or b is delivered before a1 / b1 are due, and then in order
    assert await claim(store) == []
    clock.advance(200)
    await store.sweep([(T, "g")])
    first = await claim(store)
    assert sorted(d.payload for d in first) == ['"a1"', '"b1"']
    await ack(store, first)
    assert sorted(d.payload for d in await claim(store)) == ['"a2"', '"b2"']


async def test_keys_are_per_group(store: RedisStore) -> None:
    # Given two groups: a key in flight in one group does not hold the other group's line
    await store.ensure_group(T, "g")
    await store.ensure_group(T, "h")
    await store.publish_many([keyed("a", '"a1"'), keyed("a", '"a2"')])
    (g1,) = await claim(store, group="g")
    (h1,) = await claim(store, group="h")
    await ack(store, [h1], group="h")
    assert [d.payload for d in await claim(store, group="h")] == ['"a2"']
    assert await claim(store, group="g") == []
    assert g1.payload == '"a1"'


async def test_random_nacks_keep_every_key_in_order(store_factory: StoreFactory) -> None:
    # Given 20 keys x 15 messages, consumed in random batches with 30 % immediate nacks (redelivered at once)
    store = await store_factory(Settings().replace("retry", max_attempts=50))
    await store.ensure_group(T, "g")
    rng = random.Random(7)
    reqs = [keyed(f"k{i % 20}", f'"{i}"') for i in range(300)]
    for i in range(0, 300, 37):
        await store.publish_many(reqs[i : i + 37])
    done: dict[str, list[int]] = {}
    for _ in range(2_000):
        got = await claim(store, n=rng.randint(1, 30))
        if not got and sum(map(len, done.values())) == 300:
            break
        in_flight = [d.key for d in got]
        assert len(in_flight) == len(set(in_flight)), "two messages of one key in flight"
        nacks = [d for d in got if rng.random() < 0.3]
        acks = [d for d in got if d not in nacks]
        if nacks:
            items = [(NackItem(d.id, d.receipt, "flaky", delay_ms=0), d.attempt, "c1") for d in nacks]
            assert set(await store.nack_many(T, "g", items)) == {NackOutcome.READY}
        if acks:
            await ack(store, acks)
        for d in acks:
            assert d.key is not None
            done.setdefault(d.key, []).append(int(d.payload.strip('"')))
    # Then every key's messages were processed exactly once, in publish order
    assert sum(map(len, done.values())) == 300
    for key, seq in done.items():
        assert seq == sorted(seq) and len(seq) == 15, key


# ---- per-message retry policy -------------------------------------------------------------------------------------


async def test_a_message_may_carry_its_own_max_attempts_and_backoff(
    store_factory: StoreFactory, clock: FakeClock
) -> None:
    settings = Settings().replace("retry", max_attempts=5, backoff_base_ms=60_000, jitter=0.0)
    store = await store_factory(settings, clock=clock)
    await store.ensure_group(T, "g")
    # Given one message allowed 2 attempts with a 40 ms backoff, one with the defaults
    await store.publish_many([keyed(None, '"own"', max_attempts=2, backoff_base_ms=40), keyed(None, '"default"')])
    own, default = await claim(store)
    outcomes = await store.nack_many(
        T, "g", [(NackItem(own.id, own.receipt, "e1"), 1, "c1"), (NackItem(default.id, default.receipt, "e1"), 1, "c1")]
    )
    assert outcomes == [NackOutcome.RETRY, NackOutcome.RETRY]
    # Then its retry is due after its own backoff (40 ms), the other's after the default (60 s)
    g = store.keys(T).group("g")
    due = dict(await store.redis.zrange(g.delayed, 0, -1, withscores=True))
    assert due[default.id] - due[own.id] > 59_000
    clock.advance(60)
    await store.sweep([(T, "g")])
    (again,) = await claim(store)
    # And its second failure dead-letters it (max_attempts 2), while the default allows 5
    (outcome,) = await store.nack_many(T, "g", [(NackItem(again.id, again.receipt, "e2"), 2, "c1")])
    assert outcome is NackOutcome.DEAD
    # And the dead letter keeps the policy, so a reprocessed message keeps it too
    assert await store.redis.hget(g.dead_letter(own.id), "max_attempts") == "2"


async def test_lease_expiry_uses_the_message_policy(store_factory: StoreFactory, clock: FakeClock) -> None:
    store = await store_factory(Settings().replace("retry", max_attempts=5), clock=clock)
    await store.ensure_group(T, "g")
    await store.publish_many([keyed(None, '"once"', max_attempts=1)])
    await claim(store, lease_ms=20)
    clock.advance(50)
    # When its only lease expires, Then it is dead-lettered at once (not retried up to the default 5)
    assert await store.sweep([(T, "g")]) == [(0, 1, 0)]


async def test_key_repair_never_queues_a_live_head_twice(store: RedisStore) -> None:
    from broker.store.scripts import load_script

    await store.ensure_group(T, "g")
    await store.publish_many([keyed("a", '"a1"'), keyed("a", '"a2"')])
    k = store.keys(T)
    g = k.group("g")
    repair = store.redis.register_script(load_script("repair_key"))

    async def run(mode: str) -> int:
        return int(await repair(keys=[g.key_line("a"), g.ready, g.leased, g.delayed], args=[k.base, "g", 0, mode]))

    # Given a healthy line (its head a1 is ready, then leased): the repair finds nothing and changes nothing
    assert await run("repair") == 0
    (a1,) = await claim(store)
    assert await run("repair") == 0
    assert await store.redis.llen(g.ready) == 0
    # When the head's lease entry is lost (damage), Then check reports it without changing anything, repair fixes it
    await store.redis.zrem(g.leased, a1.id)
    assert await run("check") == 1 and await store.redis.llen(g.ready) == 0
    assert await run("repair") == 1 and await store.redis.lrange(g.ready, 0, -1) == [a1.id]
    assert await run("repair") == 0  # and a second run does not queue it again
