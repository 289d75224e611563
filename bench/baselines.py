"""NATS JetStream baselines, measured in the same run as the broker scenarios (the same-frames relay is in
``bench.scenarios``, the raw Redis lists in ``bench.rawredis``, RabbitMQ in ``bench.rabbitmq``).

nats, nats-s2, nats-s3   S1, S2 and S3 through NATS JetStream on 127.0.0.1:4222 (nats-py): a stream with file
           storage by default, ``js.publish_async`` with at most ``window`` unconfirmed PubAcks, one consumer
           connection per group, each with its own push consumer on the stream (a JetStream consumer is what a
           group is here), explicit acks, ``max_ack_pending = prefetch``, ``msg.ack()`` for every message.
           Done = every delivery recorded and each consumer connection's ``flush()`` answered (the server has
           every ack). The stream is deleted afterwards; CPU is the ``nats-server`` process's.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import orjson

from . import BenchError
from .registry import Context, ScenarioResult, scenario
from .scenarios import S1_TITLE, S2_TITLE, S3_TITLE, peer_scenario
from .wsclient import Abort, DeliveryTracker, payload_text, perf, wait_for_event

# ---- NATS JetStream ------------------------------------------------------------------------------------------


class NatsSkipped(Exception):
    pass


async def _nats_connect(url: str, timeout_s: float) -> Any:
    import nats  # imported lazily: the other scenarios do not need nats-py

    if not url.startswith(("nats://127.0.0.1:", "nats://localhost:")):
        raise NatsSkipped(f"refusing non-loopback NATS URL {url}")
    try:
        async with asyncio.timeout(timeout_s + 1):
            return await nats.connect(
                url,
                connect_timeout=timeout_s,
                allow_reconnect=False,
                max_reconnect_attempts=0,
                name="bench",
            )
    except Exception as e:
        raise NatsSkipped(f"NATS unreachable at {url}: {e!r}") from None


class NatsRun:
    """The outcome of one NATS run: elapsed (first publish -> last ack flushed), one tracker per group."""

    def __init__(self, trackers: list[DeliveryTracker], info: dict[str, Any]) -> None:
        self.trackers = trackers
        self.info = info
        self.elapsed = 0.0
        self.sent_span = 0.0  # paced runs: first -> last send
        self.max_lag = 0.0


async def _nats_once(ctx: Context, messages: int, groups: int, rate: float | None, cpu: Any = None) -> NatsRun:
    """Publish ``messages`` (windowed, or paced at ``rate``/s) to a fresh stream read by ``groups`` consumers."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType
    from nats.js.errors import APIError

    s = ctx.sizes
    timeout = s.connect_timeout_s
    # Like the broker scenarios: the publisher and every consumer have their own socket.
    nc = await _nats_connect(ctx.nats_url, timeout)
    subs_nc: list[Any] = []
    tag = uuid.uuid4().hex[:10]
    stream, subject = f"BENCH_{tag}", f"bench.{tag}"
    run = NatsRun([], {"stream": stream, "storage": ctx.nats_storage, "consumer": ctx.nats_consumer})
    created = False
    consumer_tasks: list[asyncio.Task[None]] = []
    subs: list[Any] = []
    try:
        for _ in range(groups):
            subs_nc.append(await _nats_connect(ctx.nats_url, timeout))
        js = nc.jetstream(timeout=timeout, publish_async_max_pending=s.window)
        storage = StorageType.FILE if ctx.nats_storage == "file" else StorageType.MEMORY
        try:
            await js.add_stream(name=stream, subjects=[subject], storage=storage)
            created = True
        except (APIError, TimeoutError) as e:
            raise NatsSkipped(f"JetStream not usable at {ctx.nats_url}: {e!r}") from None
        except Exception as e:
            if type(e).__name__ in ("NoRespondersError", "ServiceUnavailableError"):
                raise NatsSkipped(f"JetStream not enabled at {ctx.nats_url}: {e!r}") from None
            raise

        abort = Abort()
        deadline = perf() + s.run_timeout_s
        pub_errors: list[str] = []
        acked = [0] * groups
        loads = orjson.loads
        for i, conn in enumerate(subs_nc):
            # A fresh config per consumer: nats-py writes the deliver subject into the object it is given.
            config = ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                max_ack_pending=s.prefetch,
            )
            tracker = DeliveryTracker(messages)
            run.trackers.append(tracker)
            js_sub = conn.jetstream(timeout=timeout)

            async def on_msg(msg: Any, tracker: DeliveryTracker = tracker, i: int = i) -> None:
                tracker.record(loads(msg.data), perf())
                await msg.ack()  # fire-and-forget, like a NATS client normally acks; flushed before t_end
                acked[i] += 1

            if ctx.nats_consumer == "push":
                subs.append(await js_sub.subscribe(subject, stream=stream, cb=on_msg, manual_ack=True, config=config))
                continue
            sub = await js_sub.pull_subscribe(subject, durable=f"bench_{tag}_{i}", stream=stream, config=config)
            subs.append(sub)

            async def pull_loop(sub: Any = sub, tracker: DeliveryTracker = tracker, on_msg: Any = on_msg) -> None:
                try:
                    while not tracker.complete.is_set():
                        try:
                            msgs = await sub.fetch(batch=s.prefetch, timeout=0.5)
                        except TimeoutError:
                            continue
                        for m in msgs:
                            await on_msg(m)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    abort.set(f"NATS pull consumer: {e!r}")

            consumer_tasks.append(asyncio.create_task(pull_loop()))

        def on_puback(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled():
                pub_errors.append("cancelled")
            elif (exc := fut.exception()) is not None:
                pub_errors.append(repr(exc))
                abort.set(f"NATS publish failed: {exc!r}")

        if cpu is not None:
            cpu.start()
        t0 = perf()
        seq = 0
        interval = 1.0 / rate if rate else 0.0
        try:
            # One timeout around the whole loop: publish_async(wait_stall=...) would wrap every semaphore
            # acquire in asyncio.wait_for (a task per publish), which measured several times slower.
            async with asyncio.timeout(max(0.0, deadline - perf())):
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
                    data = payload_text(seq, perf(), s.payload_bytes).encode()
                    if seq == 0:
                        t0 = perf()
                    fut = await js.publish_async(subject, data)
                    fut.add_done_callback(on_puback)
                run.sent_span = perf() - t0
        except TimeoutError:
            raise BenchError(f"NATS run timed out after publishing {seq} of {messages}") from None
        try:
            async with asyncio.timeout(max(0.0, deadline - perf())):
                await js.publish_async_completed()
        except TimeoutError:
            raise BenchError(f"NATS: {js.publish_async_pending()} PubAcks still missing at the deadline") from None
        for tracker in run.trackers:
            await wait_for_event(tracker.complete, abort, deadline, "all NATS deliveries")
        for conn in subs_nc:
            await conn.flush(timeout=max(1, int(deadline - perf())))  # the server has every ack
        t_end = perf()
        if cpu is not None:
            cpu.stop()
        run.elapsed = t_end - t0
        await asyncio.sleep(s.settle_s)
        run.info.update(acked=sum(acked), publish_errors=pub_errors[:10])
        return run
    finally:
        for task in consumer_tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if created:
            try:
                async with asyncio.timeout(timeout):
                    await nc.jetstream().delete_stream(stream)
                run.info["stream_deleted"] = True
            except Exception as e:
                ctx.log(f"warning: could not delete NATS stream {stream}: {e!r}")
        for conn in [*subs_nc, nc]:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await conn.close()


async def _nats_scenario(ctx: Context, name: str, messages: int, groups: int, rate: float | None) -> ScenarioResult:
    return await peer_scenario(ctx, name, "nats", "NATS", _nats_once, NatsSkipped, messages, groups, rate)


NATS = "NATS JetStream (file storage, publish_async <=1,000 pending, explicit acks)"


@scenario("nats", needs=("nats",), title=f"{NATS}, S1: {S1_TITLE}", system="nats", shape="s1")
async def nats_s1(ctx: Context) -> ScenarioResult:
    return await _nats_scenario(ctx, "nats", ctx.sizes.messages, 1, None)


@scenario("nats-s2", needs=("nats",), title=f"{NATS}, S2: {S2_TITLE}", system="nats", shape="s2")
async def nats_s2(ctx: Context) -> ScenarioResult:
    s = ctx.sizes
    return await _nats_scenario(ctx, "nats-s2", s.fanout_messages, s.fanout_groups, None)


@scenario("nats-s3", needs=("nats",), title=f"{NATS}, S3: {S3_TITLE}", system="nats", shape="s3")
async def nats_s3(ctx: Context) -> ScenarioResult:
    s = ctx.sizes
    return await _nats_scenario(ctx, "nats-s3", int(s.latency_rate * s.latency_seconds), 1, s.latency_rate)
