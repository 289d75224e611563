"""Issue 8 scenario ``keyed``: per-key ordering under S1's load.

S1 with two changes: every message carries an ordering key (``k<seq % 1,000>``, 1,000 keys round robin) and the
group has 4 competing consumers (one connection each, prefetch and ack batching as S1). The broker lets one message
per key be in flight at a time, so a key's next message is claimable only once the previous one's ack reached
Redis. msg/s over the same span as S1 (first publish -> last ack answered), compared with S1 from the same run
(goal >= 0.7x). Every delivery is checked: a key's messages must arrive in publish order (no redeliveries happen in
this run), and the group must see every message exactly once.
"""

from __future__ import annotations

from typing import Any

from .registry import Context, ScenarioResult, scenario
from .scenarios import BrokerRun, _publish_all, add_cpu, cpu_meter, latency_summary
from .wsclient import AckingConsumer, Frame

KEYS = 1_000
CONSUMERS = 4


class OrderCheckingConsumer(AckingConsumer):
    """Acks everything, and checks that each key's messages arrive in publish order across all consumers."""

    last_seq: dict[int, int] = {}  # key -> highest sequence number delivered so far (shared by the group)
    out_of_order: list[str] = []

    def _on_message(self, d: Frame, now: float) -> None:
        payload = d.get("payload")
        seq = payload.get("s") if isinstance(payload, dict) else None
        if isinstance(seq, int):
            key = seq % KEYS
            if d.get("key") != f"k{key}":
                self.out_of_order.append(f"seq {seq} delivered with key {d.get('key')!r}")
            prev = self.last_seq.get(key, -1)
            if seq <= prev:
                self.out_of_order.append(f"key k{key}: seq {seq} delivered after {prev}")
            self.last_seq[key] = max(prev, seq)
        super()._on_message(d, now)


async def _run(ctx: Context, tag: str, messages: int, cpu: Any = None) -> tuple[float, BrokerRun]:
    OrderCheckingConsumer.last_seq = {}
    OrderCheckingConsumer.out_of_order = []
    s = ctx.sizes
    async with BrokerRun(
        ctx,
        tag,
        messages,
        ["default"],
        ack_batch=s.ack_batch,
        consumer_cls=OrderCheckingConsumer,
        per_group=CONSUMERS,
        keys=KEYS,
    ) as run:
        if cpu is not None:
            cpu.start()
        t0 = await _publish_all(run)
        t_end = await run.finish()
        if cpu is not None:
            cpu.stop()
        await run.settle()
    return t_end - t0, run


@scenario(
    "keyed",
    needs=("broker",),
    title="Per-key ordering: S1 load with 1,000 ordering keys, 4 competing consumers in one group; ratio vs S1",
)
async def keyed_throughput(ctx: Context) -> ScenarioResult:
    s = ctx.sizes
    res = ScenarioResult("keyed")
    if s.warmup_messages > 0:
        await _run(ctx, "keyed-warmup", s.warmup_messages)
    cpu = cpu_meter(ctx, "broker")
    elapsed, run = await _run(ctx, "keyed", s.messages, cpu)
    run.check(res)
    for problem in OrderCheckingConsumer.out_of_order[:5]:
        res.problem(problem)
    res.add("throughput", s.messages / elapsed, "msg/s")
    add_cpu(res, cpu, s.messages)
    res.extra.update(
        messages=s.messages,
        keys=KEYS,
        consumers=CONSUMERS,
        elapsed_s=elapsed,
        out_of_order=len(OrderCheckingConsumer.out_of_order),
        delivery_latency=latency_summary(run.consumers[0].tracker.latencies),
    )
    return res
