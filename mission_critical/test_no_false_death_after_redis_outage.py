"""After a Redis outage longer than the node timeout, no node takes a live node for dead.

During the outage no node can heartbeat, so when Redis answers again every node's last heartbeat is older than
``delivery.node_timeout_ms``. The orphan sweep of the first node back would take every node whose heartbeat had not
landed yet for dead and expire the leases of its live consumers: redeliveries of messages being worked on, attempts
spent, acks answered stale (seeds/002: the duplicate processing a recovery caused). A node whose own heartbeats
failed judges no other node until one node timeout after its own heartbeats succeed again.

Given two broker nodes on one redis-server (node timeout 6 s), a consumer on node B holding 5 leased messages (60 s
leases) and an idle consumer of the same group on node A
When Redis is stopped (SIGSTOP) for 8 s, and node B is stopped too and resumes 3 s after Redis (B alive throughout,
its heartbeat just late)
Then node A takes no node for dead, the idle consumer receives nothing, and B's consumer acks all 5 (none stale).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

from broker.client import BrokerClient
from broker.client.client import Message
from tests.brokers import BrokerProcess
from tests.support import RedisServer

TOPIC, GROUP = "invoices", "booking"
NODE_TIMEOUT_S = 6
ENV = {
    "BROKER_DELIVERY_NODE_TIMEOUT_MS": str(NODE_TIMEOUT_S * 1000),
    "BROKER_DELIVERY_SWEEP_INTERVAL_MS": "200",
    "BROKER_DELIVERY_LEASE_MS": "60000",
}
# B resumes this long after Redis: A's sweep runs within about a second of Redis answering and then finds B's last
# heartbeat older than the node timeout; B's next heartbeat lands within about a second of B resuming.
B_LATER_S = 3.0


def stop(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)


def cont(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


async def test_no_node_is_taken_for_dead_when_redis_comes_back(redis: RedisServer) -> None:
    with BrokerProcess(redis.url, env=ENV) as a, BrokerProcess(redis.url, env=ENV) as b:
        assert redis.proc is not None and b.proc is not None
        async with BrokerClient(a.url) as on_a, BrokerClient(b.url) as on_b:
            # Given 5 messages leased to the consumer on B, and then an idle consumer of the group on A
            busy = await on_b.subscribe(TOPIC, GROUP, prefetch=10)
            for i in range(5):
                await on_a.publish(TOPIC, {"n": i})
            held: list[Message] = []
            async with asyncio.timeout(20):
                async for m in busy:
                    held.append(m)
                    if len(held) == 5:
                        break
            idle = await on_a.subscribe(TOPIC, GROUP, prefetch=10)
            stray: list[Message] = []

            async def collect() -> None:
                async for m in idle:
                    stray.append(m)

            collecting = asyncio.create_task(collect())
            # When Redis stops for longer than the node timeout, node B with it, and B resumes just after Redis
            stop(redis.proc.pid)
            stop(b.proc.pid)
            try:
                await asyncio.sleep(NODE_TIMEOUT_S + 2)
            finally:
                cont(redis.proc.pid)
                await asyncio.sleep(B_LATER_S)
                cont(b.proc.pid)
            resumed = time.monotonic()
            # Then (after well over a node timeout, both nodes heartbeating again) A took no node for dead
            await asyncio.sleep(NODE_TIMEOUT_S + 3)
            log_a = a.log_text()
            assert "nodes_taken_for_dead" not in log_a, log_a[-3000:]
            assert "dead_node_judgement_deferred" in log_a  # what held it back (the test would pass vacuously else)
            # And nothing was redelivered to the idle consumer, and B's consumer acks every message (none stale)
            assert not stray, [m.id for m in stray]
            async with asyncio.timeout(30):
                for m in held:
                    await m.ack(wait=True)
            collecting.cancel()
            print(f"acked all 5 {time.monotonic() - resumed:.1f} s after Redis resumed; nothing redelivered")
