"""Backoff (pure) and the asyncio Breaker over pybreaker's state machine (small real timeouts, no mocks of time)."""

from __future__ import annotations

import asyncio
import random
import statistics
from collections.abc import Awaitable, Callable
from pathlib import Path

import pybreaker
import pytest

from broker.runtime.resilience import (
    Breaker,
    BreakerOpenError,
    BreakerState,
    Deadlines,
    backoff_delay,
    backoff_ms,
    jitter_factor,
)

# ---- backoff ------------------------------------------------------------------------------------------------------


def test_backoff_grows_geometrically_then_caps() -> None:
    # Given base 1 s, multiplier 2, cap 60 s and no jitter
    rng = random.Random(1)
    # When computing attempts 1..9, Then each doubles until the cap holds
    got = [backoff_ms(a, 1_000, 2.0, 60_000, 0.0, rng) for a in range(1, 10)]
    assert got == [1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000, 60_000]
    # And attempt 0 or below is treated as the first
    assert backoff_ms(0, 1_000, 2.0, 60_000, 0.0, rng) == 1_000
    assert backoff_ms(-5, 1_000, 2.0, 60_000, 0.0, rng) == 1_000


def test_backoff_huge_attempt_is_capped_not_an_overflow() -> None:
    # Given a very large attempt number (max_attempts configured high), When the delay is computed
    # Then it is the cap (2.0 ** 9999 would overflow a float)
    rng = random.Random(1)
    assert backoff_ms(10_000, 1_000, 2.0, 60_000, 0.0, rng) == 60_000
    assert backoff_ms(10_000, 1_000, 1.5, 60_000, 0.1, rng) <= 66_000


def test_the_cap_holds_whatever_the_jitter() -> None:
    # Given delays at and past the cap, When a jitter factor above 1 is applied, Then the cap still holds
    assert backoff_delay(10, 1_000, 2.0, 60_000, 1.2) == 60_000
    assert backoff_delay(6, 1_000, 2.0, 60_000, 1.19) == 38_080  # below the cap, jitter works as before
    rng = random.Random(7)
    assert max(backoff_ms(a, 1_000, 2.0, 5_000, 0.2, rng) for a in range(1, 50) for _ in range(20)) <= 5_000


def test_backoff_multiplier_one_is_constant() -> None:
    rng = random.Random(1)
    assert {backoff_ms(a, 250, 1.0, 60_000, 0.0, rng) for a in range(1, 20)} == {250}


@pytest.mark.parametrize("attempt", [1, 3, 6])  # below the cap (at the cap jitter only shortens: the test above)
def test_backoff_jitter_stays_in_bounds_and_centres_on_the_delay(attempt: int) -> None:
    # Given jitter 0.2 and a seeded RNG
    base, mult, cap, j = 1_000, 2.0, 60_000, 0.2
    d = min(cap, base * mult ** (attempt - 1))
    rng = random.Random(42)
    # When 10,000 delays are drawn
    samples = [backoff_ms(attempt, base, mult, cap, j, rng) for _ in range(10_000)]
    # Then every one lies in [d*(1-j), d*(1+j)], the mean is close to d, and the spread is really used
    assert all(d * (1 - j) <= s <= d * (1 + j) for s in samples)
    assert abs(statistics.fmean(samples) - d) < d * 0.01
    assert min(samples) < d * 0.82 and max(samples) > d * 1.18


def test_backoff_is_never_below_one_ms() -> None:
    # Given tiny or zero bases with large jitter, When many delays are drawn, Then none is below 1 ms
    rng = random.Random(7)
    samples = [backoff_ms(1, b, 2.0, 10, 0.99, rng) for b in (0, 1, 2) for _ in range(3_000)]
    assert min(samples) == 1


def test_backoff_is_reproducible_with_a_seed() -> None:
    a = [backoff_ms(3, 1_000, 2.0, 60_000, 0.2, random.Random(5)) for _ in range(3)]
    assert len(set(a)) == 1


