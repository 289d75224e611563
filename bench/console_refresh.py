"""The web console's refresh with many topics (issue 15): ``python -m bench.console_refresh``.

Starts its own redis-server and broker (open mode on loopback), registers ``--topics`` topics of ``--groups`` groups
with ``--ready`` messages ready in each topic, then calls ``GET /console/api/overview`` ``--refreshes`` times in a
row and reports the ``server_ms`` the broker measured for each (median, p90, max) and the broker's CPU per refresh
(its CPU during the refreshes minus its CPU over as long a time idle: the sweep and heartbeats run either way).
Bounded: each call has a 10 s timeout, the run at most ``--refreshes`` calls.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson

from broker.client.client import BrokerClient
from broker.core.config import Settings
from broker.ops.connect import operator_store

from .cpumon import cpu_seconds
from .procs import DEFAULT_BROKER_CMD, LOOPBACK, start_broker, start_redis


def overview(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/console/api/overview", timeout=10) as r:
        return dict(orjson.loads(r.read()))


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="console-bench-") as tmp:
        redis = await start_redis(Path(tmp), "everysec")
        broker = await start_broker(Path(tmp), redis.url, cmd=DEFAULT_BROKER_CMD, log_level="warning",
                                    timeout_s=30, env_extra={"BROKER_AUTH_MODE": "open"})  # fmt: skip
        try:
            async with operator_store(Settings().replace("redis", url=redis.url)) as store:
                for t in range(args.topics):
                    for g in range(args.groups):
                        await store.ensure_group(f"load.t{t:04}", f"g{g}")
            async with BrokerClient(broker.ws_url + "/") as c:
                await asyncio.gather(*(c.publish(f"load.t{t:04}", {"n": i})
                                       for t in range(args.topics) for i in range(args.ready)))  # fmt: skip
            await asyncio.to_thread(overview, broker.port)  # warm-up (loads the script)
            pid = broker.proc.pid
            assert pid is not None
            ms: list[float] = []
            c0, t0 = cpu_seconds(pid) or 0.0, time.monotonic()
            for _ in range(args.refreshes):
                doc = await asyncio.to_thread(overview, broker.port)
                ms.append(float(doc["server_ms"]))  # type: ignore[arg-type]
            busy, dt = (cpu_seconds(pid) or 0.0) - c0, time.monotonic() - t0
            c1 = cpu_seconds(pid) or 0.0
            await asyncio.sleep(dt)
            idle = (cpu_seconds(pid) or 0.0) - c1
            groups = len(doc["groups"])  # type: ignore[arg-type]
            ms.sort()
            print(f"{groups} groups ({args.topics} topics x {args.groups}), {args.refreshes} refreshes: server_ms "
                  f"median {statistics.median(ms):.1f}, p90 {ms[int(len(ms) * 0.9)]:.1f}, max {ms[-1]:.1f}; "
                  f"broker CPU per refresh {(busy - idle) / args.refreshes * 1000:.1f} ms")  # fmt: skip
        finally:
            await broker.proc.stop()
            await redis.proc.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--topics", type=int, default=200)
    p.add_argument("--groups", type=int, default=3)
    p.add_argument("--ready", type=int, default=5, help="messages ready per topic (each group has them)")
    p.add_argument("--refreshes", type=int, default=40)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
