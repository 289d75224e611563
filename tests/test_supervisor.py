"""broker/runtime/supervisor.py: no background loop fails, stalls or ends silently.

- a failing step is logged (with the traceback unless it is the expected `unavailable`), counted, and retried after
  tenacity's jittered exponential backoff;
- `loops.fail_threshold` consecutive failures make the loop unready (its name and last error), a success clears it;
- a loop that shows no progress is reported stalled by the watchdog, and clears when it moves again;
- a loop task that raises or returns while it should run is logged and restarted; a normal end is not a failure;
- fire-and-forget tasks log the exception they end with;
- a delivery loop keeps its paused/resumed behaviour on `unavailable` and reports other failures to the supervisor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import tenacity.wait
from structlog.testing import capture_logs

from broker.core.config import LoopSettings, Settings
from broker.core.errors import BrokerError, UnavailableError
from broker.core.model import Delivery
from broker.node.dispatch import Consumer, Dispatch
from broker.runtime import metrics, supervisor
from broker.runtime.resilience import LoopBackoff
from broker.runtime.supervisor import Supervisor, watch_task


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with capture_logs() as captured:
        yield captured


def events(logs: list[dict[str, Any]], name: str, loop: str | None = None) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name and (loop is None or e.get("loop") == loop)]


async def until(predicate: Any, timeout_s: float = 10.0) -> None:
    """Bounded wait for a condition (a safety net, not a timing assertion)."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.002)


class RecordingSupervisor(Supervisor):
    """Records every wait instead of sleeping it (the loop logic is what is under test, not the clock)."""

    def __init__(self, policy: LoopSettings) -> None:
        super().__init__(policy)
        self.waits: list[float] = []

    async def sleep(self, seconds: float, *, retrying: bool = False) -> bool:
        self.waits.append(seconds)
        await asyncio.sleep(0)
        return self.stopping.is_set()


# ---- backoff -----------------------------------------------------------------------------------------------------


def test_backoff_is_tenacitys_exponential_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given tenacity's jitter draw pinned to its lowest, then to its highest value
    backoff = LoopBackoff(0.5, 10.0)
    monkeypatch.setattr(tenacity.wait.random, "uniform", lambda a, b: a)
    low = [backoff(n) for n in range(1, 8)]
    monkeypatch.setattr(tenacity.wait.random, "uniform", lambda a, b: b)
    high = [backoff(n) for n in range(1, 8)]
    # Then the delay doubles from the base per failure, the jitter adds up to one base, and the cap holds
    assert low == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert high == [1.0, 1.5, 2.5, 4.5, 8.5, 10.0, 10.0]


def test_backoff_never_below_the_interval_nor_above_the_cap() -> None:
    slow = LoopBackoff(30.0, 10.0)  # a loop slower than the cap: its interval wins
    assert {slow(n) for n in range(1, 6)} == {30.0}
    fast = LoopBackoff(0.1, 2.0)
    delays = [fast(n) for n in range(1, 200)]
    assert all(0.1 <= d <= 2.0 for d in delays) and max(delays) == 2.0


# ---- failures, readiness -----------------------------------------------------------------------------------------


async def test_failed_steps_are_logged_counted_and_retried_after_backoff(
    logs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tenacity.wait.random, "uniform", lambda a, b: a)
    sup = RecordingSupervisor(LoopSettings(fail_threshold=3, backoff_cap_s=10.0))
    calls = 0

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls <= 4:
            raise RuntimeError(f"boom {calls}")

    before = sample("broker_loop_errors_total", loop="unit_a")
    # Given a loop whose step fails four times, then works
    sup.periodic("unit_a", step, 0.5)
    await until(lambda: calls >= 6)
    await sup.stop(1.0)
    # Then each failure was logged with its traceback and counted
    failed = events(logs, "loop_failed", "unit_a")
    assert [e["failures"] for e in failed] == [1, 2, 3, 4]
    assert all(e["log_level"] == "error" and isinstance(e["exc_info"], RuntimeError) for e in failed)
    assert sample("broker_loop_errors_total", loop="unit_a") - before == 4
    # And the waits after the failures followed the backoff; after the success, the interval again
    assert sup.waits[:5] == [0.5, 1.0, 2.0, 4.0, 0.5]
    # And the 3rd failure made it unhealthy once; the success logged its recovery
    assert [e["failures"] for e in events(logs, "loop_unhealthy", "unit_a")] == [3]
    (recovered,) = events(logs, "loop_recovered", "unit_a")
    assert recovered["after_failures"] == 4 and recovered["was"] == "failing"


