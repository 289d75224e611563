"""Baseline: raw Redis lists, the storage floor (``redis``, ``redis-s2``, ``redis-s3``).

The bench process talks to a redis-server of its own (started like the broker's: AOF on, ``appendfsync
everysec``, RDB off) with redis-py, no broker in between. One list pair per group:

- publish: ``LPUSH <ready>`` of the payload text for every group, pipelined per batch of ``PUBLISH_BATCH``
  messages, at most ``window`` messages unconfirmed (S3: one message per pipeline, on its schedule);
- consume (one connection per group): one pipeline per round holding the acks of the previous round
  (``LREM <processing> -1 <payload>``) and up to ``prefetch`` ``LMOVE <ready> <processing> RIGHT LEFT``; when the
  queue is empty a ``BLMOVE`` with a 50 ms timeout waits for the next message. A consumer therefore holds at most
  ``prefetch`` unacked messages, like the broker's subscriptions.

Done = every message delivered in every group and the last acks' pipeline answered. CPU = the redis-server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import orjson

from . import BenchError
from .registry import Context, ScenarioResult, scenario
from .scenarios import S1_TITLE, S2_TITLE, S3_TITLE, add_shape_measures, cpu_meter, latency_summary
from .wsclient import Abort, DeliveryTracker, before, payload_text, perf

PUBLISH_BATCH = 100
BLOCK_S = 0.05


class Resp:
    """A minimal Redis connection: commands packed by hand, one write per pipeline, replies parsed by hiredis.

    redis-py's asyncio client spends far more CPU per pipeline call (timeouts, retries, hooks) than Redis spends on
    the commands, which would make this baseline measure the client instead of Redis."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import hiredis  # lazily: only this baseline needs it (installed with redis-py's hiredis extra)

        self.reader = reader
        self.writer = writer
        self.parser = hiredis.Reader()

    @classmethod
    async def open(cls, url: str) -> Resp:
        if url.startswith("unix://"):  # the redis-server's own socket (procs.RedisServer.url_for)
            reader, writer = await asyncio.open_unix_connection(url.removeprefix("unix://").split("?", 1)[0])
            return cls(reader, writer)
        if not url.startswith("redis://127.0.0.1:"):
            raise BenchError(f"refusing non-loopback Redis URL {url}")
        port = int(url.removeprefix("redis://127.0.0.1:").split("/", 1)[0])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    @staticmethod
    def pack(*args: bytes | str) -> bytes:
        parts = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a.encode() if isinstance(a, str) else a
            parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(parts)

    async def pipeline(self, commands: list[bytes]) -> list[Any]:
        """Send packed ``commands`` in one write; return their replies in order (errors raise)."""
        self.writer.write(b"".join(commands))
        out: list[Any] = []
        while len(out) < len(commands):
            reply = self.parser.gets()
            if reply is False:
                data = await self.reader.read(65_536)
                if not data:
                    raise BenchError("Redis closed the connection")
                self.parser.feed(data)
                continue
            if isinstance(reply, Exception):
                raise BenchError(f"Redis: {reply}")
            out.append(reply)
        return out

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


