"""`broker message ID` on a real redis-server: the state of one message in each group (issue 8's status lookup)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import orjson
import pytest
import redis.asyncio as aioredis

from broker.core.config import Settings
from broker.core.model import AckItem, NackItem, PublishRequest
from broker.store import connect_redis
from broker.store.status import message_status

from .brokers import ROOT
from .support import RedisServer, make_store


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as r:
        yield r


def status(redis: RedisServer, msg_id: str) -> tuple[int, list[dict[str, object]]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")} | {"BROKER_REDIS_URL": redis.url}
    p = subprocess.run([sys.executable, "-m", "broker", "message", msg_id, "--json"],
                       cwd=ROOT, env=env, capture_output=True, timeout=60)  # fmt: skip
    return p.returncode, orjson.loads(p.stdout)


async def test_message_state_in_each_group(redis: RedisServer) -> None:
    settings = Settings()
    store = make_store(connect_redis(redis.url, settings), settings)
    try:
        # Given one message in five groups: waiting, leased, waiting for a retry, dead, and acked
        for g in ("waiting", "held", "retrying", "dead", "done"):
            await store.ensure_group("orders", g)
        (res,) = await store.publish_many([PublishRequest("orders", '{"n":1}')])
        msg = res.id
        (h,) = await store.claim("orders", "held", 1, 60_000, "c7.1")
        (r,) = await store.claim("orders", "retrying", 1, 60_000, "c7.2")
        await store.nack_many(
            "orders", "retrying", [(NackItem(r.id, r.receipt, "timeout", delay_ms=60_000), 1, "c7.2")]
        )
        (d,) = await store.claim("orders", "dead", 1, 60_000, "c7.3")
        await store.nack_many("orders", "dead", [(NackItem(d.id, d.receipt, "poison", dead=True), 1, "c7.3")])
        (a,) = await store.claim("orders", "done", 1, 60_000, "c7.4")
        await store.ack_many("orders", "done", [AckItem(a.id, a.receipt)])
    finally:
        await store.close()

    # When the operator looks it up
    code, rows = status(redis, msg)
    by_group = {row["group"]: row for row in rows}
    # Then each group's state is right, with the details that matter
    assert code == 0
    assert by_group["waiting"]["state"] == "ready" and by_group["waiting"]["position"] == 0
    assert by_group["held"]["state"] == "leased" and by_group["held"]["consumer"] == "c7.1"
    assert by_group["retrying"]["state"] == "retry_wait" and by_group["retrying"]["last_error"] == "timeout"
    assert by_group["dead"]["state"] == "dead" and by_group["dead"]["reason"] == "rejected"
    assert int(str(by_group["dead"]["ttl_s"])) > 600_000
    assert by_group["done"]["state"] == "done"
    assert h.id == msg

    # And an unknown id says so with a non-zero exit
    code, rows = status(redis, "nope")
    assert code == 1 and rows == []


async def test_keyed_message_waiting_behind_its_key(redis: RedisServer) -> None:
    settings = Settings()
    store = make_store(connect_redis(redis.url, settings), settings)
    try:
        # Given two messages of ordering key "acct-1"; the first is leased
        await store.ensure_group("orders", "g")
        first, second = await store.publish_many(
            [PublishRequest("orders", "1", key="acct-1"), PublishRequest("orders", "2", key="acct-1")]
        )
        (held,) = await store.claim("orders", "g", 10, 60_000, "c1.1")
    finally:
        await store.close()
    # When the operator looks up the second, Then it waits behind the first of its key
    code, rows = status(redis, second.id)
    assert code == 0
    assert [(r["state"], r["key"], r["position"]) for r in rows] == [("key_wait", "acct-1", 1)]
    code, rows = status(redis, first.id)
    assert [r["state"] for r in rows] == ["leased"] and held.id == first.id


async def test_lookup_of_a_leased_or_waiting_message_does_not_scan_the_queue(redis: RedisServer) -> None:
    settings = Settings()
    store = make_store(connect_redis(redis.url, settings), settings)
    counter = aioredis.Redis.from_url(redis.url, decode_responses=True)
    try:
        # Given a group with a queue of 1,000 messages, one message leased and one waiting for its retry
        await store.ensure_group("orders", "g")
        published = await store.publish_many([PublishRequest("orders", str(n)) for n in range(1_002)])
        leased, waiting = await store.claim("orders", "g", 2, 60_000, "c1.1")
        await store.nack_many("orders", "g", [(NackItem(waiting.id, waiting.receipt, "later", 60_000), 1, "c1.1")])
        await counter.config_resetstat()

        # When both are looked up
        rows = [*await message_status(store, leased.id, "orders"), *await message_status(store, waiting.id, "orders")]

        # Then their states are told without a scan of the queue (LPOS: O(its length) for an id not in it)
        assert [r["state"] for r in rows] == ["leased", "retry_wait"]
        assert "cmdstat_lpos" not in await counter.info("commandstats")

        # And a message in the queue is still found at its position
        (queued,) = await message_status(store, published[5].id, "orders")
        assert (queued["state"], queued["position"]) == ("ready", 3)
    finally:
        await counter.aclose()
        await store.close()
