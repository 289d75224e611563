"""Export / import at the store level (broker/transfer.py, broker/store/transfer.py, import.lua), on fakeredis and a
real redis-server: every state survives the trip, queue order per group is kept, a second import changes nothing,
and the documented trade-offs (lease -> ready with the attempt kept, the ledger) hold. Given/When/Then comments.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import fakeredis
import orjson
import pytest

from broker.core import records as export_format
from broker.core.config import Settings
from broker.core.errors import NotFoundError
from broker.core.model import AckItem, NackItem, PublishRequest, PublishResult
from broker.core.records import ExportFile
from broker.ops import transfer
from broker.store import RedisStore, connect_redis
from broker.store.dead_letters import DeadLetters

from .support import RedisServer, make_store

T = "orders"
LONG_MS = 3_600_000  # retries and delays that stay pending for the whole test


@dataclass
class Pair:
    source: RedisStore
    target: RedisStore


@pytest.fixture
async def pair(backend: str, request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    """Two stores that share nothing: two fake servers, or two key prefixes on the session's redis-server."""
    made: list[RedisStore] = []
    servers = [fakeredis.FakeServer(version=(7, 0)), fakeredis.FakeServer(version=(7, 0))]
    real: RedisServer | None = request.getfixturevalue("redis_server") if backend == "real" else None
    prefixes = [f"src{uuid.uuid4().hex[:8]}", f"dst{uuid.uuid4().hex[:8]}"]
    for prefix, server in zip(prefixes, servers, strict=True):
        settings = Settings().replace("redis", key_prefix=prefix)
        settings = settings.replace("delivery", strict_order_groups=(f"{T}/strict",))
        client: Any = (
            connect_redis(real.url, settings)
            if real is not None
            else fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
        )
        made.append(make_store(client, settings))
    yield Pair(*made)
    for s in made:
        if real is not None:
            keys = [k async for k in s.redis.scan_iter(match=f"{s.prefix}:*", count=1000)]
            if keys:
                await s.redis.delete(*keys)
        await s.close()


async def dump(store: RedisStore) -> dict[str, Any]:
    """Every key of the store's prefix with its type and value (and whether it has a TTL)."""
    r = store.redis
    out: dict[str, Any] = {}
    for key in sorted([k async for k in r.scan_iter(match=f"{store.prefix}:*", count=1000)]):
        kind = await r.type(key)
        value: Any
        if kind == "string":
            value = await r.get(key)
        elif kind == "hash":
            value = await r.hgetall(key)
        elif kind == "list":
            value = await r.lrange(key, 0, -1)
        elif kind == "set":
            value = sorted(await r.smembers(key))
        else:
            value = await r.zrange(key, 0, -1, withscores=True)
        out[key[len(store.prefix) :]] = (kind, value, await r.ttl(key) > 0)
    return out


async def publish(store: RedisStore, *reqs: PublishRequest) -> list[str]:
    res = await store.publish_many(reqs)
    assert all(isinstance(r, PublishResult) for r in res), res
    return [r.id for r in res if isinstance(r, PublishResult)]


@dataclass
class Built:
    ids: list[str]  # m0 .. m6


async def build(s: RedisStore) -> Built:
    """Given topic orders with groups g1 and g2 and 7 messages (m2 keyed, m1 with headers and an idempotency key,
    m6 a delayed publish): in g1 m0 is dead (rejected), m1 waits for a retry, m2 is leased; in g2 m0 failed once and
    is back at the head of the ready list."""
    await s.ensure_group(T, "g1")
    await s.ensure_group(T, "g2")
    ids = await publish(
        s,
        PublishRequest(T, '{"n":0}'),
        PublishRequest(T, '{"n":1}', '{"trace":"t-1"}', idempotency_key="order-1"),
        PublishRequest(T, '{"n":2}', key="cust-9"),
        *(PublishRequest(T, f'{{"n":{i}}}') for i in (3, 4, 5)),
        PublishRequest(T, '"later"', delay_ms=LONG_MS),
    )
    d0, d1, _leased = await s.claim(T, "g1", 3, 60_000, "worker-a")
    outcomes = await s.nack_many(
        T,
        "g1",
        [
            (NackItem(d0.id, d0.receipt, "invalid order", dead=True), 1, "worker-a"),
            (NackItem(d1.id, d1.receipt, "db timeout", delay_ms=2 * LONG_MS), 1, "worker-a"),  # due after m6
        ],
    )
    assert [o.value for o in outcomes] == ["dead", "retry"]
    (e0,) = await s.claim(T, "g2", 1, 60_000, "worker-b")
    outcomes = await s.nack_many(T, "g2", [(NackItem(e0.id, e0.receipt, "flaky", delay_ms=0), 1, "worker-b")])
    assert [o.value for o in outcomes] == ["ready"]
    return Built(ids)


