"""Scenario ``backlog``: a deep queue, filled with no consumer and then drained.

Fill: ``backlog_messages`` (1,000,000; 20,000 with ``--quick``) 256-byte messages published like S1 (single-message
frames, at most ``window`` unconfirmed) to a fresh topic with no subscriber (the publish creates its group
``default``). Drain: one consumer subscribes (prefetch 100, one ack frame per message) and takes everything.
Each phase has its own deadline, ``Sizes.backlog_phase_s`` (at least ``run_timeout_s``, room for 2,000 msg/s).

Reported: fill and drain msg/s; Redis ``used_memory`` (``INFO memory``) after the fill minus before, per message;
the broker's resident set (``/proc/<pid>/statm``) sampled every ``sample_interval_s`` during each phase (max, in
MB); the servers' CPU over both phases per message.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from . import BenchError
from .cpumon import rss_bytes
from .registry import Context, ScenarioResult, scenario
from .scenarios import BrokerRun, _publish_all, add_cpu, cpu_meter
from .wsclient import AckingConsumer, BrokerConn, perf, wait_for_event

MB = 1024 * 1024


class Sampler:
    """Reads the broker's RSS (and Redis's used_memory) every ``interval`` seconds into the current phase."""

    def __init__(self, pid: int, redis: Any, interval: float) -> None:
        self.pid = pid
        self.redis = redis
        self.interval = interval
        self.rss: dict[str, list[int]] = {}
        self.used: dict[str, list[int]] = {}
        self.phase = "idle"
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            rss = rss_bytes(self.pid)
            if rss is not None:
                self.rss.setdefault(self.phase, []).append(rss)
            with contextlib.suppress(Exception):
                self.used.setdefault(self.phase, []).append(await used_memory(self.redis))
            await asyncio.sleep(self.interval)

    def __enter__(self) -> Sampler:
        self._task = asyncio.create_task(self._loop(), name="backlog-sampler")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    def max_mb(self, phase: str) -> float:
        xs = self.rss.get(phase) or [0]
        return max(xs) / MB


async def used_memory(redis: Any) -> int:
    info = await redis.info("memory")
    return int(info["used_memory"])


@scenario(
    "backlog",
    needs=("broker",),
    title="Backlog: 1,000,000 x 256 B published with no consumer, then drained; Redis bytes/message, broker RSS",
    bound=lambda s: 2 * s.backlog_phase_s + 60,
)
async def backlog(ctx: Context) -> ScenarioResult:
    import redis.asyncio as aioredis

    s = ctx.sizes
    n = s.backlog_messages
    res = ScenarioResult("backlog")
    pid = ctx.pids.get("broker", {}).get("server", [0])[0]
    r = aioredis.Redis.from_url(ctx.redis_url)
    cpu = cpu_meter(ctx, "broker")
    try:
        used_before = await used_memory(r)
        with Sampler(pid, r, s.sample_interval_s) as sampler:
            await asyncio.sleep(s.sample_interval_s)  # one reading at rest
            async with BrokerRun(ctx, "backlog", n, ["default"], ack_batch=s.ack_batch, subscribe=False) as run:
                run.deadline = perf() + s.backlog_phase_s
                sampler.phase = "fill"
                cpu.start()
                t0 = await _publish_all(run)
                assert run.publisher is not None
                await run.publisher.wait_confirmed(run.deadline)
                t_filled = perf()
                used_full = await used_memory(r)
                sampler.phase = "drain"
                deadline = perf() + s.backlog_phase_s
                conn = await BrokerConn.open(ctx.broker_url, "drain", run.abort, s.connect_timeout_s)
                run.conns.append(conn)
                consumer = AckingConsumer(
                    conn, n, ack_batch=s.ack_batch, ack_interval=s.ack_interval_s, confirm_acks=s.confirm_acks
                )
                run.consumers.append(consumer)
                t1 = perf()
                await conn.subscribe(run.topic, "default", s.prefetch, s.connect_timeout_s)
                consumer.start()
                try:
                    await wait_for_event(consumer.done, run.abort, deadline, f"draining {n:,} messages")
                except BenchError as e:
                    raise BenchError(f"{e} ({consumer.progress()})") from None
                t_drained = consumer.t_done or perf()
                cpu.stop()
                sampler.phase = "after"
                await run.settle()
                run.check(res)
            await asyncio.sleep(s.sample_interval_s)
            used_after = await used_memory(r)
    finally:
        await r.aclose()
    res.add("fill", n / (t_filled - t0), "msg/s")
    res.add("drain", n / (t_drained - t1), "msg/s")
    res.add("redis_bytes_per_msg", (used_full - used_before) / n, "B/msg", higher_is_better=False)
    res.add("rss_fill_max", sampler.max_mb("fill"), "MB", higher_is_better=False)
    res.add("rss_drain_max", sampler.max_mb("drain"), "MB", higher_is_better=False)
    add_cpu(res, cpu, n)
    res.extra.update(
        messages=n,
        payload_bytes=s.payload_bytes,
        redis_used_memory={"before": used_before, "full": used_full, "after_drain": used_after},
        broker_rss_mb={p: [round(x / MB, 1) for x in xs] for p, xs in sampler.rss.items()},
        redis_used_memory_max={p: max(xs) for p, xs in sampler.used.items() if xs},
        fill_s=t_filled - t0,
        drain_s=t_drained - t1,
    )
    return res
