"""Coalesce concurrent requests into one Redis round trip, without adding latency when idle.

Requests submitted while a flush is in flight form the next batch; one flush runs at a time per coalescer, so the
order of submission is the order in Redis (first delivery order = publish order). A flush may answer an exception
in place of one item's result: only that item's waiter gets it. ``submit_many`` gives several requests one waiter
(one future for a whole ack frame instead of one per item). ``submit_call`` and ``submit_many_call`` answer through
a function called in the flush instead of a future (no done callback scheduled: a loop turn fewer per request).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import structlog

from broker.runtime import metrics
from broker.runtime.supervisor import watch_task

log = structlog.get_logger("broker.runtime")

Req = TypeVar("Req")
Res = TypeVar("Res")


class _Many(Generic[Res]):
    """The shared waiter of ``submit_many`` (a future) or ``submit_many_call`` (``fn(arg, results)``, called once in
    the flush that answers the last of them): result i (or the exception in its place) of each request, in order."""

    __slots__ = ("arg", "fn", "fut", "left", "results")

    def __init__(
        self,
        fut: asyncio.Future[list[Res | BaseException]] | None,
        n: int,
        fn: Callable[[Any, list[Res | BaseException]], None] | None = None,
        arg: Any = None,
    ) -> None:
        self.fut = fut
        self.fn = fn
        self.arg = arg
        self.results: list[Res | BaseException] = [None] * n  # type: ignore[list-item]
        self.left = n

    def put(self, i: int, res: Res | BaseException) -> None:
        self.results[i] = res
        self.left -= 1
        if self.left != 0:
            return
        if self.fut is not None:
            if not self.fut.done():
                self.fut.set_result(self.results)
        elif self.fn is not None:
            _call_back(self.fn, self.arg, self.results)

    def answered(self) -> bool:
        return self.fut.done() if self.fut is not None else self.left <= 0


class _Call(Generic[Res]):
    """The waiter of ``submit_call``: ``fn(arg, result)`` called once, in the flush, with the result or the
    exception in its place (no future, no done callback scheduled: a loop turn fewer per request)."""

    __slots__ = ("arg", "done", "fn")

    def __init__(self, fn: Callable[[Any, Res | BaseException], None], arg: Any) -> None:
        self.fn = fn
        self.arg = arg
        self.done = False

    def put(self, res: Res | BaseException) -> None:
        if self.done:
            return
        self.done = True
        _call_back(self.fn, self.arg, res)


def _call_back(fn: Callable[[Any, Any], None], arg: Any, res: Any) -> None:
    try:
        fn(arg, res)
    except Exception:  # a bug in the caller's function: the other waiters of the batch are answered all the same
        metrics.task_errors.inc()
        log.exception("coalescer_callback_failed", fn=getattr(fn, "__qualname__", repr(fn)))


Sink = asyncio.Future[Res] | _Many[Res] | _Call[Res]


class Coalescer(Generic[Req, Res]):
    """One flusher task per coalescer, started by the first submission: it flushes while anything is queued, then
    parks on a future until the next submission sets it (no new task per flush: at a low rate, where every request
    travels alone, creating and finishing a task per flush cost a third of the coalescer's time; a parked task costs
    nothing). ``drain`` (shutdown) ends it once nothing is queued; a later submission starts a new one."""

    def __init__(
        self, flush: Callable[[Sequence[Req]], Awaitable[Sequence[Res | BaseException]]], max_batch: int
    ) -> None:
        self._flush = flush
        self._max = max_batch
        self._pending: deque[tuple[Req, Sink[Res], int]] = deque()
        self._task: asyncio.Task[None] | None = None  # the flusher
        self._idle: asyncio.Future[None] | None = None  # while the flusher is parked: set to wake it
        self._closing = False  # drain() ran: the flusher ends whenever nothing is queued
        self._loop: asyncio.AbstractEventLoop | None = None  # the flusher's loop (its futures)
        self._flushing: list[tuple[Req, Sink[Res], int]] = []  # the batch being flushed
        # Asked whenever the flusher has emptied the queue: True ends it instead of parking (its owner no longer
        # needs it and has let it go; a coalescer that was busy when its owner tried ``retire``)
        self.on_idle: Callable[[], bool] | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def submit(self, req: Req) -> asyncio.Future[Res]:
        fut: asyncio.Future[Res] = self._loop_now().create_future()
        self._pending.append((req, fut, 0))
        self._start()
        return fut

    def submit_many(self, reqs: Sequence[Req]) -> asyncio.Future[list[Res | BaseException]]:
        """Submit ``reqs`` in order with one waiter: its result lists each request's result or, in its place, the
        exception that request failed with (never an exception of its own)."""
        fut: asyncio.Future[list[Res | BaseException]] = self._loop_now().create_future()
        if not reqs:
            fut.set_result([])
            return fut
        many: _Many[Res] = _Many(fut, len(reqs))
        if len(reqs) == 1:
            self._pending.append((reqs[0], many, 0))
        else:
            self._pending.extend((r, many, i) for i, r in enumerate(reqs))
        self._start()
        return fut

    def submit_many_call(
        self, reqs: Sequence[Req], fn: Callable[[Any, list[Res | BaseException]], None], arg: Any
    ) -> None:
        """``submit_many`` that answers by calling ``fn(arg, results)`` in the flush that has the last result,
        instead of through a future (no future, no done callback scheduled: a loop turn fewer per request group).
        ``reqs`` must not be empty."""
        many: _Many[Res] = _Many(None, len(reqs), fn, arg)
        if len(reqs) == 1:
            self._pending.append((reqs[0], many, 0))
        else:
            self._pending.extend((r, many, i) for i, r in enumerate(reqs))
        self._start()

    def submit_call(self, req: Req, fn: Callable[[Any, Res | BaseException], None], arg: Any) -> None:
        """``submit`` that answers by calling ``fn(arg, result)`` (or ``fn(arg, exception)``) in the flush that
        has the result, instead of through a future."""
        self._pending.append((req, _Call(fn, arg), 0))
        self._start()

    def _loop_now(self) -> asyncio.AbstractEventLoop:
        """The running loop: the flusher's while there is one (asyncio.get_running_loop() costs a getpid() system
        call per call on Python 3.11), else asked."""
        loop = self._loop
        if loop is None or self._task is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _start(self) -> None:
        idle = self._idle
        if idle is not None:  # parked: it goes on in the next loop turn, as a new task would start
            self._idle = None
            idle.set_result(None)
        elif self._task is None:
            self._task = watch_task(self._loop_now().create_task(self._flusher(), name="coalescer"))

    async def _flusher(self) -> None:
        try:
            while True:
                pending = self._pending
                while pending:
                    if len(pending) == 1:  # a request alone (every one, at a low rate): no comprehensions
                        one = pending.popleft()
                        batch = self._flushing = [one]
                        reqs = [one[0]]
                    else:
                        batch = self._flushing = [pending.popleft() for _ in range(min(self._max, len(pending)))]
                        reqs = [r for r, _, _ in batch]
                    try:
                        results = await self._flush(reqs)
                    except BaseException as e:  # every waiter hears about the failure; nothing is dropped silently
                        for _, sink, i in batch:
                            _answer(sink, i, e)
                        if isinstance(e, asyncio.CancelledError):
                            raise
                        continue
                    finally:
                        self._flushing = []
                    for (_, sink, i), res in zip(batch, results, strict=True):
                        _answer(sink, i, res)
                if self._closing or (self.on_idle is not None and self.on_idle()):
                    return
                idle = self._idle = self._loop_now().create_future()
                await idle
        except asyncio.CancelledError as e:  # shutdown: whatever still waits is answered too
            while self._pending:
                _, sink, i = self._pending.popleft()
                _answer(sink, i, e)
            raise
        finally:
            self._task = None
            self._idle = None
            self._flushing = []

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is pending or being flushed (shutdown), then end the parked flusher. True if drained
        in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self._closing = True
        while (self._pending or self._busy()) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        drained = not self._pending and not self._busy()
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.set_result(None)  # the flusher sees nothing queued and ends
        return drained

    def retire(self) -> bool:
        """End the parked flusher now if nothing is queued or being flushed (a coalescer its owner no longer
        needs); False (and nothing changed) otherwise. A later submission still gets a flusher of its own."""
        if self._pending or self._busy():
            return False
        self._closing = True
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.set_result(None)  # the flusher sees nothing queued and ends
        return True

    def _busy(self) -> bool:
        """A flush is in flight (the flusher runs and is not parked)."""
        return self._task is not None and self._idle is None and not self._task.done()

    def fail_all(self, exc: BaseException) -> int:
        """Answer ``exc`` to every waiter not answered yet: the batch being flushed (its late result is then ignored)
        and everything pending (dropped unflushed). Returns how many were answered (shutdown)."""
        n = 0
        for _, sink, i in [*self._flushing, *self._pending]:
            if not _answered(sink):
                n += 1
            _answer(sink, i, exc)
        self._pending.clear()
        return n


def _answered(sink: Sink[Res]) -> bool:
    if isinstance(sink, _Call):
        return sink.done
    return sink.answered() if isinstance(sink, _Many) else sink.done()


def _answer(sink: Sink[Res], i: int, res: Res | BaseException) -> None:
    if isinstance(sink, _Call):
        sink.put(res)
    elif isinstance(sink, _Many):
        sink.put(i, res)
    elif sink.done():
        pass
    elif isinstance(res, BaseException):
        sink.set_exception(res)
    else:
        sink.set_result(res)
