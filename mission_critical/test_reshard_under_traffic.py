"""Resharding under traffic: the slot of a busy topic moves to another master and back while it is published to
and consumed (real 3-master Redis Cluster, real broker processes).

The move is the exact per-slot sequence of ``redis-cli --cluster reshard`` (``tests.cluster.move_slot``:
``SETSLOT IMPORTING`` / ``MIGRATING``, ``MIGRATE`` 10 keys at a time, ``SETSLOT NODE``), with a short pause between
batches so that publishes, claims and acks meet the half-moved slot.

Guarantees checked: every publish is confirmed in the end (the client retries with its idempotency key), no retry
stored a message twice, every confirmed message reaches both groups, nothing is stuck afterwards (no ready, leased,
delayed, dead or held entry, no delivery record, no body: every ack landed), no key of the slot is left on the
master it left, and the Redis breakers never opened (a migrating slot is not an outage).

Counts are printed (``-s``); docs/scaling.md quotes a run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
from collections.abc import Iterator

import pytest
import redis

from broker.client.client import BrokerClient
from tests.brokers import BrokerProcess
from tests.cluster import RedisCluster, move_slot
from tests.cluster_traffic import BROKER_ENV, Consumers
from tests.support import until

HOT = "hot"
TOPICS = [HOT, "cool0", "cool1", "cool2"]
GROUPS = ("audit", "billing")
N = 3_000  # publishes, 3 of 4 to the busy topic
ENV = BROKER_ENV


@pytest.fixture
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster(node_timeout_ms=1_000) as c:
        yield c


def leftovers(cluster: RedisCluster) -> dict[str, int]:
    """What is still in flight or stored for the topics (all zero once every message is acked by both groups)."""
    rc = redis.RedisCluster.from_url(cluster.url, decode_responses=True)
    try:
        out: dict[str, int] = collections.Counter()
        for t in TOPICS:
            for g in GROUPS:
                gb = f"mq:{{{t}}}:g:{g}:"
                out["ready"] += rc.llen(gb + "ready")
                out["leased"] += rc.zcard(gb + "leased")
                out["delayed"] += rc.zcard(gb + "delayed")
                out["dead"] += rc.zcard(gb + "dead")
                out["held"] += rc.hlen(gb + "held")
                out["deliveries"] += sum(1 for _ in rc.scan_iter(match=gb + "dlv:*", count=1000))
            out["bodies"] += sum(1 for _ in rc.scan_iter(match=f"mq:{{{t}}}:msg:*", count=1000))
        return dict(out)
    finally:
        rc.close()


def metric(broker: BrokerProcess, pattern: str) -> float:
    """The sum of the samples of ``/metrics`` whose line matches ``pattern`` (0 when none)."""
    status, body = broker.get("/metrics")
    assert status == 200
    total = 0.0
    for line in body.decode().splitlines():
        if not line.startswith("#") and re.search(pattern, line):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("replicas_to_ack", [0, 1])
async def test_moving_a_busy_topics_slot_there_and_back_loses_and_strands_nothing(
    cluster: RedisCluster, replicas_to_ack: int
) -> None:
    # Given a busy topic (and a few quiet ones) published to through two broker nodes and consumed in two groups
    slot = int(cluster.cli(cluster.ports[0], "CLUSTER", "KEYSLOT", f"mq:{{{HOT}}}:groups"))
    home = cluster.port_of_slot_owner(f"mq:{{{HOT}}}:groups")
    away = next(p for p in cluster.masters() if p != home)
    env = {**ENV, "BROKER_REDIS_REPLICAS_TO_ACK": str(replicas_to_ack)}
    brokers = [BrokerProcess(cluster.url, env=env).start() for _ in range(2)]
    confirmed: dict[str, int] = {}  # id -> seq
    moved: list[int] = []
    try:
        async with Consumers(urls := [b.url for b in brokers], TOPICS, GROUPS, per_group=len(urls)) as consumers:
            async with contextlib.AsyncExitStack() as stack:
                pubs = [await stack.enter_async_context(BrokerClient(b.url, reconnect_deadline_s=120)) for b in brokers]
                window = asyncio.Semaphore(100)

                async def publish(i: int) -> None:
                    async with window:
                        topic = HOT if i % 4 else TOPICS[1 + (i // 4) % 3]
                        res = await pubs[i % 2].publish(topic, {"seq": i}, idempotency_key=f"seq-{i}")
                        confirmed[res.id] = i

                tasks = [asyncio.create_task(publish(i)) for i in range(N)]
                # When the busy topic's slot moves to another master a quarter of the way in, and back at two thirds
                await until(lambda: len(confirmed) >= N // 4, "a quarter confirmed", 120)
                moved.append(await asyncio.to_thread(move_slot, cluster, slot, home, away))
                await until(lambda: len(confirmed) >= 2 * N // 3, "two thirds confirmed", 120)
                moved.append(await asyncio.to_thread(move_slot, cluster, slot, away, home))
                async with asyncio.timeout(180):
                    await asyncio.gather(*tasks)
            # Then every publish was confirmed, and every confirmed message reaches both groups
            ids = set(confirmed)
            await until(lambda: consumers.have_all(ids), "every confirmed message in both groups", 120)
            # And nothing is left in flight: every ack landed (a failed one is retried through a redelivery)
            left: dict[str, int] = {}

            def drained() -> bool:
                left.update(leftovers(cluster))
                return not any(left.values())

            with contextlib.suppress(AssertionError):
                await until(drained, "nothing in flight", 60)
            got = {g: collections.Counter(c) for g, c in consumers.got.items()}
            copies = {seq: s for seq, s in consumers.ids_of_seq.items() if len(s) > 1}
            ack_errors = consumers.ack_errors
        breaker_opened = [metric(b, r'breaker_transitions_total\{.*breaker="redis".*to="open"') for b in brokers]
        # (a background sweep that met the moving slot reports its round as failed; the next round succeeds)
        with contextlib.suppress(AssertionError):
            await until(lambda: all(b.get("/readyz")[0] == 200 for b in brokers), "/readyz 200", 30)
        readyz = [b.get("/readyz")[0] for b in brokers]
        # (error replies of the scripts; the sweep's read of the group sets, a plain SMEMBERS, may meet the moving
        # slot: redis-py's "TTL exhausted", and that round of the sweep reports it)
        script_errors = [metric(b, r'store_errors_total\{op="(?!all_pairs").*redis_error_reply') for b in brokers]
        resent = [metric(b, r"slot_moving_total\{") for b in brokers]
    finally:
        for b in brokers:
            print(f"--- broker {b.port} ---\n{b.log_tail(int(os.environ.get('RESHARD_LOG_LINES', '15')))}")
            b.close()
    stray = {p: int(cluster.cli(p, "CLUSTER", "COUNTKEYSINSLOT", str(slot))) for p in cluster.masters() if p != home}
    print(
        f"replicas_to_ack={replicas_to_ack} slot={slot} {home}->{away}->{home} keys_moved={moved} "
        f"published={N} confirmed={len(confirmed)} "
        f"delivered={{{', '.join(f'{g}: {sum(c.values())}' for g, c in got.items())}}} ack_errors={ack_errors} "
        f"left={left} breaker_opened={breaker_opened} script_error_replies={script_errors} "
        f"calls_resent_while_moving={resent} stray_keys={stray}"
    )
    assert len(confirmed) == N  # every publish confirmed in the end
    assert not copies, f"retries stored a message twice: {list(copies.items())[:3]}"
    for group, counts in got.items():
        assert set(counts) >= set(confirmed), group
    assert not any(left.values()), f"stuck after the moves: {left}"
    assert not any(stray.values()), f"keys of slot {slot} left behind: {stray}"
    assert breaker_opened == [0, 0], "a migrating slot opened the Redis breaker"
    assert readyz == [200, 200]
    assert script_errors == [0, 0], "a script failed (e.g. a run-time key of a moving slot: 'non local key')"
    assert sum(resent) > 0, "the moves met no traffic: nothing was tested"