async def round_trip(p: Pair, **kw: Any) -> tuple[ExportFile, transfer.ImportSummary]:
    f, missing = await transfer.export(p.source)
    assert missing == []
    parsed = export_format.parse(export_format.encode(f))
    return parsed, await transfer.import_file(p.target, parsed, **kw)


async def test_export_describes_every_pending_state(pair: Pair) -> None:
    # Given the built state
    b = await build(pair.source)
    m = b.ids
    # When exported
    f, _ = await transfer.export(pair.source)
    # Then each group's pending messages are listed in queue order with their state and delivery hash
    assert [(t.topic, t.groups) for t in f.topics] == [(T, ("g1", "g2"))]
    by_id = {r.id: r for r in f.messages}
    assert list(by_id) == m  # publish order
    g1 = sorted((r.groups["g1"].position, r.id, r.groups["g1"].state) for r in f.messages if "g1" in r.groups)
    assert [(i, s) for _, i, s in g1] == [
        (m[2], "leased"),
        (m[3], "ready"),
        (m[4], "ready"),
        (m[5], "ready"),
        (m[6], "delayed"),
        (m[1], "delayed"),
    ]
    g2 = sorted((r.groups["g2"].position, r.id, r.groups["g2"].state) for r in f.messages)
    assert [(i, s) for _, i, s in g2] == [(m[0], "ready"), *((x, "ready") for x in m[1:6]), (m[6], "delayed")]
    assert "g1" not in by_id[m[0]].groups  # dead there: a dead record instead
    leased = by_id[m[2]].groups["g1"]
    assert leased.leased_until and leased.delivery["attempts"] == "1" and leased.delivery["consumer"] == "worker-a"
    retry = by_id[m[1]].groups["g1"]
    assert retry.due and orjson.loads("[" + retry.delivery["errors"] + "]")[0]["error"] == "db timeout"
    assert by_id[m[3]].groups["g1"].delivery == {}  # never claimed
    assert by_id[m[1]].body == {
        "payload": '{"n":1}',
        "headers": '{"trace":"t-1"}',
        "published_at": by_id[m[1]].body["published_at"],
    }
    assert by_id[m[2]].body["key"] == "cust-9" and "refs" not in by_id[m[2]].body
    (dead,) = f.dead
    assert (dead.group, dead.id, dead.fields["reason"]) == ("g1", m[0], "rejected")
    assert dead.ttl_s and 0 < dead.ttl_s <= Settings().dlq.ttl_s
    assert [(i.key, i.id) for i in f.idempotency] == [("order-1", m[1])]


