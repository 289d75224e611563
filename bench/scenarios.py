"""Scenarios S1-S3 on the broker and on the same-frames relay (both speak the broker's frames, so the same client
code drives both). Each is registered in ``bench.registry.SCENARIOS``; add S5, S6... the same way.

Every timed run uses fresh connections and a fresh topic (``bench.<scenario>.<random>``), is bounded in message
count and in time (``Sizes.run_timeout_s``; a full publish window without a confirmation for
``Sizes.stall_timeout_s`` aborts), and is preceded by an untimed warm-up run of ``Sizes.warmup_messages``. The
servers' CPU (``/proc/<pid>/stat``) is read at the start and the end of the timed part: ``add_cpu``.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from . import BenchError
from .cmdstats import CommandStats
from .cpumon import CpuMeter, find_pids
from .registry import (
    CLIENT_BUSY,
    CPU_CLIENT,
    CPU_REDIS,
    CPU_SERVER,
    CPU_TOTAL,
    Context,
    ScenarioResult,
    System,
    percentile,
    scenario,
)
from .wsclient import (
    Abort,
    AckingConsumer,
    BrokerConn,
    DeliveryTracker,
    WindowedPublisher,
    before,
    perf,
    wait_for_event,
)

#: Process names of the system services the baselines use (their CPU is the server CPU of those baselines).
SERVICE_PROCESSES: dict[str, tuple[str, ...]] = {
    "nats": ("nats-server",),
    "rabbitmq": ("beam.smp", "epmd", "erl_child_setup", "inet_gethost"),
}


def cpu_meter(ctx: Context, system: System) -> CpuMeter:
    """A meter over ``system``'s server processes: those the runner started (``ctx.pids``), or a system service's
    processes found by name; and over the bench's own process, where the clients run (role ``client``)."""
    roles = (
        {"server": find_pids(SERVICE_PROCESSES[system])} if system in SERVICE_PROCESSES else ctx.pids.get(system, {})
    )
    return CpuMeter({**roles, "client": [os.getpid()]})


def add_cpu(res: ScenarioResult, meter: CpuMeter, count: int, unit: str = "us/msg") -> None:
    """The servers' CPU over the timed part per message (per delivery for S2), in µs: server, redis and the sum
    (the servers only); and the clients' (the bench process), with how busy it was (% of one core). CPU seconds
    come in ticks of 10 ms: a short run is only a rough figure."""
    secs = meter.seconds
    if not count or not any(role != "client" for role in meter.roles):  # no server process found: no figure at all
        return
    for role, key in (("server", CPU_SERVER), ("redis", CPU_REDIS), ("client", CPU_CLIENT)):
        if role in meter.roles:
            res.add(key, secs.get(role, 0.0) * 1e6 / count, unit, higher_is_better=False)
    servers = sum(s for role, s in secs.items() if role != "client")
    res.add(CPU_TOTAL, servers * 1e6 / count, unit, higher_is_better=False)
    if "client" in meter.roles and meter.wall_s > 0:
        res.add(CLIENT_BUSY, secs.get("client", 0.0) * 100 / meter.wall_s, "% of a core", higher_is_better=False)
    res.extra["cpu"] = {
        "seconds": secs,
        "pids": meter.roles,
        "window_s": meter.wall_s,
        "per": count,
    }


def add_shape_measures(
    res: ScenarioResult,
    cpu: CpuMeter,
    *,
    messages: int,
    groups: int,
    rate: float | None,
    elapsed_s: float,
    latencies_s: Sequence[float],
    sent_span_s: float | None = None,
    max_lag_s: float = 0.0,
) -> None:
    """What every system reports for one run of the S1/S2/S3 shapes: S3 (paced, ``rate``) latency and CPU per
    message with the rate it reached; S2 (``groups`` > 1) deliveries/s and CPU per delivery; S1 msg/s and CPU per
    message."""
    if rate:
        add_latency(res, latencies_s)
        add_cpu(res, cpu, messages)
        res.extra.update(achieved_rate=messages / sent_span_s if sent_span_s else 0.0, max_send_lag_ms=max_lag_s * 1000)
    elif groups > 1:
        res.add("deliveries", messages * groups / elapsed_s, "deliveries/s")
        add_cpu(res, cpu, messages * groups, "us/delivery")
    else:
        res.add("throughput", messages / elapsed_s, "msg/s")
        add_cpu(res, cpu, messages)


