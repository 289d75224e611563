"""The store on a Redis Cluster (``redis.cluster = true``): routing by the topic's slot, the run-time keys' slot,
errors that are outages vs bugs, and scripts across a failover (a promoted replica has an empty script cache).

The store's whole test suite also runs on the cluster (``test_store_cluster.py``); this module holds what only a
cluster can show.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster as RedisClusterClient

from broker.core.config import load_settings
from broker.core.errors import BrokerError, ConfigError, UnavailableError
from broker.core.model import NackItem, PublishRequest, PublishResult
from broker.ops import dlq, transfer
from broker.ops import stats as ops_stats
from broker.store import RedisStore, connect_redis
from broker.store.cluster import sharded
from broker.store.diagnose import diagnose
from broker.store.keys import TopicKeys
from broker.store.queues import Queues
from broker.store.scripts import load_script

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
    # When its replica takes over (CLUSTER FAILOVER) and has never seen the scripts
    _, replica = _fail_over(redis_cluster, cstore.keys(T).groups)
    sha = cstore.scripts.get("publish").sha
    assert redis_cluster.cli(replica, "SCRIPT", "EXISTS", str(sha)) == "0"
    # Then the same store, on the same client, follows the slot (MOVED) and loads its scripts there (NOSCRIPT)
    (second,) = await cstore.publish_many([PublishRequest(T, '"2"')])
    assert isinstance(second, PublishResult)
    got = await cstore.claim(T, "g", 10, 30_000, "c1")
    assert [d.payload for d in got] == ['"1"', '"2"']
    assert redis_cluster.cli(replica, "SCRIPT", "EXISTS", str(sha)) == "1"
    assert cstore.breaker.state == "closed"


async def test_a_publish_waiting_for_replicas_after_a_failover_is_vouched_for_by_the_new_master(
    redis_cluster: RedisCluster,
) -> None:
    # Given replicas_to_ack = 1 and a topic published to: the store's slot map names the topic's master
    store = _waiting_store(redis_cluster, ack_timeout_ms=2_000)
    try:
        await store.ensure_group(T, "g")
        (first,) = await store.publish_many([PublishRequest(T, '"1"')])
        assert isinstance(first, PublishResult), first
        # When its replica takes over, the old master becomes its replica, and the store's map is now stale
        _fail_over(redis_cluster, store.keys(T).groups)
        # Then the next publish runs on the new master (MOVED, then NOSCRIPT) and its WAIT goes there too, on the
        # connection of the write: confirmed, not failed by a WAIT sent to the demoted master (a replica refuses it)
        (second,) = await store.publish_many([PublishRequest(T, '"2"')])
        assert isinstance(second, PublishResult), second
        got = await store.claim(T, "g", 10, 30_000, "c1")
        assert [d.payload for d in got] == ['"1"', '"2"']
        assert store.breaker.state == "closed"
    finally:
        await store.close()


def _waiting_store(cluster: RedisCluster, ack_timeout_ms: int) -> RedisStore:
    """A store on the cluster, under a prefix of its own, with ``redis.replicas_to_ack = 1``."""
    settings = cluster.settings().replace("redis", key_prefix=f"r{uuid.uuid4().hex[:10]}", replicas_to_ack=1)
    settings = settings.replace("redis", replicas_ack_timeout_ms=ack_timeout_ms)
    return make_store(connect_redis(cluster.url, settings), settings)


def _fail_over(cluster: RedisCluster, key: str) -> tuple[int, int]:
    """Promote the replica of ``key``'s master (CLUSTER FAILOVER: the old master becomes its replica) and wait until
    the old master is in sync as the new one's replica (a manual failover needs a replica in sync: the next test's
    would fail otherwise); returns (old master, new master)."""
    old = cluster.port_of_slot_owner(key)
    old_id = _id(cluster, old)
    replica = next(p for p, role, master in cluster.nodes() if role == "slave" and master == old_id)
    # A failover of a shard that failed over a moment ago can lose its election (the masters vote for one shard's
    # failover once per 2 x cluster-node-timeout): asked again until it takes
    for _ in range(4):
        assert cluster.cli(replica, "CLUSTER", "FAILOVER") == "OK"
        with contextlib.suppress(AssertionError):
            _wait(lambda: cluster.port_of_slot_owner(key) == replica, "the replica to be promoted", timeout_s=5)
            break
    _wait(lambda: cluster.port_of_slot_owner(key) == replica, "the replica to be promoted")
    _wait(lambda: "master_link_status:up" in cluster.cli(old, "INFO", "replication"), "the demoted master in sync")
    return old, replica


def _id(cluster: RedisCluster, port: int) -> str:
    return cluster.cli(port, "CLUSTER", "MYID")


def _wait(cond: object, what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if callable(cond) and cond():
                return
        except RuntimeError:  # mid-failover: no master serves the slot for a moment
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# ---- wake-ups: sharded Pub/Sub ------------------------------------------------------------------------------------


class Listener:
    """``listen_wakes`` of one store as a task, recording what it heard."""

    def __init__(self, store: RedisStore, topics: set[str]) -> None:
        self.store, self.topics = store, topics
        self.woken: list[str] = []
        self.due: list[str] = []
        self.subscribed = 0
        self.running = True
        self.task = asyncio.create_task(
            store.listen_wakes(
                self.woken.append,
                lambda: None,
                lambda: self.running,
                self._on_sub,
                self.due.append,
                lambda: set(self.topics),
            )
        )

    def _on_sub(self) -> None:
        self.subscribed += 1

    async def until(self, cond: Callable[[], bool], what: str, timeout_s: float = 15) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.task.done():
                self.task.result()  # raises what ended it
                raise AssertionError(f"the listener ended while waiting for {what}")
            if cond():
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}: woken={self.woken} subscribed={self.subscribed}")

    async def stop(self) -> None:
        self.running = False
        await asyncio.wait_for(self.task, 10)


@pytest.fixture
async def two_nodes(redis_cluster: RedisCluster) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    settings = redis_cluster.settings().replace("redis", key_prefix=f"w{uuid.uuid4().hex[:10]}")
    a = make_store(connect_redis(redis_cluster.url, settings), settings, node_id="node-a")
    b = make_store(connect_redis(redis_cluster.url, settings), settings, node_id="node-b")
    yield a, b
    await a.close()
    await b.close()


async def test_wake_ups_travel_by_sharded_pubsub_to_the_nodes_that_consume_the_topic(
    two_nodes: tuple[RedisStore, RedisStore],
) -> None:
    a, b = two_nodes
    # Given node A listens for the topics it consumes (one now), and the scripts send SPUBLISH on a cluster
    assert "SPUBLISH" in a.scripts.get("publish").script and "'PUBLISH'" not in str(a.scripts.get("publish").script)
    heard = Listener(a, {T})
    await heard.until(lambda: heard.subscribed == 1, "the subscription")
    # When node B publishes to it, and to a topic A does not consume
    await b.publish_many([PublishRequest(T, '"1"'), PublishRequest("unheard", '"2"')])
    # Then A is woken for its topic only (B's note names B, so B itself would skip it)
    await heard.until(lambda: T in heard.woken, "the wake-up from node B")
    # When A starts consuming another topic, Then it subscribes and wakes that topic's loops once (a note sent before
    # its subscription stood was missed), and hears B's next publish there
    heard.topics.add("later")
    await heard.until(lambda: "later" in heard.woken, "the first wake of a newly consumed topic")
    n = heard.woken.count("later")
    await b.publish_many([PublishRequest("later", '"3"', delay_ms=60_000)])  # a delayed publish: a due note
    await heard.until(lambda: "later" in heard.due, "the due note")
    await b.publish_many([PublishRequest("later", '"4"')])
    await heard.until(lambda: heard.woken.count("later") > n, "the wake-up on the new topic")
    assert "unheard" not in heard.woken
    await heard.stop()


async def test_the_listener_follows_a_failover(
    two_nodes: tuple[RedisStore, RedisStore], redis_cluster: RedisCluster
) -> None:
    a, b = two_nodes
    await a.ensure_group(T, "g")
    heard = Listener(a, {T})
    await heard.until(lambda: heard.subscribed == 1, "the subscription")
    # When the topic's master fails over to its replica, and node A's own calls meet the new owner (its sweep does)
    _fail_over(redis_cluster, a.keys(T).groups)
    await a.sweep([(T, "g")])
    # Then A subscribes again on the new owner (and wakes every loop once: notes may have been missed)
    await heard.until(lambda: heard.subscribed == 2, "the subscription on the new owner")
    # And hears node B's next publish through it
    heard.woken.clear()
    await b.publish_many([PublishRequest(T, '"after"')])
    await heard.until(lambda: T in heard.woken, "the wake-up after the failover")
    await heard.stop()


def test_every_publish_of_the_scripts_becomes_a_sharded_publish_on_a_cluster() -> None:
    # Given the scripts' text as loaded (with _lib.lua), Then every PUBLISH they send is written the one way that
    # cluster.sharded() turns into SPUBLISH: none is left plain on a cluster
    scripts = Path(__file__).resolve().parent.parent / "broker" / "store" / "scripts"
    sent = 0
    for path in sorted(scripts.glob("[!_]*.lua")):
        text = load_script(path.stem)
        code = "\n".join(line.split("--", 1)[0] for line in text.splitlines())
        sent += code.count("PUBLISH")
        assert "PUBLISH" not in sharded(code).replace("SPUBLISH", ""), path.name
    assert sent >= 10  # publish, promote, reprocess, ack, nack, expire, release, unclaim, import, repair_key


# ---- everything that scans, across every master ----------------------------------------------------------------


async def test_operator_views_cover_every_master(cstore: RedisStore, redis_cluster: RedisCluster) -> None:
    # Given 12 topics over the three masters, each with a group, 3 messages and one dead letter
    topics = [f"ops{i}" for i in range(12)]
    assert len({redis_cluster.port_of_slot_owner(cstore.keys(t).groups) for t in topics}) == 3
    for t in topics:
        await cstore.ensure_group(t, "g")
    await cstore.publish_many([PublishRequest(t, f'"{t}-{n}"') for t in topics for n in range(3)])
    for t in topics:
        (d,) = await cstore.claim(t, "g", 1, 30_000, "c1")
        await cstore.nack_many(t, "g", [(NackItem(d.id, d.receipt, "bad", dead=True), 1, "c1")])
    # When an operator looks, Then stats, memory per topic and the DLQ show every topic, each on its own master
    snap = await ops_stats.collect(cstore, memory=True)
    assert {(r["topic"], r["ready"], r["dead"]) for r in snap.groups} == {(t, 2, 1) for t in topics}
    assert {m["topic"] for m in snap.topics} == set(topics) and all(m["keys"] > 0 for m in snap.topics)
    letters = await dlq.select(cstore, dlq.Filter())
    assert sorted(d.topic for d in letters) == sorted(topics)
    # And diagnose reads every master (persistence: each runs with AOF) and finds damage wherever it is
    assert await diagnose(cstore) == []
    damaged = topics[-1]
    await cstore.redis.hset(cstore.keys(damaged).body("0" * 28), mapping={"payload": "1", "refs": "1"})
    findings = await diagnose(cstore)
    assert [(f.check, f.details.get("ids")) for f in findings] == [("orphan_bodies", [f"{damaged}/{'0' * 28}"])]
    await cstore.redis.delete(cstore.keys(damaged).body("0" * 28))
    # And an export of every topic comes back whole after the topics are deleted
    exported, _ = await transfer.export(cstore, topics)
    for t in topics:
        await Queues(cstore).delete_topic(t)
    assert (await ops_stats.collect(cstore)).groups == []
    summary = (await transfer.import_file(cstore, exported)).to_json()
    assert summary["deliveries"]["imported"] == 24 and summary["dead_letters"]["imported"] == 12, summary
    assert {(r["topic"], r["ready"], r["dead"]) for r in (await ops_stats.collect(cstore)).groups} == {
        (t, 2, 1) for t in topics
    }


async def test_a_master_that_does_not_answer_is_named_not_left_out() -> None:
    # Given a cluster whose replicas would not take over for a long while, and one master frozen (SIGSTOP)
    with RedisCluster(node_timeout_ms=60_000) as cluster:
        settings = cluster.settings().replace("redis", socket_timeout_ms=300, connect_timeout_ms=300)
        settings = settings.replace("breakers", redis_fail_max=100)  # each ask on its own: no breaker in the way
        store = make_store(connect_redis(cluster.url, settings), settings)
        try:
            topics = [f"t{i}" for i in range(12)]
            await store.publish_many([PublishRequest(t, '"x"') for t in topics])
            frozen = cluster.port_of_slot_owner(store.keys(topics[0]).groups)
            cluster.signal(frozen, signal.SIGSTOP)
            try:
                # When an operator asks for stats, memory or a diagnosis, Then the answer is an error that names
                # the master, not the other masters' topics shown as the whole
                for ask in (
                    lambda: ops_stats.collect(store, memory=True),
                    lambda: ops_stats.collect(store),
                    lambda: diagnose(store),
                ):
                    with pytest.raises(UnavailableError, match=str(frozen)):
                        await ask()
            finally:
                cluster.signal(frozen, signal.SIGCONT)
        finally:
            await store.close()


# ---- confirms that survive a failover: WAIT per master ----------------------------------------------------------


async def test_replicas_to_ack_waits_on_each_master_and_refuses_only_where_replicas_lag(
    redis_cluster: RedisCluster,
) -> None:
    # Given replicas_to_ack = 1 on the cluster, and 30 topics over the three masters
    store = _waiting_store(redis_cluster, ack_timeout_ms=300)
    try:
        topics = [f"r{i}" for i in range(30)]
        res = await store.publish_many([PublishRequest(t, '"1"') for t in topics])
        # Then one batch is confirmed on every master (a WAIT on each, after its writes, on the same connection)
        assert all(isinstance(r, PublishResult) for r in res), res
        # When one master's replica stops answering
        lagging = redis_cluster.port_of_slot_owner(store.keys(topics[0]).groups)
        replica = redis_cluster.replica_of(lagging)
        redis_cluster.signal(replica, signal.SIGSTOP)
        try:
            res = await store.publish_many([PublishRequest(t, '"2"') for t in topics])
        finally:
            redis_cluster.signal(replica, signal.SIGCONT)
        # Then that master's topics are refused (unavailable: the publisher retries), the others confirmed
        for t, r in zip(topics, res, strict=True):
            on_lagging = redis_cluster.port_of_slot_owner(store.keys(t).groups) == lagging
            assert isinstance(r, UnavailableError) if on_lagging else isinstance(r, PublishResult), (t, r)
        assert store.breaker.state == "closed"
    finally:
        await store.close()
