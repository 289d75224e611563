"""Incident (seeds/000, a backup taken while the system ran): an export of live queues that reads the structures at
different moments is not a backup of any moment. `broker export` found the ordering-key lines (`key:<okey>`) with a
SCAN before the MULTI that read them: a line born in between was not read, so its waiting messages were missing
while messages stored after them were in the file (a torn snapshot), and a restore from it would have lost them.

Guarantee: `broker export` is a consistent snapshot of each group while publishers and consumers run. Every message
published before the export started is in the file or was acked before it ended, and so is every message published
before any message the file holds.

Given a real broker on a Redis with 150,000 other keys (a SCAN over them takes a while), two groups of one topic
      (one with a consumer that acks every delivery 5 ms after it, one with no consumer) and publishers that keep
      publishing messages with ordering keys, three per key (each key's second and third wait behind its first),
      new keys all the time
When `broker export` runs (the CLI, in a subprocess) while they publish
Then for each group, every publish confirmed before the export started, and every publish confirmed before the
     publish of any message in the file was sent, is in the file or in the group's acked record with an ack time
     before the export ended.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import redis as redislib

from broker.client.client import BrokerClient
from broker.core import records
from tests.brokers import ROOT, BrokerProcess
from tests.support import RedisServer

FILLER_KEYS = 150_000
PUBLISHERS = 4
PER_KEY = 3
ENV = {"BROKER_RETENTION_ACKED_AUDIT_MAX": "10000000", "BROKER_RETENTION_ACKED_AUDIT_TTL_S": "3600"}


def _fill(url: str) -> None:
    with redislib.Redis.from_url(url) as r:
        for i in range(0, FILLER_KEYS, 10_000):
            r.mset({f"filler:{j}": "x" for j in range(i, i + 10_000)})


async def test_export_under_live_keyed_traffic_is_a_consistent_snapshot(redis: RedisServer, tmp_path: Path) -> None:
    await asyncio.to_thread(_fill, redis.url)
    out = tmp_path / "export.jsonl"
    sent_at: dict[str, float] = {}  # message id -> when its publish was sent (monotonic)
    confirmed_at: dict[str, float] = {}  # message id -> when `published` came back
    stop = asyncio.Event()
    with BrokerProcess(redis.url, env=ENV) as broker:
        async with BrokerClient(broker.url, reconnect=False) as c:
            sub = await c.subscribe("t", "g", prefetch=20)
            await c.subscribe("t", "h", prefetch=1)  # the group exists; its one delivery is never acked
            seq = iter(range(10**9))

            async def publish() -> None:
                for _ in range(200_000):  # bounded; the export's end stops it
                    if stop.is_set():
                        return
                    n = next(seq)
                    t = time.monotonic()
                    res = await c.publish("t", {"n": n}, key=f"k{n // PER_KEY}")
                    sent_at[res.id], confirmed_at[res.id] = t, time.monotonic()

            async def consume() -> None:
                while True:
                    m = await sub.get()
                    await asyncio.sleep(0.005)
                    await m.ack()

            consumer = asyncio.create_task(consume())
            pubs = [asyncio.create_task(publish()) for _ in range(PUBLISHERS)]
            await asyncio.sleep(2.0)
            # When
            env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
            t0 = time.monotonic()
            proc = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "broker", "export", "--topic", "t", "--out", str(out), "--redis-url",
                 redis.url],
                cwd=ROOT, env=env, capture_output=True, timeout=120,
            )  # fmt: skip
            t_end_ms = int(time.time() * 1000)
            t_end = time.monotonic()
            await asyncio.sleep(0.3)
            stop.set()
            async with asyncio.timeout(20):
                await asyncio.gather(*pubs)
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
    assert proc.returncode == 0, proc.stderr.decode()
    f = records.parse(out.read_bytes())

    # Then
    with redislib.Redis.from_url(redis.url, decode_responses=True) as r:
        acked = {g: dict(r.zrange(f"mq:{{t}}:g:{g}:acked", 0, -1, withscores=True)) for g in ("g", "h")}
    before_t0 = [i for i, t in confirmed_at.items() if t < t0]
    print(f"export took {t_end - t0:.2f}s; {proc.stderr.decode().strip()}; publishes confirmed={len(confirmed_at)} "
          f"before the export={len(before_t0)}; acked in g={len(acked['g'])}")  # fmt: skip
    assert len(before_t0) > 200 and len(acked["g"]) > 100, "too little traffic to prove anything"
    for g in ("g", "h"):
        in_file = {m.id for m in f.messages if g in m.groups}
        done = {i for i, at in acked[g].items() if at <= t_end_ms}
        newest_sent = max(sent_at[i] for i in in_file if i in sent_at)
        must = {i for i, t in confirmed_at.items() if t < max(t0, newest_sent)}
        missing = sorted(must - in_file - done)
        waiting = sum(1 for m in f.messages if g in m.groups and m.groups[g].state == "waiting")
        early = [i for i in missing if confirmed_at[i] < t0]
        print(f"group {g}: in file={len(in_file)} (waiting behind their key: {waiting}) must={len(must)} "
              f"missing={len(missing)} (confirmed before the export started: {len(early)})")  # fmt: skip
        assert not missing, (g, len(missing), missing[:10])
