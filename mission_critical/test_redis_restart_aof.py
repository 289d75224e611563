"""Incident (seeds/000, seeds/004): a queue that "survives restarts" only as well as its persistence: state that was
never written, or written without being checked, vanished on restart and nobody was told.

Guarantee: with Redis persistence on (AOF, fsync always), a Redis crash and restart loses no confirmed message:
the broker only confirms what Redis accepted, rides out the restart behind its breaker, and carries on.

Given a broker on a redis-server with AOF, a publisher and a consumer (both with the reconnecting client)
When Redis is killed with SIGKILL mid-stream and restarted on its AOF
Then every confirmed message is consumed; nothing confirmed is missing.
"""

from __future__ import annotations

import asyncio
import collections

from broker.client.client import BrokerClient
from tests.brokers import BrokerProcess
from tests.support import RedisServer

N = 3_000
ENV = {
    "BROKER_BREAKERS_REDIS_RESET_TIMEOUT_S": "1",
    "BROKER_DELIVERY_LEASE_MS": "3000",
    "BROKER_DELIVERY_SWEEP_INTERVAL_MS": "200",
    "BROKER_DELIVERY_POLL_INTERVAL_MS": "100",
}


async def test_nothing_confirmed_is_lost_across_redis_kill_and_aof_restart(redis: RedisServer) -> None:
    with BrokerProcess(redis.url, env=ENV) as broker:
        confirmed: set[str] = set()
        received: collections.Counter[str] = collections.Counter()
        async with BrokerClient(broker.url) as cc, BrokerClient(broker.url) as pub:
            sub = await cc.subscribe("audit", "store", prefetch=50)

            async def consume() -> None:
                async for m in sub:
                    received[m.id] += 1
                    await m.ack()

            consumer = asyncio.create_task(consume())
            window = asyncio.Semaphore(200)

            async def publish(i: int) -> None:
                async with window:
                    confirmed.add((await pub.publish("audit", {"seq": i})).id)

            tasks = [asyncio.create_task(publish(i)) for i in range(N)]
            async with asyncio.timeout(60):
                while len(confirmed) < N // 3:
                    await asyncio.sleep(0.01)
            # When: Redis dies hard and comes back on its AOF
            redis.kill()
            await asyncio.sleep(1.0)
            redis.start()
            async with asyncio.timeout(120):
                await asyncio.gather(*tasks)
                while not confirmed <= set(received):
                    await asyncio.sleep(0.1)
            consumer.cancel()
        # Then
        assert len(confirmed) == N
        assert not confirmed - set(received)
        print(
            f"confirmed={len(confirmed)} received={len(received)} duplicates={sum(received.values()) - len(received)}"
        )
