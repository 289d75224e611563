"""Coalesce concurrent requests into one Redis round trip, without adding latency when idle.

Requests submitted while a flush is in flight form the next batch; one flush runs at a time per coalescer, so the
order of submission is the order in Redis (first delivery order = publish order). A flush may answer an exception
in place of one item's result: only that item's waiter gets it. ``submit_many`` gives several requests one waiter
(one future for a whole ack frame instead of one per item).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from broker.runtime.supervisor import watch_task

Req = TypeVar("Req")
Res = TypeVar("Res")


class _Many(Generic[Res]):
    """The shared waiter of ``submit_many``: result i (or the exception in its place) of each request, in order."""

    __slots__ = ("fut", "left", "results")

    def __init__(self, fut: asyncio.Future[list[Res | BaseException]], n: int) -> None:
        self.fut = fut
        self.results: list[Res | BaseException] = [None] * n  # type: ignore[list-item]
        self.left = n

    def put(self, i: int, res: Res | BaseException) -> None:
        self.results[i] = res
        self.left -= 1
        if self.left == 0 and not self.fut.done():
            self.fut.set_result(self.results)


class Coalescer(Generic[Req, Res]):
    def __init__(
        self, flush: Callable[[Sequence[Req]], Awaitable[Sequence[Res | BaseException]]], max_batch: int
    ) -> None:
        self._flush = flush
        self._max = max_batch
        self._pending: deque[tuple[Req, asyncio.Future[Res] | _Many[Res], int]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._flushing: list[tuple[Req, asyncio.Future[Res] | _Many[Res], int]] = []  # the batch being flushed

    def __len__(self) -> int:
        return len(self._pending)

    def submit(self, req: Req) -> asyncio.Future[Res]:
        fut: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._pending.append((req, fut, 0))
        self._start()
        return fut

    def submit_many(self, reqs: Sequence[Req]) -> asyncio.Future[list[Res | BaseException]]:
        """Submit ``reqs`` in order with one waiter: its result lists each request's result or, in its place, the
        exception that request failed with (never an exception of its own)."""
        fut: asyncio.Future[list[Res | BaseException]] = asyncio.get_running_loop().create_future()
        if not reqs:
            fut.set_result([])
            return fut
        many: _Many[Res] = _Many(fut, len(reqs))
        self._pending.extend((r, many, i) for i, r in enumerate(reqs))
        self._start()
        return fut

    def _start(self) -> None:
        if self._task is None:
            self._task = watch_task(asyncio.create_task(self._flush_while_queued(), name="coalescer"))

    async def _flush_while_queued(self) -> None:
        try:
            while self._pending:
                n = min(self._max, len(self._pending))
                batch = self._flushing = [self._pending.popleft() for _ in range(n)]
                try:
                    results = await self._flush([r for r, _, _ in batch])
                except BaseException as e:  # every waiter hears about the failure; nothing is dropped silently
                    for _, sink, i in batch:
                        _answer(sink, i, e)
                    if isinstance(e, asyncio.CancelledError):  # shutdown: whatever still waits is answered too
                        while self._pending:
                            _, sink, i = self._pending.popleft()
                            _answer(sink, i, e)
                        raise
                    continue
                for (_, sink, i), res in zip(batch, results, strict=True):
                    _answer(sink, i, res)
        finally:
            self._task = None
            self._flushing = []

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is pending (shutdown). True if drained in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (self._pending or self._task is not None) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return not self._pending and self._task is None


    def fail_all(self, exc: BaseException) -> int:
        """Answer ``exc`` to every waiter not answered yet: the batch being flushed (its late result is then ignored)
        and everything pending (dropped unflushed). Returns how many were answered (shutdown)."""
        n = 0
        for _, sink, i in [*self._flushing, *self._pending]:
            if not (sink.fut if isinstance(sink, _Many) else sink).done():
                n += 1
            _answer(sink, i, exc)
        self._pending.clear()
        return n


def _answer(sink: asyncio.Future[Res] | _Many[Res], i: int, res: Res | BaseException) -> None:
    if isinstance(sink, _Many):
        sink.put(i, res)
    elif sink.done():
        pass
    elif isinstance(res, BaseException):
        sink.set_exception(res)
    else:
        sink.set_result(res)
