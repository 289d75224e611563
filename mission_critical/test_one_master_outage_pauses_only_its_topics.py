"""Incident (issue 16): on a Redis Cluster the node had one Redis breaker, so one failing master opened it and
paused every topic of the node, also those whose masters were healthy.

Guarantee: a master that stops answering pauses only its own topics. Each master has its own breaker; publishes to
its topics get ``unavailable`` (the publisher retries with its idempotency key), the other masters' topics are
confirmed and delivered as before; nothing confirmed is lost, and the master's topics resume by themselves once it
answers again.

Given two broker nodes on a 3-master cluster whose replicas would not take over for a minute, one consumer per node
in one group on 12 topics spread over every master, and two publishers under way
When one master is frozen (SIGSTOP) in the middle of the traffic
Then every message confirmed for the other masters' topics while it is frozen is delivered while it is still frozen
(their consumers never pause: no ``delivery_paused`` names one of their topics), both nodes stay ready (``/readyz``
200 naming the master), and after SIGCONT every publish is confirmed and every confirmed message delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from broker.client.client import BrokerClient, Message
from broker.core.errors import BrokerError
from tests.brokers import BrokerProcess
from tests.cluster import RedisCluster
from tests.support import until

TOPICS = [f"m{i:02d}" for i in range(12)]
N = 1_200  # messages, round robin over the topics
ENV = {
    "BROKER_REDIS_CLUSTER": "true",
    "BROKER_REDIS_SOCKET_TIMEOUT_MS": "500",
    "BROKER_REDIS_CONNECT_TIMEOUT_MS": "300",
    "BROKER_BREAKERS_REDIS_FAIL_MAX": "3",
    "BROKER_BREAKERS_REDIS_CALL_TIMEOUT_MS": "800",
    "BROKER_DELIVERY_POLL_INTERVAL_MS": "100",
    "BROKER_DELIVERY_SWEEP_INTERVAL_MS": "200",
    "BROKER_DELIVERY_LEASE_MS": "30000",
}


@pytest.fixture
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster(node_timeout_ms=60_000) as c:
        yield c


def owner(cluster: RedisCluster, key: str) -> int:
    return cluster.port_of_slot_owner(key)


def prefix_with_registries_on_one_master(cluster: RedisCluster) -> tuple[str, int]:
    """The node and topic registries live on one master each; keep them together, away from the master frozen
    (a node whose registry master is away cannot heartbeat: docs/scaling.md, "Breakers")."""
    for _ in range(200):
        prefix = f"o{uuid.uuid4().hex[:6]}"
        owners = {owner(cluster, f"{prefix}:{k}") for k in ("schema", "topics", "nodes")}
        if len(owners) == 1:
            return prefix, owners.pop()
    raise AssertionError("no key prefix puts the registries on one master")


def events(broker: BrokerProcess, name: str) -> list[dict[str, Any]]:
    out = []
    for line in broker.log_text().splitlines():
        if line.startswith("{") and f'"{name}"' in line:
            e = orjson.loads(line)
            if e.get("event") == name:
                out.append(e)
    return out


async def test_a_frozen_master_pauses_only_its_topics(cluster: RedisCluster) -> None:
    prefix, registry = prefix_with_registries_on_one_master(cluster)
    env = {**ENV, "BROKER_REDIS_KEY_PREFIX": prefix}
    brokers: list[BrokerProcess] = []
    try:
        # Given two broker nodes whose heartbeats are not on the master to freeze (a node is started again until so)
        topic_owner = {t: owner(cluster, f"{prefix}:{{{t}}}:groups") for t in TOPICS}
        assert len(set(topic_owner.values())) == 3
        frozen = 0
        for _ in range(10):
            for b in brokers:
                b.close()
            brokers = [BrokerProcess(cluster.url, env=env).start() for _ in range(2)]
            heartbeats = set()
            for b in brokers:
                node_id = orjson.loads(b.get("/healthz")[1])["node"]
                heartbeats.add(owner(cluster, f"{prefix}:node:{node_id}"))
            free = sorted(set(topic_owner.values()) - heartbeats - {registry})
            if free:
                frozen = free[0]
                break
        assert frozen, "no master free of registries and heartbeats in 10 tries"
        on_frozen = {t for t in TOPICS if topic_owner[t] == frozen}
        healthy = set(TOPICS) - on_frozen
        got: dict[str, float] = {}  # message id -> when it arrived (monotonic)
        topic_of: dict[str, str] = {}
        confirmed: dict[str, float] = {}  # message id -> when its publish was confirmed
        thawed_at: float | None = None
        during: set[str] = set()

        async def consume(sub: Any) -> None:
            async for m in sub:
                assert isinstance(m, Message)
                got.setdefault(m.id, time.monotonic())
                with contextlib.suppress(BrokerError):
                    await m.ack()

        async with contextlib.AsyncExitStack() as stack:
            # And one consumer per node in one group on every topic, and a publisher per node
            consumers = [
                await stack.enter_async_context(BrokerClient(b.url, reconnect_deadline_s=120)) for b in brokers
            ]
            tasks = [asyncio.create_task(consume(await c.subscribe(TOPICS, "g", prefetch=50))) for c in consumers]
            pubs = [await stack.enter_async_context(BrokerClient(b.url, reconnect_deadline_s=120)) for b in brokers]
            window = asyncio.Semaphore(40)

            async def publish(i: int) -> None:
                topic = TOPICS[i % len(TOPICS)]
                async with window:
                    await asyncio.sleep(0.005)  # a steady pace (about 200/s), not one burst
                    res = await pubs[i % 2].publish(topic, {"seq": i}, idempotency_key=f"seq-{i}")
                confirmed.setdefault(res.id, time.monotonic())
                topic_of[res.id] = topic

            publishing = [asyncio.create_task(publish(i)) for i in range(N)]
            try:
                await until(lambda: len(confirmed) >= N // 4, "a quarter confirmed", 120)
                # When one master freezes mid-traffic
                cluster.signal(frozen, signal.SIGSTOP)
                frozen_at = time.monotonic()
                try:
                    # Then both nodes name it on /readyz, and stay ready
                    def both_degraded() -> bool:
                        for b in brokers:
                            status, body = b.get("/readyz")
                            if status != 200 or f"127.0.0.1:{frozen}" not in body.decode():
                                return False
                        return True

                    await until(both_degraded, "both nodes to name the frozen master on /readyz", 60)
                    # And the other masters' topics keep flowing: wait for 200 more of their confirms
                    mark = sum(1 for i in confirmed if topic_of.get(i) in healthy)
                    await until(
                        lambda: sum(1 for i in confirmed if topic_of.get(i) in healthy) >= mark + 200,
                        "200 more confirms on the healthy masters' topics",
                        120,
                    )
                    during = {i for i, at in confirmed.items() if at > frozen_at and topic_of[i] in healthy}
                    await until(lambda: during <= set(got), "those confirmed while frozen to be delivered", 60)
                    # (while it is still frozen: nothing on a healthy master waited for it)
                finally:
                    cluster.signal(frozen, signal.SIGCONT)
                    thawed_at = time.monotonic()
                # When it answers again, Then every publish is confirmed in the end (retried with its key)
                async with asyncio.timeout(180):
                    await asyncio.gather(*publishing)
                # And every confirmed message is delivered (nothing lost), on every topic
                await until(lambda: set(confirmed) <= set(got), "every confirmed message delivered", 120)
            finally:
                for t in publishing:
                    t.cancel()
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*publishing, *tasks, return_exceptions=True)
        # And no consumer of a healthy master's topic was ever paused; the frozen master's were, naming it
        paused = [e for b in brokers for e in events(b, "delivery_paused")]
        assert {e["topic"] for e in paused} <= on_frozen, paused
        assert all(f"127.0.0.1:{frozen}" in e["reason"] for e in paused), paused
        late = sum(1 for i in confirmed if topic_of[i] in on_frozen and confirmed[i] > (thawed_at or 0))
        print(
            f"frozen={frozen} topics_on_frozen={len(on_frozen)} confirmed={len(confirmed)} delivered={len(got)} "
            f"healthy_confirmed_while_frozen={len(during)} frozen_topics_confirmed_after_thaw={late} "
            f"paused_events={len(paused)}"
        )
        assert len(confirmed) == N
    finally:
        for b in brokers:
            print(f"--- broker {b.port} ---\n{b.log_tail(10)}")
            b.close()
