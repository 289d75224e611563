"""Per-master circuit breakers on a Redis Cluster (issue 16): one failing master pauses only its topics.

On a real 3-master cluster whose replicas would not take over for a long while, one master is frozen (SIGSTOP):

- the store: publishes to its topics are ``unavailable``, to the other masters' topics confirmed, in the same batch;
  its breaker opens, the others stay closed; claims and the sweep on the other masters go on; after SIGCONT its
  breaker half-opens by its probe and closes with the next calls, with no operator;
- a broker node (real process): ``/readyz`` stays 200 but names the master and its topics (degraded), ``broker
  stats`` names it, ``/metrics`` has its breaker's state and transitions; after SIGCONT all of it clears by itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.crc import key_slot

from broker.core.errors import UnavailableError
from broker.core.model import PublishRequest, PublishResult
from broker.runtime.resilience import BreakerState
from broker.store import RedisStore, connect_redis

from .brokers import BrokerProcess
from .cluster import RedisCluster
from .support import make_store, until

REPO = Path(__file__).resolve().parent.parent
TOPICS = [f"b{i}" for i in range(12)]


@pytest.fixture(scope="module")
def slow_failover_cluster() -> Any:
    """A cluster whose replicas wait 60 s before taking over: a frozen master stays the slot owner."""
    with RedisCluster(node_timeout_ms=60_000) as cluster:
        yield cluster


def master_name(store: RedisStore, cluster: RedisCluster, topic: str) -> str:
    return f"127.0.0.1:{cluster.port_of_slot_owner(store.keys(topic).groups)}"


async def test_a_frozen_master_fails_only_its_own_topics(slow_failover_cluster: RedisCluster) -> None:
    cluster = slow_failover_cluster
    # Given a store on the cluster (short timeouts, 2 failures open a breaker, only the probe half-opens it early)
    settings = cluster.settings().replace(
        "redis", key_prefix=f"p{uuid.uuid4().hex[:8]}", socket_timeout_ms=300, connect_timeout_ms=300
    )
    settings = settings.replace(
        "breakers", redis_fail_max=2, redis_reset_timeout_s=600, redis_success_threshold=2, redis_call_timeout_ms=500
    )
    store = make_store(connect_redis(cluster.url, settings), settings)
    try:
        # And 12 topics over the three masters, each with a group and a message
        for t in TOPICS:
            await store.ensure_group(t, "g")
        first = await store.publish_many([PublishRequest(t, '"0"') for t in TOPICS])
        assert all(isinstance(r, PublishResult) for r in first)
        owner = {t: master_name(store, cluster, t) for t in TOPICS}
        assert len(set(owner.values())) == 3
        frozen = owner[TOPICS[0]]
        on_frozen = {t for t in TOPICS if owner[t] == frozen}
        mb = store.master_breakers
        assert mb is not None and set(mb.states()) == set(owner.values())  # one breaker per master, as met
        cluster.signal(int(frozen.rsplit(":", 1)[1]), signal.SIGSTOP)
        try:
            # When one batch publishes to every topic, twice (the breaker's failure count)
            for _ in range(2):
                res = await store.publish_many([PublishRequest(t, '"1"') for t in TOPICS])
                # Then the frozen master's topics are unavailable, naming it; the others are confirmed
                for t, r in zip(TOPICS, res, strict=True):
                    if t in on_frozen:
                        assert isinstance(r, UnavailableError) and frozen in r.message, (t, r)
                    else:
                        assert isinstance(r, PublishResult), (t, r)
            # And its breaker is open, the others closed
            states = mb.states()
            assert states.pop(frozen) is BreakerState.OPEN
            assert set(states.values()) == {BreakerState.CLOSED}
            # And an open breaker answers at once (no call to the frozen master), naming it
            t0 = time.monotonic()
            (r,) = await store.publish_many([PublishRequest(TOPICS[0], '"2"')])
            assert isinstance(r, UnavailableError) and "breaker open" in r.message and frozen in r.message
            assert time.monotonic() - t0 < 0.25  # well below the 300 ms socket timeout: refused, not tried
            # And the outage names the master with its topics (what /readyz and the node's status report)
            outage = store.master_outage()
            assert not outage.total and outage.down == {frozen: (BreakerState.OPEN, sorted(on_frozen))}
            # And claims and the sweep of the other masters' topics go on; the frozen ones' fail alone
            healthy = next(t for t in TOPICS if t not in on_frozen)
            assert len(await store.claim(healthy, "g", 10, 30_000, "c1")) == 3
            with pytest.raises(UnavailableError, match=frozen):
                await store.claim(TOPICS[0], "g", 10, 30_000, "c1")
            failed: list[str] = []
            swept = await store.sweep_due([(t, "g") for t in TOPICS], failed=failed)
            assert failed == []  # not damage: its master's breaker reports it
            assert [s.failed for s in swept] == [t in on_frozen for t in TOPICS]
        finally:
            cluster.signal(int(frozen.rsplit(":", 1)[1]), signal.SIGCONT)
        # When the master answers again, Then its breaker's probe half-opens it, and calls close it: no operator
        await until(lambda: mb.states()[frozen] is not BreakerState.OPEN, "the probe to half-open the breaker")
        async with asyncio.timeout(30):
            while True:
                res = await store.publish_many([PublishRequest(t, '"3"') for t in sorted(on_frozen)])
                if all(isinstance(r, PublishResult) for r in res) and mb.states()[frozen] is BreakerState.CLOSED:
                    break
                await asyncio.sleep(0.1)
        assert store.master_outage().down == {}
        # And nothing was lost on the frozen master's topics: what was confirmed before is there
        for t in on_frozen:
            got = await store.claim(t, "g", 10, 30_000, "c2")
            assert [d.payload for d in got][:1] == ['"0"'], t
    finally:
        await store.close()


async def test_a_pass_over_many_masters_needs_each_one(slow_failover_cluster: RedisCluster) -> None:
    # Given a store and a master frozen
    cluster = slow_failover_cluster
    settings = cluster.settings().replace(
        "redis", key_prefix=f"q{uuid.uuid4().hex[:8]}", socket_timeout_ms=300, connect_timeout_ms=300
    )
    store = make_store(connect_redis(cluster.url, settings), settings)
    try:
        for t in TOPICS:
            await store.ensure_group(t, "g")
        frozen = master_name(store, cluster, TOPICS[0])
        cluster.signal(int(frozen.rsplit(":", 1)[1]), signal.SIGSTOP)
        try:
            # When a read needs every master (the groups' depths, as `broker stats` reads them)
            # Then it fails naming the frozen master, not showing the others' topics as the whole
            with pytest.raises(UnavailableError, match=frozen):
                await store.group_stats(TOPICS, [])
        finally:
            cluster.signal(int(frozen.rsplit(":", 1)[1]), signal.SIGCONT)
    finally:
        await store.close()


# ---- a broker node: /readyz, broker stats, /metrics -------------------------------------------------------------


def readyz(broker: BrokerProcess) -> tuple[int, dict[str, Any]]:
    status, body = broker.get("/readyz")
    return status, (orjson.loads(body) if body else {})


def slot_owners(cluster: RedisCluster) -> Callable[[str], str]:
    """``owner(key)``: the master (``host:port``) serving ``key``'s slot, from one ``CLUSTER SLOTS``."""
    import redis

    with redis.Redis(port=cluster.masters()[0]) as r:
        ranges = [(int(a), int(b), f"127.0.0.1:{int(m[1])}") for a, b, m, *_ in r.execute_command("CLUSTER SLOTS")]

    def owner(key: str) -> str:
        slot = key_slot(key.encode())
        return next(m for a, b, m in ranges if a <= slot <= b)

    return owner


