"""One connection consuming two groups of one topic: every ack and nack settles the group it was meant for.

A connection settles a delivery by (id, receipt) alone, and a receipt is `<claim-ms>-<claim-seq>`: two groups that
claim the same message in the same millisecond used to hand that connection two deliveries under the same
(id, receipt). The session then settled whichever it found first, so an ack meant for one group could ack the
message in the other, which never processed it (a lost message there), and a nack went to the wrong group too.
The dispatcher now never gives a connection a second delivery under an (id, receipt) it already holds: that one is
released (attempt not counted) and claimed again under a new receipt.

Given one connection subscribed to `billing` and `audit` of one topic
When 3,000 messages are published; billing acks each; audit nacks each first delivery (redelivered at once) and
     acks the second
Then billing got each message once (attempt 1), audit each exactly twice (attempts 1 and 2), and both groups end
     with nothing ready, leased or in flight.
"""

from __future__ import annotations

import asyncio
import collections

from broker.client.client import BrokerClient, Subscription

from .brokers import BrokerProcess
from .support import RedisServer

N = 3_000
TOPIC = "shared"


async def test_acks_and_nacks_settle_the_right_group(broker: BrokerProcess, redis: RedisServer) -> None:
    seen: dict[str, collections.Counter[str]] = {"billing": collections.Counter(), "audit": collections.Counter()}

    async def consume(sub: Subscription, group: str, want: int) -> None:
        async with asyncio.timeout(60):
            while sum(seen[group].values()) < want:
                m = await sub.get()
                seen[group][m.id] += 1
                assert m.attempt == seen[group][m.id], (group, m.id, m.attempt)
                if group == "audit" and m.attempt == 1:
                    await m.nack("once more", delay_ms=0)
                else:
                    await m.ack()

    async with BrokerClient(broker.url) as pub, BrokerClient(broker.url) as con:
        # Given: one connection, two groups
        billing = await con.subscribe(TOPIC, "billing", prefetch=1000)
        audit = await con.subscribe(TOPIC, "audit", prefetch=1000)
        tasks = [
            asyncio.create_task(consume(billing, "billing", N)),
            asyncio.create_task(consume(audit, "audit", 2 * N)),
        ]
        # When
        ids: list[str] = []
        for start in range(0, N, 500):
            res = await pub.publish_batch([{"topic": TOPIC, "payload": start + i} for i in range(500)])
            ids += [r.id for r in res]  # type: ignore[union-attr]
        await asyncio.gather(*tasks)
        await con.ping()  # the last acks were read by the broker before this answer
    # Then
    assert set(seen["billing"]) == set(ids) and set(seen["billing"].values()) == {1}
    assert set(seen["audit"]) == set(ids) and set(seen["audit"].values()) == {2}
    async with asyncio.timeout(30):  # acks sent without waiting: Redis settles them shortly
        while any(
            redis.cli("ZCARD", f"mq:{{{TOPIC}}}:g:{g}:leased") != "0"
            or redis.cli("LLEN", f"mq:{{{TOPIC}}}:g:{g}:ready") != "0"
            for g in ("billing", "audit")
        ):
            await asyncio.sleep(0.05)
    assert redis.cli("--scan", "--pattern", f"mq:{{{TOPIC}}}:*dlv:*") == ""
    assert redis.cli("--scan", "--pattern", f"mq:{{{TOPIC}}}:msg:*") == ""
