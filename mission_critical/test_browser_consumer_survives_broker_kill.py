"""Guarantee: a confirmed publish is never lost, whatever happens to the broker process, for a consumer in a web
page too. The JavaScript client in the browser reconnects with backoff, resubscribes, and gets back what the dead
broker had leased to it (acks of deliveries from the dead connection fail fast as stale, and those come again).

Given a broker on a real redis-server (AOF, fsync always), a page on its origin consuming with the JavaScript client
     (headless Chromium, the browser's own WebSocket), and a Python publisher
When 2,000 messages are published while the broker is killed with SIGKILL mid-stream and restarted on its port
Then the page shows "reconnecting" and then "open" again, every message the publisher saw confirmed reaches the
     page, every publish is confirmed once (no retry stores a copy), and a message comes twice only if it was leased
     in Redis at the kill.
"""

from __future__ import annotations

import asyncio

from broker.client.client import BrokerClient
from tests.brokers import BrokerProcess
from tests.browser import BROWSER, Pages
from tests.support import RedisServer

pytestmark = BROWSER

N = 2_000
PREFETCH = 50
LEASED = "mq:{ledger}:g:posting:leased"
ENV = {
    "BROKER_DELIVERY_LEASE_MS": "2000",
    "BROKER_DELIVERY_SWEEP_INTERVAL_MS": "200",
    "BROKER_DELIVERY_POLL_INTERVAL_MS": "100",
}


async def test_a_page_keeps_consuming_across_a_broker_kill(redis: RedisServer, pages: Pages) -> None:
    broker = BrokerProcess(redis.url, env=ENV).start()
    confirmed: set[str] = set()
    try:
        page = await pages.open(broker.http, label="consumer")
        await page.start_consumer("ledger", "posting", prefetch=PREFETCH)
        async with BrokerClient(broker.url, reconnect_deadline_s=60) as pub:
            window = asyncio.Semaphore(200)

            async def publish(i: int) -> None:
                async with window:
                    confirmed.add((await pub.publish("ledger", {"seq": i})).id)

            tasks = [asyncio.create_task(publish(i)) for i in range(N)]
            # When: the broker dies mid-stream (the page has been consuming)
            async with asyncio.timeout(120):
                while len(confirmed) < N // 3:
                    await asyncio.sleep(0.01)
            await page.wait_for("() => window.consumers.main.received.length > 0")
            broker.kill()
            await asyncio.sleep(0.5)
            leased_at_kill = set(redis.cli("ZRANGE", LEASED, "0", "-1").split())
            await page.wait_for("() => window.consumers.main.states.includes('reconnecting')")
            broker.start()  # same port: the page reconnects and resubscribes; the publisher retries
            async with asyncio.timeout(180):
                await asyncio.gather(*tasks)
        # Then: everything confirmed reaches the page (the wait is a safety bound)
        await page.wait_for(
            "(n) => new Set(window.consumers.main.received.map((m) => m.id)).size >= n", N, timeout_ms=180_000
        )
        await asyncio.sleep(1.0)  # anything still coming (a duplicate) arrives now, to be counted below
        run = await page.consumed()
    finally:
        print(f"--- broker log tail ---\n{broker.log_tail(15)}")
        broker.close()

    received = [m["id"] for m in run["received"]]
    twice = {i for i in received if received.count(i) > 1}
    print(
        f"confirmed={len(confirmed)} received={len(set(received))} deliveries={len(received)} "
        f"stale_acks={run['stale']} leased_at_kill={len(leased_at_kill)} states={run['states']}"
    )
    assert not confirmed - set(received)
    assert len(confirmed) == N  # every publish confirmed, each stored once (idempotent retries)
    assert set(received) == confirmed
    assert twice <= leased_at_kill, twice - leased_at_kill  # only what was in flight at the kill comes again
    assert run["errors"] == []
    assert run["states"][-2:] == ["reconnecting", "open"], run["states"]
    page.check()
