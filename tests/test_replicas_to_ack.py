"""``redis.replicas_to_ack``: a publish is confirmed only when ``WAIT`` saw that many replicas take it; short of them
the publisher gets ``unavailable`` (a refusal: Redis is up, the breaker does not count it). On one Redis with a
replica here; on a cluster, per master, in ``test_cluster.py``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import pytest

from broker.core.config import Settings
from broker.core.errors import StoreRefusedError
from broker.core.model import PublishRequest, PublishResult
from broker.store import ClaimRequest, RedisStore, connect_redis

from .support import RedisServer, make_store

T = "orders"


@pytest.fixture(scope="module")
def primary() -> Iterator[RedisServer]:
    with RedisServer() as r:
        yield r


@pytest.fixture
def replica(primary: RedisServer) -> Iterator[RedisServer]:
    with RedisServer(extra_args=["--replicaof", "127.0.0.1", str(primary.port)]) as r:
        deadline = time.monotonic() + 10
        while "master_link_status:up" not in r.cli("INFO", "replication"):
            assert time.monotonic() < deadline, "the replica did not attach"
            time.sleep(0.05)
        yield r


@pytest.fixture
async def store(primary: RedisServer) -> AsyncIterator[RedisStore]:
    primary.cli("FLUSHALL")
    settings = Settings().replace("redis", replicas_to_ack=1, replicas_ack_timeout_ms=200)
    s = make_store(connect_redis(primary.url, settings), settings)
    yield s
    await s.close()


async def test_a_publish_is_confirmed_once_a_replica_has_it(store: RedisStore, replica: RedisServer) -> None:
    # Given a replica attached, When a batch is published (one WAIT for the batch), Then it is confirmed, and the
    # replica holds every message
    await store.ensure_group(T, "g")
    res = await store.publish_many([PublishRequest(T, f'"{n}"') for n in range(50)])
    assert all(isinstance(r, PublishResult) for r in res), res
    assert replica.cli("LLEN", store.keys(T).group("g").ready) == "50"
    # And a single publish too (the single-call fast path is not taken when a WAIT must follow)
    (one,) = await store.publish_many([PublishRequest(T, '"one"')])
    assert isinstance(one, PublishResult)


async def test_without_the_replica_the_publisher_gets_unavailable_and_the_breaker_stays_closed(
    store: RedisStore, replica: RedisServer
) -> None:
    await store.ensure_group(T, "g")
    # Given the replica gone, When a batch is published
    replica.kill()
    res = await store.publish_many([PublishRequest(T, '"a"', idempotency_key="k1"), PublishRequest(T, '"b"')])
    # Then it is refused as unavailable (retry later, with the idempotency key), not counted as an outage
    for r in res:
        assert isinstance(r, StoreRefusedError) and r.code == "unavailable", r
        assert "NOREPLICAS 0 of 1" in r.message
    assert store.breaker.state == "closed" and store.breaker.fail_counter == 0
    # And claims riding on a refused publish keep their deliveries (they ran; a lost lease is only a redelivery)
    claim = ClaimRequest(T, "g", 10, 30_000, "c1")
    res = await store.publish_many([PublishRequest(T, '"c"')], [claim])
    assert isinstance(res[0], StoreRefusedError)
    assert isinstance(claim.result, list) and {d.payload for d in claim.result} == {'"a"', '"b"', '"c"'}
    # When the publisher retries with its idempotency key once a replica is back, Then it is not stored twice
    replica.start()
    deadline = time.monotonic() + 10
    while "master_link_status:up" not in replica.cli("INFO", "replication"):
        assert time.monotonic() < deadline, "the replica did not attach again"
        time.sleep(0.05)
    (again,) = await store.publish_many([PublishRequest(T, '"a"', idempotency_key="k1")])
    assert isinstance(again, PublishResult) and again.duplicate
