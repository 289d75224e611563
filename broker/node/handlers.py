"""In-process handlers: consumers that live inside the broker, configured in ``[[handlers]]``.

A handler is ``async def f(message: HandlerMessage) -> None``; returning acks, raising nacks (the exception text
goes into the message's error history and the retry/DLQ path applies as for WebSocket consumers). Each handler runs
behind its own circuit breaker: while it is open the group is paused (no claims), and a delivery the breaker
refused goes back to the queue without counting an attempt, so an outage downstream never fills the DLQ.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from broker.core.config import HandlerSettings, Settings
from broker.core.errors import BrokerError, ConfigError
from broker.core.model import AckItem, Delivery, NackItem
from broker.node.dispatch import Consumer, Dispatch
from broker.runtime import metrics
from broker.runtime.resilience import Breaker, BreakerOpenError, BreakerState
from broker.runtime.supervisor import watch_task

log = structlog.get_logger("broker.handlers")

_STATE_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


@dataclass(frozen=True)
class HandlerMessage:
    id: str
    topic: str
    group: str
    payload: Any
    headers: dict[str, str]
    attempt: int
    published_at: int
    key: str | None


HandlerFn = Callable[[HandlerMessage], Awaitable[object]]


def load_target(target: str) -> HandlerFn:
    module_name, _, attr = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"handler target {target!r} cannot be loaded: {e}") from None
    if not inspect.iscoroutinefunction(fn):
        raise ConfigError(f"handler target {target!r} must be an async function")
    return fn  # type: ignore[no-any-return]


class HandlerRunner:
    """The ``Outlet`` of one handler consumer: runs deliveries as tasks, settles them through dispatch."""

    def __init__(self, cfg: HandlerSettings, settings: Settings, dispatch: Dispatch) -> None:
        self.cfg = cfg
        self.fn = load_target(cfg.target)
        self.dispatch = dispatch
        self.name = f"handler:{cfg.topic}/{cfg.group}"
        b = settings.breakers
        self.breaker = Breaker(
            self.name,
            fail_max=b.handler_fail_max,
            reset_timeout_s=b.handler_reset_timeout_s,
            success_threshold=b.handler_success_threshold,
            call_timeout_s=cfg.timeout_ms / 1000,
            on_change=self._changed,
        )
        metrics.breaker_state.labels(self.name).set(0)
        self.consumer = Consumer(self, "h", cfg.topic, cfg.group, cfg.concurrency, settings.delivery.lease_ms)
        self.consumer.id = f"handler:{cfg.target}"
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = 0

    def _changed(self, name: str, old: BreakerState, new: BreakerState) -> None:
        metrics.breaker_state.labels(name).set(_STATE_VALUE[new])
        metrics.breaker_transitions.labels(name, new.value).inc()
        if new is BreakerState.OPEN:
            log.warning("delivery_paused", topic=self.cfg.topic, group=self.cfg.group, reason=f"{name} breaker open")
        elif new is BreakerState.CLOSED:
            log.info("delivery_resumed", topic=self.cfg.topic, group=self.cfg.group)
        self.dispatch.wake(self.cfg.topic, self.cfg.group)

    # ---- Outlet --------------------------------------------------------------------------------------------

    def congested(self) -> bool:
        admits = self.breaker.admits()
        if admits == 0:
            return True
        return admits == 1 and self._running >= 1  # half-open: one trial at a time

    def holds(self, msg_id: str, receipt: str) -> bool:
        return False  # one consumer per runner: two groups never share it

    def send_delivery(self, consumer: Consumer, delivery: Delivery) -> None:
        task = watch_task(asyncio.create_task(self._handle(delivery), name=f"{self.name}:{delivery.id}"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, d: Delivery) -> None:
        msg = HandlerMessage(
            d.id, d.topic, d.group, orjson.loads(d.payload), orjson.loads(d.headers), d.attempt, d.published_at, d.key
        )
        self._running += 1
        try:
            await self.breaker.call(lambda: self.fn(msg))
        except BreakerOpenError:
            # not tried: back to the queue as it was (attempt not counted), and the group stays paused
            self.consumer.inflight.pop(d.id, None)
            self.dispatch.release_later(d.topic, d.group, [d])
            return
        except asyncio.CancelledError:
            self.consumer.inflight.pop(d.id, None)
            self.dispatch.release_later(d.topic, d.group, [d])
            raise
        except Exception as e:
            text = "timeout" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
            log.warning("handler_failed", handler=self.cfg.target, message_id=d.id, attempt=d.attempt, error=text)
            await self._settle(self.dispatch.nack(self.consumer, NackItem(d.id, d.receipt, text[:2000]), d.attempt))
            return
        finally:
            self._running -= 1
        await self._settle(self.dispatch.ack(self.consumer, AckItem(d.id, d.receipt)))

    async def _settle(self, fut: asyncio.Future[Any]) -> None:
        try:
            await fut
        except BrokerError as e:
            log.warning("handler_settle_failed", handler=self.cfg.target, error=e.message,
                        note="the lease will expire and the message will be redelivered")  # fmt: skip

    async def stop(self, timeout_s: float) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=timeout_s)
            for t in pending:
                t.cancel()
            if pending:
                log.warning("handler_tasks_cut", handler=self.cfg.target, count=len(pending))
                await asyncio.wait(pending, timeout=1.0)


async def start_handlers(settings: Settings, dispatch: Dispatch) -> list[HandlerRunner]:
    runners = [HandlerRunner(cfg, settings, dispatch) for cfg in settings.handlers]
    for r in runners:
        await dispatch.add(r.consumer)
        log.info("handler_started", topic=r.cfg.topic, group=r.cfg.group, target=r.cfg.target)
    return runners