async def test_a_degraded_step_keeps_its_pace_and_is_logged_bounded(logs: list[dict[str, Any]]) -> None:
    # Given a loop whose step does its work but for one damaged part, 45 times in a row
    sup = RecordingSupervisor(LoopSettings(fail_threshold=3, backoff_cap_s=10.0))
    calls = 0

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls <= 45:
            raise supervisor.DegradedError("1 topic(s) unreadable, not swept: t: WRONGTYPE")

    sup.periodic("unit_degraded", step, 0.5)
    await until(lambda: calls >= 47)
    await sup.stop(1.0)
    # Then it kept its normal interval (no backoff starving the healthy part of the work)
    assert set(sup.waits[:46]) == {0.5}
    # And it was unhealthy from the 3rd failure, logged with its traceback at failures 1, 20, 40 only
    assert [e["failures"] for e in events(logs, "loop_failed", "unit_degraded")] == [1, 20, 40]
    assert [e["failures"] for e in events(logs, "loop_unhealthy", "unit_degraded")] == [3]
    (recovered,) = events(logs, "loop_recovered", "unit_degraded")
    assert recovered["after_failures"] == 45


def test_threshold_makes_the_loop_a_readiness_reason_until_it_succeeds(logs: list[dict[str, Any]]) -> None:
    sup = Supervisor(LoopSettings(fail_threshold=3))
    loop = sup.loop("unit_sweep", 0.5)
    # Given two failures: a blip, not yet a reason
    loop.failed(BrokerError("redis error reply during all_pairs: WRONGTYPE"))
    loop.failed(BrokerError("redis error reply during all_pairs: WRONGTYPE"))
    assert sup.reasons() == []
    assert sample("broker_loops_unhealthy", loop="unit_sweep") == 0
    # When the third comes
    loop.failed(BrokerError("redis error reply during all_pairs: WRONGTYPE"))
    # Then /readyz's reasons name the loop and its last error
    assert sup.reasons() == [
        "loop unit_sweep failing: redis error reply during all_pairs: WRONGTYPE (3 consecutive failures)"
    ]
    assert sup.problems().keys() == {"unit_sweep"}
    # And a Redis error reply is not the expected outage: every one was logged at error, with its traceback
    failed = events(logs, "loop_failed", "unit_sweep")
    assert [e["failures"] for e in failed] == [1, 2, 3] and not events(logs, "loop_step_failed", "unit_sweep")
    assert all(e["log_level"] == "error" and isinstance(e["exc_info"], BrokerError) for e in failed)
    assert sample("broker_loops_unhealthy", loop="unit_sweep") == 1
    loop.failed(BrokerError("still"))
    assert len(events(logs, "loop_unhealthy", "unit_sweep")) == 1  # once per episode
    # When it succeeds again, Then the reason is gone
    loop.succeeded()
    assert sup.reasons() == []
    assert sample("broker_loops_unhealthy", loop="unit_sweep") == 0
    assert events(logs, "loop_recovered", "unit_sweep")[-1]["was"] == "failing"


def test_unavailable_is_logged_bounded_at_warning(logs: list[dict[str, Any]]) -> None:
    sup = Supervisor(LoopSettings(fail_threshold=3))
    loop = sup.loop("unit_hb", 1.0)
    for _ in range(45):
        loop.failed(UnavailableError("redis unreachable during heartbeat"))
    step_failed = events(logs, "loop_step_failed", "unit_hb")
    assert [e["failures"] for e in step_failed] == [1, 20, 40]
    assert {e["log_level"] for e in step_failed} == {"warning"}
    assert not events(logs, "loop_failed", "unit_hb")  # no traceback for the expected case
    assert sup.reasons() == ["loop unit_hb failing: redis unreachable during heartbeat (45 consecutive failures)"]