async def test_round_trip_keeps_every_state_and_order(pair: Pair) -> None:
    # Given the built state, exported and imported into an empty target
    b = await build(pair.source)
    m = b.ids
    src, dst = pair.source, pair.target
    _, summary = await round_trip(pair)
    # Then the summary counts everything as imported
    assert summary.to_json() == {
        "dry_run": False,
        "topics": 1,
        "groups": {"imported": 2, "skipped": 0},
        "messages": {"imported": 7, "skipped": 0},
        "deliveries": {"imported": 13, "skipped": 0},
        "dead_letters": {"imported": 1, "skipped": 0, "expired": 0},
        "idempotency_keys": {"imported": 1, "skipped": 0, "expired": 0},
    }
    s, d = src.keys(T), dst.keys(T)
    r, t = src.redis, dst.redis
    # And each group's queue is the source's: the lease back at the head, retries and delays with their due times
    assert await t.lrange(d.group("g1").ready, 0, -1) == [m[2], m[3], m[4], m[5]]
    assert await t.zrange(d.group("g1").delayed, 0, -1, withscores=True) == await r.zrange(
        s.group("g1").delayed, 0, -1, withscores=True
    )
    assert await t.lrange(d.group("g2").ready, 0, -1) == await r.lrange(s.group("g2").ready, 0, -1)
    assert await t.zcard(d.group("g1").leased) == 0
    # And bodies are the same, with refs = the groups holding them
    for i, msg_id in enumerate(m):
        want = await r.hgetall(s.body(msg_id))
        got = await t.hgetall(d.body(msg_id))
        if i == 0:  # dead in g1, pending in g2 only
            assert got == want and got["refs"] == "1"
        else:
            assert got == want and got["refs"] == "2"
    # And delivery hashes are the same; the cut lease also says so in its history
    for g, msg_id in (("g1", m[1]), ("g2", m[0])):
        assert await t.hgetall(d.group(g).delivery(msg_id)) == await r.hgetall(s.group(g).delivery(msg_id))
    cut = await t.hgetall(d.group("g1").delivery(m[2]))
    assert cut["attempts"] == "1"
    (note,) = orjson.loads("[" + cut["errors"] + "]")
    assert (note["attempt"], note["error"], note["consumer"]) == (1, transfer.LEASE_NOTE, "worker-a")
    # And the dead letter is the same hash, indexed at the same time, with a TTL
    x = await t.hgetall(d.group("g1").dead_letter(m[0]))
    assert x == await r.hgetall(s.group("g1").dead_letter(m[0]))
    assert await t.zscore(d.group("g1").dead, m[0]) == await r.zscore(s.group("g1").dead, m[0])
    assert 0 < await t.ttl(d.group("g1").dead_letter(m[0])) <= await r.ttl(s.group("g1").dead_letter(m[0]))
    # And the idempotency key still deduplicates in the target
    assert await t.get(d.idem("order-1")) == m[1] and await t.ttl(d.idem("order-1")) > 0
    (dup,) = await dst.publish_many([PublishRequest(T, '"again"', idempotency_key="order-1")])
    assert isinstance(dup, PublishResult) and (dup.id, dup.duplicate) == (m[1], True)
    # And the target's normal scripts consume it: the cut lease is delivered as attempt 2
    got = await dst.claim(T, "g1", 10, 30_000, "new-worker")
    assert [(x.id, x.attempt) for x in got] == [(m[2], 2), (m[3], 1), (m[4], 1), (m[5], 1)]
    assert all(await dst.ack_many(T, "g1", [AckItem(x.id, x.receipt) for x in got]))
    assert await t.hget(d.body(m[3]), "refs") == "1"  # g2 still holds it
    assert [x.id for x in await DeadLetters(dst).get_many(T, "g1", [m[0]])] == [m[0]]


async def test_importing_twice_changes_nothing(pair: Pair) -> None:
    # Given an import of the built state
    await build(pair.source)
    f, first = await round_trip(pair)
    before = await dump(pair.target)
    # When the same file is imported again
    again = await transfer.import_file(pair.target, f)
    # Then everything is skipped and no key or value changed
    counts = again.to_json()
    assert all(counts[k]["imported"] == 0 for k in transfer.KINDS)
    assert {k: counts[k]["skipped"] for k in transfer.KINDS} == {
        k: first.to_json()[k]["imported"] for k in transfer.KINDS
    }
    assert await dump(pair.target) == before


async def test_dry_run_writes_nothing_and_predicts_the_real_run(pair: Pair) -> None:
    # Given an export of the built state and an empty target
    await build(pair.source)
    f, _ = await transfer.export(pair.source)
    # When it is imported with dry_run
    dry = await transfer.import_file(pair.target, f, dry_run=True)
    # Then nothing was written, and the real run does what the dry run said
    assert await dump(pair.target) == {}
    real = await transfer.import_file(pair.target, f)
    assert {**dry.to_json(), "dry_run": False} == real.to_json()
    assert "nothing changed" in dry.text() and "would import" in dry.text()
    # And a dry run after it says everything would be skipped
    after = (await transfer.import_file(pair.target, f, dry_run=True)).to_json()
    assert all(after[k]["imported"] == 0 for k in transfer.KINDS)