async def stats_nodes(seed: str, prefix: str) -> tuple[int, list[dict[str, Any]], str]:
    """``broker stats --nodes --json`` against the cluster (``seed``: a node that answers): exit code, the node
    rows, stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(BROKER_REDIS_URL=f"redis://{seed}", BROKER_REDIS_CLUSTER="true", BROKER_REDIS_KEY_PREFIX=prefix)
    env.update(BROKER_REDIS_SOCKET_TIMEOUT_MS="300", BROKER_REDIS_CONNECT_TIMEOUT_MS="300")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "stats", "--json", "--nodes", "--no-memory",
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(f"broker stats did not answer in 60 s: {err.decode()[-2000:]}") from None
    print(f"broker stats: exit {proc.returncode} in {time.monotonic() - t0:.1f} s: {err.decode()[-600:]}")
    doc = orjson.loads(out) if out.strip() else {}
    return int(proc.returncode or 0), doc.get("nodes", []), err.decode()


def pick_prefix(owner: Callable[[str], str], masters: set[str]) -> tuple[str, str, str]:
    """A key prefix whose registries (schema, topics, nodes) live on one master that does not serve slot 0, and the
    master to freeze: the third one. Slot 0's master is the one a new cluster client (an operator command) asks for
    redis-py's command table: while it is down no new client starts (docs/scaling.md, "Breakers")."""
    slot0 = owner(next(f"s{i}" for i in range(100_000) if key_slot(f"s{i}".encode()) == 0))
    for _ in range(10_000):
        prefix = f"n{uuid.uuid4().hex[:6]}"
        owners = {owner(f"{prefix}:{k}") for k in ("schema", "topics", "nodes")}
        if len(owners) == 1 and owners != {slot0}:
            (registry,) = owners
            (frozen,) = masters - {slot0, registry}
            return prefix, registry, frozen
    raise AssertionError("no prefix with its registries on one master other than slot 0's")