def test_lua_backoff_matches_the_python_formula() -> None:
    # Given the backoff function the Lua scripts use (it lets a message's own backoff base apply inside Redis)
    import fakeredis

    from broker.store.lua_lib import with_lib

    lib = (Path(__file__).resolve().parent.parent / "broker/store/scripts/_lib.lua").read_text()
    r = fakeredis.FakeStrictRedis()
    cases = [
        (a, base, mult, cap, u)
        for a in (1, 2, 3, 7, 40)
        for base, mult, cap in ((1_000, 2.0, 60_000), (10, 3.0, 500), (250, 1.0, 250))
        for u in (0.5, 0.8, 1.0, 1.2, 1.999)
    ]
    args = ", ".join(f"tonumber(ARGV[{i}])" for i in range(1, 6))
    script = with_lib(lib, f"return backoff({args})")
    # When both compute the same cases, Then they agree to the millisecond
    for case in cases:
        assert r.eval(script, 0, *case) == backoff_delay(*case), case
    # And the jitter factors a caller draws stay within [1 - jitter, 1 + jitter]
    rng = random.Random(1)
    draws = [jitter_factor(0.2, rng) for _ in range(10_000)]
    assert 0.8 <= min(draws) < 0.82 and 1.18 < max(draws) <= 1.2


# ---- breaker ------------------------------------------------------------------------------------------------------


class Calls:
    """Async functions that count how often they really ran."""

    def __init__(self) -> None:
        self.n = 0

    async def fail(self) -> None:
        self.n += 1
        await asyncio.sleep(0)
        raise RuntimeError("down")

    async def ok(self) -> str:
        self.n += 1
        await asyncio.sleep(0)
        return "ok"

    def slow(self, gate: asyncio.Event, result: str = "ok") -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            self.n += 1
            await gate.wait()
            return result

        return run


async def trip(b: Breaker, calls: Calls, n: int) -> None:
    for _ in range(n):
        with pytest.raises(RuntimeError):
            await b.call(calls.fail)


async def test_plain_pybreaker_decorator_misses_async_failures() -> None:
    # Given pybreaker's own decorator on an async function (why the adapter exists)
    cb = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=60)
    calls = Calls()
    wrapped = cb(calls.fail)
    # When the coroutine fails
    with pytest.raises(RuntimeError):
        await wrapped()
    # Then pybreaker saw a success (the coroutine was only created) and stays closed
    assert cb.current_state == "closed"


async def test_breaker_counts_async_failures_and_opens() -> None:
    # Given a breaker with fail_max=3
    changes: list[tuple[str, BreakerState, BreakerState]] = []
    b = Breaker("redis", fail_max=3, reset_timeout_s=30, on_change=lambda *a: changes.append(a))
    calls = Calls()
    # When an async function fails twice, Then the failures are counted and it stays closed
    await trip(b, calls, 2)
    assert b.fail_counter == 2 and b.state is BreakerState.CLOSED
    # When it fails a third time, Then the breaker opens (the original error is raised, not a breaker error)
    await trip(b, calls, 1)
    assert b.state is BreakerState.OPEN
    assert changes == [("redis", BreakerState.CLOSED, BreakerState.OPEN)]
    # And a call while open is refused without running, with a retry hint close to the reset timeout
    with pytest.raises(BreakerOpenError) as ei:
        await b.call(calls.ok)
    assert calls.n == 3
    assert ei.value.name == "redis" and 28_000 <= ei.value.retry_after_ms <= 30_000


async def test_success_resets_the_failure_count() -> None:
    # Given two failures, When a call succeeds, Then the count restarts and two more failures do not open it
    b = Breaker("x", fail_max=3, reset_timeout_s=30)
    calls = Calls()
    await trip(b, calls, 2)
    assert await b.call(calls.ok) == "ok"
    assert b.fail_counter == 0
    await trip(b, calls, 2)
    assert b.state is BreakerState.CLOSED


