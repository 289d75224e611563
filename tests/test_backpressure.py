"""Publisher backpressure (`server.max_unconfirmed_publishes`): a connection may have at most that many publishes
waiting for Redis; beyond it the broker stops reading that connection (TCP pushes back on the publisher) instead of
buffering without bound. Proven by order, not by time: a ping sent after the publishes is read, and answered, only
once enough of them were confirmed to make room.

Given a broker allowing 5 unconfirmed publishes per connection, whose Redis answers every reply 0.3 s late
When one connection sends 20 publishes and then a ping
Then the pong comes after at least 15 `published` answers (the 20th publish was read only when at most 4 were
     waiting), and all 20 are confirmed.
"""

from __future__ import annotations

import asyncio

import orjson
import websockets

from tests.brokers import BrokerProcess
from tests.proxy import TcpProxy
from tests.support import RedisServer


async def test_a_connection_over_its_unconfirmed_limit_is_not_read(redis: RedisServer) -> None:
    with TcpProxy(redis.port) as proxy, BrokerProcess(
        proxy.url, env={"BROKER_SERVER_MAX_UNCONFIRMED_PUBLISHES": "5"}
    ) as broker:
        proxy.delay(0.3)
        async with websockets.connect(broker.url) as ws:
            for i in range(20):
                await ws.send(orjson.dumps({"op": "publish", "ref": i, "topic": "bp", "payload": i}).decode())
            await ws.send(orjson.dumps({"op": "ping", "ref": "p"}).decode())
            replies = []
            async with asyncio.timeout(60):
                while len(replies) < 21:
                    replies.append(orjson.loads(await ws.recv()))
        ops = [r["op"] for r in replies]
        assert ops.count("published") == 20, replies
        assert ops.index("pong") >= 15, ops