class PeerRun(Protocol):
    """One timed run of a peer (NATS, RabbitMQ): what ``peer_scenario`` reads from it."""

    @property
    def trackers(self) -> Sequence[DeliveryTracker]: ...
    @property
    def elapsed(self) -> float: ...
    @property
    def sent_span(self) -> float: ...
    @property
    def max_lag(self) -> float: ...
    @property
    def info(self) -> dict[str, Any]: ...


async def peer_scenario(
    ctx: Context,
    name: str,
    system: System,
    label: str,
    once: Callable[[Context, int, int, float | None, CpuMeter | None], Awaitable[PeerRun]],
    skipped: type[Exception],
    messages: int,
    groups: int,
    rate: float | None,
) -> ScenarioResult:
    """A peer's S1/S2/S3 scenario: an untimed warm-up run, the timed run with the CPU meter, delivery checks and the
    shape's measures; ``skipped`` (the peer is not there) makes the result `skipped`, not failed."""
    s = ctx.sizes
    res = ScenarioResult(name)
    cpu = cpu_meter(ctx, system)
    try:
        if s.warmup_messages > 0:
            await once(ctx, s.warmup_messages, groups, None, None)
        run = await once(ctx, messages, groups, rate, cpu)
    except skipped as e:
        res.status = "skipped"
        res.note = f"baseline skipped: {e}"
        return res
    for i, tracker in enumerate(run.trackers):
        for p in tracker.problems(f"{label} consumer {i}"):
            res.problem(p)
    latencies = [x for t in run.trackers for x in t.latencies]
    add_shape_measures(
        res,
        cpu,
        messages=messages,
        groups=groups,
        rate=rate,
        elapsed_s=run.elapsed,
        latencies_s=latencies,
        sent_span_s=run.sent_span,
        max_lag_s=run.max_lag,
    )
    res.extra.update(
        run.info,
        messages=messages,
        groups=groups,
        payload_bytes=s.payload_bytes,
        elapsed_s=run.elapsed,
        delivery=[t.summary() for t in run.trackers],
        delivery_latency=latency_summary(latencies),
    )
    return res


def new_topic(tag: str) -> str:
    return f"bench.{tag}.{uuid.uuid4().hex[:10]}"


def add_latency(res: ScenarioResult, latencies_s: Sequence[float], prefix: str = "") -> None:
    """p50 / p99 / max in milliseconds as metrics (lower is better)."""
    xs = sorted(latencies_s)
    for key, value in (("p50", percentile(xs, 50)), ("p99", percentile(xs, 99)), ("max", xs[-1] if xs else 0.0)):
        res.add(f"{prefix}{key}", value * 1000, "ms", higher_is_better=False)


def latency_summary(latencies_s: Sequence[float]) -> dict[str, float]:
    xs = sorted(latencies_s)
    if not xs:
        return {}
    return {
        "count": len(xs),
        "p50_ms": percentile(xs, 50) * 1000,
        "p90_ms": percentile(xs, 90) * 1000,
        "p99_ms": percentile(xs, 99) * 1000,
        "p999_ms": percentile(xs, 99.9) * 1000,
        "max_ms": xs[-1] * 1000,
    }


