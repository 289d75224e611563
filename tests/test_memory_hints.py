"""Message bodies are hashes whose payload is longer than Redis's default ``hash-max-listpack-value`` (64 bytes):
Redis then stores each as a hashtable, about 250 bytes more per queued message. The managed redis-server runs with
``BODY_LISTPACK_VALUE``; a broker on a Redis with less says so at startup (``redis_memory_hint``)."""

from __future__ import annotations

import uuid
from pathlib import Path

import redis.asyncio as aioredis

from bench.procs import HASH_LISTPACK_VALUE
from broker.core.config import Settings
from broker.core.model import PublishRequest
from broker.node.embedded import EmbeddedRedis
from broker.store import connect_redis
from broker.store.connection import BODY_LISTPACK_VALUE, memory_hints

from .support import RedisServer, make_store


def test_the_bench_runs_its_redis_server_as_the_managed_one() -> None:
    assert HASH_LISTPACK_VALUE == BODY_LISTPACK_VALUE


def test_a_value_below_1024_is_named_with_the_fix() -> None:
    (hint,) = memory_hints({"hash-max-listpack-value": "64"})
    assert "64" in hint and str(BODY_LISTPACK_VALUE) in hint
    assert memory_hints({"hash-max-listpack-value": "4096"}) == []
    assert memory_hints({}) == []  # not readable: nothing to say (the persistence check says CONFIG is forbidden)


async def test_the_store_reports_the_hint_and_a_body_is_compact_once_the_value_is_raised() -> None:
    with RedisServer() as server:
        settings = Settings().replace("redis", key_prefix=f"h{uuid.uuid4().hex[:8]}")
        store = make_store(connect_redis(server.url, settings), settings)
        try:
            r: aioredis.Redis = store.redis
            payload = '"' + "x" * 254 + '"'  # a 256-byte payload
            # Given Redis's default, Then the store names the setting, and a body is a hashtable
            assert [h for h in await store.memory_hints() if "hash-max-listpack-value is 64" in h]
            await store.ensure_group("t", "g")
            (first,) = await store.publish_many([PublishRequest("t", payload)])
            assert await r.object("encoding", store.keys("t").body(first.id)) == "hashtable"  # type: ignore[union-attr]
            # When it is raised as the managed Redis has it, Then no hint, and a body is a listpack
            await r.config_set("hash-max-listpack-value", BODY_LISTPACK_VALUE)
            assert await store.memory_hints() == []
            (second,) = await store.publish_many([PublishRequest("t", payload)])
            assert await r.object("encoding", store.keys("t").body(second.id)) == "listpack"  # type: ignore[union-attr]
        finally:
            await store.close()


async def test_the_managed_redis_runs_with_compact_bodies(tmp_path: Path) -> None:
    embedded = EmbeddedRedis(str(tmp_path / "redis"))
    await embedded.start()
    try:
        r = aioredis.from_url(embedded.url, decode_responses=True)
        assert (await r.config_get("hash-max-listpack-value"))["hash-max-listpack-value"] == str(BODY_LISTPACK_VALUE)
        await r.aclose()
    finally:
        embedded.stop()
