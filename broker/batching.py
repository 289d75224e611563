"""Coalesce concurrent requests into one Redis round trip, without adding latency when idle.

Requests submitted while a flush is in flight form the next batch; one flush runs at a time per coalescer, so the
order of submission is the order in Redis (first delivery order = publish order). A flush may answer an exception
in place of one item's result: only that item's waiter gets it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from .supervisor import watch_task

Req = TypeVar("Req")
Res = TypeVar("Res")


class Coalescer(Generic[Req, Res]):
    def __init__(
        self, flush: Callable[[Sequence[Req]], Awaitable[Sequence[Res | BaseException]]], max_batch: int
    ) -> None:
        self._flush = flush
        self._max = max_batch
        self._pending: deque[tuple[Req, asyncio.Future[Res]]] = deque()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def submit(self, req: Req) -> asyncio.Future[Res]:
        fut: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._pending.append((req, fut))
        if self._task is None:
            self._task = watch_task(asyncio.create_task(self._run(), name="coalescer"))
        return fut

    async def _run(self) -> None:
        try:
            while self._pending:
                n = min(self._max, len(self._pending))
                batch = [self._pending.popleft() for _ in range(n)]
                try:
                    results = await self._flush([r for r, _ in batch])
                except BaseException as e:  # every waiter hears about the failure; nothing is dropped silently
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                    if isinstance(e, asyncio.CancelledError):
                        raise
                    continue
                for (_, fut), res in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(res, BaseException):
                        fut.set_exception(res)
                    else:
                        fut.set_result(res)
        finally:
            self._task = None

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is pending (shutdown). True if drained in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (self._pending or self._task is not None) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return not self._pending and self._task is None
