"""Incidents (seeds/000, 001, 003): each fix was proven on the one failure it was written for; together, under load,
nobody checked. Messages were lost in the combinations: a crash during a retry, a restart during an outage.

Guarantee: under a mix of failures (broker processes killed with SIGKILL and restarted, Redis unreachable for a
while), with traffic flowing, a confirmed publish is never lost. Duplicates are allowed (at-least-once) and counted.

Given 2 broker processes on one Redis (reached through a TCP proxy), a reconnecting publisher on broker 1 that
      publishes 20,000 messages with idempotent retries, and one consumer on each broker in the same group
When a scheduler with a fixed random seed kills -9 and restarts the brokers 4 times (same ports) and cuts Redis
     twice for 2 s, while the messages flow
Then every confirmed message is received at least once, all 20,000 are confirmed exactly once (no publish retry
     stored a copy), nothing is dead-lettered, and the duplicate count is printed.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time

import pytest

from broker.client import BrokerClient, Subscription
from broker.core.errors import StaleReceiptError
from tests.brokers import BrokerProcess
from tests.proxy import TcpProxy
from tests.support import RedisServer

N = 20_000
RATE = 1_000  # publishes per second: the run lasts about 20 s, so the faults land mid-stream
SEED = 20_251_123
TOPIC, GROUP = "chaos", "workers"
ENV = {
    "BROKER_DELIVERY_LEASE_MS": "3000",
    "BROKER_DELIVERY_SWEEP_INTERVAL_MS": "100",
    "BROKER_DELIVERY_POLL_INTERVAL_MS": "50",
    "BROKER_DELIVERY_NODE_TIMEOUT_MS": "2000",
    "BROKER_BREAKERS_REDIS_RESET_TIMEOUT_S": "1",
    "BROKER_BREAKERS_REDIS_CALL_TIMEOUT_MS": "500",
    "BROKER_REDIS_SOCKET_TIMEOUT_MS": "500",
    "BROKER_REDIS_CONNECT_TIMEOUT_MS": "300",
    "BROKER_RETRY_BACKOFF_BASE_MS": "100",
    "BROKER_RETRY_MAX_ATTEMPTS": "10",
    "BROKER_SERVER_SHUTDOWN_GRACE_MS": "1000",
}


@pytest.mark.timeout(180)
async def test_chaos_loses_no_confirmed_message(redis: RedisServer) -> None:
    rng = random.Random(SEED)
    t_start = time.monotonic()
    with TcpProxy(redis.port) as proxy:
        brokers = [BrokerProcess(proxy.url, env=ENV), BrokerProcess(proxy.url, env=ENV)]
        try:
            for b in brokers:
                b.start()
            async with asyncio.timeout(120):
                stats = await _run(rng, proxy, brokers)
        finally:
            for b in brokers:
                print(f"--- broker {b.port} log: restarts={b.log_text().count('broker_started') - 1} ---")
                b.close()
    confirmed, received, stale, events = stats
    dead = int(redis.cli("ZCARD", f"mq:{{{TOPIC}}}:g:{GROUP}:dead"))
    missing = confirmed - set(received)
    duplicates = sum(n - 1 for n in received.values())
    print(f"chaos events: {events}")
    print(
        f"confirmed={len(confirmed)} received={len(received)} duplicates={duplicates} stale_acks={stale} "
        f"dead_lettered={dead} seconds={time.monotonic() - t_start:.1f}"
    )
    assert not missing, f"{len(missing)} confirmed messages lost"
    assert len(confirmed) == N
    assert len(received) == N  # no idempotent retry stored a second copy
    assert dead == 0


async def _run(
    rng: random.Random, proxy: TcpProxy, brokers: list[BrokerProcess]
) -> tuple[set[str], collections.Counter[str], int, list[str]]:
    confirmed: set[str] = set()
    received: collections.Counter[str] = collections.Counter()
    stale = 0
    events: list[str] = []
    t0 = time.monotonic()

    async def consume(sub: Subscription) -> None:
        nonlocal stale
        while True:
            m = await sub.get()
            received[m.id] += 1
            try:
                await m.ack()
            except StaleReceiptError:  # delivered on a connection that died: the broker puts it back
                stale += 1

    async def chaos() -> None:
        actions = ["kill0", "kill1", "kill0", "kill1", "cut", "cut"]
        rng.shuffle(actions)
        for action in actions:
            await asyncio.sleep(rng.uniform(1.0, 2.5))
            at = f"{time.monotonic() - t0:.1f}s"
            if action == "cut":
                events.append(f"{at} redis cut")
                proxy.cut()
                await asyncio.sleep(2.0)
                proxy.restore()
            else:
                b = brokers[int(action[-1])]
                down = rng.uniform(0.2, 1.0)
                events.append(f"{at} kill -9 broker{action[-1]} for {down:.1f}s")
                b.kill()
                await asyncio.sleep(down)
                await asyncio.to_thread(b.start)  # same port: clients reconnect

    clients = [BrokerClient(b.url, reconnect_deadline_s=100) for b in brokers]
    publisher = BrokerClient(brokers[0].url, reconnect_deadline_s=100)
    for c in [*clients, publisher]:
        await c.connect()
    tasks: list[asyncio.Task[None]] = []
    try:
        for c in clients:
            tasks.append(asyncio.create_task(consume(await c.subscribe(TOPIC, GROUP, prefetch=100))))
        window = asyncio.Semaphore(200)

        async def publish(i: int) -> None:
            await asyncio.sleep(max(0.0, t0 + i / RATE - time.monotonic()))
            async with window:
                confirmed.add((await publisher.publish(TOPIC, {"seq": i})).id)

        chaos_task = asyncio.create_task(chaos())
        await asyncio.gather(*(publish(i) for i in range(N)))
        await chaos_task
        print(f"published and chaos done at {time.monotonic() - t0:.1f}s")
        while not confirmed <= set(received):
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # let late duplicates show up, so they are counted
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in [*clients, publisher]:
            await c.close()
    return confirmed, received, stale, events
