"""Supervised background work: no loop of a broker node stops, stalls or fails silently.

Every long-running loop (the sweep, heartbeat, DLQ prune, depth gauges, one delivery loop per (topic, group), and
the watchdog itself) runs as a named ``Loop`` under the node's ``Supervisor``:

- a step that raises is logged (``loop_step_failed``, bounded, for an expected ``UnavailableError``;
  ``loop_failed`` with the traceback for anything else), counted (``broker_loop_errors_total{loop}``), and tried
  again after a jittered exponential backoff computed by tenacity (``resilience.LoopBackoff``);
- ``loops.fail_threshold`` consecutive failures make the loop *failing* (``loop_unhealthy``): ``/readyz`` is 503
  with ``loop <name> failing: <error>`` until a step succeeds again (``loop_recovered``);
- when the dependency is back (``retry_failing_now``: the Redis breaker half-opened or closed), a loop that has
  failed tries again at once, and until its next success its backoff starts over from ``RECOVERY_BACKOFF_S``
  (never above its own): a try that fails just after an outage (a connection the outage left dead, a call that was
  under way when the breaker closed) does not keep it failing, and ``/readyz`` red, for a whole interval-long
  backoff (``dlq_prune``'s is 30 s) while everything works;
- a loop that reports no progress (``Loop.beat``) for its stall timeout past the wait it announced is *stalled*
  (``loop_stalled``, ``/readyz`` 503) until it beats again; the watchdog checks every second;
- a loop whose task ends unexpectedly (an exception escaped its body, or the body returned while the loop should
  still run) is logged (``loop_task_ended``) and restarted after the same backoff (``loop_restarted``).

Fire-and-forget tasks are not loops: ``watch_task`` makes one log ``task_failed`` if it ends with an exception.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from broker.core.config import LoopSettings
from broker.core.errors import BrokerError, UnavailableError
from broker.runtime import metrics
from broker.runtime.resilience import LoopBackoff

log = structlog.get_logger("broker.supervisor")

WATCHDOG_PERIOD_S = 1.0
STALL_INTERVALS = 5  # a loop may be silent for this many of its intervals (at least loops.stall_timeout_s)
LOG_EVERY = 20  # an expected failure (Redis unavailable) is logged the 1st time, then every 20th
MIN_BACKOFF_S = 0.1  # backoff base for loops with a shorter interval
RECOVERY_BACKOFF_S = 1.0  # backoff base after the dependency came back, for loops with a longer one (see Loop.failed)
MAX_ERROR_CHARS = 300

Clock = Callable[[], float]


class DegradedError(BrokerError):
    """A step did its work except for a part it could not do (e.g. the sweep skipped an unreadable topic and swept
    every other one). The loop counts as failing (logged, counted, /readyz after the threshold) but keeps its normal
    pace: backing off would starve the healthy part of its work."""


def describe(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, BrokerError) else f"{type(exc).__name__}: {exc}"
    return text[:MAX_ERROR_CHARS]


class Loop:
    """Health of one named loop. Its code reports here: ``beat`` (alive; ``wait_s`` is the pause it plans next),
    ``succeeded`` after a good step, ``failed`` after a bad one (which answers how long to back off)."""

    def __init__(self, sup: Supervisor, name: str, interval_s: float, backoff_cap_s: float | None = None) -> None:
        self.name = name
        self.kind = name.split(":", 1)[0]  # the metrics label: `dispatch` for every dispatch:<topic>/<group>
        self.interval_s = interval_s
        self.stall_after_s = max(sup.policy.stall_timeout_s, STALL_INTERVALS * interval_s)
        self.failures = 0  # consecutive
        self.last_error = ""
        self.last_unavailable = False  # the last error was `unavailable` (Redis, or one cluster master, away)
        self.failing = False
        self.stalled = False
        self.restarts = 0
        cap = sup.policy.backoff_cap_s if backoff_cap_s is None else min(backoff_cap_s, sup.policy.backoff_cap_s)
        self.backoff = LoopBackoff(max(interval_s, MIN_BACKOFF_S), cap)
        # after the dependency came back: the same curve from a lower base, never above the normal backoff
        self.recovery_backoff = LoopBackoff(min(RECOVERY_BACKOFF_S, self.backoff.base_s), self.backoff.cap_s)
        self.failures_at_recovery: int | None = None  # ``failures`` when retry_failing_now came; None: no recovery
        self._sup = sup
        self.last_beat = sup.clock()
        self.due = self.last_beat + self.stall_after_s  # stalled when no beat by then

    def beat(self, wait_s: float = 0.0) -> None:
        now = self._sup.clock()
        self.last_beat = now
        self.due = now + wait_s + self.stall_after_s
        if self.stalled:
            self.stalled = False
            log.info("loop_recovered", loop=self.name, after_failures=self.failures, was="stalled")
            self._sup.health_changed(self)

    def succeeded(self) -> None:
        if not self.failures:
            return
        log.info("loop_recovered", loop=self.name, after_failures=self.failures,
                 was="failing" if self.failing else "retrying")  # fmt: skip
        self.failures = 0
        self.failures_at_recovery = None
        self.last_error = ""
        if self.failing:
            self.failing = False
            self._sup.health_changed(self)

    def failed(self, exc: BaseException) -> float:
        """A step raised ``exc``: log, count, and answer the backoff (seconds) before the next try."""
        self._count(exc)
        bounded = self.failures == 1 or self.failures % LOG_EVERY == 0
        if isinstance(exc, UnavailableError):  # expected while Redis is away: loud once, then bounded
            if bounded:
                log.warning("loop_step_failed", loop=self.name, error=self.last_error, failures=self.failures)
        elif bounded or not isinstance(exc, DegradedError):  # a degraded step repeats at full pace: bounded too
            log.exception("loop_failed", loop=self.name, failures=self.failures, exc_info=exc)
        wait = self._after_failure()
        return self.interval_s if isinstance(exc, DegradedError) else wait

    def recovered(self) -> None:
        """The dependency this loop failed on looks healthy again (``Supervisor.retry_failing_now``): until its next
        success, a failure backs off as if it were the first since then, from ``recovery_backoff``'s lower base."""
        if self.failures:
            self.failures_at_recovery = self.failures

    def ended(self, exc: BaseException | None, restarting: bool = True) -> float:
        """The loop's task ended unexpectedly: log, count, answer the wait before its restart."""
        self._count(exc)
        wait = self._backoff()
        restart_in_s = round(wait, 2) if restarting else None
        if exc is not None:
            log.exception("loop_task_ended", loop=self.name, reason="raised", restart_in_s=restart_in_s, exc_info=exc)
        else:
            log.error("loop_task_ended", loop=self.name, reason="returned", restart_in_s=restart_in_s)
        self._after_failure()
        return wait

    def _count(self, exc: BaseException | None) -> None:
        self.failures += 1
        self.last_error = describe(exc) if exc is not None else "the loop returned while it should run"
        self.last_unavailable = isinstance(exc, UnavailableError)
        metrics.loop_errors.labels(self.kind).inc()

    def _after_failure(self) -> float:
        if self.failures >= self._sup.policy.fail_threshold and not self.failing:
            self.failing = True
            log.error("loop_unhealthy", loop=self.name, failures=self.failures, error=self.last_error)
            self._sup.health_changed(self)
        return self._backoff()

    def _backoff(self) -> float:
        """The wait after the latest failure: the normal backoff, or after a recovery the recovery backoff counted
        from the failures since then (bounded: it grows back to the normal one)."""
        if self.failures_at_recovery is None:
            return self.backoff(self.failures)
        return self.recovery_backoff(self.failures - self.failures_at_recovery)

    def problem(self, now: float) -> str | None:
        """Why this loop makes the node unready, or None."""
        if self.failing:
            return f"loop {self.name} failing: {self.last_error} ({self.failures} consecutive failures)"
        if self.stalled:
            return f"loop {self.name} stalled: no progress for {now - self.last_beat:.0f}s"
        return None


