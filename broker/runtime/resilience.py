"""Circuit breakers (pybreaker under an asyncio adapter) and retry policies (tenacity).

The only module of the server that imports pybreaker or tenacity (the client, apart, retries with tenacity itself;
tests/test_layers.py holds both). The rest of the code sees ``Breaker``, ``BreakerState``, ``BreakerOpenError``,
``LoopBackoff`` and pure functions such as ``backoff_ms``.

Why an adapter: pybreaker 1.4's decorator records success when an ``async def`` is *called* (the coroutine is only
created), and ``call_async`` needs Tornado. We run the ``await`` (with its per-call timeout, so a hung call counts as
a failure) and then report its outcome to pybreaker's state machine through the public ``calling()`` context manager.
``asyncio.CancelledError`` is reported as nothing at all: pybreaker counts an excluded exception as a success, which
would let a cancelled half-open trial close the breaker. In half-open only one trial call runs at a time.
A call that is not an ``await`` (its outcome arrives in a callback: the script pipe's batches) uses
``Breaker.begin``/``Breaker.end`` instead, on the same state machine and the same trial.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from enum import StrEnum
from typing import Any, TypeVar

import pybreaker
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, retry_if_result, stop_after_delay
from tenacity import wait_exponential_jitter as _wait_exponential_jitter

T = TypeVar("T")
log = structlog.get_logger("broker.resilience")


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class BreakerOpenError(Exception):
    """The breaker refused the call without trying it (open, or a half-open trial is already running)."""

    def __init__(self, name: str, retry_after_ms: int) -> None:
        super().__init__(f"circuit breaker {name!r} is open")
        self.name = name
        self.retry_after_ms = retry_after_ms


def backoff_delay(attempt: int, base_ms: int, multiplier: float, cap_ms: int, factor: float) -> int:
    """Delay before retry number ``attempt`` (1-based): ``min(cap, base * multiplier**(attempt-1))`` times a jitter
    ``factor``, never below 1 ms and never above the cap (jitter spreads delays below the cap, it never exceeds it).
    The Lua scripts compute the same (``backoff`` in ``store/scripts/_lib.lua``) so a message's own backoff base
    applies in Redis; a test holds the two to each other."""
    try:
        raw = min(float(cap_ms), base_ms * multiplier ** max(0, attempt - 1))
    except OverflowError:  # a huge attempt number: far past the cap
        raw = float(cap_ms)
    return max(1, min(cap_ms, math.floor(raw * factor + 0.5)))


def jitter_factor(jitter: float, rng: random.Random) -> float:
    """A uniform draw from ``[1 - jitter, 1 + jitter]``: proportional jitter (not full jitter) keeps retries spread
    without ever retrying at once."""
    return rng.uniform(1.0 - jitter, 1.0 + jitter)


def backoff_ms(attempt: int, base_ms: int, multiplier: float, cap_ms: int, jitter: float, rng: random.Random) -> int:
    """``backoff_delay`` with a fresh jitter draw: the result lies in ``[d*(1-jitter), d*(1+jitter)]``."""
    return backoff_delay(attempt, base_ms, multiplier, cap_ms, jitter_factor(jitter, rng))


StateListener = Callable[[str, BreakerState, BreakerState], None]


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, name: str, on_change: Callable[[BreakerState, BreakerState], None]) -> None:
        self._name = name
        self._on_change = on_change

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        old = BreakerState(old_state.name) if old_state is not None else BreakerState.CLOSED
        new = BreakerState(new_state.name)
        log.warning("breaker_state_changed", breaker=self._name, old=old.value, new=new.value)
        self._on_change(old, new)


class _Call:
    """One call under ``Deadlines``: its task, its deadline (loop time), whether it ended or timed out."""

    __slots__ = ("cancelling", "deadline", "ended", "expired", "task")

    def __init__(self, task: asyncio.Task[Any], deadline: float) -> None:
        self.task = task
        self.deadline = deadline
        self.cancelling = task.cancelling()
        self.ended = False
        self.expired = False

    def timed_out(self) -> bool:
        """On ``CancelledError``: whether it is this call's deadline that cancelled it and nobody else cancelled the
        task too (then raise ``TimeoutError``), as ``asyncio.timeout`` decides."""
        return self.expired and self.task.uncancel() <= self.cancelling


class Deadlines:
    """A timeout of ``timeout_s`` for each call run through ``run``, with one loop timer between all of them.

    ``asyncio.timeout`` per call costs a timer handle made and cancelled, a ``Timeout`` object and two lookups of the
    running loop (a ``getpid()`` each on Python 3.11): at a low rate, where every Redis batch travels alone, that is
    per message. Here a call costs an entry in a queue. Every call has the same timeout, so the calls' deadlines
    come in the order they started: the timer is armed at the oldest's deadline; when it fires it cancels the task
    of every call past its deadline that has not ended (its ``run`` raises ``TimeoutError``, as ``asyncio.timeout``
    would) and is armed again at the next call's. A call that ends only marks its entry (nothing to cancel): the
    timer then fires once at a deadline that no longer holds and moves on. So a hung call still fails within its
    ``timeout_s`` (a few ms of loop lag aside, as with ``asyncio.timeout``)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._calls: deque[_Call] = deque()  # started, in order; ended ones are dropped lazily
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        """``await fn()``, raising ``TimeoutError`` if it has not ended ``timeout_s`` after it started."""
        call = self._start()
        if call is None:  # not in a task (a callback): nothing to cancel, so a timeout of asyncio's own
            async with asyncio.timeout(self.timeout_s):
                return await fn()
        try:
            return await fn()
        except asyncio.CancelledError:
            if call.timed_out():
                raise TimeoutError from None
            raise
        finally:
            call.ended = True

    def _start(self) -> _Call | None:
        """A call of the current task starts now (None outside a task)."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            return None
        if loop is not self._loop:  # first call, or a new loop (tests): what the old one held is gone
            self._loop, self._timer = loop, None
            self._calls.clear()
        call = _Call(task, loop.time() + self.timeout_s)
        calls = self._calls
        while calls and calls[0].ended:
            calls.popleft()
        calls.append(call)
        if self._timer is None:
            self._timer = loop.call_at(call.deadline, self._fire)
        return call

    def _fire(self) -> None:
        loop = self._loop
        if loop is None or loop is not asyncio.get_running_loop():  # a timer of a loop left behind (tests)
            return
        self._timer = None
        now = loop.time()
        calls = self._calls
        while calls:
            call = calls[0]
            if not call.ended:
                if call.deadline > now:
                    self._timer = loop.call_at(call.deadline, self._fire)
                    return
                call.expired = True
                call.task.cancel()
            calls.popleft()

    def __len__(self) -> int:
        """Calls in flight (tests)."""
        return sum(1 for c in self._calls if not c.ended)


class Breaker:
    """An asyncio circuit breaker over pybreaker's state machine.

    With a ``probe`` (a cheap health check such as Redis ``PING``, never real traffic), an open breaker does not wait
    out its whole ``reset_timeout_s``: every ``probe_interval_s`` it runs the probe, and the first healthy answer
    moves it to half-open at once, so the next real call is the trial. ``reset_timeout_s`` stays the upper bound.
    """

    def __init__(
        self,
        name: str,
        *,
        fail_max: int,
        reset_timeout_s: float,
        success_threshold: int = 1,
        call_timeout_s: float | None = None,
        exclude: Iterable[type[BaseException]] = (),
        on_change: StateListener | None = None,
        probe: Callable[[], Awaitable[object]] | None = None,
        probe_interval_s: float = 1.0,
    ) -> None:
        self.name = name
        self.reset_timeout_s = reset_timeout_s
        self.call_timeout_s = call_timeout_s
        self._fail_max = fail_max
        self._success_threshold = success_threshold
        self._exclude = tuple(exclude)
        self._on_change = on_change
        self._probe = probe
        self._probe_interval_s = probe_interval_s
        self._prober: asyncio.Task[None] | None = None
        self.probes = 0  # probes run (tests and logs: at most one per probe_interval_s while open)
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout_s,
            success_threshold=success_threshold,
            exclude=[asyncio.CancelledError, *exclude],  # type: ignore[arg-type]
            listeners=[_Listener(name, self._changed)],
            name=name,
            throw_new_error_on_trip=False,
        )
        self._trial = False  # a half-open trial call is running (``call`` or ``begin``): no other call may start
        self._deadlines = Deadlines(call_timeout_s) if call_timeout_s is not None else None

    def like(self, name: str, probe: Callable[[], Awaitable[object]] | None = None) -> Breaker:
        """A new breaker named ``name`` with this one's settings and listener (and ``probe`` as its probe): e.g. one
        per Redis Cluster master, made from the node's Redis breaker."""
        return Breaker(
            name,
            fail_max=self._fail_max,
            reset_timeout_s=self.reset_timeout_s,
            success_threshold=self._success_threshold,
            call_timeout_s=self.call_timeout_s,
            exclude=self._exclude,
            on_change=self._on_change,
            probe=probe,
            probe_interval_s=self._probe_interval_s,
        )

    @property
    def state(self) -> BreakerState:
        return BreakerState(self._cb.current_state)

    @property
    def fail_counter(self) -> int:
        return int(self._cb.fail_counter)

    def _changed(self, old: BreakerState, new: BreakerState) -> None:
        if new is BreakerState.OPEN and self._probe is not None and (self._prober is None or self._prober.done()):
            with contextlib.suppress(RuntimeError):  # no running loop (a synchronous test): nothing to probe with
                self._prober = asyncio.get_running_loop().create_task(self._probe_until_healthy(), name=self.name)
        if self._on_change is not None:
            self._on_change(self.name, old, new)

    async def _probe_until_healthy(self) -> None:
        assert self._probe is not None
        while self.state is BreakerState.OPEN:
            await asyncio.sleep(self._probe_interval_s)
            if self.state is not BreakerState.OPEN:
                return
            self.probes += 1
            try:
                async with asyncio.timeout(self.call_timeout_s or self._probe_interval_s):
                    await self._probe()
            except Exception as e:  # still down: stay open, try again next interval
                log.debug("breaker_probe_failed", breaker=self.name, error=repr(e))
                continue
            if self.state is BreakerState.OPEN:
                log.info("breaker_probe_healthy", breaker=self.name)
                self._cb.half_open()
            return

    def stop_probe(self) -> None:
        """Stop the probe without waiting (a breaker that is forgotten)."""
        if self._prober is not None and not self._prober.done():
            self._prober.cancel()

    async def close(self) -> None:
        """Stop the probe (shutdown)."""
        if self._prober is not None and not self._prober.done():
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober

    def retry_after_ms(self) -> int:
        if self.state is not BreakerState.OPEN:
            return 1_000
        return max(100, int(self._open_time_left_s() * 1000))

    def admits(self) -> int:
        """How many calls may start now: unlimited (-1) when closed, 1 when a trial is due, 0 while open."""
        if self.state is BreakerState.CLOSED:
            return -1
        if self._trial or (self.state is BreakerState.OPEN and self._open_time_left_s() > 0):
            return 0
        return 1

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        if self._cb.current_state == "closed":  # (not ``self.state``: an enum made from the string per call)
            return await self._guarded(fn)
        self._take_trial()
        try:
            return await self._guarded(fn)
        finally:
            self._trial = False

    def begin(self) -> bool:
        """Start a call that is not an ``await`` (its outcome is known later, in a callback): raises
        ``BreakerOpenError`` if the breaker refuses it, as ``call`` would. Returns whether it is the half-open trial
        (then no other call starts until it ends). Every ``begin`` that returned must be followed by exactly one
        ``end``. The call's timeout is the caller's (``call_timeout_s``: a call past it is ended as a failure)."""
        if self._cb.current_state == "closed":
            return False
        self._take_trial()
        return True

    def end(self, trial: bool, exc: Exception | None, *, counted: bool = True) -> None:
        """The call ``begin`` started has ended: ``exc`` None is a success, else a failure (a timeout too), reported
        to pybreaker as ``call`` reports an awaited call's outcome. ``counted=False``: it ended without an outcome
        (abandoned at shutdown, as a cancelled ``call``): nothing is reported, only the trial is released."""
        try:
            if counted:
                self._report(exc)
        finally:
            if trial:
                self._trial = False

    def _take_trial(self) -> None:
        """The breaker is not closed: refuse the call, or make it the half-open trial (``_trial`` set)."""
        if self._trial:
            raise BreakerOpenError(self.name, self.retry_after_ms())
        if self.state is BreakerState.OPEN:
            if self._open_time_left_s() > 0:
                raise BreakerOpenError(self.name, self.retry_after_ms())
            self._cb.half_open()
        self._trial = True

    def _open_time_left_s(self) -> float:
        opened = self._cb._state_storage.opened_at
        if opened is None:
            return 0.0
        return float(opened.timestamp() + self.reset_timeout_s - time.time())

    async def _guarded(self, fn: Callable[[], Awaitable[T]]) -> T:
        # The await runs outside pybreaker; its outcome is reported afterwards, synchronously. So a cancelled call
        # reports nothing (pybreaker would count an excluded exception as a *success*: a cancelled half-open trial
        # would close the breaker, a cancelled call would reset the failure count), and a call that finishes after
        # others opened the breaker does not reopen it or fire the listener again.
        deadlines = self._deadlines
        try:
            result = await (fn() if deadlines is None else deadlines.run(fn))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a timeout of the call's own deadline included (``TimeoutError``)
            self._report(e)
            raise
        self._report(None)
        return result

    def _report(self, exc: Exception | None) -> None:
        """A call's outcome to pybreaker: ``exc`` None is a success."""
        cb = self._cb
        if exc is None and cb.current_state == "closed" and not cb.fail_counter:
            # a success changes nothing in pybreaker's closed state without failures (it resets a counter at 0 and
            # tells listeners, ours listen to state changes only): skipped, as it costs a lock and a generator per call
            return
        try:
            with self._cb.calling():
                if exc is not None:
                    raise exc
        except pybreaker.CircuitBreakerError:
            pass  # opened by other calls while this one ran: the outcome changes nothing
        except Exception as e:
            if e is not exc:
                raise


