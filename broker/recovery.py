"""Background upkeep, safe on N nodes (every step is one idempotent script): lease expiry, due-retry promotion,
node heartbeats. Each loop logs and counts its failures and keeps going; none ends silently."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog

from . import metrics
from .dispatch import Dispatch
from .errors import BrokerError
from .store import RedisStore
from .store.dlq import DeadLetters

log = structlog.get_logger("broker.recovery")

PAIRS_REFRESH_S = 2.0
FORGET_NODE_MS = 3_600_000  # after this long its heartbeat entry is removed
GAUGE_INTERVAL_S = 5.0  # queue-depth gauges in /metrics are this fresh


class Recovery:
    def __init__(
        self, store: RedisStore, dispatch: Dispatch, status: Callable[[], dict[str, str]] | None = None
    ) -> None:
        self.store = store
        self.status = status
        self.dispatch = dispatch
        settings = store.settings
        self.interval = settings.delivery.sweep_interval_ms / 1000
        self.node_timeout_ms = settings.delivery.node_timeout_ms
        self.prune_interval = float(settings.dlq.prune_interval_s)
        self.dead_letters = DeadLetters(store)
        self._pairs: list[tuple[str, str]] = []
        self._pairs_at = 0.0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.last_error: dict[str, str] = {}

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._loop("sweep", self.sweep_once, self.interval), name="sweep"),
            asyncio.create_task(self._loop("heartbeat", self.heartbeat_once, 1.0), name="heartbeat"),
            asyncio.create_task(self._loop("dlq_prune", self.prune_once, self.prune_interval), name="dlq_prune"),
            asyncio.create_task(self._loop("depth_gauges", self.gauges_once, GAUGE_INTERVAL_S), name="depth_gauges"),
        ]

    async def _loop(self, name: str, step: Callable[[], Awaitable[object]], every_s: float) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                await step()
                if failures:
                    log.info("loop_recovered", loop=name, after_failures=failures)
                failures = 0
                self.last_error.pop(name, None)
            except BrokerError as e:
                failures += 1
                metrics.loop_errors.labels(name).inc()
                self.last_error[name] = e.message
                if failures == 1 or failures % 20 == 0:
                    log.warning("loop_step_failed", loop=name, error=e.message, failures=failures)
            except Exception as e:
                failures += 1
                metrics.loop_errors.labels(name).inc()
                self.last_error[name] = repr(e)
                log.exception("loop_step_crashed", loop=name, failures=failures)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), every_s)

    async def sweep_once(self) -> None:
        if await self.store.reconcile_claims():
            self.dispatch.wake_all()
        now = time.monotonic()
        if now - self._pairs_at > PAIRS_REFRESH_S or not self._pairs:
            self._pairs = await self.store.all_pairs()
            self._pairs_at = now
        dead_nodes = await self.store.dead_nodes(self.node_timeout_ms)
        for i in range(0, len(self._pairs), 100):
            chunk = self._pairs[i : i + 100]
            results = await self.store.sweep(chunk, dead_nodes=dead_nodes)
            for (topic, group), (retry, dead, promoted) in zip(chunk, results, strict=True):
                if retry or dead:
                    metrics.lease_expired.labels(topic, group, "retry").inc(retry)
                    metrics.lease_expired.labels(topic, group, "dead").inc(dead)
                    log.warning("leases_expired", topic=topic, group=group, to_retry=retry, to_dlq=dead)
                if promoted:
                    metrics.promoted.labels(topic, group).inc(promoted)
                if promoted or dead:  # a dead-lettered message may let the next one of its ordering key go live
                    self.dispatch.wake(topic, group)
        if dead_nodes:
            # every pair was swept for these nodes' leases in this pass: they hold nothing any more
            await self.store.forget_nodes(await self.store.dead_nodes(FORGET_NODE_MS))

    async def gauges_once(self) -> None:
        pairs = await self.store.all_pairs()
        for i in range(0, len(pairs), 200):
            for d in await self.store.depths(pairs[i : i + 200]):
                for state, n in (("ready", d.ready), ("leased", d.leased), ("delayed", d.delayed), ("dead", d.dead)):
                    metrics.child(metrics.queue_depth, d.topic, d.group, state).set(n)

    async def heartbeat_once(self) -> None:
        await self.store.heartbeat(self.status() if self.status is not None else None)

    async def prune_once(self) -> None:
        pairs = await self.store.all_pairs()
        for i in range(0, len(pairs), 100):
            n = await self.dead_letters.prune(pairs[i : i + 100])
            if n:
                log.info("dead_letters_expired", count=n)

    async def stop(self, timeout_s: float) -> None:
        self._stop.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout_s)
