"""Scenarios ``s4`` (the retry path under S1's load, through the retry set) and ``reprocess`` (DLQ reprocess speed).

``s4`` is S1 with two changes: every publish carries its own retry policy ``backoff_base_ms`` (50 ms; the rest of
the default backoff policy applies: x multiplier per attempt, jitter), and the consumer nacks every 10th message
(sequence number divisible by 10) once, without ``delay_ms``, the first time it is delivered: the broker schedules
the retry (about 50 ms, jittered) in the group's retry set, it is delivered again as attempt 2 and acked. msg/s is
measured over the same span as S1 (first publish -> last ack) and compared with S1 from the same run. The retry's
delay from *due* to *delivered* is measured on a sample of the nacked messages (at most about 500): the nack
carries a ``ref``; once it is answered ``nacked`` (outcome ``retry``), a ``status`` lookup on a connection of its
own (two, up to 8 lookups in flight on each) reads the ``due`` time the broker chose; the delay is the wall clock
at the attempt-2 delivery minus ``due`` (same machine, same clock; milliseconds). A lookup that finds the message
no longer waiting (already moved to the queue) cannot know its due time: it is counted as ``retry_unresolved``
next to ``retry_samples``, both shown in the table; many unresolved lookups (a loaded machine, lookups queued
behind each other) bias the sample towards the retries that were looked up fastest.

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
from .procs import REPO_ROOT
from .registry import Context, ScenarioResult, percentile, scenario
from .scenarios import BrokerRun, _publish_all, add_cpu, cpu_meter, latency_summary, new_topic
from .wsclient import Abort, AckingConsumer, BrokerConn, Frame, before, payload_text, perf, wait_for_event

NACK_EVERY = 10  # s4: every 10th message is nacked once
DUE_SAMPLES = 500  # s4: most status lookups of nacked messages (their due time)
OBSERVERS = 2  # s4: connections for the lookups (the broker serves 8 lookups at once per connection)
DEAD_BATCH = 1_000  # reprocess: messages per publish frame


class NackingConsumer(AckingConsumer):
    """An ``AckingConsumer`` that nacks (backoff policy, no ``delay_ms``) the first delivery of every
    ``NACK_EVERY``-th message and acks everything else. A nacked delivery is not recorded in the tracker: its
    redelivery (attempt 2) is, so "every message exactly once" still means every message acked exactly once. Any
    delivery with an unexpected attempt number (a nacked message delivered as 1 twice, or a redelivery that is not
    2) is a problem. With ``observers`` (connections), sampled nacks get a ``status`` lookup of their due time."""

    observers: tuple[BrokerConn, ...] = ()
    topic = ""

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
        self._sample_every = max(1, math.ceil(len(range(0, expected, NACK_EVERY)) / DUE_SAMPLES))
        self._lookups: dict[int, asyncio.Semaphore] = {}  # per observer: 8 lookups in flight at most
        self._turn = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._nack_frames: list[bytes] = []
        self._nack_kick = asyncio.Event()
        self._nacker: asyncio.Task[None] | None = None

    def start(self) -> None:
        super().start()
        self._nacker = asyncio.create_task(self._nack_loop(), name=f"nacks-{self.conn.name}")

    async def stop(self) -> None:
        for task in [*self._tasks, *([self._nacker] if self._nacker else [])]:
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
            if nack_this:
                self.nacked[seq] = 1
                self._ids[seq] = str(d.get("id"))
                frame = {"op": "nack", "ref": f"n-{seq}", "id": d.get("id"), "receipt": d.get("receipt"), "error": "s4"}
                self._nack_frames.append(orjson.dumps(frame))
                self._nack_kick.set()
                return
            if expected == 2:
                self.redeliveries += 1
                self.delivered_ms[seq] = time.time() * 1000
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
            elif self.observers and (seq // NACK_EVERY) % self._sample_every == 0:
                task = asyncio.create_task(self._lookup(seq))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        else:
            self._attempt_problem(f"seq {seq}: nack answered {d.get('code')}: {d.get('message')}")
        return True

    async def _lookup(self, seq: int) -> None:
        self._turn = (self._turn + 1) % len(self.observers)
        observer = self.observers[self._turn]
        async with self._lookups.setdefault(self._turn, asyncio.Semaphore(8)):
            try:
                reply = await observer.request({"op": "status", "topic": self.topic, "id": self._ids[seq]}, 10)
            except BenchError as e:
                self.lookup_errors.append(str(e))
                return
        rows = reply.get("groups") or []
        row = rows[0] if rows and isinstance(rows[0], dict) else {}
        if row.get("state") == "retry_wait" and isinstance(row.get("due"), int):
            self.due_ms[seq] = row["due"]
        else:
            self.unresolved += 1

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


async def _s4_run(ctx: Context, tag: str, messages: int, cpu: Any = None) -> tuple[float, BrokerRun]:
    s = ctx.sizes
    observers: list[BrokerConn] = []
    try:
        for i in range(OBSERVERS):
            observers.append(await BrokerConn.open(ctx.broker_url, f"{tag}-observer{i}", Abort(), s.connect_timeout_s))
        async with BrokerRun(
            ctx,
            tag,
            messages,
            ["default"],
            ack_batch=s.ack_batch,
            consumer_cls=NackingConsumer,
            extra=f',"backoff_base_ms":{s.retry_backoff_base_ms}',
        ) as run:
            for c in run.consumers:
                assert isinstance(c, NackingConsumer)
                c.observers, c.topic = tuple(observers), run.topic
            if cpu is not None:
                cpu.start()
            t0 = await _publish_all(run)
            t_end = await run.finish()
            if cpu is not None:
                cpu.stop()
            await run.settle()
        return t_end - t0, run
    finally:
        for observer in observers:
            await observer.close()


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
    elapsed, run = await _s4_run(ctx, "s4", s.messages, cpu)
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
    if not delays:
        res.problem("no retry's due time could be read (status lookups found none waiting)")
    res.extra.update(
        messages=s.messages,
        payload_bytes=s.payload_bytes,
        backoff_base_ms=s.retry_backoff_base_ms,
        nacked=consumer.nacks_sent,
        deliveries=s.messages + consumer.redeliveries,
        elapsed_s=elapsed,
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