# ---- stalls ------------------------------------------------------------------------------------------------------


def test_watchdog_reports_a_loop_that_stops_beating(logs: list[dict[str, Any]]) -> None:
    now = [1000.0]
    sup = Supervisor(LoopSettings(stall_timeout_s=10.0), clock=lambda: now[0])
    loop = sup.loop("unit_stall", 0.5)
    slow = sup.loop("unit_slow", 4.0)  # 5 intervals (20 s) is longer than stall_timeout_s
    assert (loop.stall_after_s, slow.stall_after_s) == (10.0, 20.0)
    # Given a beat announcing a 0.5 s pause
    loop.beat(0.5)
    slow.beat(4.0)
    now[0] += 10.4
    assert sup.check_stalls() == [] and sup.reasons() == []
    # When nothing comes for longer than pause + stall timeout
    now[0] += 0.2
    assert sup.check_stalls() == [loop]
    # Then it is a readiness reason, logged once
    assert sup.reasons() == ["loop unit_stall stalled: no progress for 11s"]
    assert sup.check_stalls() == []
    (stalled,) = events(logs, "loop_stalled", "unit_stall")
    assert stalled["silent_s"] == 10.6 and stalled["limit_s"] == 10.5
    assert sample("broker_loops_unhealthy", loop="unit_stall") == 1
    # When it moves again, Then it is cleared
    loop.beat()
    assert sup.reasons() == []
    assert events(logs, "loop_recovered", "unit_stall")[-1]["was"] == "stalled"
    assert sample("broker_loops_unhealthy", loop="unit_stall") == 0


async def test_a_hung_step_is_found_by_the_running_watchdog(
    logs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor, "WATCHDOG_PERIOD_S", 0.01)
    sup = Supervisor(LoopSettings(stall_timeout_s=0.05))
    unblock = asyncio.Event()

    async def step() -> None:
        await unblock.wait()  # a call that never returns (until the test lets it)

    sup.start()
    loop = sup.periodic("unit_hung", step, 0.001)
    await until(lambda: loop.stalled)
    assert any(r.startswith("loop unit_hung stalled") for r in sup.reasons())
    unblock.set()
    await until(lambda: not loop.stalled)
    assert events(logs, "loop_stalled", "unit_hung") and events(logs, "loop_recovered", "unit_hung")
    await sup.stop(1.0)
    assert sup.loops == {}


# ---- task supervision --------------------------------------------------------------------------------------------


async def test_a_loop_task_that_raises_or_returns_is_logged_and_restarted(
    logs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tenacity.wait.random, "uniform", lambda a, b: a)
    sup = RecordingSupervisor(LoopSettings(fail_threshold=3))
    loop = sup.loop("unit_task", 0.5)
    runs = 0
    third = asyncio.Event()

    async def body() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise ValueError("escaped the loop")
        if runs == 2:
            return  # ended while it should run
        third.set()
        await sup.stopping.wait()

    before = sample("broker_loop_restarts_total", loop="unit_task")
    task = sup.run(loop, body, should_run=lambda: True)
    await until(third.is_set)
    ended = events(logs, "loop_task_ended", "unit_task")
    assert [e["reason"] for e in ended] == ["raised", "returned"]
    assert isinstance(ended[0]["exc_info"], ValueError) and ended[0]["restart_in_s"] > 0
    assert [e["restarts"] for e in events(logs, "loop_restarted", "unit_task")] == [1, 2]
    assert sample("broker_loop_restarts_total", loop="unit_task") - before == 2
    assert loop.failures == 2 and sup.waits == [0.5, 1.0]  # the restarts waited the loop's backoff
    # When the supervisor stops, Then the task ends for good and the loop is forgotten
    await sup.stop(1.0)
    assert task.done() and "unit_task" not in sup.loops


async def test_a_normal_end_is_not_a_failure(logs: list[dict[str, Any]]) -> None:
    sup = Supervisor(LoopSettings())
    loop = sup.loop("unit_done", 0.5)

    async def body() -> None:
        return

    await sup.run(loop, body, should_run=lambda: False)
    assert not events(logs, "loop_task_ended") and "unit_done" not in sup.loops and loop.failures == 0