class BrokerRun:
    """One timed run: N consumers (one connection each, one group each) and one publisher on one topic."""

    def __init__(
        self,
        ctx: Context,
        tag: str,
        messages: int,
        groups: Sequence[str],
        *,
        ack_batch: int,
        consumer_cls: type[AckingConsumer] = AckingConsumer,
        per_group: int = 1,
        keys: int = 0,
        url: str | None = None,
        extra: str = "",
        subscribe: bool = True,
    ) -> None:
        self.ctx = ctx
        self.url = ctx.broker_url if url is None else url
        self.extra = extra  # more publish fields (JSON text starting with a comma)
        self.subscribe = subscribe  # False: no consumers at all (the backlog's fill phase)
        self.sizes = ctx.sizes
        self.topic = new_topic(tag)
        self.messages = messages
        self.groups = list(groups)
        self.ack_batch = ack_batch
        self.consumer_cls = consumer_cls  # e.g. a subclass that nacks some deliveries (S4)
        self.per_group = per_group  # competing consumers per group; they share one delivery tracker
        self.keys = keys  # > 0: messages carry ordering keys k0..k<keys-1> (round robin)
        self._waiters: list[asyncio.Task[None]] = []
        self.abort = Abort()
        self.deadline = perf() + self.sizes.run_timeout_s
        self.conns: list[BrokerConn] = []
        self.consumers: list[AckingConsumer] = []
        self.publisher: WindowedPublisher | None = None

    async def __aenter__(self) -> BrokerRun:
        try:
            await self._open()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _open(self) -> None:
        s = self.sizes
        for g in self.groups if self.subscribe else ():
            shared: AckingConsumer | None = None
            for i in range(self.per_group):
                name = f"consumer-{g}" if self.per_group == 1 else f"consumer-{g}-{i}"
                conn = await BrokerConn.open(self.url, name, self.abort, s.connect_timeout_s)
                self.conns.append(conn)
                consumer = self.consumer_cls(
                    conn,
                    self.messages,
                    ack_batch=self.ack_batch,
                    ack_interval=s.ack_interval_s,
                    confirm_acks=s.confirm_acks,
                )
                if shared is None:
                    shared = consumer
                else:  # competing consumers: the group as a whole must see every message once
                    consumer.tracker = shared.tracker
                    self._waiters.append(asyncio.create_task(_done_when_complete(consumer)))
                self.consumers.append(consumer)
                await conn.subscribe(self.topic, g, s.prefetch, s.connect_timeout_s)
                consumer.start()
            if shared is not None and self.per_group > 1:
                self._waiters.append(asyncio.create_task(_done_when_complete(shared)))
        pub = await BrokerConn.open(self.url, "publisher", self.abort, s.connect_timeout_s)
        self.conns.append(pub)
        self.publisher = WindowedPublisher(
            pub, self.topic, s.window, s.payload_bytes, s.stall_timeout_s, keys=self.keys, extra=self.extra
        )

    async def __aexit__(self, *exc: object) -> None:
        for w in self._waiters:
            w.cancel()
        for c in self.consumers:
            await c.stop()
        for conn in self.conns:
            await conn.close()

    async def finish(self) -> float:
        """Wait until every publish is confirmed and every consumer has acked everything; return the last t_done."""
        assert self.publisher is not None
        try:
            await self.publisher.wait_confirmed(self.deadline)
            for c in self.consumers:
                await wait_for_event(c.done, self.abort, self.deadline, f"all deliveries acked on {c.conn.name}")
        except BenchError as e:
            p = self.publisher
            state = [f"publisher: {p.confirmed:,}/{p.sent:,} confirmed"] + [c.progress() for c in self.consumers]
            raise BenchError(f"{e} ({'; '.join(state)})") from None
        return max((c.t_done or perf() for c in self.consumers), default=perf())

    async def settle(self) -> None:
        """Untimed: listen a little longer so late duplicates are counted."""
        await asyncio.sleep(self.sizes.settle_s)

    def check(self, res: ScenarioResult) -> None:
        assert self.publisher is not None
        for err in self.publisher.errors[:5]:
            res.problem(err)
        for p in self.publisher.conn.unexpected_problems():
            res.problem(p)
        for c in self.consumers:
            for p in c.problems(c.conn.name):
                res.problem(p)
        res.extra["topic"] = self.topic
        res.extra["publisher"] = self.publisher.summary()
        res.extra["consumers"] = {c.conn.name: c.summary() for c in self.consumers}
        res.extra["publish_confirm_latency"] = latency_summary(self.publisher.confirm_latencies)


