"""Dead-letter operations (broker/store/dead_letters.py) on fakeredis and real Redis: list, get, reprocess, purge,
prune."""

from __future__ import annotations

import json

import orjson

from broker.core.config import Settings
from broker.core.model import AckItem, NackItem, PublishRequest, now_ms
from broker.store import RedisStore
from broker.store.dead_letters import DeadLetters

from .conftest import StoreFactory

T = "orders"


async def kill(store: RedisStore, payloads: list[str], group: str = "g1", **kw: object) -> list[str]:
    """Publish, claim and dead-letter each payload in ``group``; returns the ids in order."""
    res = await store.publish_many([PublishRequest(T, p, **kw) for p in payloads])  # type: ignore[arg-type]
    got = await store.claim(T, group, len(payloads), 30_000, "worker-1")
    assert [d.id for d in got] == [r.id for r in res]
    items = [(NackItem(d.id, d.receipt, f"bad {d.payload}", dead=True), d.attempt, "worker-1") for d in got]
    await store.nack_many(T, group, items)
    return [r.id for r in res]


async def test_ids_and_get_many_describe_each_dead_letter(store: RedisStore) -> None:
    # Given two dead letters, one with a key
    await store.ensure_group(T, "g1")
    a = (await kill(store, ['{"n":1}'], key="k1", headers='{"h":"1"}'))[0]
    b = (await kill(store, ['{"n":2}']))[0]
    dlq = DeadLetters(store)
    # When listed and fetched, Then the index is oldest first and each letter is complete
    ids = await dlq.ids(T, "g1")
    assert [i for i, _ in ids] == [a, b]
    assert all(abs(died - now_ms()) < 10_000 for _, died in ids)
    letters = await dlq.get_many(T, "g1", [a, b, "unknown"])
    assert [x.id for x in letters] == [a, b]
    x = letters[0]
    assert (x.topic, x.group, x.payload, x.headers, x.key, x.reason, x.attempts) == (
        T,
        "g1",
        '{"n":1}',
        '{"h":"1"}',
        "k1",
        "rejected",
        1,
    )
    assert [e["error"] for e in x.errors] == ['bad {"n":1}'] and x.last_consumer == "worker-1"
    assert 0 < x.ttl_s <= Settings().dlq.ttl_s
    # And the JSON form embeds payload and headers as JSON, not as strings
    exported = orjson.loads(orjson.dumps(x.to_json()))
    assert (exported["id"], exported["payload"], exported["headers"]) == (a, {"n": 1}, {"h": "1"})


async def test_get_many_drops_index_entries_whose_letter_expired(store: RedisStore) -> None:
    # Given a dead letter whose hash is gone (its TTL ran out) but whose index entry remains
    await store.ensure_group(T, "g1")
    a, b = await kill(store, ['"a"', '"b"'])
    g = store.keys(T).group("g1")
    await store.redis.delete(g.dead_letter(a))
    # When fetched, Then only the live letter is returned and the stale index entry is removed
    dlq = DeadLetters(store)
    assert [x.id for x in await dlq.get_many(T, "g1", [a, b])] == [b]
    assert [i for i, _ in await dlq.ids(T, "g1")] == [b]


async def test_reprocess_makes_a_dead_letter_live_again(store: RedisStore) -> None:
    # Given a dead letter (the only group, so its body was freed)
    await store.ensure_group(T, "g1")
    (mid,) = await kill(store, ['{"x":1}'], key="k")
    k = store.keys(T)
    g = k.group("g1")
    assert await store.redis.exists(k.body(mid)) == 0
    # When an operator reprocesses it
    dlq = DeadLetters(store)
    assert await dlq.reprocess(T, "g1", [mid], who="alice") == [True]
    # Then it is ready again with the body restored, attempts reset, and the history kept plus a note
    assert await store.redis.exists(g.dead_letter(mid)) == 0
    assert await store.redis.zscore(g.dead, mid) is None
    (d,) = await store.claim(T, "g1", 10, 30_000, "c")
    assert (d.id, d.payload, d.key, d.attempt) == (mid, '{"x":1}', "k", 1)
    errors = json.loads("[" + await store.redis.hget(g.delivery(mid), "errors") + "]")
    assert [e["error"] for e in errors] == ['bad {"x":1}', "reprocessed from the dead-letter queue"]
    assert errors[1]["consumer"] == "alice"
    # And acking it now removes everything
    assert await store.ack_many(T, "g1", [AckItem(mid, d.receipt)]) == [True]
    assert not [key for key in [x async for x in store.redis.scan_iter(match=f"{store.prefix}:*")] if mid in key]


async def test_reprocess_is_idempotent_and_reports_missing(store: RedisStore) -> None:
    # Given a dead letter, When reprocessed twice (and an unknown id once)
    await store.ensure_group(T, "g1")
    (mid,) = await kill(store, ['"m"'])
    dlq = DeadLetters(store)
    assert await dlq.reprocess(T, "g1", [mid, "nope"]) == [True, False]
    assert await dlq.reprocess(T, "g1", [mid]) == [False]
    # Then it is queued exactly once
    (d,) = await store.depths([(T, "g1")])
    assert (d.ready, d.dead) == (1, 0)


async def test_reprocess_while_another_group_holds_the_body(store: RedisStore) -> None:
    # Given a message dead in g1 but still queued in g2
    await store.ensure_group(T, "g1")
    await store.ensure_group(T, "g2")
    (mid,) = await kill(store, ['"shared"'])
    body = store.keys(T).body(mid)
    assert await store.redis.hget(body, "refs") == "1"
    # When g1 reprocesses it, Then the body is re-referenced, not overwritten
    assert await DeadLetters(store).reprocess(T, "g1", [mid]) == [True]
    assert await store.redis.hget(body, "refs") == "2"
    # And the body goes only after both groups ack
    for group in ("g1", "g2"):
        (d,) = await store.claim(T, group, 1, 30_000, "c")
        assert d.payload == '"shared"'
        assert await store.redis.exists(body) == 1
        await store.ack_many(T, group, [AckItem(mid, d.receipt)])
    assert await store.redis.exists(body) == 0


async def test_purge_deletes_dead_letters(store: RedisStore) -> None:
    # Given two dead letters, When one is purged (plus an unknown id)
    await store.ensure_group(T, "g1")
    a, b = await kill(store, ['"a"', '"b"'])
    dlq = DeadLetters(store)
    assert await dlq.purge(T, "g1", [a, "nope"]) == [True, False]
    # Then it is gone from hash and index, and the other remains
    g = store.keys(T).group("g1")
    assert await store.redis.exists(g.dead_letter(a)) == 0
    assert [i for i, _ in await dlq.ids(T, "g1")] == [b]


async def test_prune_drops_index_entries_past_ttl_or_without_hash(store_factory: StoreFactory) -> None:
    # Given three dead letters: one whose hash vanished, one that died longer ago than the TTL, one live
    store = await store_factory(Settings().replace("dlq", ttl_s=60))
    await store.ensure_group(T, "g1")
    gone, old, live = await kill(store, ['"1"', '"2"', '"3"'])
    g = store.keys(T).group("g1")
    await store.redis.delete(g.dead_letter(gone))
    await store.redis.zadd(g.dead, {old: now_ms() - 61_000})
    # When pruned, Then both stale index entries are removed and the live one stays
    dlq = DeadLetters(store)
    assert await dlq.prune([(T, "g1")]) == 2
    assert [i for i, _ in await dlq.ids(T, "g1")] == [live]
    assert await dlq.prune([]) == 0