async def test_fire_and_forget_task_logs_its_exception(logs: list[dict[str, Any]]) -> None:
    async def boom() -> None:
        raise KeyError("lost")

    before = sample("broker_task_errors_total")
    task = watch_task(asyncio.create_task(boom(), name="release:t/g"))
    await asyncio.wait([task])
    await asyncio.sleep(0)  # done callbacks run on the next turn
    (failed,) = events(logs, "task_failed")
    assert failed["task"] == "release:t/g" and isinstance(failed["exc_info"], KeyError)
    assert sample("broker_task_errors_total") - before == 1
    task.exception()  # retrieved: no "exception was never retrieved" warning


# ---- delivery loops ----------------------------------------------------------------------------------------------


class ScriptedStore:
    """A store whose claims answer from a script: an exception to raise, or a list of deliveries."""

    def __init__(self, script: list[Exception | list[Delivery]]) -> None:
        self.script = script
        self.claims = 0

    async def ensure_group(self, topic: str, group: str) -> None:
        pass

    async def claim(self, topic: str, group: str, n: int, lease_ms: int, consumer: str) -> list[Delivery]:
        self.claims += 1
        if not self.script:
            return []
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


class Outlet:
    def __init__(self) -> None:
        self.frames: list[tuple[str, str]] = []

    def send_delivery(self, consumer: Consumer, delivery: Delivery) -> None:
        self.frames.append(("message", delivery.id))

    def congested(self) -> bool:
        return False

    def holds(self, msg_id: str, receipt: str) -> bool:
        return False

    def delivery_paused(self, topic: str, group: str, err: BrokerError) -> None:
        self.frames.append(("paused", err.message))

    def delivery_resumed(self, topic: str, group: str) -> None:
        self.frames.append(("resumed", ""))


def _settings() -> Settings:
    return Settings().replace("delivery", poll_interval_ms=1).replace("loops", fail_threshold=2, backoff_cap_s=0.01)


async def test_delivery_loop_pauses_on_unavailable_and_reports_other_failures(logs: list[dict[str, Any]]) -> None:
    dv = Delivery("m1", "t", "g", "1", "{}", 1, "r-1", 0, 0, None)
    unavailable = UnavailableError("redis unavailable (breaker open) during claim", retry_after_ms=1)
    store = ScriptedStore([unavailable, unavailable, [dv], RuntimeError("bug 1"), RuntimeError("bug 2")])
    dispatch = Dispatch(store, _settings())  # type: ignore[arg-type]
    outlet = Outlet()
    consumer = Consumer(outlet, "c1", "t", "g", prefetch=10, lease_ms=30_000)
    await dispatch.add(consumer)
    sup = dispatch.supervisor
    # The outage: paused once, resumed after the next good claim, and never a loop failure
    await until(lambda: ("resumed", "") in outlet.frames)
    assert outlet.frames[:3] == [("paused", unavailable.message), ("message", "m1"), ("resumed", "")]
    before_resume = logs[: next(i for i, e in enumerate(logs) if e["event"] == "delivery_resumed")]
    assert [e["event"] for e in before_resume] == ["delivery_paused"]  # no loop_failed / loop_step_failed
    # The bugs: logged with the traceback, and after fail_threshold of them a readiness reason
    await until(lambda: store.claims >= 6)
    failed = events(logs, "loop_failed", "dispatch:t/g")
    assert [str(e["exc_info"]) for e in failed] == ["bug 1", "bug 2"]
    assert events(logs, "loop_unhealthy", "dispatch:t/g")
    # and the next good claim clears it
    await until(lambda: not sup.reasons())
    assert events(logs, "loop_recovered", "dispatch:t/g")[-1]["was"] == "failing"
    # When the last consumer leaves, the loop ends normally and is forgotten
    dispatch.remove(consumer)
    await dispatch.stop(1.0)
    assert "dispatch:t/g" not in sup.loops
    assert not events(logs, "loop_task_ended")


