"""The broker node: wires store, dispatch, recovery and the server; owns startup and graceful shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Sequence

import structlog

from . import metrics
from .batching import Coalescer
from .config import Settings
from .dispatch import Dispatch
from .embedded import EmbeddedRedis
from .errors import ConfigError
from .handlers import HandlerRunner, start_handlers
from .model import PublishRequest, PublishResult
from .protocol import Limits
from .recovery import Recovery
from .resilience import Breaker, BreakerState
from .server import WsServer
from .store import Redis, RedisStore, connect_redis
from .store.fake import fake_client
from .store.inspect import persistence_warnings
from .store.keys import SCHEMA_VERSION

log = structlog.get_logger("broker.app")

_STATE_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class Broker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.node_id = f"{os.uname().nodename}-{os.getpid()}-{os.urandom(2).hex()}"
        s = settings
        self.limits = Limits(
            max_payload_bytes=s.server.max_payload_bytes,
            max_headers_bytes=s.server.max_headers_bytes,
            max_prefetch=s.delivery.max_prefetch,
            max_delay_ms=s.delivery.max_delay_ms,
        )
        b = s.breakers
        self.redis_breaker = Breaker(
            "redis",
            fail_max=b.redis_fail_max,
            reset_timeout_s=b.redis_reset_timeout_s,
            success_threshold=b.redis_success_threshold,
            call_timeout_s=b.redis_call_timeout_ms / 1000,
            on_change=self._breaker_changed,
        )
        metrics.breaker_state.labels("redis").set(0)
        self.embedded: EmbeddedRedis | None = None
        self.handlers: list[HandlerRunner] = []
        self.durable = True
        self.stopping = False
        self._stopped = asyncio.Event()
        self._nondurable_nag: asyncio.Task[None] | None = None

    def _breaker_changed(self, name: str, old: BreakerState, new: BreakerState) -> None:
        metrics.breaker_state.labels(name).set(_STATE_VALUE[new])
        metrics.breaker_transitions.labels(name, new.value).inc()
        if new is BreakerState.CLOSED and hasattr(self, "dispatch"):
            self.dispatch.wake_all()

    async def _redis_client(self) -> Redis:
        url = self.settings.redis.url
        if url:
            log.info("redis_external", url=_redact(url))
            return connect_redis(url, self.settings)
        if EmbeddedRedis.binary() is not None:
            self.embedded = EmbeddedRedis(self.settings.redis.data_dir, self.settings.redis.embedded_port)
            await self.embedded.start()
            return connect_redis(self.embedded.url, self.settings)
        self.durable = False
        log.critical(
            "redis_nondurable_fallback",
            message="NO redis-server binary and no BROKER_REDIS_URL: using in-process fakeredis. "
            "NOTHING IS DURABLE: every message is lost when this process exits.",
        )
        return fake_client()

    async def start(self) -> None:
        client = await self._redis_client()
        self.store = RedisStore(client, self.settings, self.redis_breaker, self.node_id)
        old = await self.store.init_schema()
        if old is not None and old != SCHEMA_VERSION:
            raise ConfigError(f"Redis holds key schema version {old}, this broker speaks {SCHEMA_VERSION}")
        if self.durable:
            for w in await persistence_warnings(client):
                log.warning("redis_persistence_risk", problem=w)
        else:
            self._nondurable_nag = asyncio.create_task(self._nag())
        self.dispatch = Dispatch(self.store, self.settings)
        self.publisher: Coalescer[PublishRequest, PublishResult] = Coalescer(self._publish_flush, 1000)
        self.recovery = Recovery(self.store, self.dispatch)
        self.recovery.start()
        self.handlers = await start_handlers(self.settings, self.dispatch)
        self.server = WsServer(self)
        await self.server.start()
        log.info(
            "broker_started",
            node=self.node_id,
            host=self.settings.server.host,
            port=self.server.port,
            durable=self.durable,
            embedded_redis=self.embedded.url if self.embedded else None,
        )

    async def _nag(self) -> None:
        while True:
            await asyncio.sleep(60)
            log.critical("redis_nondurable_fallback", message="still running on fakeredis: NOTHING IS DURABLE")

    async def _publish_flush(self, reqs: Sequence[PublishRequest]) -> list[PublishResult]:
        res = await self.store.publish_many(reqs)
        for topic in {r.topic for r in reqs}:
            self.dispatch.wake(topic)
        return res

    def readiness(self) -> tuple[bool, list[str]]:
        reasons = []
        if self.stopping:
            reasons.append("shutting down")
        state = self.redis_breaker.state
        if state is not BreakerState.CLOSED:
            reasons.append(f"redis breaker {state.value}")
        recovery: Recovery | None = getattr(self, "recovery", None)
        if recovery is not None:
            reasons += [f"loop {name} failing: {err}" for name, err in recovery.last_error.items()]
        return (not reasons, reasons)

    async def stop(self) -> None:
        """Graceful, in phases with deadlines: stop accepting -> stop claiming -> give back unsent deliveries and
        wait for in-flight acks -> close connections -> stop loops -> close Redis last."""
        if self.stopping:
            return
        self.stopping = True
        grace = self.settings.server.shutdown_grace_ms / 1000
        log.info("shutdown_started", grace_s=grace)
        self.server.stop_accepting()
        await self.dispatch.stop(grace / 2)
        for h in self.handlers:
            await h.stop(grace / 4)
        if not await self.publisher.drain(grace / 4):
            log.warning("shutdown_publishes_cut", pending=len(self.publisher))
        await self.server.close_all(grace / 4)
        await self.dispatch.stop(grace / 4)  # settle what the closed sessions handed back
        await self.recovery.stop(2.0)
        if self._nondurable_nag:
            self._nondurable_nag.cancel()
        await self.store.close()
        if self.embedded:
            self.embedded.stop()
        log.info("shutdown_complete")
        self._stopped.set()

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        await self.stop()


def _redact(url: str) -> str:
    if "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
