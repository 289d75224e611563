"""Shared fixtures: one real redis-server per session; store tests run against fakeredis and that server.

Isolation on the shared server: every test gets its own key prefix, and its keys are deleted at teardown.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import fakeredis
import pytest

from broker.client.client import BrokerClient
from broker.core.config import Settings
from broker.core.model import now_ms
from broker.store import RedisStore, connect_redis

from .brokers import BrokerProcess
from .cluster import RedisCluster
from .support import FakeClock, RedisServer, make_store

StoreFactory = Callable[..., Awaitable[RedisStore]]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """One 3-master Redis Cluster per session (for the modules that run the store on a cluster too)."""
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture(params=["fake", "real"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clock() -> FakeClock:
    """A store clock the test steps (``clock.advance(ms)``); pass it to ``store_factory(clock=clock)``."""
    return FakeClock()


@pytest.fixture
async def store_factory(backend: str, request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """``await store_factory(settings=None, clock=None)`` -> a store on this test's backend and key prefix (and on
    ``clock``, default the wall clock).

    Several stores of one test share the data (one FakeServer, or the session's redis-server), like broker nodes.
    """
    prefix = f"t{uuid.uuid4().hex[:12]}"
    fake_server = fakeredis.FakeServer(version=(7, 0)) if backend == "fake" else None
    server: RedisServer | None = request.getfixturevalue("redis_server") if backend == "real" else None
    cluster: RedisCluster | None = request.getfixturevalue("redis_cluster") if backend == "cluster" else None
    made: list[RedisStore] = []

    async def factory(settings: Settings | None = None, clock: Callable[[], int] | None = None) -> RedisStore:
        settings = (settings or Settings()).replace("redis", key_prefix=prefix)
        client: Any
        if fake_server is not None:
            client = fakeredis.FakeAsyncRedis(server=fake_server, decode_responses=True)
        elif cluster is not None:
            client = connect_redis(cluster.url, cluster.settings(settings))
        else:
            assert server is not None
            client = connect_redis(server.url, settings)
        store = make_store(client, settings, clock=clock or now_ms)
        made.append(store)
        return store

    yield factory

    if (server is not None or cluster is not None) and made:
        r = made[0].redis
        keys = [k async for k in r.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await r.delete(*keys)
    for s in made:
        await s.close()


@pytest.fixture
async def store(store_factory: StoreFactory) -> RedisStore:
    return await store_factory()


# ---- real broker processes (integration tests) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    """A throwaway redis-server per test module (modules that need another shape define their own)."""
    with RedisServer() as r:
        yield r


@pytest.fixture
def broker(redis: RedisServer, request: pytest.FixtureRequest) -> Iterator[BrokerProcess]:
    """A fresh broker process on an empty Redis, configured with the test module's ``FAST`` settings (if any)."""
    redis.cli("FLUSHALL")
    with BrokerProcess(redis.url, env=getattr(request.module, "FAST", {})) as b:
        yield b


@pytest.fixture
async def client(broker: BrokerProcess) -> AsyncIterator[BrokerClient]:
    async with BrokerClient(broker.url) as c:
        yield c
