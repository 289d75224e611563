"""A node that joins a node that ran alone gets the wake-ups of its publishes, and a node left alone still delivers.

Incident this prevents: a node alone sends no wake-up note for its publishes (publish.lua counts the other nodes'
listeners, `<prefix>:listeners` minus `<prefix>:listener:<own id>`). If that count missed a node that had joined
(counted only after its pattern subscription, or its own listener mistaken for another's), messages published on the
first node would wait on the second for its poll interval: with a long poll, minutes. If the count kept a node that
left, nothing breaks but notes; if a node alone needed its own note, its consumers would stall.

Given broker 1 alone on a real redis-server (poll interval 60 s: only a wake-up or a claim of its own is quick),
      with 3 messages published while nobody consumes
When broker 2 starts, a consumer of the group subscribes on it, and 5 more messages are published on broker 1 one
     by one, each waited for
Then broker 2's consumer gets the 3 waiting ones and each new one well before any poll (within 20 s each); and
     after broker 2 stops, a consumer on broker 1, alone again, gets 5 more the same way.
"""

from __future__ import annotations

import asyncio

from broker.client.client import BrokerClient
from tests.brokers import BrokerProcess
from tests.support import RedisServer

SLOW = {"BROKER_DELIVERY_POLL_INTERVAL_MS": "60000"}
TOPIC, GROUP = "joined", "default"  # the group the first publish creates
BOUND_S = 20  # far below the 60 s poll: only a wake-up (or a node's own riding claim) delivers within it


async def test_a_joining_node_gets_wake_ups_and_a_node_alone_still_delivers(redis: RedisServer) -> None:
    with BrokerProcess(redis.url, env=SLOW) as b1:
        async with BrokerClient(b1.url) as pub:
            for i in range(3):
                await pub.publish(TOPIC, {"early": i})
            with BrokerProcess(redis.url, env=SLOW) as b2:
                async with BrokerClient(b2.url) as con:
                    sub = await con.subscribe(TOPIC, GROUP, prefetch=10)
                    got = []
                    for _ in range(3):
                        m = await sub.get(timeout=BOUND_S)
                        got.append(m.payload)
                        await m.ack(wait=True)
                    assert sorted(p["early"] for p in got) == [0, 1, 2]
                    await asyncio.sleep(1.5)  # broker 2's wake-up listener is subscribed (it beats every second)
                    for i in range(5):
                        await pub.publish(TOPIC, {"joined": i})
                        m = await sub.get(timeout=BOUND_S)
                        assert m.payload == {"joined": i}
                        await m.ack(wait=True)
            # broker 2 is gone: broker 1 is alone again
            async with BrokerClient(b1.url) as con1:
                sub1 = await con1.subscribe(TOPIC, GROUP, prefetch=10)
                for i in range(5):
                    await pub.publish(TOPIC, {"alone": i})
                    m = await sub1.get(timeout=BOUND_S)
                    assert m.payload == {"alone": i}
                    await m.ack(wait=True)
