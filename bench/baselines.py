"""Baselines measured in the same run as the broker scenarios.

relay      S1's message count and payload through ``bench.relay`` (a bare websockets forwarder, no storage, no
           confirms, no acks): the cost of one Python WebSocket hop with this client. msgs/s = messages / (first
           send -> last receipt).
relay-lat  (not in the default set) S3's paced load through the relay: the latency floor of the harness itself.
nats       S1's message count and payload through NATS JetStream on 127.0.0.1:4222 (nats-py): a stream with
           file storage by default, ``js.publish_async`` with at most ``window`` unconfirmed PubAcks, one
           consumer with explicit acks (push by default, ``max_ack_pending = prefetch``). msgs/s = messages /
           (first publish -> last ack flushed to the server). The stream is deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import orjson

from . import BenchError
from .registry import Context, ScenarioResult, scenario
from .scenarios import add_latency, latency_summary
from .wsclient import Abort, DeliveryTracker, before, open_ws, payload_text, perf, publish_frame, wait_for_event

# ---- relay --------------------------------------------------------------------------------------------------


class RelayRun:
    def __init__(self, ctx: Context, messages: int) -> None:
        self.ctx = ctx
        self.messages = messages
        self.tracker = DeliveryTracker(messages)
        self.abort = Abort()
        self.deadline = perf() + ctx.sizes.run_timeout_s
        self.topic = f"relay.{uuid.uuid4().hex[:8]}"

    async def __aenter__(self) -> RelayRun:
        timeout = self.ctx.sizes.connect_timeout_s
        self.sub = await open_ws(self.ctx.relay_url + "/sub", timeout)
        try:
            async with asyncio.timeout(timeout):
                ready = await self.sub.recv()
            if orjson.loads(ready).get("op") != "ready":
                raise BenchError(f"relay: unexpected first frame {ready!r}")
            self.pub = await open_ws(self.ctx.relay_url + "/pub", timeout)
        except BaseException:
            await self.sub.close()
            raise
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        loads = orjson.loads
        recv = self.sub.recv
        try:
            while True:
                raw = await recv(decode=False)
                now = perf()
                d = loads(raw)
                self.tracker.record(d.get("payload") if isinstance(d, dict) else None, now)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.abort.set(f"relay consumer: {e!r}")

    async def __aexit__(self, *exc: object) -> None:
        self.reader.cancel()
        with contextlib.suppress(BaseException):
            await self.reader
        for ws in (self.pub, self.sub):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3):
                    await ws.close()

    async def send(self, seq: int) -> float:
        frame = publish_frame(seq, self.topic, self.ctx.sizes.payload_bytes)
        t = perf()
        await self.pub.send(frame, text=True)
        return t

    async def run_unpaced(self) -> float:
        """Send everything as fast as the socket takes it; return elapsed first send -> last receipt."""
        t0 = perf()
        async with before(self.deadline, f"sending {self.messages} messages to the relay"):
            for seq in range(self.messages):
                if seq % 1_000 == 0:
                    self.abort.check()
                stamp = await self.send(seq)
                if seq == 0:
                    t0 = stamp
        await wait_for_event(self.tracker.complete, self.abort, self.deadline, "all relayed messages")
        assert self.tracker.t_last is not None
        return self.tracker.t_last - t0


@scenario(
    "relay",
    needs=("relay",),
    title="Baseline: S1's messages through a bare websockets relay subprocess (no storage, no confirms, no acks)",
)
async def relay_throughput(ctx: Context) -> ScenarioResult:
    s = ctx.sizes
    res = ScenarioResult("relay")
    if s.warmup_messages > 0:
        async with RelayRun(ctx, s.warmup_messages) as warm:
            await warm.run_unpaced()
    async with RelayRun(ctx, s.messages) as run:
        elapsed = await run.run_unpaced()
        await asyncio.sleep(s.settle_s)
    for p in run.tracker.problems("relay consumer"):
        res.problem(p)
    res.add("throughput", s.messages / elapsed, "msg/s")
    res.extra.update(
        messages=s.messages,
        payload_bytes=s.payload_bytes,
        elapsed_s=elapsed,
        delivery=run.tracker.summary(),
        delivery_latency=latency_summary(run.tracker.latencies),
    )
    return res


@scenario(
    "relay-lat",
    needs=("relay",),
    title="Baseline (optional): S3's paced load through the relay -> latency floor of the harness",
    default=False,
)
async def relay_latency(ctx: Context) -> ScenarioResult:
    s = ctx.sizes
    res = ScenarioResult("relay-lat")
    n = int(s.latency_rate * s.latency_seconds)
    interval = 1.0 / s.latency_rate
    async with RelayRun(ctx, n) as run:
        t0 = perf()
        async with before(run.deadline, f"sending {n} paced messages to the relay"):
            for seq in range(n):
                due = t0 + seq * interval
                now = perf()
                if due > now:
                    await asyncio.sleep(due - now)
                if seq % 100 == 0:
                    run.abort.check()
                await run.send(seq)
        await wait_for_event(run.tracker.complete, run.abort, run.deadline, "all relayed messages")
    for p in run.tracker.problems("relay consumer"):
        res.problem(p)
    add_latency(res, run.tracker.latencies)
    res.extra.update(messages=n, delivery_latency=latency_summary(run.tracker.latencies))
    return res


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


async def _nats_once(ctx: Context, messages: int) -> tuple[float, DeliveryTracker, dict[str, Any]]:
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType
    from nats.js.errors import APIError

    s = ctx.sizes
    timeout = s.connect_timeout_s
    # Two connections, like the broker scenarios: the publisher and the consumer each have their own socket.
    nc = await _nats_connect(ctx.nats_url, timeout)
    try:
        nc_sub = await _nats_connect(ctx.nats_url, timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            await nc.close()
        raise
    tag = uuid.uuid4().hex[:10]
    stream, subject = f"BENCH_{tag}", f"bench.{tag}"
    info: dict[str, Any] = {"stream": stream, "storage": ctx.nats_storage, "consumer": ctx.nats_consumer}
    created = False
    try:
        js = nc.jetstream(timeout=timeout, publish_async_max_pending=s.window)
        js_sub = nc_sub.jetstream(timeout=timeout)
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

        tracker = DeliveryTracker(messages)
        abort = Abort()
        deadline = perf() + s.run_timeout_s
        pub_errors: list[str] = []
        acked = 0
        loads = orjson.loads
        config = ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=s.prefetch,
        )

        async def on_msg(msg: Any) -> None:
            nonlocal acked
            tracker.record(loads(msg.data), perf())
            await msg.ack()  # fire-and-forget, like a NATS client normally acks; flushed before t_end
            acked += 1

        consumer_task: asyncio.Task[None] | None = None
        if ctx.nats_consumer == "push":
            sub = await js_sub.subscribe(subject, stream=stream, cb=on_msg, manual_ack=True, config=config)
        else:
            sub = await js_sub.pull_subscribe(subject, durable=f"bench_{tag}", stream=stream, config=config)

            async def pull_loop() -> None:
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

            consumer_task = asyncio.create_task(pull_loop())

        def on_puback(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled():
                pub_errors.append("cancelled")
            elif (exc := fut.exception()) is not None:
                pub_errors.append(repr(exc))
                abort.set(f"NATS publish failed: {exc!r}")

        try:
            t0 = perf()
            seq = 0
            try:
                # One timeout around the whole loop: publish_async(wait_stall=...) would wrap every semaphore
                # acquire in asyncio.wait_for (a task per publish), which measured several times slower.
                async with asyncio.timeout(max(0.0, deadline - perf())):
                    for seq in range(messages):
                        if seq % 1_000 == 0:
                            abort.check()
                        data = payload_text(seq, perf(), s.payload_bytes).encode()
                        if seq == 0:
                            t0 = perf()
                        fut = await js.publish_async(subject, data)
                        fut.add_done_callback(on_puback)
            except TimeoutError:
                raise BenchError(f"NATS run timed out after publishing {seq} of {messages}") from None
            try:
                async with asyncio.timeout(max(0.0, deadline - perf())):
                    await js.publish_async_completed()
            except TimeoutError:
                raise BenchError(f"NATS: {js.publish_async_pending()} PubAcks still missing at the deadline") from None
            await wait_for_event(tracker.complete, abort, deadline, "all NATS deliveries")
            await nc_sub.flush(timeout=max(1, int(deadline - perf())))  # the server has every ack
            t_end = perf()
            await asyncio.sleep(s.settle_s)
        finally:
            if consumer_task is not None:
                consumer_task.cancel()
                with contextlib.suppress(BaseException):
                    await consumer_task
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        info.update(acked=acked, publish_errors=pub_errors[:10])
        return t_end - t0, tracker, info
    finally:
        if created:
            try:
                async with asyncio.timeout(timeout):
                    await nc.jetstream().delete_stream(stream)
                info["stream_deleted"] = True
            except Exception as e:
                ctx.log(f"warning: could not delete NATS stream {stream}: {e!r}")
        for conn in (nc_sub, nc):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await conn.close()


@scenario(
    "nats",
    needs=("nats",),
    title="Baseline: S1's messages through NATS JetStream (file storage, publish_async <=1,000 pending, explicit acks)",
)
async def nats_throughput(ctx: Context) -> ScenarioResult:
    s = ctx.sizes
    res = ScenarioResult("nats")
    try:
        if s.warmup_messages > 0:
            await _nats_once(ctx, s.warmup_messages)
        elapsed, tracker, info = await _nats_once(ctx, s.messages)
    except NatsSkipped as e:
        res.status = "skipped"
        res.note = f"baseline skipped: {e}"
        return res
    for p in tracker.problems("NATS consumer"):
        res.problem(p)
    res.add("throughput", s.messages / elapsed, "msg/s")
    res.extra.update(
        info,
        messages=s.messages,
        payload_bytes=s.payload_bytes,
        elapsed_s=elapsed,
        delivery=tracker.summary(),
        delivery_latency=latency_summary(tracker.latencies),
    )
    return res
