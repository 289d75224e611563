"""`broker stats` rates: nodes publish per topic/group counters with their heartbeat; `--rates` turns two snapshots
into per-second rates, on a real broker while traffic flows."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import orjson

from broker.client.client import BrokerClient

from .brokers import ROOT, BrokerProcess
from .support import RedisServer


async def test_rates_follow_the_traffic() -> None:
    with RedisServer() as redis, BrokerProcess(redis.url) as broker:
        async with BrokerClient(broker.url) as c:
            sub = await c.subscribe("orders", "billing", prefetch=50)

            async def consume() -> None:
                async for m in sub:
                    await m.ack()

            consumer = asyncio.create_task(consume())
            env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")} | {"BROKER_REDIS_URL": redis.url}
            # Given a steady flow, When stats samples rates over 2 s
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "broker", "stats", "--rates", "--json",
                cwd=ROOT, env=env, stdout=subprocess.PIPE,
            )  # fmt: skip
            for i in range(500):
                await c.publish("orders", i)
                await asyncio.sleep(0.005)
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            consumer.cancel()
    # Then publish, delivery and ack rates are positive and consistent, and nothing was nacked
    (row,) = [r for r in orjson.loads(out) if r["group"] == "billing"]
    assert row["published_per_s"] > 10 and row["acked_per_s"] > 10 and row["delivered_per_s"] > 10
    assert abs(row["published_per_s"] - row["acked_per_s"]) < 0.5 * row["published_per_s"]
    assert row["nacked_per_s"] == 0 and row["consumers"] == 1