async def _done_when_complete(consumer: AckingConsumer) -> None:
    """A consumer sharing its tracker may have nothing left to receive when the group's last message arrives at
    another consumer: check it once then (its pending acks check again when answered)."""
    await consumer.tracker.complete.wait()
    consumer._check_done()


async def _publish_all(run: BrokerRun) -> float:
    """Publish ``run.messages`` windowed; return the stamp of the first send."""
    assert run.publisher is not None
    t0 = perf()
    async with before(run.deadline, f"publishing {run.messages} messages"):
        for seq in range(run.messages):
            if seq % 1_000 == 0:
                run.abort.check()
            stamp = await run.publisher.publish(seq)
            if seq == 0:
                t0 = stamp
    return t0


def url_for(ctx: Context, system: System) -> str:
    return ctx.relay_url if system == "relay" else ctx.broker_url


async def _warmup(ctx: Context, tag: str, groups: Sequence[str], url: str | None = None) -> None:
    n = ctx.sizes.warmup_messages
    if n <= 0:
        return
    async with BrokerRun(ctx, f"{tag}-warmup", n, groups, ack_batch=ctx.sizes.ack_batch, url=url) as run:
        await _publish_all(run)
        await run.finish()


async def run_s1(ctx: Context, name: str, system: System) -> ScenarioResult:
    """S1 on a system speaking the broker's frames: 1 publisher (<= window unconfirmed) -> 1 consumer."""
    s = ctx.sizes
    res = ScenarioResult(name)
    url = url_for(ctx, system)
    await _warmup(ctx, name, ["default"], url)
    cpu = cpu_meter(ctx, system)
    cmds = CommandStats(ctx.redis_url if system == "broker" else "")
    async with BrokerRun(ctx, name, s.messages, ["default"], ack_batch=s.ack_batch, url=url) as run:
        await cmds.start()
        cpu.start()
        t0 = await _publish_all(run)
        t_end = await run.finish()
        cpu.stop()
        await cmds.stop()
        await run.settle()
        run.check(res)
    elapsed = t_end - t0
    res.add("throughput", s.messages / elapsed, "msg/s")
    add_cpu(res, cpu, s.messages)
    cmds.add(res, s.messages)
    res.extra.update(messages=s.messages, payload_bytes=s.payload_bytes, elapsed_s=elapsed)
    res.extra["delivery_latency"] = latency_summary(run.consumers[0].tracker.latencies)
    return res


async def run_s2(ctx: Context, name: str, system: System) -> ScenarioResult:
    """S2: 1 publisher -> ``fanout_groups`` groups with one consumer each; deliveries/s over all groups."""
    s = ctx.sizes
    res = ScenarioResult(name)
    url = url_for(ctx, system)
    groups = [f"g{i}" for i in range(s.fanout_groups)]
    await _warmup(ctx, name, groups, url)
    cpu = cpu_meter(ctx, system)
    async with BrokerRun(ctx, name, s.fanout_messages, groups, ack_batch=s.ack_batch, url=url) as run:
        cpu.start()
        t0 = await _publish_all(run)
        t_end = await run.finish()
        cpu.stop()
        await run.settle()
        run.check(res)
    elapsed = t_end - t0
    deliveries = s.fanout_messages * len(groups)
    res.add("deliveries", deliveries / elapsed, "deliveries/s")
    add_cpu(res, cpu, deliveries, "us/delivery")
    res.extra.update(messages=s.fanout_messages, groups=len(groups), deliveries=deliveries, elapsed_s=elapsed)
    res.extra["delivery_latency"] = latency_summary([x for c in run.consumers for x in c.tracker.latencies])
    return res


