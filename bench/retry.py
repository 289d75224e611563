"""Scenarios ``s4`` (the retry path under S1's load, through the retry set) and ``reprocess`` (DLQ reprocess speed).

``s4`` is S1 with two changes: every publish carries its own retry policy ``backoff_base_ms`` (50 ms; the rest of
the default backoff policy applies: x multiplier per attempt, jitter), and the consumer nacks every 10th message
(sequence number divisible by 10) once, without ``delay_ms``, the first time it is delivered: the broker schedules
the retry (about 50 ms, jittered) in the group's retry set, it is delivered again as attempt 2 and acked. msg/s is
measured over the same span as S1 (first publish -> last ack) and compared with S1 from the same run. The retry's
delay from *due* to *delivered* is measured on every nacked message: once its nack is answered ``nacked`` (outcome
``retry``), the bench reads the ``due`` time the broker chose straight from the group's retry set in Redis (``ZSCORE
<prefix>:{<topic>}:g:default:delayed <id>``, docs/keys.md; the lookups batched into one pipeline per turn of the loop,
on a connection of their own); the delay is the wall clock at the attempt-2 delivery minus ``due`` (same machine, same
clock; milliseconds). A lookup that finds the message no longer waiting (already moved to the queue) cannot know its
due time: it is counted as ``retry_unresolved`` next to ``retry_samples``.

Why not the broker's own ``status`` request (as until 2026-12-07, session 5): a ``status`` lookup costs the broker
about a millisecond of CPU (redis-py round trips) and, while the retry waits, cost Redis two ``LPOS`` scans of the
whole ready queue (the backlog: milliseconds each, during which Redis served nothing else). 500 of them took a third
of S4's throughput and inflated the very delay they sampled. A ``ZSCORE`` costs Redis a microsecond and the broker
nothing (docs/performance.md, session 5).

``reprocess`` makes dead letters through the protocol (batch publishes, a consumer that nacks each delivery with
``dead: true``, untimed), then runs the operator's command ``python -m broker dlq reprocess --topic T --group
default --all`` as a subprocess over all of them. ``with_cli`` = dead letters / the command's wall time;
``throughput`` subtracts the time the same command takes to start, connect and find nothing (a ``dlq purge`` of an
empty topic, measured right before).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import subprocess
import sys
import time
from typing import Any

import orjson

from . import BenchError
from .cmdstats import CommandStats
from .procs import REPO_ROOT
from .rawredis import Resp
from .registry import Context, ScenarioResult, percentile, scenario
from .scenarios import BrokerRun, _publish_all, add_cpu, cpu_meter, latency_summary, new_topic
from .wsclient import Abort, AckingConsumer, BrokerConn, Frame, before, payload_text, perf, wait_for_event

NACK_EVERY = 10  # s4: every 10th message is nacked once
DEAD_BATCH = 1_000  # reprocess: messages per publish frame


class NackingConsumer(AckingConsumer):
    """An ``AckingConsumer`` that nacks (backoff policy, no ``delay_ms``) the first delivery of every
    ``NACK_EVERY``-th message and acks everything else. A nacked delivery is not recorded in the tracker: its
    redelivery (attempt 2) is, so "every message exactly once" still means every message acked exactly once. Any
    delivery with an unexpected attempt number (a nacked message delivered as 1 twice, or a redelivery that is not
    2) is a problem. With ``redis`` (a connection to the broker's Redis) and ``delayed_key`` (the group's retry set),
    each nack answered ``retry`` gets its due time read there (``ZSCORE``, batched)."""

    redis: Resp | None = None
    delayed_key = ""

    def __init__(self, conn: BrokerConn, expected: int, **kw: Any) -> None:
        super().__init__(conn, expected, **kw)
        self.nacked = bytearray(expected)
        self.nacks_sent = 0
        self.redeliveries = 0
        self.outcomes: dict[str, int] = {}
        self.attempt_problems: list[str] = []
        self.attempt_problem_count = 0
        self.due_ms: dict[int, int] = {}  # seq -> due (epoch ms) the broker chose
        self.delivered_ms: dict[int, float] = {}  # seq -> wall clock (epoch ms) at the attempt-2 delivery
        self.unresolved = 0
        self.lookup_errors: list[str] = []
        self._ids: dict[int, str] = {}
        self._to_look_up: list[int] = []  # seqs whose nack was answered retry, due time not read yet
        self._look_kick = asyncio.Event()
        self._looker: asyncio.Task[None] | None = None
        self._nack_frames: list[bytes] = []
        self._nack_kick = asyncio.Event()
        self._nacker: asyncio.Task[None] | None = None
        self.last_first_at = 0.0  # perf() at the last attempt-1 delivery: what follows it is the retries' tail
        self._nacked_at: dict[int, float] = {}  # seq -> perf() at the delivery it nacked
        self.back_after_s: list[float] = []  # per retry: that delivery -> its attempt-2 delivery (s)

    def start(self) -> None:
        super().start()
        self._nacker = asyncio.create_task(self._nack_loop(), name=f"nacks-{self.conn.name}")

    async def stop(self) -> None:
        for task in (self._nacker, self._looker):
            if task is None:
                continue
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
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
            if expected == 1:
                self.last_first_at = now
            if nack_this:
                self.nacked[seq] = 1
                self._nacked_at[seq] = now
                self._ids[seq] = str(d.get("id"))
                frame = {"op": "nack", "ref": f"n-{seq}", "id": d.get("id"), "receipt": d.get("receipt"), "error": "s4"}
                self._nack_frames.append(orjson.dumps(frame))
                self._nack_kick.set()
                return
            if expected == 2:
                self.redeliveries += 1
                self.delivered_ms[seq] = time.time() * 1000
                if seq in self._nacked_at:
                    self.back_after_s.append(now - self._nacked_at[seq])
        super()._on_message(d, now)

    def _on_reply(self, d: Frame) -> bool:
        ref = d.get("ref")
        if not (isinstance(ref, str) and ref.startswith("n-")):
            return super()._on_reply(d)
        seq = int(ref[2:])
        if d.get("op") == "nacked":
            outcome = str(d.get("outcome"))
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            if outcome != "retry":
                self._attempt_problem(f"seq {seq}: nack outcome {outcome}, expected retry")
            elif self.redis is not None:
                if self._looker is None:  # (started here: ``redis`` is set after the run has started its consumers)
                    self._looker = asyncio.create_task(self._look_up_loop(self.redis), name=f"due-{self.conn.name}")
                self._to_look_up.append(seq)
                self._look_kick.set()
        else:
            self._attempt_problem(f"seq {seq}: nack answered {d.get('code')}: {d.get('message')}")
        return True

    async def _look_up_loop(self, redis: Resp) -> None:
        """Read the due time of every retry answered so far: one pipeline of ``ZSCORE``s per turn."""
        while True:
            await self._look_kick.wait()
            self._look_kick.clear()
            seqs, self._to_look_up = self._to_look_up, []
            if not seqs:
                continue
            try:
                scores = await redis.pipeline([Resp.pack("ZSCORE", self.delayed_key, self._ids[q]) for q in seqs])
            except (BenchError, OSError) as e:
                self.lookup_errors.append(f"ZSCORE {self.delayed_key}: {e}")
                return
            for q, score in zip(seqs, scores, strict=True):
                if score is None:
                    self.unresolved += 1  # already moved to the queue: its due time is gone
                else:
                    self.due_ms[q] = int(float(score))

    def retry_delays_ms(self) -> list[float]:
        return sorted(self.delivered_ms[s] - due for s, due in self.due_ms.items() if s in self.delivered_ms)

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
            out.append(f"{label}: {self.attempt_problem_count} wrong attempts or nack outcomes, e.g. {first}")
        want = len(range(0, self.tracker.expected, NACK_EVERY))
        if self.redeliveries != want:
            out.append(f"{label}: {self.redeliveries} of {want} nacked messages redelivered")
        return out

    def summary(self) -> dict[str, Any]:
        return {
            **super().summary(),
            "nacks_sent": self.nacks_sent,
            "nack_outcomes": self.outcomes,
            "redeliveries": self.redeliveries,
            "due_lookups": len(self.due_ms),
            "due_unresolved": self.unresolved,
            "lookup_errors": self.lookup_errors[:5],
        }


async def _s4_run(
    ctx: Context, tag: str, messages: int, cpu: Any = None, cmds: CommandStats | None = None
) -> tuple[float, float, BrokerRun]:
    """One S4 run; returns (first publish -> done, last first delivery -> done, the run)."""
    s = ctx.sizes
    redis = await Resp.open(ctx.redis_url)
    try:
        async with BrokerRun(
            ctx,
            tag,
            messages,
            ["default"],
            ack_batch=s.ack_batch,
            consumer_cls=NackingConsumer,
            extra=f',"backoff_base_ms":{s.retry_backoff_base_ms}',
        ) as run:
            prefix = ctx.broker_env.get("BROKER_REDIS_KEY_PREFIX", "mq")
            groups_key = f"{prefix}:{{{run.topic}}}:groups"
            (known,) = await redis.pipeline([Resp.pack("EXISTS", groups_key)])
            if not known:
                raise BenchError(f"{groups_key} is not in the broker's Redis: where are the topic's keys?")
            for c in run.consumers:
                assert isinstance(c, NackingConsumer)
                c.redis, c.delayed_key = redis, f"{prefix}:{{{run.topic}}}:g:default:delayed"
            if cmds is not None:
                await cmds.start()
            if cpu is not None:
                cpu.start()
            t0 = await _publish_all(run)
            t_end = await run.finish()
            if cpu is not None:
                cpu.stop()
            if cmds is not None:
                await cmds.stop()
            await run.settle()
    finally:
        await redis.close()
    consumer = run.consumers[0]
    assert isinstance(consumer, NackingConsumer)
    return t_end - t0, t_end - consumer.last_first_at, run


@scenario(
    "s4",
    needs=("broker",),
    title="S4 retries: S1 with every 10th message nacked once (backoff policy, base 50 ms) through the retry set;"
    " due->delivered p50/p99; ratio vs S1",
)
async def s4_retries(ctx: Context) -> ScenarioResult:
    s = ctx.sizes
    res = ScenarioResult("s4")
    if s.warmup_messages > 0:
        await _s4_run(ctx, "s4-warmup", s.warmup_messages)
    cpu = cpu_meter(ctx, "broker")
    cmds = CommandStats(ctx.redis_url)
    elapsed, tail, run = await _s4_run(ctx, "s4", s.messages, cpu, cmds)
    run.check(res)
    consumer = run.consumers[0]
    assert isinstance(consumer, NackingConsumer)
    delays = consumer.retry_delays_ms()
    res.add("throughput", s.messages / elapsed, "msg/s")
    res.add("retry_p50", percentile(delays, 50), "ms", higher_is_better=False)
    res.add("retry_p99", percentile(delays, 99), "ms", higher_is_better=False)
    res.add("retry_samples", len(delays), "lookups")
    res.add("retry_unresolved", consumer.unresolved, "lookups", higher_is_better=False)
    add_cpu(res, cpu, s.messages)
    cmds.add(res, s.messages)
    back = sorted(consumer.back_after_s)
    if not delays:
        res.problem("no retry's due time could be read (the retry set held none of them when read)")
    if consumer.lookup_errors:
        res.problem(f"reading due times failed: {consumer.lookup_errors[0]}")
    res.extra.update(
        messages=s.messages,
        payload_bytes=s.payload_bytes,
        backoff_base_ms=s.retry_backoff_base_ms,
        nacked=consumer.nacks_sent,
        deliveries=s.messages + consumer.redeliveries,
        elapsed_s=elapsed,
        tail_s=tail,
        nack_to_redelivery_ms={
            "p50": percentile(back, 50) * 1000,
            "p99": percentile(back, 99) * 1000,
            "max": back[-1] * 1000 if back else math.nan,
        },
        retry_delay_ms={
            "samples": len(delays),
            "unresolved": consumer.unresolved,
            "p50": percentile(delays, 50),
            "p90": percentile(delays, 90),
            "p99": percentile(delays, 99),
            "max": delays[-1] if delays else math.nan,
        },
        delivery_latency=latency_summary(consumer.tracker.latencies),
    )
    return res


# ---- reprocess -----------------------------------------------------------------------------------------------


async def _make_dead_letters(ctx: Context, topic: str, n: int, deadline: float) -> None:
    """Publish ``n`` messages to ``topic`` (batch frames) and nack every delivery with ``dead: true``; return when
    the broker has answered every nack ``dead``."""
    s = ctx.sizes
    abort = Abort()
    consumer = await BrokerConn.open(ctx.broker_url, "dead-letter-maker", abort, s.connect_timeout_s)
    publisher = await BrokerConn.open(ctx.broker_url, "dead-letter-publisher", abort, s.connect_timeout_s)
    dead = 0
    problems: list[str] = []
    all_dead = asyncio.Event()
    frames: list[bytes] = []
    kick = asyncio.Event()

    def on_message(d: Frame, now: float) -> None:
        frames.append(
            orjson.dumps({"op": "nack", "ref": 1, "id": d.get("id"), "receipt": d.get("receipt"), "dead": True})
        )
        kick.set()

    def on_reply(d: Frame) -> bool:
        nonlocal dead
        if d.get("ref") != 1:
            return False
        if d.get("op") == "nacked" and d.get("outcome") == "dead":
            dead += 1
            if dead == n:
                all_dead.set()
        elif len(problems) < 5:
            problems.append(str(d)[:200])
        return True

    async def nacker() -> None:
        while True:
            await kick.wait()
            kick.clear()
            while frames:
                batch = frames[:]
                del frames[:]
                for f in batch:
                    await consumer.send(f)

    consumer.on_message, consumer.on_reply = on_message, on_reply
    task = asyncio.create_task(nacker())
    try:
        await consumer.subscribe(topic, "default", 1_000, s.connect_timeout_s, batch=True)
        async with before(deadline, f"making {n:,} dead letters"):
            for first in range(0, n, DEAD_BATCH):
                k = min(DEAD_BATCH, n - first)
                items = [
                    f'{{"topic":"{topic}","payload":{payload_text(q, 0.0, s.payload_bytes)}}}'
                    for q in range(first, first + k)
                ]
                reply = await publisher.request({"op": "publish", "messages": [orjson.Fragment(x) for x in items]}, 30)
                if reply.get("op") != "published" or any("error" in r for r in reply.get("results", ())):
                    raise BenchError(f"publishing dead letters failed: {str(reply)[:200]}")
        await wait_for_event(all_dead, abort, deadline, f"{n:,} nacks answered dead ({dead:,} so far)")
        if problems:
            raise BenchError(f"nack dead refused: {problems[0]}")
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await consumer.close()
        await publisher.close()


def _dlq_cli(ctx: Context, *args: str, timeout_s: float) -> tuple[float, int, str, str]:
    """Run ``python -m broker dlq ARGS --redis-url <the bench's redis>``; return (seconds, exit code, out, err)."""
    env = {**os.environ, **ctx.broker_env, "BROKER_REDIS_URL": ctx.redis_url}
    argv = [sys.executable, "-m", "broker", "dlq", *args, "--redis-url", ctx.redis_url]
    t = perf()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(argv[1:])} did not finish within {timeout_s:g}s") from None
    return perf() - t, p.returncode, p.stdout, p.stderr


