"""Incident (seeds/001): failures were permanent and silent; a Redis hiccup marked messages FAILED forever, and
nothing protected the system while Redis was down. Seeds/000: the processor kept running while every write failed.

Guarantee: during a Redis outage the broker degrades loudly and recovers by itself. A publish is never confirmed
unless Redis has it (publishers get `unavailable` with `retry_after_ms`), subscribers are told delivery is paused,
/readyz is red, the Redis breaker opens after the configured failures; no delivery attempt is burned and nothing
lands in the DLQ. When Redis returns the breaker half-opens, closes, and delivery resumes with no operator action.

Given a broker whose Redis path goes through a TCP proxy, a publisher and a consumer
When the proxy cuts Redis for longer than the breaker threshold while messages flow
Then the above holds, and after recovery every confirmed message is consumed exactly once with attempt 1.
"""

from __future__ import annotations

import asyncio
import collections

import orjson
import websockets

from broker.client.client import BrokerClient
from tests.brokers import BrokerProcess
from tests.proxy import TcpProxy
from tests.support import RedisServer

ENV = {
    "BROKER_BREAKERS_REDIS_RESET_TIMEOUT_S": "1.5",
    "BROKER_BREAKERS_REDIS_CALL_TIMEOUT_MS": "500",
    "BROKER_REDIS_SOCKET_TIMEOUT_MS": "500",
    "BROKER_REDIS_CONNECT_TIMEOUT_MS": "300",
    "BROKER_DELIVERY_SWEEP_INTERVAL_MS": "200",
    "BROKER_DELIVERY_POLL_INTERVAL_MS": "100",
}


async def test_redis_outage_degrades_loudly_and_recovers(redis: RedisServer) -> None:
    with TcpProxy(redis.port) as proxy, BrokerProcess(proxy.url, env=ENV) as broker:
        confirmed: set[str] = set()
        received: collections.Counter[str] = collections.Counter()
        attempts: list[int] = []
        async with BrokerClient(broker.url) as consumer_client:
            sub = await consumer_client.subscribe("payments", "ledger", prefetch=50)

            async def consume() -> None:
                async for m in sub:
                    received[m.id] += 1
                    attempts.append(m.attempt)
                    await m.ack()

            consumer = asyncio.create_task(consume())
            async with websockets.connect(broker.url) as raw:
                # Given: traffic flows
                for i in range(100):
                    await raw.send(
                        orjson.dumps({"op": "publish", "ref": i, "topic": "payments", "payload": i}).decode()
                    )
                replies = [orjson.loads(await asyncio.wait_for(raw.recv(), 5)) for _ in range(100)]
                confirmed |= {r["id"] for r in replies if r["op"] == "published"}
                assert len(confirmed) == 100

                # When: Redis goes away
                proxy.cut()
                errors = []
                for i in range(100, 110):
                    await raw.send(
                        orjson.dumps({"op": "publish", "ref": i, "topic": "payments", "payload": i}).decode()
                    )
                    r = orjson.loads(await asyncio.wait_for(raw.recv(), 10))
                    if r["op"] == "published":
                        confirmed.add(r["id"])
                    else:
                        errors.append(r)
                # Then: publishers are told, with a retry hint; nothing is falsely confirmed
                assert len(errors) >= 8, errors
                assert all(e["code"] == "unavailable" and e["retry_after_ms"] > 0 for e in errors)
                status, body = broker.get("/readyz")
                assert status == 503 and "redis breaker" in orjson.loads(body)["reasons"][0]
                assert '"breaker_state_changed"' in broker.log_text() and '"new":"open"' in broker.log_text()

                # And: a publisher using the client retries idempotently through the outage
                async with BrokerClient(broker.url) as pub:
                    pending = asyncio.create_task(pub.publish("payments", "during-outage"))
                    await asyncio.sleep(2.0)
                    assert not pending.done()
                    # When: Redis comes back
                    proxy.restore()
                    res = await asyncio.wait_for(pending, 30)
                    confirmed.add(res.id)

            # Then: the breaker closes by itself and readiness returns
            async with asyncio.timeout(30):
                while broker.get("/readyz")[0] != 200:
                    await asyncio.sleep(0.2)
            assert '"new":"closed"' in broker.log_text()
            # And: every confirmed message arrives once, first attempt, and the DLQ is empty
            async with asyncio.timeout(30):
                while not confirmed <= set(received):
                    await asyncio.sleep(0.1)
            consumer.cancel()
        assert set(received.values()) == {1}
        assert set(attempts) == {1}
        assert redis.cli("ZCARD", "mq:{payments}:g:ledger:dead") == "0"
        assert '"delivery_paused"' in broker.log_text() and '"delivery_resumed"' in broker.log_text()
