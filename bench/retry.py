"""Issue 4 scenarios: ``s4`` (the retry path under S1's load) and ``reprocess`` (DLQ reprocess speed).

``s4`` is S1 with one change: the consumer nacks every 10th message (sequence number divisible by 10) once, with
``delay_ms: 0``, the first time it is delivered; the broker puts it back at the head of the queue, it is delivered
again (attempt 2) and acked. msg/s is measured over the same span as S1 (first publish -> last ack answered) and
compared with S1 from the same run (goal >= 0.8x).

``reprocess`` creates dead letters directly through the store API (``RedisStore.publish_many`` + ``claim`` +
``nack_many`` with ``dead=True``, 1,000 per batch) in the broker's redis-server under the broker's key prefix,
then times ``broker.ops.dlq.reprocess`` over all of them (what ``broker dlq reprocess --all`` runs after its
selection); the selection (``broker.ops.dlq.select``) is timed too and reported as ``with_select``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import orjson

from broker.core.config import Settings, load_settings
from broker.core.errors import BrokerError, ConfigError
from broker.core.model import NackItem, PublishRequest
from broker.ops import dlq as dlq_ops
from broker.runtime.resilience import Breaker
from broker.store import RedisStore, connect_redis
from broker.store.keys import topics_key

from . import BenchError
from .procs import REPO_ROOT
from .registry import Context, ScenarioResult, scenario
from .scenarios import BrokerRun, _publish_all, latency_summary, new_topic
from .wsclient import AckingConsumer, BrokerConn, Frame, before, payload_text, perf

NACK_EVERY = 10  # s4: every 10th message is nacked once
DEAD_BATCH = 1_000  # reprocess: dead letters made per publish/claim/nack round


class NackingConsumer(AckingConsumer):
    """An ``AckingConsumer`` that nacks (``delay_ms: 0``) the first delivery of every ``NACK_EVERY``-th message and
    acks everything else. A nacked delivery is not recorded in the tracker: its redelivery (attempt 2) is, so
    "every message exactly once" still means every message acked exactly once. Any delivery with an unexpected
    attempt number (a nacked message delivered as 1 twice, or a redelivery that is not 2) is a problem."""

    def __init__(self, conn: BrokerConn, expected: int, **kw: Any) -> None:
        super().__init__(conn, expected, **kw)
        self.nacked = bytearray(expected)
        self.nacks_sent = 0
        self.redeliveries = 0
        self.attempt_problems: list[str] = []
        self.attempt_problem_count = 0
        self._nack_frames: list[bytes] = []
        self._nack_kick = asyncio.Event()
        self._nacker: asyncio.Task[None] | None = None

    def start(self) -> None:
        super().start()
        self._nacker = asyncio.create_task(self._nack_loop(), name=f"nacks-{self.conn.name}")

    async def stop(self) -> None:
        if self._nacker is not None:
            self._nacker.cancel()
            with contextlib.suppress(BaseException):
                await self._nacker
        await super().stop()

    def _on_message(self, d: Frame, now: float) -> None:
        payload = d.get("payload")
        seq = payload.get("s") if isinstance(payload, dict) else None
        if isinstance(seq, int) and 0 <= seq < len(self.nacked):
            attempt = d.get("attempt")
            nack_this = seq % NACK_EVERY == 0 and not self.nacked[seq]
            expected = 1 if nack_this or seq % NACK_EVERY else 2
            if attempt != expected:
                self._attempt_problem(f"seq {seq} delivered as attempt {attempt}, expected {expected}")
            if nack_this:
                self.nacked[seq] = 1
                frame = {"op": "nack", "id": d.get("id"), "receipt": d.get("receipt"), "delay_ms": 0, "error": "s4"}
                self._nack_frames.append(orjson.dumps(frame))
                self._nack_kick.set()
                return
            if expected == 2:
                self.redeliveries += 1
        super()._on_message(d, now)

    def _attempt_problem(self, text: str) -> None:
        self.attempt_problem_count += 1
        if len(self.attempt_problems) < 10:
            self.attempt_problems.append(text)

    async def _nack_loop(self) -> None:
        while True:
            await self._nack_kick.wait()
            self._nack_kick.clear()
            while self._nack_frames:
                frames, self._nack_frames = self._nack_frames, []
                for frame in frames:
                    try:
                        await self.conn.send(frame)
                    except BenchError:
                        return
                    self.nacks_sent += 1

    def problems(self, label: str) -> list[str]:
        out = super().problems(label)
        if self.attempt_problem_count:
            first = self.attempt_problems[0]
            out.append(f"{label}: {self.attempt_problem_count} deliveries with a wrong attempt, e.g. {first}")
        want = len(range(0, self.tracker.expected, NACK_EVERY))
        if self.redeliveries != want:
            out.append(f"{label}: {self.redeliveries} of {want} nacked messages redelivered")
        return out

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "nacks_sent": self.nacks_sent, "redeliveries": self.redeliveries}


async def _warmup(ctx: Context) -> None:
    n = ctx.sizes.warmup_messages
    if n <= 0:
        return
    s = ctx.sizes
    async with BrokerRun(ctx, "s4-warmup", n, ["default"], ack_batch=s.ack_batch, consumer_cls=NackingConsumer) as run:
        await _publish_all(run)
        await run.finish()


@scenario(
    "s4",
    needs=("broker",),
    title="S4 retries: S1 with every 10th message nacked once (delay_ms 0) and redelivered; ratio vs S1",
)
async def s4_retries(ctx: Context) -> ScenarioResult:
    s = ctx.sizes
    res = ScenarioResult("s4")
    await _warmup(ctx)
    async with BrokerRun(
        ctx, "s4", s.messages, ["default"], ack_batch=s.ack_batch, consumer_cls=NackingConsumer
    ) as run:
        t0 = await _publish_all(run)
        t_end = await run.finish()
        await run.settle()
        run.check(res)
    consumer = run.consumers[0]
    assert isinstance(consumer, NackingConsumer)
    elapsed = t_end - t0
    res.add("throughput", s.messages / elapsed, "msg/s")
    res.extra.update(
        messages=s.messages,
        payload_bytes=s.payload_bytes,
        nacked=consumer.nacks_sent,
        deliveries=s.messages + consumer.redeliveries,
        elapsed_s=elapsed,
        delivery_latency=latency_summary(consumer.tracker.latencies),
    )
    return res


# ---- reprocess -----------------------------------------------------------------------------------------------


def broker_settings(ctx: Context) -> Settings:
    """The settings the bench's broker runs with (its key prefix above all): config/broker.toml, the environment
    and ``--broker-env``, merged the way ``python -m broker serve`` merges them."""
    env = {**os.environ, **ctx.broker_env, "BROKER_REDIS_URL": ctx.redis_url}
    default = REPO_ROOT / "config/broker.toml"
    config = None if env.get("BROKER_CONFIG") or not default.is_file() else default
    try:
        return load_settings(config, env)
    except ConfigError as e:
        raise BenchError(f"cannot read the broker's settings: {e.message}") from None


async def _make_dead_letters(store: RedisStore, topic: str, group: str, n: int, payload_bytes: int) -> None:
    who = "bench-reprocess"
    for first in range(0, n, DEAD_BATCH):
        k = min(DEAD_BATCH, n - first)
        reqs = [PublishRequest(topic, payload_text(seq, 0.0, payload_bytes)) for seq in range(first, first + k)]
        bad = [r for r in await store.publish_many(reqs) if isinstance(r, BrokerError)]
        if bad:
            raise BenchError(f"publish_many refused {len(bad)} of {k}: {bad[0].message}")
        got = await store.claim(topic, group, k, 600_000, who)
        if len(got) != k:
            raise BenchError(f"claimed {len(got)} of {k} just published")
        items = [(NackItem(d.id, d.receipt, "bench: rejected", 0, True), d.attempt, who) for d in got]
        outcomes = await store.nack_many(topic, group, items)
        if any(o.value != "dead" for o in outcomes):
            raise BenchError(f"nack_many(dead=True) answered {sorted({o.value for o in outcomes})}")


async def _drop_topic(store: RedisStore, topic: str) -> None:
    """Untimed cleanup, so later scenarios do not share Redis with 100,000 queued messages."""
    r = store.redis
    batch: list[str] = []
    async for key in r.scan_iter(match=f"{store.prefix}:{{{topic}}}:*", count=5_000):
        batch.append(key)
        if len(batch) >= 5_000:
            await r.unlink(*batch)
            batch = []
    if batch:
        await r.unlink(*batch)
    await r.srem(topics_key(store.prefix), topic)


@scenario(
    "reprocess",
    needs=("broker",),
    title="DLQ reprocess: 100,000 dead letters made through the store API, then dlq_ops.reprocess over all",
)
async def reprocess_dead_letters(ctx: Context) -> ScenarioResult:
    s = ctx.sizes
    n = s.dead_letters
    res = ScenarioResult("reprocess")
    settings = broker_settings(ctx)
    store = RedisStore(
        connect_redis(ctx.redis_url, settings), settings, Breaker("redis", fail_max=1_000, reset_timeout_s=1), "bench"
    )
    topic, group = new_topic("reprocess"), "default"
    deadline = perf() + s.run_timeout_s
    try:
        await store.ensure_group(topic, group)
        t = perf()
        async with before(deadline, f"creating {n:,} dead letters"):
            await _make_dead_letters(store, topic, group, n, s.payload_bytes)
        created_s = perf() - t
        (depth,) = await store.depths([(topic, group)])
        if depth.dead != n:
            res.problem(f"{depth.dead:,} dead letters in the index after creating {n:,}")
        async with before(deadline, f"reprocessing {n:,} dead letters"):
            t0 = perf()
            letters = await dlq_ops.select(store, dlq_ops.Filter(topic=topic, group=group))
            t1 = perf()
            moved, missing = await dlq_ops.reprocess(store, letters, None)
            t2 = perf()
        (depth,) = await store.depths([(topic, group)])
    except BrokerError as e:
        raise BenchError(f"store: {e.message}") from None
    finally:
        with contextlib.suppress(Exception):
            await _drop_topic(store, topic)
        await store.close()
    if len(letters) != n:
        res.problem(f"select found {len(letters):,} of {n:,} dead letters")
    if moved != n or missing:
        res.problem(f"reprocessed {moved:,} of {n:,}; {len(missing)} missing")
    if (depth.ready, depth.dead, depth.leased, depth.delayed) != (n, 0, 0, 0):
        res.problem(f"after reprocess: ready={depth.ready:,} dead={depth.dead:,} (expected ready={n:,}, dead=0)")
    res.add("throughput", n / (t2 - t1), "msg/s")
    res.add("with_select", n / (t2 - t0), "msg/s")
    res.extra.update(
        dead_letters=n,
        payload_bytes=s.payload_bytes,
        key_prefix=settings.redis.key_prefix,
        create_s=created_s,
        select_s=t1 - t0,
        reprocess_s=t2 - t1,
        topic=topic,
    )
    return res