async def test_consumed_between_imports_the_ledger_skips_and_its_expiry_does_not(pair: Pair) -> None:
    # Given a target where every imported message was consumed and the dead letter reprocessed
    b = await build(pair.source)
    f, _ = await round_trip(pair)
    dst = pair.target
    g1 = await dst.claim(T, "g1", 100, 30_000, "w")
    g2 = await dst.claim(T, "g2", 100, 30_000, "w")
    await dst.ack_many(T, "g1", [AckItem(x.id, x.receipt) for x in g1])
    await dst.ack_many(T, "g2", [AckItem(x.id, x.receipt) for x in g2])
    assert await DeadLetters(dst).reprocess(T, "g1", [b.ids[0]]) == [True]
    before = await dump(dst)
    # When the file is imported again, Then the ledger skips what was imported (consumed or not): no duplicate
    again = (await transfer.import_file(dst, f)).to_json()
    assert again["deliveries"] == {"imported": 0, "skipped": 13}
    assert again["dead_letters"]["imported"] == 0
    assert await dump(dst) == before
    # When the ledger has expired (simulated by deleting it) and it is imported once more
    await dst.redis.delete(dst.keys(T).imported)
    late = (await transfer.import_file(dst, f)).to_json()
    # Then the documented trade-off: what was consumed everywhere comes back (no trace of it is left), what is live
    # anywhere does not: m1 and m6 wait in g1's delayed set, m0 is live again in g1 (reprocessed), so g2 counts
    # them as done
    m = b.ids
    assert late["messages"] == {"imported": 4, "skipped": 3}
    for group in ("g1", "g2"):
        assert await dst.redis.lrange(dst.keys(T).group(group).ready, 0, -1) == (
            [m[0], m[2], m[3], m[4], m[5]] if group == "g1" else [m[2], m[3], m[4], m[5]]
        )
    assert late["dead_letters"] == {"imported": 0, "skipped": 1, "expired": 0}  # reprocessed: its delivery exists


async def test_restore_into_the_source_adds_only_what_is_missing(pair: Pair) -> None:
    # Given an export, after which m3 was acked by both groups and m4 by g1 only
    b = await build(pair.source)
    src = pair.source
    f, _ = await transfer.export(src)
    m3, m4 = b.ids[3], b.ids[4]
    for group, ids in (("g1", {m3, m4}), ("g2", {m3})):
        got = await src.claim(T, group, 100, 30_000, "w")
        await src.release(T, group, [AckItem(x.id, x.receipt) for x in got if x.id not in ids])
        await src.ack_many(T, group, [AckItem(x.id, x.receipt) for x in got if x.id in ids])
    # When the export is imported into the same Redis
    res = (await transfer.import_file(src, f)).to_json()
    # Then what is still there is skipped (m4's body still lives for g2, so g1 counts it as done), and only m3,
    # whose every trace was gone, comes back (the documented trade-off)
    assert res["messages"] == {"imported": 1, "skipped": 6}
    assert res["dead_letters"]["imported"] == 0 and res["idempotency_keys"]["imported"] == 0
    for group in ("g1", "g2"):
        ready = await src.redis.lrange(src.keys(T).group(group).ready, 0, -1)
        assert len(ready) == len(set(ready)) and m3 in ready and (m4 in ready) == (group == "g2")


async def test_keyed_messages_go_through_key_lists(pair: Pair) -> None:
    # Given a source whose per-key ordering holds a1 (head), a2, a3 of key A, b1 of key B, a plain p, and d1 of key C
    # delayed (key lines as publish writes them)
    src, dst = pair.source, pair.target
    await src.ensure_group(T, "g")
    a1, a2, a3, b1, p = await publish(
        src,
        *(PublishRequest(T, f'"{n}"', key=k) for n, k in (("a1", "A"), ("a2", "A"), ("a3", "A"), ("b1", "B"))),
        PublishRequest(T, '"p"'),
    )
    (d1,) = await publish(src, PublishRequest(T, '"d1"', key="C", delay_ms=LONG_MS))
    # When exported, Then the waiting ones are listed after the queued ones, in key-list order
    f, _ = await transfer.export(src)
    states = sorted((r.groups["g"].position, r.id, r.groups["g"].state) for r in f.messages)
    assert [(i, s) for _, i, s in states] == [
        (a1, "ready"),
        (b1, "ready"),
        (p, "ready"),
        (d1, "delayed"),
        (a2, "waiting"),
        (a3, "waiting"),
    ]
    # When imported, Then only each key's head is queued and the rest wait in order
    await transfer.import_file(dst, f)
    h = dst.keys(T).group("g")
    assert await dst.redis.lrange(h.ready, 0, -1) == [a1, b1, p]
    assert await dst.redis.zrange(h.delayed, 0, -1) == [d1]
    assert await dst.redis.lrange(h.key_line("A"), 0, -1) == [a1, a2, a3]
    assert await dst.redis.lrange(h.key_line("B"), 0, -1) == [b1]
    assert await dst.redis.lrange(h.key_line("C"), 0, -1) == [d1]
    # And a key list already holding an id of that key keeps the imported one waiting behind it
    await dst.redis.delete(
        dst.keys(T).imported,
        h.key_line("A"),
        h.ready,
        h.key_line("B"),
        h.delayed,
        h.key_line("C"),
        *[dst.keys(T).body(x) for x in (a1, a2, a3, b1, p, d1)],
    )
    await dst.redis.rpush(h.key_line("A"), "earlier")
    await transfer.import_file(dst, f)
    assert await dst.redis.lrange(h.key_line("A"), 0, -1) == ["earlier", a1, a2, a3]
    assert await dst.redis.lrange(h.ready, 0, -1) == [b1, p]