class Unguarded:
    """Calls behind no breaker, only a per-call timeout (``call`` as ``Breaker.call``; it never refuses). On a Redis
    Cluster the calls that are for no one master (registries, heartbeats, reads and scans over many topics) run so:
    a breaker shared by every master would let one master's outage refuse the calls to all the others, and a call
    over many masters cannot be counted against one of them. Their callers pace them (loops back off, operators
    ask once), so a master that does not answer is not hammered."""

    name = "redis"
    state = BreakerState.CLOSED

    def __init__(self, call_timeout_s: float | None) -> None:
        self.call_timeout_s = call_timeout_s
        self._deadlines = Deadlines(call_timeout_s) if call_timeout_s is not None else None

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        if self._deadlines is None:
            return await fn()
        return await self._deadlines.run(fn)


def retry_until(
    retry_on: tuple[type[BaseException], ...],
    *,
    deadline_s: float,
    on_retry: Callable[[int, BaseException, float], None],
) -> AsyncRetrying:
    """Retry while ``retry_on`` is raised, with jittered exponential waits (0.2 s growing to 2 s), until
    ``deadline_s`` has passed; then the last error is raised. ``on_retry(attempt, error, wait_s)`` before each wait
    (say what is being waited for: a retry is never silent)."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        if exc is not None:
            on_retry(state.attempt_number, exc, wait)

    return AsyncRetrying(
        retry=retry_if_exception_type(retry_on),
        wait=_wait_exponential_jitter(initial=0.2, max=2.0, jitter=0.2),
        stop=stop_after_delay(deadline_s),
        before_sleep=before_sleep,
        reraise=True,
    )


async def repeat_while_left(
    step: Callable[[], Awaitable[bool]], *, deadline_s: float, initial_s: float, max_s: float
) -> bool:
    """Await ``step`` until it answers False (nothing left to do), with jittered exponential waits (``initial_s``
    growing to ``max_s``) between, for at most ``deadline_s``. An exception of ``step`` is raised at once. Returns
    whether something was still left at the end (the caller reports it: a retry that gave up is never silent)."""
    retrying = AsyncRetrying(
        retry=retry_if_result(bool),
        wait=_wait_exponential_jitter(multiplier=initial_s, max=max_s, jitter=initial_s),
        stop=stop_after_delay(deadline_s),
        retry_error_callback=lambda state: True,
    )
    return bool(await retrying(step))


class LoopBackoff:
    """How long a failed background loop waits before its next try: tenacity's ``wait_exponential_jitter``, i.e.
    ``min(cap_s, base_s * 2**(failures-1) + uniform(0, base_s))`` and never less than ``base_s`` (the loop's own
    interval: a failing loop never runs faster than a healthy one)."""

    def __init__(self, base_s: float, cap_s: float) -> None:
        self.base_s = base_s
        self.cap_s = max(cap_s, base_s)
        self._wait = _wait_exponential_jitter(multiplier=base_s, max=self.cap_s, jitter=base_s, min=base_s)
        self._state = RetryCallState(AsyncRetrying(), None, (), {})

    def __call__(self, failures: int) -> float:
        self._state.attempt_number = max(1, failures)
        return float(self._wait(self._state))