@scenario(
    "reprocess",
    needs=("broker",),
    title="DLQ reprocess: 100,000 dead letters made through the protocol, then `broker dlq reprocess --all`",
)
async def reprocess_dead_letters(ctx: Context) -> ScenarioResult:
    s = ctx.sizes
    n = s.dead_letters
    res = ScenarioResult("reprocess")
    topic = new_topic("reprocess")
    deadline = perf() + s.run_timeout_s
    t = perf()
    await _make_dead_letters(ctx, topic, n, deadline)
    created_s = perf() - t
    left = max(1.0, deadline - perf())
    empty = new_topic("reprocess-empty")
    startup_s, code, _, err = await asyncio.to_thread(_dlq_cli, ctx, "purge", "--topic", empty, "--yes", timeout_s=left)
    if code != 1 or "no dead letters match" not in err:
        res.problem(f"`broker dlq purge` of an empty topic: exit {code}: {err.strip()[-200:]}")
    wall_s, code, out, err = await asyncio.to_thread(
        _dlq_cli, ctx, "reprocess", "--topic", topic, "--group", "default", "--all", timeout_s=left
    )
    try:
        summary = orjson.loads(out.strip().splitlines()[-1])
    except (orjson.JSONDecodeError, IndexError):
        summary = {}
    if code != 0 or summary.get("reprocessed") != n or summary.get("missing"):
        res.problem(f"`broker dlq reprocess`: exit {code}, {summary or out.strip()[-200:]}; {err.strip()[-200:]}")
    res.add("throughput", n / max(1e-6, wall_s - startup_s), "msg/s")
    res.add("with_cli", n / wall_s, "msg/s")
    res.extra.update(
        dead_letters=n,
        payload_bytes=s.payload_bytes,
        create_s=created_s,
        cli_s=wall_s,
        cli_startup_s=startup_s,
        topic=topic,
        note="the reprocessed messages stay in the topic's queue (nothing consumes them)",
    )
    return res
