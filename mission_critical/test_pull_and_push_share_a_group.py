"""Pull and push consumers of one group share its messages: nothing lost, nothing delivered twice.

Incident this prevents: a second delivery path is added next to an existing one and each keeps its own idea of who
holds what. Messages claimed for a pull whose wait ran out vanish (claimed, never answered, never given back), or a
message goes to a push consumer and to a puller at once. Pulls must go through the same claim, lease and ack path as
push deliveries, so the group's guarantee (at-least-once, no duplicate without a failure) holds across both.

Given a broker on a real redis-server, group `mixed` of topic `shared` with two push consumers (prefetch 40) and
      two pull consumers (up to 25 per pull, short waits so that many pulls run out empty while messages are
      claimed for others), each on its own connection, all acking what they get
When 3,000 messages are published (confirmed) while they consume
Then every message was processed exactly once, both kinds of consumer took part, and Redis holds nothing for the
     group afterwards (no ready, leased or delayed entry, no body, no dead letter).
"""

from __future__ import annotations

import asyncio
import collections

from broker.client.client import BrokerClient, Subscription
from tests.brokers import BrokerProcess
from tests.support import RedisServer

N = 3_000
TOPIC, GROUP = "shared", "mixed"
ENV = {"BROKER_DELIVERY_SWEEP_INTERVAL_MS": "100", "BROKER_DELIVERY_POLL_INTERVAL_MS": "100"}


async def test_pull_and_push_consumers_share_3000_once_each(redis: RedisServer) -> None:
    with BrokerProcess(redis.url, env=ENV) as broker:
        seen: collections.Counter[int] = collections.Counter()
        by_kind = {"push": 0, "pull": 0}
        consumers = [BrokerClient(broker.url) for _ in range(4)]
        for c in consumers:
            await c.connect()
        push_subs = [await c.subscribe(TOPIC, GROUP, prefetch=40) for c in consumers[:2]]
        for c in consumers[2:]:
            assert await c.pull(TOPIC, GROUP, max=1) == []  # joins the group (the group exists from here on)

        async def push_worker(sub: Subscription) -> None:
            while True:
                m = await sub.get()
                seen[m.payload] += 1
                by_kind["push"] += 1
                await m.ack()

        async def pull_worker(c: BrokerClient, wait_ms: int) -> None:
            while True:
                for m in await c.pull(TOPIC, GROUP, max=25, wait_ms=wait_ms):
                    seen[m.payload] += 1
                    by_kind["pull"] += 1
                    await m.ack()

        workers = [asyncio.create_task(push_worker(s)) for s in push_subs]
        workers += [asyncio.create_task(pull_worker(c, w)) for c, w in zip(consumers[2:], (5, 200), strict=True)]
        try:
            async with BrokerClient(broker.url) as pub:
                for start in range(0, N, 500):
                    results = await pub.publish_batch(
                        [{"topic": TOPIC, "payload": i} for i in range(start, start + 500)]
                    )
                    assert all(not isinstance(r, Exception) for r in results)
            async with asyncio.timeout(60):
                while sum(seen.values()) < N:
                    await asyncio.sleep(0.05)
                while any(
                    redis.cli(cmd, f"mq:{{{TOPIC}}}:g:{GROUP}:{key}") != "0"
                    for cmd, key in (("LLEN", "ready"), ("ZCARD", "leased"), ("ZCARD", "delayed"))
                ):
                    await asyncio.sleep(0.05)  # the last acks reaching Redis
        finally:
            for w in workers:
                w.cancel()
            async with asyncio.timeout(30):
                await asyncio.gather(*workers, return_exceptions=True)
                for c in consumers:
                    await c.close()

    assert len(seen) == N and set(seen.values()) == {1}, [i for i, n in seen.items() if n != 1][:20]
    assert by_kind["push"] > 0 and by_kind["pull"] > 0, by_kind
    assert redis.cli("KEYS", f"mq:{{{TOPIC}}}:msg:*") == ""
    assert redis.cli("ZCARD", f"mq:{{{TOPIC}}}:g:{GROUP}:dead") == "0"