async def test_readyz_stats_and_metrics_name_the_master_whose_breaker_is_open(
    slow_failover_cluster: RedisCluster,
) -> None:
    cluster = slow_failover_cluster
    keyslot_owner = slot_owners(cluster)
    masters = {f"127.0.0.1:{p}" for p in cluster.masters()}
    # (a node whose heartbeat key lands on the master to freeze starts again under a new prefix: at most 10 times;
    # a node that ever heartbeated stays in its prefix's registry, and `broker stats` reads every node's status)
    for _ in range(10):
        prefix, registry, frozen = pick_prefix(keyslot_owner, masters)
        env = {
            "BROKER_REDIS_CLUSTER": "true",
            "BROKER_REDIS_KEY_PREFIX": prefix,
            "BROKER_REDIS_SOCKET_TIMEOUT_MS": "300",
            "BROKER_REDIS_CONNECT_TIMEOUT_MS": "300",
            "BROKER_BREAKERS_REDIS_FAIL_MAX": "2",
            "BROKER_BREAKERS_REDIS_CALL_TIMEOUT_MS": "500",
            "BROKER_DELIVERY_POLL_INTERVAL_MS": "100",
            "BROKER_DELIVERY_SWEEP_INTERVAL_MS": "200",
        }
        broker = BrokerProcess(cluster.url, env=env).start()
        node_id = orjson.loads(broker.get("/healthz")[1])["node"]
        if keyslot_owner(f"{prefix}:node:{node_id}") != frozen:
            break
        broker.close()
    else:
        raise AssertionError("every node started had its heartbeat on the master to freeze")
    try:
        from broker.client.client import BrokerClient

        async with BrokerClient(broker.url) as client:
            # Given a consumer of topics on every master
            owner = {t: keyslot_owner(f"{prefix}:{{{t}}}:groups") for t in TOPICS}
            assert len(set(owner.values())) == 3
            on_frozen = sorted(t for t in TOPICS if owner[t] == frozen)
            await client.subscribe(TOPICS, "g", prefetch=10)
            for t in TOPICS:
                await client.publish(t, {"t": t})
            cluster.signal(int(frozen.rsplit(":", 1)[1]), signal.SIGSTOP)
            try:
                # When the frozen master's breaker opens (its group's claims and sweep fail)
                def degraded() -> bool:
                    status, body = readyz(broker)
                    return status == 200 and any(frozen in r for r in body.get("reasons", []))

                await until(degraded, "/readyz to name the frozen master", 60)
                # Then /readyz stays 200 (the other masters' topics are served) and names it with its topics
                status, body = readyz(broker)
                assert status == 200 and body["ready"] is True, body
                (line,) = [r for r in body["reasons"] if frozen in r]
                assert line.startswith(f"degraded: redis master {frozen} breaker open: topics ")
                assert set(line.split("topics ", 1)[1].split(", ")) == set(on_frozen)
                # And /metrics has that master's breaker open, and its transition counted
                _, text = broker.get("/metrics")
                metrics_text = text.decode()
                assert f'broker_breaker_state{{breaker="redis@{frozen}"}} 2.0' in metrics_text
                assert f'broker_breaker_transitions_total{{breaker="redis@{frozen}",to="open"}} 1.0' in metrics_text
                # And `broker stats` names it per node (the snapshot itself fails: it needs every master)
                for _ in range(20):  # until the node's heartbeat carries it (bounded)
                    code, nodes, err = await stats_nodes(registry, prefix)
                    if nodes and nodes[0]["masters_down"]:
                        break
                    await asyncio.sleep(0.5)
                assert code != 0 and frozen in err, err
                (row,) = nodes
                assert row["ready"] is True and row["breakers"][f"redis@{frozen}"] == "open"
                assert row["masters_down"] == {frozen: {"state": "open", "topics": on_frozen}}
            finally:
                cluster.signal(int(frozen.rsplit(":", 1)[1]), signal.SIGCONT)
            # When the master answers again, Then the node is ready with no reason, by itself
            await until(lambda: readyz(broker) == (200, {"ready": True, "reasons": [], "node": node_id}),
                        "/readyz to clear", 60)  # fmt: skip
            for _ in range(20):  # until the node's next heartbeat carries it (bounded)
                code, nodes, err = await stats_nodes(registry, prefix)
                if code == 0 and nodes and not nodes[0]["masters_down"]:
                    break
                await asyncio.sleep(0.5)
            assert code == 0, err
            assert nodes[0]["masters_down"] == {} and nodes[0]["breakers"].get(f"redis@{frozen}") == "closed", nodes
    finally:
        broker.close()