async def run_s3(ctx: Context, name: str, system: System) -> ScenarioResult:
    """S3: ``latency_rate`` msg/s on a fixed schedule; publish -> delivery p50/p99/max; CPU per message at that
    rate (idle work of the server included: that is what a lightly loaded server costs)."""
    s = ctx.sizes
    res = ScenarioResult(name)
    url = url_for(ctx, system)
    n = int(s.latency_rate * s.latency_seconds)
    await _warmup(ctx, name, ["default"], url)
    cpu = cpu_meter(ctx, system)
    cmds = CommandStats(ctx.redis_url if system == "broker" else "")
    async with BrokerRun(ctx, name, n, ["default"], ack_batch=1, url=url) as run:
        await cmds.start()
        cpu.start()
        sent_at, max_lag = await paced_publish(run.abort, run.publisher, n, s.latency_rate, run.deadline)
        await run.finish()
        cpu.stop()
        await cmds.stop()
        await run.settle()
        run.check(res)
    latencies = run.consumers[0].tracker.latencies
    add_latency(res, latencies)
    add_cpu(res, cpu, n)
    cmds.add(res, n)
    res.extra.update(
        messages=n,
        target_rate=s.latency_rate,
        achieved_rate=n / sent_at if sent_at > 0 else 0.0,
        max_send_lag_ms=max_lag * 1000,
        delivery_latency=latency_summary(latencies),
    )
    return res


S1_TITLE = "1 publisher (<=1,000 unconfirmed) -> 1 consumer (prefetch 100, one ack frame per message)"
S2_TITLE = "1 publisher -> 8 groups x 1 consumer each; deliveries/s over all groups"
S3_TITLE = "paced 1,000 msg/s for 10 s, consumer acks each; publish->delivery p50/p99/max"


@scenario("s1", needs=("broker",), title=f"S1 throughput: {S1_TITLE}", shape="s1")
async def s1_throughput(ctx: Context) -> ScenarioResult:
    return await run_s1(ctx, "s1", "broker")


@scenario("s2", needs=("broker",), title=f"S2 fan-out: {S2_TITLE}", shape="s2")
async def s2_fanout(ctx: Context) -> ScenarioResult:
    return await run_s2(ctx, "s2", "broker")


@scenario("s3", needs=("broker",), title=f"S3 latency: {S3_TITLE}", shape="s3")
async def s3_latency(ctx: Context) -> ScenarioResult:
    return await run_s3(ctx, "s3", "broker")


@scenario("relay", needs=("relay",), title=f"Same-frames relay, S1: {S1_TITLE}", system="relay", shape="s1")
async def relay_s1(ctx: Context) -> ScenarioResult:
    return await run_s1(ctx, "relay", "relay")


@scenario("relay-s2", needs=("relay",), title=f"Same-frames relay, S2: {S2_TITLE}", system="relay", shape="s2")
async def relay_s2(ctx: Context) -> ScenarioResult:
    return await run_s2(ctx, "relay-s2", "relay")


@scenario("relay-s3", needs=("relay",), title=f"Same-frames relay, S3: {S3_TITLE}", system="relay", shape="s3")
async def relay_s3(ctx: Context) -> ScenarioResult:
    return await run_s3(ctx, "relay-s3", "relay")


async def paced_publish(
    abort: Abort, publisher: WindowedPublisher | None, n: int, rate: float, deadline: float
) -> tuple[float, float]:
    """Send ``n`` messages at ``rate``/s on a fixed schedule (no catch-up bursts beyond what is due).

    Returns (seconds from first to last send, worst lateness against the schedule). The latency itself is stamped
    per message at the actual send, so generator lag does not inflate it; it is reported so it can be judged."""
    assert publisher is not None
    interval = 1.0 / rate
    t0 = perf()
    max_lag = 0.0
    last = t0
    async with before(deadline, f"publishing {n} paced messages"):
        for seq in range(n):
            due = t0 + seq * interval
            now = perf()
            if due > now:
                await asyncio.sleep(due - now)
            else:
                max_lag = max(max_lag, now - due)
            if seq % 100 == 0:
                abort.check()
            last = await publisher.publish(seq)
    return last - t0, max_lag