class RawRedisRun:
    def __init__(self, ctx: Context, messages: int, groups: int) -> None:
        self.ctx = ctx
        self.sizes = ctx.sizes
        self.messages = messages
        tag = uuid.uuid4().hex[:10]
        self.keys = [(f"bench:{tag}:g{i}:ready", f"bench:{tag}:g{i}:processing") for i in range(groups)]
        self.trackers = [DeliveryTracker(messages) for _ in range(groups)]
        self.t_done = [0.0] * groups
        self.abort = Abort()
        self.deadline = perf() + ctx.sizes.run_timeout_s
        self.pool: asyncio.Queue[Resp] = asyncio.Queue()  # publisher connections (one pipeline in flight each)
        self.conns: list[Resp] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.window = asyncio.Semaphore(ctx.sizes.window)
        self.inflight: set[asyncio.Task[None]] = set()
        self.errors: list[str] = []

    async def __aenter__(self) -> RawRedisRun:
        url = self.ctx.raw_redis_url
        try:
            async with asyncio.timeout(self.sizes.connect_timeout_s):
                for _ in range(max(1, self.sizes.window // PUBLISH_BATCH)):
                    conn = await Resp.open(url)
                    self.conns.append(conn)
                    self.pool.put_nowait(conn)
                subs = []
                for _ in self.keys:
                    subs.append(await Resp.open(url))
                    self.conns.append(subs[-1])
        except (OSError, TimeoutError) as e:
            await self.__aexit__()
            raise BenchError(f"cannot connect to {url}: {e!r}") from None
        for i, r in enumerate(subs):
            self.tasks.append(asyncio.create_task(self._consume(i, r), name=f"rawredis-consumer-{i}"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in [*self.tasks, *self.inflight]:
            t.cancel()
            with contextlib.suppress(BaseException):
                await t
        if self.conns:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    fresh = await Resp.open(self.ctx.raw_redis_url)
                    await fresh.pipeline([Resp.pack("DEL", *[k for pair in self.keys for k in pair])])
                    await fresh.close()
        for conn in self.conns:
            await conn.close()

    async def _push(self, values: list[bytes]) -> None:
        conn = await self.pool.get()
        try:
            await conn.pipeline([Resp.pack("LPUSH", ready, v) for v in values for ready, _ in self.keys])
        except Exception as e:
            self.errors.append(repr(e))
            self.abort.set(f"raw Redis publish failed: {e!r}")
        finally:
            self.pool.put_nowait(conn)
            for _ in values:
                self.window.release()

    async def publish(self, first: int, n: int) -> float:
        """Send messages first..first+n-1 in one pipeline once the window has room; return the first's stamp."""
        for _ in range(n):
            await self.window.acquire()
        stamp = perf()
        size = self.sizes.payload_bytes
        values = [payload_text(seq, perf(), size).encode() for seq in range(first, first + n)]
        task = asyncio.create_task(self._push(values))
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)
        return stamp

    async def publish_all(self) -> float:
        t0 = perf()
        async with before(self.deadline, f"publishing {self.messages} messages to Redis"):
            for first in range(0, self.messages, PUBLISH_BATCH):
                self.abort.check()
                stamp = await self.publish(first, min(PUBLISH_BATCH, self.messages - first))
                if first == 0:
                    t0 = stamp
        return t0

    async def _consume(self, i: int, r: Resp) -> None:
        ready, processing = self.keys[i]
        tracker = self.trackers[i]
        prefetch = self.sizes.prefetch
        loads = orjson.loads
        pack = Resp.pack
        lmove = pack("LMOVE", ready, processing, "RIGHT", "LEFT")
        blmove = pack("BLMOVE", ready, processing, "RIGHT", "LEFT", str(BLOCK_S))
        acks: list[bytes] = []
        want = 1
        try:
            while True:
                done = tracker.complete.is_set()
                commands = [pack("LREM", processing, "-1", v) for v in acks]
                commands += [lmove] * (0 if done else want)
                out = await r.pipeline(commands)
                got = [v for v in out[len(acks) :] if v is not None]
                acks = []
                if done:
                    self.t_done[i] = perf()  # the last acks' pipeline was answered
                    return
                if not got:
                    (v,) = await r.pipeline([blmove])
                    if v is None:
                        want = 1
                        continue
                    got = [v]
                now = perf()
                for v in got:
                    tracker.record(loads(v), now)
                acks = got
                want = min(prefetch, len(got) * 2) if len(got) >= want else max(1, len(got))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.errors.append(repr(e))
            self.abort.set(f"raw Redis consumer {i}: {e!r}")

    async def finish(self) -> float:
        async with before(self.deadline, "waiting for the last publishes"):
            while self.inflight:
                await asyncio.gather(*list(self.inflight), return_exceptions=True)
        for task in self.tasks:
            try:
                async with asyncio.timeout(max(0.0, self.deadline - perf())):
                    await asyncio.shield(task)
            except TimeoutError:
                state = "; ".join(f"g{i}: {t.unique:,}/{t.expected:,}" for i, t in enumerate(self.trackers))
                raise BenchError(f"raw Redis: timed out waiting for deliveries ({state})") from None
            self.abort.check()
        return max(self.t_done)


async def _paced(run: RawRedisRun, n: int, rate: float) -> tuple[float, float]:
    interval = 1.0 / rate
    t0 = perf()
    last, max_lag = t0, 0.0
    async with before(run.deadline, f"publishing {n} paced messages to Redis"):
        for seq in range(n):
            due = t0 + seq * interval
            now = perf()
            if due > now:
                await asyncio.sleep(due - now)
            else:
                max_lag = max(max_lag, now - due)
            if seq % 100 == 0:
                run.abort.check()
            last = await run.publish(seq, 1)
    return last - t0, max_lag


async def _rawredis(ctx: Context, name: str, messages: int, groups: int, rate: float | None) -> ScenarioResult:
    s = ctx.sizes
    res = ScenarioResult(name)
    if s.warmup_messages > 0:
        async with RawRedisRun(ctx, s.warmup_messages, groups) as warm:
            await warm.publish_all()
            await warm.finish()
    cpu = cpu_meter(ctx, "rawredis")
    async with RawRedisRun(ctx, messages, groups) as run:
        cpu.start()
        sent_span, max_lag = 0.0, 0.0
        if rate:
            sent_span, max_lag = await _paced(run, messages, rate)
            t0 = perf()
        else:
            t0 = await run.publish_all()
        t_end = await run.finish()
        cpu.stop()
    for i, tracker in enumerate(run.trackers):
        for p in tracker.problems(f"raw Redis consumer g{i}"):
            res.problem(p)
    for e in run.errors[:3]:
        res.problem(e)
    latencies = [x for t in run.trackers for x in t.latencies]
    add_shape_measures(
        res,
        cpu,
        messages=messages,
        groups=groups,
        rate=rate,
        elapsed_s=t_end - t0,
        latencies_s=latencies,
        sent_span_s=sent_span,
        max_lag_s=max_lag,
    )
    res.extra.update(
        messages=messages,
        groups=groups,
        payload_bytes=s.payload_bytes,
        publish_batch=PUBLISH_BATCH,
        delivery=[t.summary() for t in run.trackers],
        delivery_latency=latency_summary(latencies),
    )
    return res


RAW = "Raw Redis lists (LPUSH; LMOVE to processing + LREM on ack, pipelined; AOF everysec)"


@scenario("redis", needs=("rawredis",), title=f"{RAW}, S1: {S1_TITLE}", system="rawredis", shape="s1")
async def rawredis_s1(ctx: Context) -> ScenarioResult:
    return await _rawredis(ctx, "redis", ctx.sizes.messages, 1, None)


@scenario("redis-s2", needs=("rawredis",), title=f"{RAW}, S2: {S2_TITLE}", system="rawredis", shape="s2")
async def rawredis_s2(ctx: Context) -> ScenarioResult:
    s = ctx.sizes
    return await _rawredis(ctx, "redis-s2", s.fanout_messages, s.fanout_groups, None)


@scenario("redis-s3", needs=("rawredis",), title=f"{RAW}, S3: {S3_TITLE}", system="rawredis", shape="s3")
async def rawredis_s3(ctx: Context) -> ScenarioResult:
    s = ctx.sizes
    return await _rawredis(ctx, "redis-s3", int(s.latency_rate * s.latency_seconds), 1, s.latency_rate)