async def test_strict_order_retry_keeps_its_place_and_not_before(pair: Pair) -> None:
    # Given a strict-order group whose head waits for a retry (not_before), with one more message behind it
    src, dst = pair.source, pair.target
    await src.ensure_group(T, "strict")
    first, second = await publish(src, PublishRequest(T, '"1"'), PublishRequest(T, '"2"'))
    (d,) = await src.claim(T, "strict", 1, 30_000, "w")
    assert [
        o.value for o in await src.nack_many(T, "strict", [(NackItem(d.id, d.receipt, "x", delay_ms=LONG_MS), 1, "w")])
    ] == ["retry"]
    # When exported and imported, Then the head is still first, still not claimable before its time
    await round_trip(pair)
    h = dst.keys(T).group("strict")
    assert await dst.redis.lrange(h.ready, 0, -1) == [first, second]
    nb = await src.redis.hget(src.keys(T).group("strict").delivery(first), "not_before")
    assert nb and await dst.redis.hget(h.delivery(first), "not_before") == nb
    assert await dst.claim(T, "strict", 10, 30_000, "w2") == []


async def test_expired_dead_letters_and_idempotency_keys_are_not_imported(pair: Pair) -> None:
    # Given an export holding a dead letter and an idempotency key
    await build(pair.source)
    f, _ = await transfer.export(pair.source)
    # When it is imported after their TTLs ran out
    late = f.header.exported_at + (Settings().dlq.ttl_s + 1) * 1000
    res = (await transfer.import_file(pair.target, f, now=late)).to_json()
    # Then they are counted as expired and not written; the messages are
    assert res["dead_letters"] == {"imported": 0, "skipped": 0, "expired": 1}
    assert res["idempotency_keys"] == {"imported": 0, "skipped": 0, "expired": 1}
    assert res["messages"]["imported"] == 7
    assert await pair.target.redis.zcard(pair.target.keys(T).group("g1").dead) == 0


async def test_export_reads_without_writing_and_filters_by_topic(pair: Pair) -> None:
    # Given the built state plus another topic
    src = pair.source
    await build(src)
    await src.ensure_group("mail", "default")
    await publish(src, PublishRequest("mail", '"hi"'))
    before = await dump(src)
    # When exported (all, one topic, an unknown topic)
    every, _ = await transfer.export(src)
    mail, _ = await transfer.export(src, ["mail"])
    # Then nothing changed, the filter holds, and an unknown topic is an error naming it
    assert await dump(src) == before
    assert [t.topic for t in every.topics] == ["mail", T] and [t.topic for t in mail.topics] == ["mail"]
    assert [r.topic for r in mail.messages] == ["mail"] and mail.dead == []
    with pytest.raises(NotFoundError, match="nosuch"):
        await transfer.export(src, ["mail", "nosuch"])


async def test_groups_without_pending_messages_are_created(pair: Pair) -> None:
    # Given a topic whose group has nothing pending
    await pair.source.ensure_group("quiet", "g")
    _, summary = await round_trip(pair)
    # Then the target has the topic and the group, so later publishes are stored for it
    assert summary.to_json()["groups"] == {"imported": 1, "skipped": 0}
    assert await pair.target.topics() == ["quiet"] and await pair.target.groups("quiet") == ["g"]
    (res,) = await pair.target.publish_many([PublishRequest("quiet", '"x"')])
    assert isinstance(res, PublishResult) and res.groups == 1
