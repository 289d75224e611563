"""Incident (seeds/002): a broadcast to 8 agents reached 6 of them. Writers raced on one queue file while the
processor held it; two deliveries were lost and nothing said so.

Guarantee: every group gets every message published after the group exists. A subscriber that is still
connecting when the broadcast is published gets it when its subscription arrives, because its group's queue holds
it durably in Redis; no subscriber-side race can drop it.

Given 8 groups (durable subscriptions) on one topic
When, 100 times over, 8 subscribers (one per group) connect and subscribe concurrently while a broadcast is
     published in the middle of their handshakes
Then every subscriber receives every broadcast: 8/8 each round, 800/800 in all, no duplicates.
"""

from __future__ import annotations

import asyncio
import random

from broker.client.client import BrokerClient
from tests.brokers import BrokerProcess
from tests.support import RedisServer

GROUPS = [f"agent{i}" for i in range(8)]
ROUNDS = 100


async def test_broadcast_reaches_8_of_8_every_time(redis: RedisServer) -> None:
    rng = random.Random(2)
    with BrokerProcess(redis.url) as broker:
        # Given: 8 durable groups exist
        async with BrokerClient(broker.url) as setup:
            for g in GROUPS:
                await setup.subscribe("broadcast", g)

        received: dict[str, list[int]] = {g: [] for g in GROUPS}

        async def subscriber(group: str, round_no: int) -> None:
            await asyncio.sleep(rng.uniform(0, 0.01))  # stagger the handshakes around the publish
            async with BrokerClient(broker.url, reconnect=False) as c:
                sub = await c.subscribe("broadcast", group, prefetch=1)
                m = await sub.get(timeout=10)
                assert m.payload == {"round": round_no}, (group, m.payload)
                received[group].append(m.payload["round"])
                await m.ack(wait=True)

        async with BrokerClient(broker.url) as publisher:
            for r in range(ROUNDS):
                subs = [asyncio.create_task(subscriber(g, r)) for g in GROUPS]
                await asyncio.sleep(rng.uniform(0, 0.005))
                # When: the broadcast goes out while the subscribers are connecting
                await publisher.publish("broadcast", {"round": r})
                await asyncio.gather(*subs)
                # Then: 8 of 8 got it this round
                assert sum(received[g][-1:] == [r] for g in GROUPS) == 8, f"round {r}: {received}"

    assert all(received[g] == list(range(ROUNDS)) for g in GROUPS)
    assert redis.cli("KEYS", "mq:{broadcast}:msg:*") == ""  # every body freed once all 8 groups acked