class Supervisor:
    """Runs loops (restarting any whose task ends early), watches them for stalls, answers for readiness."""

    def __init__(self, policy: LoopSettings, clock: Clock = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self.loops: dict[str, Loop] = {}
        self.stopping = asyncio.Event()
        self._retry_now = asyncio.Event()  # set and replaced by retry_failing_now(): wakes loops waiting out a backoff
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- loops ---------------------------------------------------------------------------------------------

    def loop(self, name: str, interval_s: float, backoff_cap_s: float | None = None) -> Loop:
        """Register a loop's health record (replacing one of the same name)."""
        loop = self.loops[name] = Loop(self, name, interval_s, backoff_cap_s)
        return loop

    def forget(self, loop: Loop) -> None:
        if self.loops.get(loop.name) is loop:
            del self.loops[loop.name]
            if loop.failing or loop.stalled:
                self.health_changed(loop)

    def run(
        self, loop: Loop, body: Callable[[], Awaitable[None]], should_run: Callable[[], bool]
    ) -> asyncio.Task[None]:
        """Run ``body`` as ``loop``'s task; restart it whenever it ends while ``should_run()`` (and the supervisor
        is not stopping). The loop is forgotten when its task ends for good."""
        task = asyncio.create_task(self._guard(loop, body, should_run), name=loop.name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return watch_task(task)

    def periodic(
        self, name: str, step: Callable[[], Awaitable[object]], interval_s: float, backoff_cap_s: float | None = None
    ) -> Loop:
        """``step`` every ``interval_s`` until the supervisor stops; a failed step is retried after the loop's
        backoff instead."""
        loop = self.loop(name, interval_s, backoff_cap_s)

        async def body() -> None:
            while not self.stopping.is_set():
                loop.beat()
                try:
                    await step()
                except Exception as e:
                    wait = loop.failed(e)
                else:
                    loop.succeeded()
                    wait = interval_s
                loop.beat(wait)
                await self.sleep(wait, retrying=loop.failures > 0)

        self.run(loop, body, lambda: not self.stopping.is_set())
        return loop

    async def _guard(self, loop: Loop, body: Callable[[], Awaitable[None]], should_run: Callable[[], bool]) -> None:
        try:
            while True:
                error: Exception | None = None
                try:
                    await body()
                except Exception as e:
                    error = e
                running = should_run() and not self.stopping.is_set()
                if not running and error is None:
                    return  # a normal end: nothing left to do (no consumers, or shutdown)
                wait = loop.ended(error, restarting=running)
                if not running:
                    return
                loop.beat(wait)
                if await self.sleep(wait, retrying=True) or not should_run():
                    return
                loop.restarts += 1
                metrics.loop_restarts.labels(loop.kind).inc()
                log.warning("loop_restarted", loop=loop.name, restarts=loop.restarts)
        finally:
            self.forget(loop)

    async def sleep(self, seconds: float, *, retrying: bool = False) -> bool:
        """Wait ``seconds`` or until the supervisor stops; True when stopping. ``retrying``: this wait is a failed
        loop's backoff, which ``retry_failing_now()`` cuts short."""
        if self.stopping.is_set():
            return True
        waits = [asyncio.ensure_future(self.stopping.wait())]
        if retrying:
            waits.append(asyncio.ensure_future(self._retry_now.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return self.stopping.is_set()

    def retry_failing_now(self) -> None:
        """The dependency the failing loops wait for is healthy again (the Redis breaker half-opened or closed): end
        their backoff now, so readiness returns within moments instead of after the longest backoff. A loop whose
        step is under way now is not waiting: should that step fail, it backs off from the recovery base as well
        (``Loop.recovered``), as does every loop whose next try fails."""
        for loop in self.loops.values():
            loop.recovered()
        self._retry_now.set()
        self._retry_now = asyncio.Event()

    # ---- watchdog and health -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the watchdog (itself a supervised loop: restarted if its task ends)."""
        self.periodic("watchdog", self._check, WATCHDOG_PERIOD_S)

    async def _check(self) -> None:
        self.check_stalls()

    def check_stalls(self) -> list[Loop]:
        """Mark loops that missed their due time as stalled (logged once per stall); returns the newly stalled."""
        now = self.clock()
        newly = []
        for loop in list(self.loops.values()):
            if not loop.stalled and now > loop.due:
                loop.stalled = True
                newly.append(loop)
                log.error("loop_stalled", loop=loop.name, silent_s=round(now - loop.last_beat, 1),
                          limit_s=round(loop.due - loop.last_beat, 1))  # fmt: skip
                self.health_changed(loop)
        return newly

    def health_changed(self, loop: Loop) -> None:
        n = sum(1 for x in self.loops.values() if x.kind == loop.kind and (x.failing or x.stalled))
        metrics.loops_unhealthy.labels(loop.kind).set(n)

    def problems(self) -> dict[str, str]:
        """Unhealthy loops: name -> the reason /readyz gives."""
        now = self.clock()
        return {name: p for name, loop in self.loops.items() if (p := loop.problem(now)) is not None}

    def reasons(self) -> list[str]:
        return list(self.problems().values())

    def split_reasons(self) -> tuple[list[str], list[str]]:
        """``reasons()`` in two: the loops failing with anything but ``unavailable`` (or stalled), and those failing
        with ``unavailable`` (on a Redis Cluster with some masters away, part of that outage: the node degraded)."""
        now = self.clock()
        hard: list[str] = []
        unavailable: list[str] = []
        for loop in self.loops.values():
            p = loop.problem(now)
            if p is not None:
                (unavailable if loop.failing and not loop.stalled and loop.last_unavailable else hard).append(p)
        return hard, unavailable

    async def stop(self, timeout_s: float) -> None:
        self.stopping.set()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)


def watch_task(task: asyncio.Task[Any]) -> asyncio.Task[Any]:
    """Make a fire-and-forget task log (``task_failed``) and count an exception it ends with."""
    task.add_done_callback(_report_end)
    return task


def _report_end(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        metrics.task_errors.inc()
        log.exception("task_failed", task=task.get_name(), exc_info=exc)