async def test_half_open_after_reset_timeout_needs_success_threshold_to_close() -> None:
    # Given an open breaker (reset 0.2 s, success_threshold 2)
    changes: list[tuple[str, BreakerState, BreakerState]] = []
    b = Breaker("h", fail_max=1, reset_timeout_s=0.2, success_threshold=2, on_change=lambda *a: changes.append(a))
    calls = Calls()
    await trip(b, calls, 1)
    with pytest.raises(BreakerOpenError):
        await b.call(calls.ok)
    # When the reset timeout has passed, Then a trial call runs and the breaker is half-open
    await asyncio.sleep(0.25)
    assert await b.call(calls.ok) == "ok"
    assert b.state is BreakerState.HALF_OPEN
    # When a second trial succeeds, Then it closes
    assert await b.call(calls.ok) == "ok"
    assert b.state is BreakerState.CLOSED
    assert changes == [
        ("h", BreakerState.CLOSED, BreakerState.OPEN),
        ("h", BreakerState.OPEN, BreakerState.HALF_OPEN),
        ("h", BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]


async def test_failed_trial_reopens() -> None:
    # Given a breaker that half-opens, When the trial fails, Then it is open again for another full timeout
    b = Breaker("r", fail_max=1, reset_timeout_s=0.2)
    calls = Calls()
    await trip(b, calls, 1)
    await asyncio.sleep(0.25)
    await trip(b, calls, 1)
    assert b.state is BreakerState.OPEN
    with pytest.raises(BreakerOpenError) as ei:
        await b.call(calls.ok)
    assert ei.value.retry_after_ms >= 100


async def test_call_timeout_counts_as_failure() -> None:
    # Given a 50 ms call timeout and fail_max=2
    b = Breaker("t", fail_max=2, reset_timeout_s=30, call_timeout_s=0.05)
    gate = asyncio.Event()
    calls = Calls()
    # When a call hangs past the timeout, Then it raises TimeoutError and counts as a failure
    with pytest.raises(TimeoutError):
        await b.call(calls.slow(gate))
    assert b.fail_counter == 1
    with pytest.raises(TimeoutError):
        await b.call(calls.slow(gate))
    assert b.state is BreakerState.OPEN


async def test_cancellation_is_neither_failure_nor_success() -> None:
    # Given a breaker with one failure counted
    b = Breaker("c", fail_max=2, reset_timeout_s=30)
    calls = Calls()
    await trip(b, calls, 1)
    # When a call is cancelled by its caller
    gate = asyncio.Event()
    task = asyncio.create_task(b.call(calls.slow(gate)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Then the breaker did not count it as a failure, nor reset the failure count as if it had succeeded
    assert b.state is BreakerState.CLOSED and b.fail_counter == 1
    await trip(b, calls, 1)
    assert b.state is BreakerState.OPEN


async def test_cancelled_trial_does_not_close_the_breaker() -> None:
    # Given a half-open-able breaker
    b = Breaker("ct", fail_max=1, reset_timeout_s=0.1)
    calls = Calls()
    await trip(b, calls, 1)
    await asyncio.sleep(0.15)
    # When the trial call is cancelled
    task = asyncio.create_task(b.call(calls.slow(asyncio.Event())))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Then the breaker is not closed (nothing proved Redis is back), and the next trial may run
    assert b.state is not BreakerState.CLOSED
    assert await b.call(calls.ok) == "ok"
    assert b.state is BreakerState.CLOSED


async def test_only_one_trial_call_at_a_time_in_half_open() -> None:
    # Given an open breaker whose reset timeout has passed
    b = Breaker("one", fail_max=1, reset_timeout_s=0.1)
    calls = Calls()
    await trip(b, calls, 1)
    await asyncio.sleep(0.15)
    # When a trial call is in flight
    gate = asyncio.Event()
    trial = asyncio.create_task(b.call(calls.slow(gate, "trial")))
    await asyncio.sleep(0.01)
    assert b.state is BreakerState.HALF_OPEN
    # Then a concurrent second call is refused without running
    before = calls.n
    with pytest.raises(BreakerOpenError):
        await b.call(calls.ok)
    assert calls.n == before
    # When the trial succeeds, Then the breaker closes and calls flow again
    gate.set()
    assert await trial == "trial"
    assert b.state is BreakerState.CLOSED
    assert await b.call(calls.ok) == "ok"


async def test_excluded_exceptions_do_not_count() -> None:
    # Given a breaker that excludes KeyError (a caller mistake, not an outage)
    b = Breaker("e", fail_max=1, reset_timeout_s=30, exclude=[KeyError])

    async def bad() -> None:
        raise KeyError("k")

    # When the call raises KeyError, Then it propagates and the breaker stays closed
    with pytest.raises(KeyError):
        await b.call(bad)
    assert b.state is BreakerState.CLOSED and b.fail_counter == 0


async def test_concurrent_failures_open_once() -> None:
    # Given fail_max=3 and ten concurrent calls that all fail
    changes: list[tuple[str, BreakerState, BreakerState]] = []
    b = Breaker("many", fail_max=3, reset_timeout_s=30, on_change=lambda *a: changes.append(a))
    gate = asyncio.Event()

    async def fail_later() -> None:
        await gate.wait()
        raise RuntimeError("down")

    tasks = [asyncio.create_task(b.call(fail_later)) for _ in range(10)]
    await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    # Then each caller sees its own error, and the breaker reported one transition to open
    assert all(isinstance(r, RuntimeError) for r in results)
    assert b.state is BreakerState.OPEN
    assert changes == [("many", BreakerState.CLOSED, BreakerState.OPEN)]


async def test_admits_tells_how_many_calls_may_start() -> None:
    # Given a closed breaker, Then calls are unlimited
    b = Breaker("a", fail_max=1, reset_timeout_s=0.1)
    calls = Calls()
    assert b.admits() == -1
    # When it opens, Then none may start until the reset timeout, then exactly one (the trial)
    await trip(b, calls, 1)
    assert b.admits() == 0
    await asyncio.sleep(0.15)
    assert b.admits() == 1
    # When the trial is in flight, Then none; after it succeeds, unlimited again
    gate = asyncio.Event()
    trial = asyncio.create_task(b.call(calls.slow(gate)))
    await asyncio.sleep(0.01)
    assert b.admits() == 0
    gate.set()
    await trial
    assert b.admits() == -1


# ---- probing an open breaker ---------------------------------------------------------------------------------------


async def test_a_healthy_probe_half_opens_an_open_breaker_before_its_reset_timeout() -> None:
    # Given a breaker with a 60 s reset timeout and a probe that fails twice, then answers
    healthy = asyncio.Event()
    answers = iter([False, False, True])

    async def probe() -> None:
        if not next(answers):
            raise OSError("still down")
        healthy.set()

    b = Breaker("p", fail_max=1, reset_timeout_s=60.0, probe=probe, probe_interval_s=0.01)
    # When one failure opens it
    calls = Calls()
    await trip(b, calls, 1)
    assert b.state is BreakerState.OPEN
    # Then it stays open while the probe fails, and is half-open right after the first healthy probe
    async with asyncio.timeout(5):
        await healthy.wait()
        while b.state is not BreakerState.HALF_OPEN:
            await asyncio.sleep(0.001)
    assert b.probes == 3
    # And the next real call is the trial that closes it
    assert await b.call(calls.ok) == "ok"
    assert b.state is BreakerState.CLOSED
    await b.close()


async def test_without_a_healthy_probe_the_breaker_stays_open_and_probes_at_its_interval() -> None:
    async def probe() -> None:
        raise OSError("still down")

    b = Breaker("p", fail_max=1, reset_timeout_s=60.0, probe=probe, probe_interval_s=0.05)
    calls = Calls()
    await trip(b, calls, 1)
    await asyncio.sleep(0.32)
    assert b.state is BreakerState.OPEN
    assert 3 <= b.probes <= 7  # one per interval, never a burst
    with pytest.raises(BreakerOpenError):
        await b.call(calls.ok)
    await b.close()


async def test_master_breakers_one_per_master_like_the_template_and_gone_masters_forgotten() -> None:
    from broker.store.breakers import MasterBreakers

    changes: list[tuple[str, BreakerState]] = []
    probed: list[str] = []

    async def probe(master: str) -> None:
        probed.append(master)
        raise OSError("still down")

    # Given a template breaker (2 failures open it) with a listener
    template = Breaker("redis", fail_max=2, reset_timeout_s=600, on_change=lambda n, _, new: changes.append((n, new)))
    mb = MasterBreakers(template, probe)
    # When two masters are met, Then each has its own breaker, named after it, made once
    a, b = mb.of("10.0.0.1:6379"), mb.of("10.0.0.2:6379")
    assert (a.name, b.name) == ("redis@10.0.0.1:6379", "redis@10.0.0.2:6379") and mb.of("10.0.0.1:6379") is a

    async def down() -> None:
        raise OSError("down")

    # When one master fails twice, Then its breaker opens (the template's listener hears it) and the other stays closed
    for _ in range(2):
        with pytest.raises(OSError):
            await a.call(down)
    assert mb.not_closed() == {"10.0.0.1:6379": BreakerState.OPEN}
    assert changes == [("redis@10.0.0.1:6379", BreakerState.OPEN)] and template.state is BreakerState.CLOSED
    # When that master is no longer one of the cluster's (failed over), Then its open breaker is forgotten
    assert mb.not_closed({"10.0.0.2:6379", "10.0.0.3:6379"}) == {}
    assert set(mb.by_master) == {"10.0.0.2:6379"}
    await mb.close()


# ---- one timer for the calls' timeouts (Deadlines) ----------------------------------------------------------------


async def test_deadlines_time_out_a_hung_call_after_calls_that_ended() -> None:
    # Given one timer for a 50 ms timeout and calls that end at once (the timer is armed at the first one's deadline)
    d = Deadlines(0.05)
    for _ in range(3):
        assert await d.run(lambda: asyncio.sleep(0, "ok")) == "ok"
    # When a later call hangs, Then it fails with TimeoutError, as under asyncio.timeout
    with pytest.raises(TimeoutError):
        await d.run(asyncio.Event().wait)
    # And nothing is left in flight
    assert len(d) == 0


async def test_deadlines_never_cancel_a_task_whose_call_ended() -> None:
    # Given a call that ended well before its deadline
    d = Deadlines(0.05)
    await d.run(lambda: asyncio.sleep(0))
    # When its task goes on waiting past that deadline (the timer fires meanwhile), Then it is not cancelled
    await asyncio.sleep(0.12)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_deadlines_keep_each_calls_own_deadline() -> None:
    # Given a hung call, and a second one started 40 ms later (both 100 ms)
    d = Deadlines(0.1)
    first = asyncio.create_task(d.run(asyncio.Event().wait))
    await asyncio.sleep(0.04)
    second = asyncio.create_task(d.run(asyncio.Event().wait))
    # When the first times out, Then the second is still running: it has its own deadline, then times out too
    with pytest.raises(TimeoutError):
        await first
    assert not second.done()
    with pytest.raises(TimeoutError):
        await second


async def test_deadlines_an_outside_cancel_stays_a_cancel() -> None:
    # Given a call under a deadline, When its caller cancels it, Then it is cancelled (not a TimeoutError)
    d = Deadlines(5.0)
    task = asyncio.create_task(d.run(asyncio.Event().wait))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(d) == 0


async def test_deadlines_nested_calls_the_outer_deadline_is_the_outer_timeout() -> None:
    # Given a call made inside a call with a later deadline (the outer started 40 ms earlier)
    d = Deadlines(0.1)

    async def outer() -> None:
        await asyncio.sleep(0.04)
        await d.run(asyncio.Event().wait)

    # When the outer deadline passes first, Then the outer call raises TimeoutError (the inner sees a cancel)
    with pytest.raises(TimeoutError):
        await d.run(outer)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
