"""Guarantee: moving a broker's state to another Redis (`broker export`, then `broker import`) loses no message and
duplicates none, and a file that is not a complete, valid export imports nothing.

Incident this prevents: a migration to a new Redis by a hand-written script that re-published what it found in the
ready lists. Leased messages and retries were lost (they are not in the ready list), dead letters lost their error
history, idempotency keys were gone so publishers' retries stored duplicates, and re-running the script after it
timed out half-way delivered everything it had already moved a second time.

Given Redis A with two topics: messages ready, leased, waiting for a retry, delayed, keyed, acked, and dead-lettered
      (one rejected, one after 5 attempts with its history), plus idempotency keys
When  `broker export` runs against A and `broker import` against an empty Redis B (after a dry run), and again
Then  A is unchanged; the dry run wrote nothing; B passes `broker diagnose`, holds the same dead letters (every
      field, history included), and a second import changes no key or value; a real broker on B delivers exactly
      the pending messages, each once per group, with payload, headers and key (the leased one and the retry as
      their next attempt), never the acked or dead ones; an import after consumption delivers nothing again; an
      idempotency key still deduplicates on B.
And   a file with a bad line, another format version, or cut short is refused naming the line, and B is unchanged.

Every wait is bounded; real redis-server and broker processes, the CLI in subprocesses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest

from broker.client.client import BrokerClient, Subscription
from broker.core.config import Settings
from broker.core.model import AckItem, NackItem, PublishRequest, PublishResult
from broker.store import RedisStore, connect_redis
from tests.brokers import BrokerProcess
from tests.support import Cli, RedisServer, make_store

FAST = {
    "BROKER_DELIVERY_SWEEP_INTERVAL_MS": "50",
    "BROKER_DELIVERY_POLL_INTERVAL_MS": "50",
}
SOON_MS = 300  # the retry and the delayed publish become due shortly (promoted by B's broker)
SETTINGS = Settings()


@pytest.fixture
def redis_b() -> Iterator[RedisServer]:
    with RedisServer() as r:
        yield r


@dataclass
class Sent:
    """What A holds, and what a consumer of B must therefore receive: (group, id) -> (payload, headers, key,
    attempt)."""

    ids: dict[str, str] = field(default_factory=dict)  # name -> id
    expected: dict[tuple[str, str, str], tuple[object, dict[str, str], str | None, int]] = field(default_factory=dict)
    dead: list[tuple[str, str, str]] = field(default_factory=list)  # (topic, group, id)


async def build_a(url: str) -> Sent:
    store: RedisStore = make_store(connect_redis(url, SETTINGS), SETTINGS, node_id="node-a")
    s = Sent()
    try:
        await store.init_schema()
        for topic, group in (("orders", "billing"), ("orders", "audit"), ("mail", "default")):
            await store.ensure_group(topic, group)
        specs = {  # name -> (payload, headers, key, idempotency key, delay)
            "o0": ({"order": 0}, {"trace": "t-0"}, None, None, 0),
            "o1": ({"order": 1}, {}, None, "order-1", 0),
            "o2": ({"order": 2}, {}, None, None, SOON_MS),
            "o3": ({"order": 3}, {}, None, None, 0),
            "o4": ({"order": 4}, {}, None, None, 0),
            "o5": ({"order": 5}, {}, "cust-1", None, 0),
            "o6": ({"order": 6}, {}, "cust-1", None, 0),
            "o7": ([7, "seven"], {"h": "v"}, "cust-2", None, 0),
        }
        reqs = [
            PublishRequest("orders", orjson.dumps(p).decode(), orjson.dumps(h).decode(), i, d, k)
            for p, h, k, i, d in specs.values()
        ]
        res = await store.publish_many(reqs)
        assert all(isinstance(r, PublishResult) for r in res), res
        s.ids = {name: r.id for name, r in zip(specs, res, strict=True) if isinstance(r, PublishResult)}
        (m0, m1) = await store.publish_many(
            [PublishRequest("mail", '"hello"', idempotency_key="mail-0"), PublishRequest("mail", '"bye"')]
        )
        assert isinstance(m0, PublishResult) and isinstance(m1, PublishResult)
        ids = s.ids
        ids.update(m0=m0.id, m1=m1.id)

        # billing: o0 rejected (dead), o1 nacked into a retry, o3 held by a consumer of A, o4 acked (done)
        got = {d.id: d for d in await store.claim("orders", "billing", 4, 60_000, "worker-a")}
        assert set(got) == {ids["o0"], ids["o1"], ids["o3"], ids["o4"]}
        d0, d1, d4 = got[ids["o0"]], got[ids["o1"]], got[ids["o4"]]
        outcomes = await store.nack_many(
            "orders",
            "billing",
            [
                (NackItem(d0.id, d0.receipt, "invalid order", dead=True), 1, "worker-a"),
                (NackItem(d1.id, d1.receipt, "db timeout", delay_ms=SOON_MS), 1, "worker-a"),
            ],
        )
        assert [o.value for o in outcomes] == ["dead", "retry"]
        assert await store.ack_many("orders", "billing", [AckItem(d4.id, d4.receipt)]) == [True]
        # audit: o0 fails 5 times and is dead-lettered with its history
        for attempt in range(1, SETTINGS.retry.max_attempts + 1):
            (d,) = await store.claim("orders", "audit", 1, 60_000, "worker-b")
            assert (d.id, d.attempt) == (ids["o0"], attempt)
            nack = NackItem(d.id, d.receipt, f"boom {attempt}", delay_ms=0)
            (o,) = await store.nack_many("orders", "audit", [(nack, attempt, "worker-b")])
        assert o.value == "dead"
        s.dead = [("orders", "billing", ids["o0"]), ("orders", "audit", ids["o0"])]

        for name in ("o1", "o2", "o3", "o5", "o6", "o7"):
            p, h, k, _, _ = specs[name]
            attempt = 2 if name in ("o1", "o3") else 1  # the retry, and the cut lease (attempt kept)
            s.expected[("orders", "billing", ids[name])] = (p, h, k, attempt)
        for name in ("o1", "o2", "o3", "o4", "o5", "o6", "o7"):
            p, h, k, _, _ = specs[name]
            s.expected[("orders", "audit", ids[name])] = (p, h, k, 1)
        s.expected[("mail", "default", ids["m0"])] = ("hello", {}, None, 1)
        s.expected[("mail", "default", ids["m1"])] = ("bye", {}, None, 1)
    finally:
        await store.close()
    return s


def full_dump(redis: RedisServer) -> dict[str, tuple[str, bool]]:
    """Every key of the server: its serialized value (DUMP) and whether it has a TTL."""
    keys = sorted(k for k in redis.cli("--scan", "--pattern", "*").splitlines() if k)
    return {k: (redis.cli("DUMP", k), int(redis.cli("TTL", k)) > 0) for k in keys}


def hgetall(redis: RedisServer, key: str) -> dict[str, str]:
    xs = redis.cli("HGETALL", key).splitlines()
    return dict(zip(xs[::2], xs[1::2], strict=True))


Got = tuple[str, str, str, object, dict[str, str], str | None, int]  # topic, group, id, payload, headers, key, attempt


async def drain(subs: dict[tuple[str, str], Subscription], want: int) -> list[Got]:
    """Take and ack deliveries from every subscription until ``want`` arrived (each get bounded)."""
    out: list[Got] = []
    async with asyncio.timeout(60):
        while len(out) < want:
            for sub in subs.values():
                try:
                    m = await sub.get(timeout=0.2)
                except TimeoutError:
                    continue
                out.append((m.topic, m.group, m.id, m.payload, m.headers, m.key, m.attempt))
                await m.ack(wait=True)
    return out


async def nothing_more(subs: dict[tuple[str, str], Subscription]) -> list[str]:
    extra = []
    for sub in subs.values():
        try:
            m = await sub.get(timeout=0.5)
        except TimeoutError:
            continue
        extra.append(f"{m.topic}/{m.group}/{m.id}")
    return extra


async def test_export_import_moves_every_message_once(redis: RedisServer, redis_b: RedisServer, tmp_path: Path) -> None:
    # Given Redis A with every kind of state
    sent = await build_a(redis.url)
    a, b = Cli(redis), Cli(redis_b)
    before_a = full_dump(redis)

    # When it is exported, Then A is unchanged
    out = tmp_path / "export.jsonl"
    p = await a("export", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert "exported 9 message(s), 2 dead letter(s), 2 idempotency key(s) of 2 topic(s)" in p.stderr
    assert full_dump(redis) == before_a

    # When a dry run imports it into empty B, Then it says what would be imported and writes nothing
    dry = await b("import", str(out), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    summary = orjson.loads(dry.stdout)
    assert summary["dry_run"] is True and summary["messages"] == {"imported": 9, "skipped": 0}
    assert "nothing changed" in dry.stderr
    assert full_dump(redis_b) == {}

    # When it is imported, Then everything is counted as imported
    p = await b("import", str(out))
    assert p.returncode == 0, p.stderr
    first = orjson.loads(p.stdout)
    assert first == {**summary, "dry_run": False}
    assert first["groups"] == {"imported": 3, "skipped": 0}
    assert first["dead_letters"] == {"imported": 2, "skipped": 0, "expired": 0}
    assert first["idempotency_keys"] == {"imported": 2, "skipped": 0, "expired": 0}

    # And the broker's own consistency checks find nothing wrong in B (no orphan bodies, no queue entry without one)
    p = await b("diagnose")
    assert p.returncode == 0 and "ok: no problems found" in p.stdout, (p.stdout, p.stderr)

    # And B holds the same dead letters, every field (history included) equal, with a TTL no longer than A's
    for topic, group, msg_id in sent.dead:
        key = f"mq:{{{topic}}}:g:{group}:dead:{msg_id}"
        assert hgetall(redis_b, key) == hgetall(redis, key)
        assert 0 < int(redis_b.cli("TTL", key)) <= int(redis.cli("TTL", key))
    audit = hgetall(redis_b, f"mq:{{orders}}:g:audit:dead:{sent.ids['o0']}")
    assert [e["error"] for e in orjson.loads(audit["errors"])] == [f"boom {i}" for i in range(1, 6)]
    assert audit["reason"] == "max_attempts"
    assert [(r["group"], r["id"]) for r in await b.json("dlq", "list", "--json")] == [
        ("audit", sent.ids["o0"]),
        ("billing", sent.ids["o0"]),
    ]

    # When the same file is imported again, Then everything is skipped and no key or value of B changed
    imported_once = full_dump(redis_b)
    p = await b("import", str(out))
    assert p.returncode == 0, p.stderr
    again = orjson.loads(p.stdout)
    kinds = ("groups", "messages", "deliveries", "dead_letters", "idempotency_keys")
    assert all(again[k]["imported"] == 0 for k in kinds)
    assert again["messages"]["skipped"] == 9
    assert full_dump(redis_b) == imported_once

    # When a broker on B serves consumers of every group
    with BrokerProcess(redis_b.url, env=FAST) as broker:
        async with BrokerClient(broker.url) as client:
            subs = {
                (t, g): await client.subscribe(t, g, prefetch=20)
                for t, g in (("orders", "billing"), ("orders", "audit"), ("mail", "default"))
            }
            got = await drain(subs, len(sent.expected))

            # Then each pending message arrives once per group, as published, at its next attempt; nothing else
            assert len(got) == len(sent.expected)
            assert {(t, g, i): (p, h, k, n) for t, g, i, p, h, k, n in got} == sent.expected
            assert await nothing_more(subs) == []

            # When the file is imported a third time, after everything was consumed
            p = await b("import", str(out))
            assert p.returncode == 0, p.stderr
            assert orjson.loads(p.stdout)["deliveries"]["imported"] == 0

            # Then nothing is delivered again (the ledger remembers), and the idempotency key still deduplicates
            assert await nothing_more(subs) == []
            dup = await client.publish("orders", {"order": 1}, idempotency_key="order-1")
            assert (dup.id, dup.duplicate) == (sent.ids["o1"], True)


async def test_a_bad_file_imports_nothing(redis: RedisServer, redis_b: RedisServer, tmp_path: Path) -> None:
    # Given a good export of A, and B holding one message of its own
    await build_a(redis.url)
    good = tmp_path / "good.jsonl"
    assert (await Cli(redis)("export", "--out", str(good))).returncode == 0
    b = Cli(redis_b)
    store = make_store(connect_redis(redis_b.url, SETTINGS), SETTINGS)
    try:
        await store.ensure_group("orders", "billing")
        await store.publish_many([PublishRequest("orders", '"own"')])
    finally:
        await store.close()
    before = full_dump(redis_b)
    lines = good.read_bytes().splitlines()

    # When files that are not a complete, valid export are imported (also as a dry run)
    header = orjson.loads(lines[0])
    cases = {
        "bad-json.jsonl": ([*lines[:4], lines[4][:-3], *lines[5:]], 5, "not JSON"),
        "version.jsonl": ([orjson.dumps({**header, "version": 9}), *lines[1:]], 1, "format version 9"),
        "cut-short.jsonl": (lines[:-2], len(lines) - 1, "no end record"),
        "missing-field.jsonl": (
            [*lines[:3], orjson.dumps({k: v for k, v in orjson.loads(lines[3]).items() if k != "body"}), *lines[4:]],
            4,
            "'body' must be an object of strings",
        ),
    }
    for name, (rows, line, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(b"\n".join(rows) + b"\n")
        for extra in ((), ("--dry-run",)):
            p = await b("import", str(path), *extra)
            # Then the command fails as a usage error naming the file and line, and B is unchanged
            assert p.returncode == 2, (name, p.returncode, p.stderr)
            assert f"{path}:{line}: " in p.stderr and message in p.stderr, (name, p.stderr)
            assert "nothing imported" in p.stderr
            assert full_dump(redis_b) == before, name

    # And an export of a topic A does not have is refused (exit 1) and writes no file
    p = await Cli(redis)("export", "--topic", "nosuch", "--out", str(tmp_path / "none.jsonl"))
    assert p.returncode == 1 and "nosuch" in p.stderr
    assert not (tmp_path / "none.jsonl").exists()
