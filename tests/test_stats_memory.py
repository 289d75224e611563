"""Retention made visible: `broker stats` shows each topic's memory in Redis (MEMORY USAGE over its keys, found by
SCAN), exact up to a key count and a marked estimate from a sample beyond it; plus the nodes' unhealthy loops.

Real redis-server only: MEMORY USAGE and SCAN are what is measured.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from broker.core.config import Settings
from broker.core.model import PublishRequest
from broker.store import RedisStore, connect_redis
from broker.store.memory import topic_memory

from .brokers import ROOT
from .support import RedisServer, make_store


@pytest.fixture
async def store(redis: RedisServer) -> AsyncIterator[RedisStore]:
    redis.cli("FLUSHALL")
    settings = Settings()
    s = make_store(connect_redis(redis.url, settings), settings)
    yield s
    await s.close()


async def fill(store: RedisStore, topic: str, n: int, keyed: bool = True) -> None:
    await store.ensure_group(topic, "g")
    for start in range(0, n, 500):
        reqs = [PublishRequest(topic, '{"pad":"' + "x" * 100 + '"}', idempotency_key=f"k{i}" if keyed else None)
                for i in range(start, min(n, start + 500))]  # fmt: skip
        await store.publish_many(reqs)


async def usage(store: RedisStore, pattern: str) -> tuple[int, list[int]]:
    keys = [k async for k in store.redis.scan_iter(match=pattern, count=1000)]
    sizes = [int(await store.redis.memory_usage(k) or 0) for k in keys]
    return len(keys), sizes


async def test_small_topic_is_measured_exactly(store: RedisStore) -> None:
    # Given a topic with 3 messages (body + idempotency key each, the groups set, the ready list),
    # and a topic whose name starts with the same letters (its keys must not be counted)
    await fill(store, "small", 3)
    await fill(store, "smallish", 5)
    # When its memory is measured
    (m,) = await topic_memory(store, ["small"])
    # Then every key was measured and the sum is what MEMORY USAGE says key by key
    n, sizes = await usage(store, "mq:{small}:*")
    assert n == 3 + 3 + 2
    assert (m.topic, m.keys, m.estimated, m.sampled) == ("small", n, False, n)
    assert m.bytes == sum(sizes) > 0
    assert m.to_json() == {"topic": "small", "keys": n, "memory_bytes": sum(sizes), "estimated": False,
                           "sampled_keys": n}  # fmt: skip


async def test_big_topic_is_a_marked_estimate_from_a_sample(store: RedisStore) -> None:
    # Given a topic with 400 messages (401 keys: bodies and the groups set), 100 keys exact, 50 sampled
    # (bodies alike: no idempotency keys, which are a fifth of a body's size, and without its ready list, one key 50x
    # bigger than the rest. SCAN order, and so the sample, depend on the random message ids: with unlike keys "close"
    # would be a matter of luck, as CI found when 50 keys held 15 bodies instead of the expected 25)
    await fill(store, "big", 400, keyed=False)
    await fill(store, "small", 2)
    await store.redis.delete("mq:{big}:g:g:ready")
    # When both are measured in one pass
    big, small = await topic_memory(store, ["big", "small"], exact_keys=100, sample_keys=50, rng=random.Random(7))
    # Then the big one is an estimate from 50 keys, with the exact key count, close to the real total
    n, sizes = await usage(store, "mq:{big}:*")
    assert (big.keys, big.estimated, big.sampled) == (n, True, 50)
    assert min(sizes) * n <= big.bytes <= max(sizes) * n
    assert abs(big.bytes - sum(sizes)) < 0.25 * sum(sizes)  # keys are alike here: a sample of 50 is close
    # And the small one, measured in the same pass, is exact
    n_small, small_sizes = await usage(store, "mq:{small}:*")
    assert (small.keys, small.estimated, small.bytes) == (n_small, False, sum(small_sizes))


async def test_unknown_or_empty_topics() -> None:
    assert await topic_memory(None, []) == []  # type: ignore[arg-type]  # nothing asked: no Redis call


# ---- the command -------------------------------------------------------------------------------------------------


async def broker_stats(redis: RedisServer, *args: str, expect: int = 0) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")} | {"BROKER_REDIS_URL": redis.url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "stats", *args,
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == expect, err.decode()
    return proc.returncode, out.decode() + err.decode()


async def test_stats_shows_memory_per_topic_and_unhealthy_loops(store: RedisStore, redis: RedisServer) -> None:
    # Given two topics, and a node whose sweep keeps failing (its status record, as its heartbeat writes it)
    await fill(store, "orders", 4)
    await fill(store, "audit", 1_500)  # 3,002 keys: more than the exact limit
    problem = "loop sweep failing: redis error reply during all_pairs: WRONGTYPE (3 consecutive failures)"
    await store.heartbeat({"ready": "0", "reasons": orjson.dumps([problem]).decode(), "breakers": "{}",
                           "loops": orjson.dumps({"sweep": problem}).decode()})  # fmt: skip
    orders_n, orders_sizes = await usage(store, "mq:{orders}:*")

    # When `broker stats --json` runs, Then each group row carries its topic's keys and memory
    _, out = await broker_stats(redis, "--json")
    rows = {r["topic"]: r for r in orjson.loads(out)}
    assert rows["orders"]["topic_keys"] == orders_n
    assert rows["orders"]["topic_memory_bytes"] == sum(orders_sizes)
    assert rows["orders"]["topic_memory_estimated"] is False
    assert rows["audit"]["topic_keys"] == 3_002 and rows["audit"]["topic_memory_estimated"] is True

    # And with --nodes: the topics' memory and the node's unhealthy loops
    _, out = await broker_stats(redis, "--json", "--nodes")
    doc: dict[str, Any] = orjson.loads(out)
    topics = {t["topic"]: t for t in doc["topics"]}
    assert topics["audit"]["sampled_keys"] == 200 and topics["audit"]["estimated"] is True
    assert topics["orders"] == {"topic": "orders", "keys": orders_n, "memory_bytes": sum(orders_sizes),
                                "estimated": False, "sampled_keys": orders_n}  # fmt: skip
    (node,) = doc["nodes"]
    assert node["loops"] == {"sweep": problem} and node["ready"] is False

    # And the table says it to a human: exact bytes, a marked estimate, the unhealthy loop
    _, text = await broker_stats(redis)
    lines = text.splitlines()
    (orders_line,) = [x for x in lines if x.startswith("orders ") and "B" in x]
    assert orders_line.split()[1] == str(orders_n)
    (audit_line,) = [x for x in lines if x.startswith("audit ") and "estimate" in x]
    assert "~" in audit_line and "(estimate from 200 sampled keys)" in audit_line
    assert f"  unhealthy loop sweep: {problem}" in lines

    # And --no-memory skips the scan
    _, out = await broker_stats(redis, "--json", "--no-memory")
    assert all("topic_memory_bytes" not in r for r in orjson.loads(out))


async def test_stats_shows_the_healthy_topics_and_names_an_unreadable_one(
    store: RedisStore, redis: RedisServer
) -> None:
    # Given a healthy topic, and a damaged registry entry (a string where a topic's group set belongs)
    await fill(store, "orders", 2)
    redis.cli("SET", "mq:{broken}:groups", "not a set")
    redis.cli("SADD", "mq:topics", "broken")
    # When `broker stats` runs, Then the healthy topic is shown, the damaged one named, and the exit status is 1
    _, out = await broker_stats(redis, "--no-memory", expect=1)
    assert "orders" in out and "unreadable topic (run `broker diagnose`): broken: WRONGTYPE" in out, out
