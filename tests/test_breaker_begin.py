"""``Breaker.begin`` / ``Breaker.end``: a call whose outcome is known in a callback (the script pipe's batches on its
protocol path, ``broker/store/pipe.py``) goes through the same pybreaker state machine as an awaited ``call``:
failures open it, an open breaker refuses at once, half-open admits one trial whose outcome closes or reopens it."""

from __future__ import annotations

import pytest

from broker.runtime.resilience import Breaker, BreakerOpenError, BreakerState


def breaker(**kw: float) -> Breaker:
    args: dict[str, float] = {"fail_max": 2, "reset_timeout_s": 3600.0, "success_threshold": 1}
    args.update(kw)
    return Breaker("redis", fail_max=int(args["fail_max"]), reset_timeout_s=args["reset_timeout_s"],
                   success_threshold=int(args["success_threshold"]))  # fmt: skip


def fail(b: Breaker) -> None:
    trial = b.begin()
    b.end(trial, TimeoutError("batch timed out"))


def test_failures_ended_open_the_breaker_and_it_then_refuses_at_once() -> None:
    b = breaker()
    # Given calls that begin while closed (no trial) and end failed
    assert b.begin() is False
    b.end(False, ConnectionError("lost"))
    assert b.state is BreakerState.CLOSED and b.fail_counter == 1
    fail(b)
    # Then the breaker is open, and the next begin is refused with a retry_after
    assert b.state is BreakerState.OPEN
    with pytest.raises(BreakerOpenError) as refused:
        b.begin()
    assert refused.value.retry_after_ms > 1_000


def test_a_success_ended_resets_the_failure_count() -> None:
    b = breaker(fail_max=3)
    fail(b)
    fail(b)
    b.end(b.begin(), None)
    assert b.fail_counter == 0 and b.state is BreakerState.CLOSED


async def test_half_open_admits_one_trial_whose_success_closes_it() -> None:
    b = breaker(fail_max=1, reset_timeout_s=0.0)
    fail(b)
    assert b.state is BreakerState.OPEN
    # When the reset timeout has passed: the next begin is the trial
    assert b.begin() is True
    assert b.state is BreakerState.HALF_OPEN
    # Then no other call starts while it runs, awaited or not
    with pytest.raises(BreakerOpenError):
        b.begin()

    async def other() -> int:
        return 1

    with pytest.raises(BreakerOpenError):
        await b.call(other)
    assert b.admits() == 0
    # And its success closes the breaker, and calls flow again
    b.end(True, None)
    assert b.state is BreakerState.CLOSED
    assert b.begin() is False
    assert await b.call(other) == 1


def test_a_failed_trial_opens_it_again() -> None:
    b = breaker(fail_max=1, reset_timeout_s=0.0)
    fail(b)
    trial = b.begin()
    assert trial is True
    b.end(trial, TimeoutError("hung"))
    assert b.state is BreakerState.OPEN
    assert b.begin() is True  # (reset timeout 0: the next trial is due at once, and it is the only one)


def test_a_trial_ended_uncounted_reports_nothing_and_frees_the_next_trial() -> None:
    b = breaker(fail_max=1, reset_timeout_s=0.0, success_threshold=1)
    fail(b)
    trial = b.begin()
    # When the trial is abandoned (the pipe shuts down with it in flight)
    b.end(trial, None, counted=False)
    # Then the breaker did not close (no success) nor reopen (no failure), and another trial may start
    assert b.state is BreakerState.HALF_OPEN
    assert b.begin() is True


async def test_an_awaited_trial_blocks_begin_until_it_ends() -> None:
    import asyncio

    b = breaker(fail_max=1, reset_timeout_s=0.0)
    fail(b)
    gate = asyncio.Event()

    async def slow() -> str:
        await gate.wait()
        return "ok"

    trial = asyncio.ensure_future(b.call(slow))
    await asyncio.sleep(0)
    with pytest.raises(BreakerOpenError):
        b.begin()
    gate.set()
    assert await trial == "ok"
    assert b.state is BreakerState.CLOSED and b.begin() is False
