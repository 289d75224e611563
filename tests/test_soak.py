"""The soak's 60-second version (``bench/soak.py`` runs the 10-minute one): 1,000 WebSocket connections on a real
broker and redis-server (50 publishers at a steady rate, the rest consumers in 3 groups), then: nothing lost,
nothing delivered twice (no failure happened), and nothing that grows with the work done.

Sound on a loaded shared machine, where a minute delivers as much as the machine lets it (no assertion on time):
- the run is bounded by progress: the last confirmations and the drain wait while anything still moves, and end
  when nothing moved for ``stall_s`` (then what is missing is lost), under a generous safety timeout;
- the broker's RSS, open file descriptors and asyncio task count are judged by their slope against the deliveries
  made (a leak grows per message, a loaded machine only makes fewer messages per second), over the 40 s after a
  20 s warm-up, against a tolerance of 4 times the noise each showed in the warm-up's second half, with a small
  floor (``bench.soak.judge``);
- Redis's memory follows the backlog (a slow machine queues more), so Redis is judged once everything is delivered
  and acked: exactly the keys it had before the traffic, its memory back within what the traffic's scripts and
  buffers take (``REDIS_SETTLED_KB``); the broker's descriptors and tasks back where they were too.

The rate is SOAK_RATE (default 300 msg/s, 900 deliveries/s: the load generator shares the machine's two cores with
the broker, Redis and whatever else runs); the numbers, p99 latency per 10 s included, are printed. SOAK_JSON=path
writes the whole result.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from bench.soak import SoakConfig, judge, run
from tests.brokers import BrokerProcess
from tests.support import RedisServer

RATE = float(os.environ.get("SOAK_RATE", "300"))
FLOORS = {"fds": 4.0, "tasks": 16.0}  # the least a resource may move by (RSS: 2 % of its size, set below)
REDIS_SETTLED_KB = 1024.0  # Redis's memory after everything was acked, over its memory before the traffic


@pytest.mark.timeout(900)  # a safety bound: the run ends by itself when nothing moves for a minute
async def test_a_minute_of_1000_connections_loses_nothing_and_leaves_nothing_growing(redis: RedisServer) -> None:
    cfg = SoakConfig(connections=1_000, publishers=50, groups=3, rate=RATE, duration_s=60, warmup_s=20, sample_s=2)
    with BrokerProcess(redis.url, env={"BROKER_LOG_LEVEL": "warning"}) as broker:
        assert broker.proc is not None
        res = await run(cfg, broker.url, broker.proc.pid, broker.port, redis.port)
    print(res.text())
    if os.environ.get("SOAK_JSON"):
        Path(os.environ["SOAK_JSON"]).write_text(json.dumps(dataclasses.asdict(res)))
    expected = int(cfg.rate * cfg.duration_s)
    assert res.confirmed == expected and res.publish_errors == 0
    assert not any(res.lost.values()), res.lost
    assert not any(res.duplicates.values()), res.duplicates
    assert res.deliveries == expected * cfg.groups
    verdict = judge(res, {"rss_kb": 0.02 * res.before["rss_kb"], **FLOORS})
    for name, v in verdict.items():
        print(f"{name}: grew {v['growth']:+.1f} over the measured deliveries (tolerance {v['tolerance']:.1f}: "
              f"warm-up noise {v['noise']:.1f})")  # fmt: skip
    print(f"before the traffic: {res.before}\nafter it, all acked: {res.after}")
    assert all(v["ok"] for v in verdict.values()), verdict
    before, after = res.before, res.after
    assert after["redis_keys"] == before["redis_keys"], (before, after)  # nothing of an acked message stays
    assert after["redis_kb"] - before["redis_kb"] <= REDIS_SETTLED_KB, (before, after)
    for name in FLOORS:  # one set per connection, the same connections: back where they were
        assert after[name] - before[name] <= verdict[name]["tolerance"], (name, before, after)
