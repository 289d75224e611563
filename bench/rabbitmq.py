"""RabbitMQ baselines (``rabbitmq``, ``rabbitmq-s2``, ``rabbitmq-s3``): S1, S2 and S3 through the RabbitMQ on
127.0.0.1:5672 (a system service, not started by the bench), with aiormq (the asyncio AMQP client under aio-pika,
about half its CPU per publish), set up as a new user would for at-least-once delivery:

- a fanout exchange per run, one **durable** queue per group bound to it (S1/S3: one group, S2: 8);
- the publisher: one connection, a channel with **publisher confirms**, **persistent** messages, at most
  ``window`` unconfirmed (one task per publish awaiting its confirm; S3 on its schedule);
- one connection per group, ``basic_qos(prefetch_count = prefetch)``, manual ``ack`` of every message.

Done = every message delivered in every group and, on each consumer channel, a ``basic.qos`` round trip after the
last ack (the server has read every ack, like NATS's ``flush()``). Queues and exchange are deleted afterwards. CPU =
the RabbitMQ processes' (``beam.smp``, ``epmd``, ``erl_child_setup``, ``inet_gethost``). Without aiormq installed
(a dev dependency: `make test` and `make bench` install it) or without a server, the baseline reports ``SKIPPED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import orjson

from .cpumon import CpuMeter
from .registry import Context, ScenarioResult, scenario
from .scenarios import S1_TITLE, S2_TITLE, S3_TITLE, peer_scenario
from .wsclient import Abort, DeliveryTracker, before, payload_text, perf, wait_for_event

RABBIT = "RabbitMQ (durable queues, persistent messages, publisher confirms, manual acks)"


class RabbitSkipped(Exception):
    pass


async def _connect(url: str, timeout_s: float) -> Any:
    try:
        import aiormq
    except ImportError:
        raise RabbitSkipped("aiormq is not installed (pip install aiormq)") from None
    if not url.startswith(("amqp://guest:guest@127.0.0.1:", "amqp://127.0.0.1:", "amqp://localhost:")):
        raise RabbitSkipped(f"refusing non-loopback AMQP URL {url}")
    try:
        async with asyncio.timeout(timeout_s):
            return await aiormq.connect(url)
    except Exception as e:
        raise RabbitSkipped(f"RabbitMQ unreachable at {url}: {e!r}") from None


class RabbitRun:
    def __init__(self) -> None:
        self.trackers: list[DeliveryTracker] = []
        self.elapsed = 0.0
        self.sent_span = 0.0
        self.max_lag = 0.0
        self.info: dict[str, Any] = {}


async def _rabbit_once(
    ctx: Context, messages: int, groups: int, rate: float | None, cpu: CpuMeter | None = None
) -> RabbitRun:
    import aiormq

    s = ctx.sizes
    timeout = s.connect_timeout_s
    tag = uuid.uuid4().hex[:10]
    exchange = f"bench.{tag}"
    run = RabbitRun()
    abort = Abort()
    deadline = perf() + s.run_timeout_s
    conns: list[Any] = []
    queues: list[str] = []
    pub_ch: Any = None
    try:
        pub = await _connect(ctx.amqp_url, timeout)
        conns.append(pub)
        pub_ch = await pub.channel(publisher_confirms=True)
        await pub_ch.exchange_declare(exchange, exchange_type="fanout")
        props = aiormq.spec.Basic.Properties(delivery_mode=2)  # persistent
        loads = orjson.loads
        consumer_channels = []
        for i in range(groups):
            conn = await _connect(ctx.amqp_url, timeout)
            conns.append(conn)
            ch = await conn.channel()
            await ch.basic_qos(prefetch_count=s.prefetch)
            queue = f"{exchange}.g{i}"
            await ch.queue_declare(queue, durable=True)
            queues.append(queue)
            await ch.queue_bind(queue, exchange)
            consumer_channels.append(ch)
            tracker = DeliveryTracker(messages)
            run.trackers.append(tracker)

            async def on_message(msg: Any, tracker: DeliveryTracker = tracker, ch: Any = ch) -> None:
                tracker.record(loads(msg.body), perf())
                await ch.basic_ack(msg.delivery_tag)

            await ch.basic_consume(queue, on_message, no_ack=False)

        window = asyncio.Semaphore(s.window)
        pending: set[asyncio.Task[None]] = set()
        errors: list[str] = []

        async def publish(seq: int) -> None:
            try:
                body = payload_text(seq, perf(), s.payload_bytes).encode()
                await pub_ch.basic_publish(body, exchange=exchange, properties=props)
            except Exception as e:
                errors.append(repr(e))
                abort.set(f"RabbitMQ publish failed: {e!r}")
            finally:
                window.release()

        if cpu is not None:
            cpu.start()
        t0 = perf()
        interval = 1.0 / rate if rate else 0.0
        async with before(deadline, f"publishing {messages} messages to RabbitMQ"):
            for seq in range(messages):
                if rate:
                    due = t0 + seq * interval
                    now = perf()
                    if due > now:
                        await asyncio.sleep(due - now)
                    else:
                        run.max_lag = max(run.max_lag, now - due)
                if seq % 1_000 == 0:
                    abort.check()
                await window.acquire()
                if seq == 0:
                    t0 = perf()
                task = asyncio.create_task(publish(seq))
                pending.add(task)
                task.add_done_callback(pending.discard)
            run.sent_span = perf() - t0
            if pending:
                await asyncio.gather(*pending)
        for tracker in run.trackers:
            await wait_for_event(tracker.complete, abort, deadline, "all RabbitMQ deliveries")
        for ch in consumer_channels:
            await ch.basic_qos(prefetch_count=s.prefetch)  # a round trip: every earlier ack was read
        t_end = perf()
        if cpu is not None:
            cpu.stop()
        run.elapsed = t_end - t0
        await asyncio.sleep(s.settle_s)
        run.info.update(publish_errors=errors[:10], exchange=exchange)
        return run
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                cleanup = await conns[0].channel() if conns else None
                if cleanup is not None:
                    for q in queues:
                        await cleanup.queue_delete(q)
                    await cleanup.exchange_delete(exchange)
        for conn in reversed(conns):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await conn.close()


async def _rabbit_scenario(ctx: Context, name: str, messages: int, groups: int, rate: float | None) -> ScenarioResult:
    return await peer_scenario(ctx, name, "rabbitmq", "RabbitMQ", _rabbit_once, RabbitSkipped, messages, groups, rate)


@scenario("rabbitmq", needs=("rabbitmq",), title=f"{RABBIT}, S1: {S1_TITLE}", system="rabbitmq", shape="s1")
async def rabbitmq_s1(ctx: Context) -> ScenarioResult:
    return await _rabbit_scenario(ctx, "rabbitmq", ctx.sizes.messages, 1, None)


@scenario("rabbitmq-s2", needs=("rabbitmq",), title=f"{RABBIT}, S2: {S2_TITLE}", system="rabbitmq", shape="s2")
async def rabbitmq_s2(ctx: Context) -> ScenarioResult:
    s = ctx.sizes
    return await _rabbit_scenario(ctx, "rabbitmq-s2", s.fanout_messages, s.fanout_groups, None)


@scenario("rabbitmq-s3", needs=("rabbitmq",), title=f"{RABBIT}, S3: {S3_TITLE}", system="rabbitmq", shape="s3")
async def rabbitmq_s3(ctx: Context) -> ScenarioResult:
    s = ctx.sizes
    return await _rabbit_scenario(ctx, "rabbitmq-s3", int(s.latency_rate * s.latency_seconds), 1, s.latency_rate)
