"""Incident (seeds/003): per-customer work had to run in order with exactly one timer per customer; two workers
picked up the same customer's next step at once and processed it out of order.

Guarantee: per-key ordering. Inside a group, messages with the same ordering key are processed one at a time in
publish order, retries included, across every consumer and broker node; different keys progress in parallel.

Given two broker processes on one real redis-server, 4 competing consumers in one group (two on each broker) and
      2,000 messages over 50 keys, each message with its own fast retry policy (10 ms backoff, 50 attempts)
When the consumers nack about 20 % of their deliveries at random (half at once, half with the backoff) and ack the
     rest
Then every key's messages are acked exactly once each and in publish order, no two messages of one key are ever
     being processed at the same time, every delivery of a key is its current message (a retry) or the next one,
     all 50 keys finish, and Redis holds no per-message key afterwards.
"""

from __future__ import annotations

import asyncio
import itertools
import random

from broker.client.client import BrokerClient, Message
from tests.brokers import BrokerProcess
from tests.support import RedisServer

TOPIC, GROUP = "accounts", "ledger"
KEYS, PER_KEY = 50, 40
TOTAL = KEYS * PER_KEY


async def test_per_key_order_with_competing_consumers_on_two_nodes(redis: RedisServer) -> None:
    rng = random.Random(3)
    busy: dict[str, str] = {}  # key -> consumer processing it now
    acked: dict[str, list[int]] = {f"k{i}": [] for i in range(KEYS)}
    delivered: dict[str, list[int]] = {f"k{i}": [] for i in range(KEYS)}
    overlaps: list[str] = []
    nacks = 0
    all_done = asyncio.Event()

    async def consume(url: str, name: str) -> None:
        nonlocal nacks
        async with BrokerClient(url) as c:
            sub = await c.subscribe(TOPIC, GROUP, prefetch=20)
            while not all_done.is_set():
                try:
                    m: Message = await sub.get(timeout=0.5)
                except TimeoutError:
                    continue
                assert m.key is not None
                seq = int(m.payload["seq"])
                if busy.get(m.key) not in (None, name):
                    overlaps.append(f"{m.key}: {name} got #{seq} while {busy[m.key]} is processing")
                # and not two of one key held by this consumer either (prefetch 20: the rest wait in its queue)
                waiting = [x for x in list(sub.queue._queue) if x.key == m.key]
                if waiting:
                    overlaps.append(f"{m.key}: {name} holds #{seq} and #{waiting[0].payload['seq']} at once")
                busy[m.key] = name
                delivered[m.key].append(seq)
                await asyncio.sleep(rng.uniform(0, 0.002))  # "processing"
                # processing ends before the settle is sent: the broker can only release the key after it
                del busy[m.key]
                if rng.random() < 0.2:
                    nacks += 1
                    await m.nack("flaky", delay_ms=0 if rng.random() < 0.5 else None, wait=True)
                else:
                    acked[m.key].append(seq)
                    await m.ack(wait=True)
                    if sum(map(len, acked.values())) == TOTAL:
                        all_done.set()

    with BrokerProcess(redis.url) as b1, BrokerProcess(redis.url) as b2:
        async with BrokerClient(b1.url) as setup:
            await setup.subscribe(TOPIC, GROUP)  # the group exists before the first publish
        consumers = [asyncio.create_task(consume(url, f"c{i}")) for i, url in enumerate([b1.url, b2.url] * 2)]
        await asyncio.sleep(0.3)
        async with BrokerClient(b2.url) as pub:
            order = [(f"k{i % KEYS}", i // KEYS) for i in range(TOTAL)]
            for i in range(0, TOTAL, 100):
                await asyncio.gather(
                    *(
                        pub.publish(TOPIC, {"seq": seq}, key=key, max_attempts=50, backoff_base_ms=10)
                        for key, seq in order[i : i + 100]
                    )
                )
        await asyncio.wait_for(all_done.wait(), timeout=120)
        await asyncio.gather(*consumers)

    assert overlaps == []
    assert nacks > 100  # the retries really happened
    for key in acked:
        assert acked[key] == list(range(PER_KEY)), key
        # every delivery is the key's current message again (a retry) or the next one
        seqs = delivered[key]
        assert all(b in (a, a + 1) for a, b in itertools.pairwise(seqs)), (key, seqs)
    assert redis.cli("--scan", "--pattern", "mq:{accounts}:msg:*") == ""
    assert redis.cli("--scan", "--pattern", "mq:{accounts}:g:ledger:key:*") == ""