async def test_retry_failing_now_ends_a_failed_loops_backoff_but_not_a_healthy_loops_interval() -> None:
    # Given a loop whose step fails (a long backoff) and a healthy loop with a long interval
    sup = Supervisor(LoopSettings(fail_threshold=1, backoff_cap_s=30.0))
    failing_runs = healthy_runs = 0
    down = True

    async def failing_step() -> None:
        nonlocal failing_runs
        failing_runs += 1
        if down:
            raise RuntimeError("redis down")

    async def healthy_step() -> None:
        nonlocal healthy_runs
        healthy_runs += 1

    failing = sup.periodic("unit_failing", failing_step, 30.0)
    sup.periodic("unit_healthy", healthy_step, 30.0)
    await until(lambda: failing_runs == 1 and healthy_runs == 1 and failing.failing)
    # When the dependency is healthy again and the supervisor is told so
    down = False
    sup.retry_failing_now()
    # Then the failed loop runs again at once and is healthy, the healthy loop keeps its interval
    await until(lambda: failing_runs == 2 and not failing.failing)
    assert healthy_runs == 1
    assert sup.reasons() == []
    await sup.stop(1.0)


async def test_a_try_that_fails_after_the_recovery_backs_off_from_one_second_not_a_whole_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # (the /readyz flake: dlq_prune, a 30 s loop, failed during the outage; its first try after the breaker closed
    # met a connection the outage had left dead, and /readyz named it failing for its next 30 s backoff)
    monkeypatch.setattr(tenacity.wait.random, "uniform", lambda a, b: a)
    sup = RecordingSupervisor(LoopSettings(fail_threshold=3, backoff_cap_s=10.0))
    outcomes: asyncio.Queue[Exception | None] = asyncio.Queue()
    down = UnavailableError("redis unreachable during topics: Connection closed by server.")

    async def step() -> None:
        if (e := await outcomes.get()) is not None:
            raise e

    async def results(*items: Exception | None) -> None:
        n = len(sup.waits) + len(items)
        for item in items:
            outcomes.put_nowait(item)
        await until(lambda: len(sup.waits) == n)

    # Given a loop with a 30 s interval that failed through an outage: failing, 30 s between tries
    loop = sup.periodic("unit_prune", step, 30.0)
    await results(down, down, down)
    assert loop.failing and sup.waits == [30.0, 30.0, 30.0]
    # When Redis is back (the breaker closed) while the loop's next try is under way, and that try fails too
    sup.retry_failing_now()
    await results(down)
    # Then it tries again after a second, not after 30 (and again if that fails, doubling back up to its backoff)
    await results(down, down, down, down, down, down)
    assert sup.waits[3:] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert sup.reasons() == [f"loop unit_prune failing: {down.message} (10 consecutive failures)"]
    # And once a try succeeds it is healthy, and a later failure backs off from its interval again
    await results(None)
    assert sup.reasons() == [] and sup.waits[-1] == 30.0
    await results(down)
    assert sup.waits[-1] == 30.0 and loop.failures == 1
    sup.stopping.set()
    outcomes.put_nowait(None)  # the step waiting for its next outcome ends, and the loop sees the stop
    await sup.stop(1.0)


def test_loops_failing_with_unavailable_are_told_apart() -> None:
    # Given one loop failing with `unavailable` (a cluster master away), one with an error reply, one healthy
    sup = Supervisor(LoopSettings(fail_threshold=1))
    sup.loop("unit_prune", 1.0).failed(UnavailableError("redis@10.0.0.12:6379 unreachable during dlq_prune"))
    sup.loop("unit_sweep", 1.0).failed(BrokerError("WRONGTYPE"))
    sup.loop("unit_ok", 1.0)
    # Then readiness can take the first as part of that outage (degraded) and the second as a reason to be unready
    hard, unavailable = sup.split_reasons()
    assert hard == ["loop unit_sweep failing: WRONGTYPE (1 consecutive failures)"]
    assert unavailable == [
        "loop unit_prune failing: redis@10.0.0.12:6379 unreachable during dlq_prune (1 consecutive failures)"
    ]
    assert sorted(sup.reasons()) == sorted(hard + unavailable)
