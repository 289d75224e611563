"""S1b: S1's workload (same messages, same window of unconfirmed messages, every message acked) using the
protocol's batch frames: ``publish`` with ``messages: [...]`` (100 per frame), a ``batch: true`` subscription
(prefetch 500) that receives ``messages`` frames, and batched acks (100 items per frame, each answered). Measures
what the broker does per message when per-frame costs are shared; S1 itself sends one frame per message."""

from __future__ import annotations

import asyncio
import itertools

import orjson

from .registry import Context, ScenarioResult, scenario
from .scenarios import add_cpu, cpu_meter, latency_summary, new_topic
from .wsclient import Abort, AckingConsumer, BrokerConn, before, payload_text, perf, wait_for_event

PUBLISH_BATCH = 100
ACK_BATCH = 100  # items per ack frame
PREFETCH = 500


@scenario(
    "s1b",
    needs=("broker",),
    title="S1b throughput with batch frames: publish 100 messages per frame, batch delivery, batched acks",
    shape="s1",
)
async def s1_batch(ctx: Context) -> ScenarioResult:
    s = ctx.sizes
    res = ScenarioResult("s1b")
    topic = new_topic("s1b")
    abort = Abort()
    deadline = perf() + s.run_timeout_s
    cconn = await BrokerConn.open(ctx.broker_url, "consumer", abort, s.connect_timeout_s)
    pconn = await BrokerConn.open(ctx.broker_url, "publisher", abort, s.connect_timeout_s)
    consumer = AckingConsumer(cconn, s.messages, ack_batch=ACK_BATCH, ack_interval=s.ack_interval_s, confirm_acks=True)
    cpu = cpu_meter(ctx, "broker")
    try:
        await cconn.subscribe(topic, "default", PREFETCH, s.connect_timeout_s, batch=True)
        consumer.start()
        window = asyncio.Semaphore(max(1, s.window // PUBLISH_BATCH))  # <= window unconfirmed messages
        errors: list[str] = []
        pending: set[asyncio.Task[None]] = set()
        refs = itertools.count(1)

        async def send_batch(first: int, n: int) -> None:
            try:
                items = [
                    f'{{"topic":"{topic}","payload":{payload_text(seq, perf(), s.payload_bytes)}}}'
                    for seq in range(first, first + n)
                ]
                frame = {"op": "publish", "messages": [orjson.Fragment(i) for i in items]}
                reply = await pconn.request({**frame, "ref": f"b{next(refs)}"}, s.stall_timeout_s)
                bad = [r for r in reply.get("results", ()) if "error" in r]
                if reply.get("op") != "published" or bad:
                    errors.append(str(bad[:1] or reply)[:200])
            finally:
                window.release()

        cpu.start()
        t0 = perf()
        async with before(deadline, f"publishing {s.messages} messages in batches"):
            for first in range(0, s.messages, PUBLISH_BATCH):
                await window.acquire()
                abort.check()
                task = asyncio.create_task(send_batch(first, min(PUBLISH_BATCH, s.messages - first)))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*pending)
        await wait_for_event(consumer.done, abort, deadline, "all deliveries acked")
        t_end = consumer.t_done or perf()
        cpu.stop()
        await asyncio.sleep(s.settle_s)
        for e in errors[:5]:
            res.problem(f"publish batch: {e}")
        for p in consumer.problems(cconn.name):
            res.problem(p)
    finally:
        await consumer.stop()
        await cconn.close()
        await pconn.close()
    elapsed = t_end - t0
    res.add("throughput", s.messages / elapsed, "msg/s")
    add_cpu(res, cpu, s.messages)
    res.extra.update(
        messages=s.messages, publish_batch=PUBLISH_BATCH, ack_batch=ACK_BATCH, prefetch=PREFETCH, elapsed_s=elapsed
    )
    res.extra["delivery_latency"] = latency_summary(consumer.tracker.latencies)
    return res
