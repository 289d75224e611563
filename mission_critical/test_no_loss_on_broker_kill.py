"""Incident (seeds/003): a service crashed between buffering a message and starting the timer that would process
it; the message sat orphaned until someone noticed. Seeds/000: a processor kept running while its state was lost.

Guarantee: a confirmed publish is never lost, whatever happens to the broker process. Deliveries held by a broker
that dies come back (lease expiry, or at once through the orphan sweep of a restarted node).

Given a broker on a real redis-server (AOF, fsync always), one publisher and one consumer
When 10,000 messages are published and consumed while the broker is killed with SIGKILL mid-stream and restarted
Then every message the publisher saw confirmed is received and acked; a message is received twice only if it was
     leased in Redis at the kill (read right after it), and what was leased then is bounded by what a broker may
     hold: the consumer's prefetch (deliveries it has not acked yet) plus the acks the broker had taken out of that
     credit but not yet applied (its ack coalescer: one flush in flight and one batch waiting, each at most
     ACK_BATCH_MAX). Counts are printed.
"""

from __future__ import annotations

import asyncio
import collections

from broker.client.client import BrokerClient
from broker.core.errors import StaleReceiptError
from tests.brokers import BrokerProcess
from tests.support import RedisServer

N = 10_000
PREFETCH = 100
ACK_BATCH_MAX = 1_000  # the broker's ack coalescer batch limit (broker/node/dispatch.py)
LEASED = "mq:{ledger}:g:posting:leased"
ENV = {
    "BROKER_DELIVERY_LEASE_MS": "2000",
    "BROKER_DELIVERY_SWEEP_INTERVAL_MS": "200",
    "BROKER_DELIVERY_POLL_INTERVAL_MS": "100",
}


async def test_no_confirmed_message_lost_when_broker_is_killed(redis: RedisServer) -> None:
    broker = BrokerProcess(redis.url, env=ENV).start()
    confirmed: set[str] = set()
    received: collections.Counter[str] = collections.Counter()
    try:
        async with BrokerClient(broker.url, reconnect_deadline_s=60) as consumer_client:
            sub = await consumer_client.subscribe("ledger", "posting", prefetch=PREFETCH)

            stale = 0

            async def consume() -> None:
                nonlocal stale
                async for m in sub:
                    received[m.id] += 1
                    try:
                        await m.ack()
                    except StaleReceiptError:  # delivered on the connection the kill cut: it comes back
                        stale += 1

            consumer = asyncio.create_task(consume())
            async with BrokerClient(broker.url, reconnect_deadline_s=60) as pub:
                window = asyncio.Semaphore(500)

                async def publish(i: int) -> None:
                    async with window:
                        res = await pub.publish("ledger", {"seq": i})
                        confirmed.add(res.id)

                tasks = [asyncio.create_task(publish(i)) for i in range(N)]
                # When: the broker dies mid-stream
                async with asyncio.timeout(120):
                    while len(confirmed) < N // 3:
                        await asyncio.sleep(0.01)
                broker.kill()
                await asyncio.sleep(0.5)
                leased_at_kill = set(redis.cli("ZRANGE", LEASED, "0", "-1").split())
                broker.start()  # same port: clients reconnect, resubscribe, retry unconfirmed publishes
                async with asyncio.timeout(180):
                    await asyncio.gather(*tasks)
            # Then: everything confirmed arrives
            async with asyncio.timeout(120):
                while not confirmed <= set(received):
                    await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            consumer.cancel()
    finally:
        print(f"--- broker log tail ---\n{broker.log_tail(15)}")
        broker.close()

    missing = confirmed - set(received)
    duplicates = sum(n - 1 for n in received.values())
    twice = {i for i, n in received.items() if n > 1}
    print(f"confirmed={len(confirmed)} received={len(received)} duplicates={duplicates} stale_acks={stale} "
          f"leased_at_kill={len(leased_at_kill)}")
    assert not missing
    assert len(confirmed) == N  # every publish was eventually confirmed (idempotent retries)
    assert len(received) == N  # and no publish retry stored a second copy
    assert twice <= leased_at_kill, twice - leased_at_kill  # only what was in flight at the kill comes again
    assert len(leased_at_kill) <= PREFETCH + 2 * ACK_BATCH_MAX
