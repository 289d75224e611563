"""The store on a Redis Cluster (``redis.cluster = true``): routing by the topic's slot, the run-time keys' slot,
errors that are outages vs bugs, and scripts across a failover (a promoted replica has an empty script cache).

The store's whole test suite also runs on the cluster (``test_store_cluster.py``); this module holds what only a
cluster can show.
"""

from __future__ import annotations

import time
import uuid

import pytest
from redis.asyncio.cluster import RedisCluster as RedisClusterClient

from broker.core.config import load_settings
from broker.core.errors import BrokerError, ConfigError, UnavailableError
from broker.core.model import PublishRequest, PublishResult
from broker.store import RedisStore, connect_redis
from broker.store.keys import TopicKeys

from .cluster import RedisCluster
from .support import make_store

T = "orders"


@pytest.fixture
async def cstore(redis_cluster: RedisCluster) -> RedisStore:
    settings = redis_cluster.settings().replace("redis", key_prefix=f"c{uuid.uuid4().hex[:10]}")
    store = make_store(connect_redis(redis_cluster.url, settings), settings)
    yield store  # type: ignore[misc]
    await store.close()


def test_cluster_setting_from_the_environment_and_its_checks() -> None:
    # Given the environment names a cluster seed, Then the settings say cluster mode
    s = load_settings(None, {"BROKER_REDIS_URL": "redis://127.0.0.1:7100", "BROKER_REDIS_CLUSTER": "true"})
    assert s.redis.cluster and s.redis.url == "redis://127.0.0.1:7100"
    # And a cluster without a seed URL, or on a unix socket, is refused at startup
    for url in ("", "unix:///tmp/redis.sock"):
        with pytest.raises(ConfigError, match=r"redis\.cluster needs redis\.url"):
            load_settings(None, {"BROKER_REDIS_URL": url, "BROKER_REDIS_CLUSTER": "1"})


async def test_the_cluster_client_has_its_retries_off(cstore: RedisStore) -> None:
    # Given the store's cluster client, Then redis-py's own retries are off (an outage reaches the breaker at once)
    client = cstore.redis
    assert isinstance(client, RedisClusterClient)
    assert client.retry.get_retries() == 0


@pytest.mark.parametrize("okey", ["plain", "k:{x}", "}{", "{", "}", "a{b}c", "é€"])
async def test_run_time_keys_are_in_the_slot_of_the_declared_ones(redis_cluster: RedisCluster, okey: str) -> None:
    # Given every key name the scripts build at run time, with ordering / idempotency keys full of braces
    k = TopicKeys("mq", "a.b-c_d")
    g = k.group("g-1")
    msg = "0192f3a4b5c6d7e8f90a1b2c3d4e"
    built = [k.body(msg), k.idem(okey), g.delivery(msg), g.dead_letter(msg), g.key_line(okey), g.ready, k.wake]
    # Then Redis Cluster puts each in the slot of the declared keys (the hash tag is the first {...} of the name,
    # and the base "<prefix>:{<topic>}:" comes first with no brace in the prefix or the topic)
    slot = redis_cluster.cli(redis_cluster.ports[0], "CLUSTER", "KEYSLOT", k.groups)
    for name in built:
        assert redis_cluster.cli(redis_cluster.ports[0], "CLUSTER", "KEYSLOT", name) == slot, name


async def test_topics_spread_over_every_master(cstore: RedisStore, redis_cluster: RedisCluster) -> None:
    # Given 30 topics published to, Then their keys live on all three masters (each topic on one)
    topics = [f"t{i}" for i in range(30)]
    res = await cstore.publish_many([PublishRequest(t, f'"{t}"') for t in topics])
    assert all(isinstance(r, PublishResult) for r in res), res
    owners = {redis_cluster.port_of_slot_owner(cstore.keys(t).groups) for t in topics}
    assert owners == set(redis_cluster.masters())


async def test_a_key_on_another_master_fails_the_script_as_a_bug_not_an_outage(cstore: RedisStore) -> None:
    # Given Redis Cluster refuses a script touching a key another master serves, Then that is an error reply
    # (BrokerError internal), not an outage: the breaker stays closed
    k = cstore.keys(T)
    home = await _slot_master(cstore, k.groups)
    others = [f"x{i}" for i in range(100) if await _slot_master(cstore, f"x{i}") != home]
    elsewhere = others[0]
    script = f"redis.call('GET', KEYS[1]); return redis.call('GET', '{elsewhere}')"
    with pytest.raises(BrokerError, match="non local key") as ei:
        await cstore.gateway.call(lambda r: r.eval(script, 1, k.groups), "probe_script")
    assert not isinstance(ei.value, UnavailableError)
    # And keys of one call in two slots are refused by the client before sending: a bug too
    with pytest.raises(BrokerError, match="same key slot") as ei2:
        await cstore.gateway.call(lambda r: r.eval("return 1", 2, k.groups, cstore.keys("other").groups), "x")
    assert not isinstance(ei2.value, UnavailableError)
    assert cstore.breaker.state == "closed"


async def _slot_master(store: RedisStore, key: str) -> str:
    client = store.redis
    assert isinstance(client, RedisClusterClient)
    await client.initialize()
    node = client.get_node_from_key(key)
    assert node is not None
    return str(node.name)


async def test_scripts_survive_a_failover_to_a_replica_with_an_empty_script_cache(
    cstore: RedisStore, redis_cluster: RedisCluster
) -> None:
    # Given a topic with a message, its scripts loaded on its master
    await cstore.ensure_group(T, "g")
    (first,) = await cstore.publish_many([PublishRequest(T, '"1"')])
    assert isinstance(first, PublishResult)
    old = redis_cluster.port_of_slot_owner(cstore.keys(T).groups)
    old_id = _id(redis_cluster, old)
    replica = next(p for p, role, master in redis_cluster.nodes() if role == "slave" and master == old_id)
    # When its replica takes over (CLUSTER FAILOVER) and has never seen the scripts
    assert redis_cluster.cli(replica, "CLUSTER", "FAILOVER") == "OK"
    _wait(lambda: redis_cluster.port_of_slot_owner(cstore.keys(T).groups) == replica, "the replica to be promoted")
    sha = cstore.scripts.get("publish").sha
    assert redis_cluster.cli(replica, "SCRIPT", "EXISTS", str(sha)) == "0"
    # Then the same store, on the same client, follows the slot (MOVED) and loads its scripts there (NOSCRIPT)
    (second,) = await cstore.publish_many([PublishRequest(T, '"2"')])
    assert isinstance(second, PublishResult)
    got = await cstore.claim(T, "g", 10, 30_000, "c1")
    assert [d.payload for d in got] == ['"1"', '"2"']
    assert redis_cluster.cli(replica, "SCRIPT", "EXISTS", str(sha)) == "1"
    assert cstore.breaker.state == "closed"


def _id(cluster: RedisCluster, port: int) -> str:
    return cluster.cli(port, "CLUSTER", "MYID")


def _wait(cond: object, what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
