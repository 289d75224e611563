"""``broker diagnose`` on a real redis-server: each planted problem is found with its severity, ``--repair`` fixes
the safe ones and leaves the rest (seed 000's diagnostic tool, seed 003's orphan check)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import orjson
import pytest

from broker.core.config import Settings
from broker.core.model import AckItem, NackItem, PublishRequest, now_ms
from broker.store import connect_redis
from broker.store.keys import nodes_key

from .support import RedisServer, free_port, make_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as r:
        yield r


def run(redis: RedisServer, *args: str) -> tuple[int, list[dict[str, object]]]:
    env = {**os.environ, "BROKER_REDIS_URL": redis.url}
    p = subprocess.run(
        [sys.executable, "-m", "broker", "diagnose", "--json", *args],
        cwd=ROOT, env=env, capture_output=True, timeout=60,
    )  # fmt: skip
    return p.returncode, orjson.loads(p.stdout)


async def test_clean_redis_is_ok(redis: RedisServer) -> None:
    code, findings = run(redis)
    assert (code, findings) == (0, [])


async def test_planted_problems_are_found_and_safe_ones_repaired(redis: RedisServer) -> None:
    settings = Settings()
    store = make_store(connect_redis(redis.url, settings), settings)
    try:
        # Given: a stale lease held by a node that stopped heartbeating ...
        await store.ensure_group("t", "g")
        await store.publish_many([PublishRequest("t", str(i)) for i in range(4)])
        (d0,) = await store.claim("t", "g", 1, 100, "c1")  # 100 ms lease, never acked
        await store.redis.zadd(nodes_key("mq"), {"test-node": now_ms() - 60_000})
        await store.redis.zadd(store.keys("t").group("g").leased, {d0.id: now_ms() - 60_000})
        # ... a queue entry whose body is gone, an orphan body, an expired dead letter still indexed
        d1, d2 = await store.claim("t", "g", 2, 30_000, "c1")
        await store.nack_many("t", "g", [(NackItem(d1.id, d1.receipt, "x", delay_ms=0), 1, "c1")])  # back in ready
        await store.redis.delete(store.keys("t").body(d1.id))
        await store.redis.hset(store.keys("t").body("orphan1"), mapping={"payload": "1", "refs": 1})
        await store.nack_many("t", "g", [(NackItem(d2.id, d2.receipt, "boom", dead=True), 1, "c1")])
        await store.redis.delete(store.keys("t").group("g").dead_letter(d2.id))
        # ... and an eviction policy that can drop queue keys, on a Redis without AOF
        redis.cli("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
        redis.cli("CONFIG", "SET", "appendonly", "no")
    finally:
        await store.close()

    # When diagnose runs
    code, findings = run(redis)
    checks = {f["check"]: f for f in findings}
    # Then each problem is reported with a severity and a fix, and the exit code says something is wrong
    assert code == 1
    assert {"stale_leases", "dead_node_leases", "missing_bodies", "orphan_bodies", "expired_dead_letters_indexed",
            "persistence"} <= set(checks)  # fmt: skip
    assert checks["missing_bodies"]["severity"] == "error" and d1.id in checks["missing_bodies"]["details"]["ids"]
    assert any("allkeys-lru" in f["message"] for f in findings if f["check"] == "persistence")
    assert all(f["fix"] for f in findings)

    # When --repair runs, Then the safe problems are repaired and the rest are left (and still reported)
    code, findings = run(redis, "--repair")
    repaired = {f["check"] for f in findings if f["repaired"]}
    assert {"stale_leases", "dead_node_leases", "missing_bodies", "expired_dead_letters_indexed"} <= repaired
    assert not any(f["repaired"] for f in findings if f["check"] in ("orphan_bodies", "persistence"))
    assert code == 1  # persistence and the orphan body still need an operator
    code, findings = run(redis)
    assert {f["check"] for f in findings} == {"orphan_bodies", "persistence"}
    assert redis.cli("HGET", f"mq:{{t}}:g:g:dlv:{d0.id}", "attempts") == "1"  # swept to retry, history kept


async def test_waiting_keyed_messages_are_not_orphans_and_a_stuck_key_is_repaired(redis: RedisServer) -> None:
    settings = Settings()
    store = make_store(connect_redis(redis.url, settings), settings)
    try:
        # Given key "a" with 3 messages: a1 leased, a2 and a3 waiting in the key line (healthy)
        await store.ensure_group("orders", "g")
        await store.publish_many([PublishRequest("orders", str(i), key="a") for i in range(3)])
        (a1,) = await store.claim("orders", "g", 10, 60_000, "c1")
        code, findings = run(redis)
        # Then nothing is reported (waiting messages are referenced by their key line)
        assert (code, findings) == (0, [])
        # When the head's lease entry is lost (a corrupted store: a1 is neither ready, leased nor delayed)
        g = store.keys("orders").group("g")
        await store.redis.zrem(g.leased, a1.id)
        code, findings = run(redis)
        assert code == 1 and [f["check"] for f in findings] == ["stuck_key_lines"]
        # Then --repair makes the head ready again, and the key flows: a1, then a2 after a1's ack
        code, findings = run(redis, "--repair")
        assert findings[0]["repaired"] == "made 1 key line head(s) ready again"
        (again,) = await store.claim("orders", "g", 10, 60_000, "c1")
        assert again.id == a1.id
        await store.ack_many("orders", "g", [AckItem(again.id, again.receipt)])
        (nxt,) = await store.claim("orders", "g", 10, 60_000, "c1")
        assert nxt.payload == "1"
        assert run(redis) == (0, [])
    finally:
        await store.close()


async def test_an_unreadable_topic_is_a_finding_not_a_crash(redis: RedisServer) -> None:
    # Given a damaged registry entry next to a healthy topic
    redis.cli("SADD", "mq:topics", "broken", "orders")
    redis.cli("SET", "mq:{broken}:groups", "not a set")
    redis.cli("SADD", "mq:{orders}:groups", "g")
    # When diagnosed, Then it is one error finding and the rest is still checked
    code, findings = run(redis)
    assert code == 1 and [f["check"] for f in findings] == ["unreadable_topic"]
    assert "broken" in str(findings[0]["message"])


def test_redis_down_is_an_error_not_a_traceback() -> None:
    # Given no Redis where the broker's URL points
    env = {**os.environ, "BROKER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    # When diagnose runs, Then it ends with the "unavailable" exit code and one error line (its reads go through the
    # store's gateway, like every store call), not a redis-py traceback
    p = subprocess.run([sys.executable, "-m", "broker", "diagnose"], cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert p.returncode == 4, p.stderr
    assert b"Traceback" not in p.stderr and p.stderr.startswith(b"error (unavailable): redis unreachable")
