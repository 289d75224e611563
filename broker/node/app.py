"""The broker node: wires store, dispatch, recovery and the server; owns startup and graceful shutdown."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import time

import orjson
import structlog

from broker.core.config import Settings
from broker.core.errors import BrokerError, ConfigError, UnavailableError
from broker.core.protocol import Limits
from broker.node.console_gate import ConsoleContext, ConsoleHandler, ConsoleMount
from broker.node.dispatch import Dispatch
from broker.node.embedded import EmbeddedRedis
from broker.node.handlers import HandlerRunner, load_target, start_handlers
from broker.node.publish import Publisher
from broker.node.recovery import Recovery
from broker.node.server import WsServer
from broker.node.session import SessionParts
from broker.runtime import metrics
from broker.runtime.resilience import Breaker, BreakerState, retry_until
from broker.runtime.supervisor import Supervisor, watch_task
from broker.store import Redis, RedisStore, connect_redis, fake_client
from broker.store.keys import SCHEMA_VERSION

log = structlog.get_logger("broker.app")

_STATE_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


def is_loopback(host: str) -> bool:
    """Only this machine can reach ``host`` (``localhost``, 127.0.0.0/8, ``::1``); ``""`` and ``0.0.0.0`` are not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to any interface


def check_auth(settings: Settings) -> None:
    """The two auth traps refused before anything starts (``ConfigError``, one line that says what to change):
    tokens mode without a token (every client would be refused), open mode reachable from other machines."""
    auth, host = settings.auth, settings.server.host
    if auth.mode == "tokens" and not settings.tokens:
        raise ConfigError(
            "auth.mode is 'tokens' (the default) but no [[tokens]] are configured, so every client would be refused: "
            "add one (`broker token-hash` prints the table for config/broker.toml), or for a local trial set "
            '[auth] mode = "open" (BROKER_AUTH_MODE=open), which serves loopback only'
        )
    if auth.mode == "open" and not is_loopback(host) and not auth.allow_open_remote:
        raise ConfigError(
            f"auth.mode is 'open' and server.host is {host!r}: anyone who can reach it could publish and consume. "
            'Configure [[tokens]] with auth.mode = "tokens", bind 127.0.0.1, or set auth.allow_open_remote = true'
        )


def connect_hint(settings: Settings, port: int) -> str:
    """How a client reaches this node, for the ``broker_started`` line."""
    sv = settings.server
    scheme = "wss" if sv.tls_cert_file else "ws"
    host = sv.host if sv.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    url = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}/"
    if settings.auth.mode == "open":
        return f"{url} (no token: auth.mode = open), e.g. broker publish demo '{{}}' --url {url}"
    return f"{url} with a token: broker publish demo '{{}}' --url {url} --token <token> (or BROKERCTL_TOKEN)"


class Broker:
    def __init__(self, settings: Settings, console: ConsoleMount | None = None) -> None:
        """``console``: the web console to serve at ``/console`` (``broker.console.mount``, which ``broker serve``
        passes); the node is below the operator library the console is built on, so it is handed in."""
        check_auth(settings)
        self.settings = settings
        self.console_mount = console
        self.console: ConsoleHandler | None = None
        self.node_id = f"{os.uname().nodename}-{os.getpid()}-{os.urandom(2).hex()}"
        s = settings
        self.limits = Limits(
            max_payload_bytes=s.server.max_payload_bytes,
            max_headers_bytes=s.server.max_headers_bytes,
            max_prefetch=s.delivery.max_prefetch,
            max_delay_ms=s.delivery.max_delay_ms,
            max_attempts_limit=s.retry.max_attempts_limit,
            backoff_base_min_ms=s.retry.backoff_base_min_ms,
            backoff_base_max_ms=s.retry.backoff_base_max_ms,
            max_pull_wait_ms=s.delivery.max_pull_wait_ms,
        )
        b = s.breakers
        self.redis_breaker = Breaker(
            "redis",
            fail_max=b.redis_fail_max,
            reset_timeout_s=b.redis_reset_timeout_s,
            success_threshold=b.redis_success_threshold,
            call_timeout_s=b.redis_call_timeout_ms / 1000,
            on_change=self._breaker_changed,
            probe=self._probe_redis,  # while open: one PING a second, half-open at the first answer
            probe_interval_s=1.0,
        )
        metrics.breaker_state.labels("redis").set(0)
        if not settings.server.metrics_enabled:
            metrics.disable()
        for h in settings.handlers:  # a bad target is a startup error, before anything runs
            load_target(h.target)
        self.embedded: EmbeddedRedis | None = None
        self.handlers: list[HandlerRunner] = []
        self.durable = True
        self.stopping = False
        self._nondurable_nag: asyncio.Task[None] | None = None

    def _breaker_changed(self, name: str, old: BreakerState, new: BreakerState) -> None:
        metrics.breaker_state.labels(name).set(_STATE_VALUE[new])
        metrics.breaker_transitions.labels(name, new.value).inc()
        if new is BreakerState.CLOSED and hasattr(self, "dispatch"):
            self.dispatch.wake_all()
        if new is not BreakerState.OPEN and hasattr(self, "supervisor"):
            self.supervisor.retry_failing_now()  # half-open: their next step is a trial; closed: all is well

    async def _probe_redis(self) -> None:
        await self.store.probe()

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

    async def _first_contact(self) -> str | None:
        """Write (or read) the schema version: the first Redis call. A Redis that is down or still loading its AOF
        at start is waited for, bounded by ``redis.startup_wait_s``, so a node restarted during an outage comes up
        when Redis does instead of exiting."""

        def waiting(attempt: int, e: BaseException, wait_s: float) -> None:
            log.warning("redis_waiting", attempt=attempt, error=str(e), retry_in_s=round(wait_s, 2))

        async for attempt in retry_until(
            (UnavailableError,), deadline_s=self.settings.redis.startup_wait_s, on_retry=waiting
        ):
            with attempt:
                return await self.store.init_schema()
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def start(self) -> None:
        structlog.contextvars.bind_contextvars(node=self.node_id)  # every log line of this process names its node
        client = await self._redis_client()
        self.store = RedisStore(client, self.settings, self.redis_breaker, self.node_id)
        old = await self._first_contact()
        if old is not None and old != SCHEMA_VERSION:
            raise ConfigError(f"Redis holds key schema version {old}, this broker speaks {SCHEMA_VERSION}")
        if self.durable:
            for w in await self.store.persistence_warnings():
                log.warning("redis_persistence_risk", problem=w)
            for h in await self.store.memory_hints():
                log.warning("redis_memory_hint", hint=h)
        else:
            self._nondurable_nag = watch_task(asyncio.create_task(self._nag(), name="nondurable_nag"))
        self.supervisor = Supervisor(self.settings.loops)
        self.supervisor.start()
        self.dispatch = Dispatch(self.store, self.settings, self.supervisor)
        self.publisher = Publisher(self.store, self.dispatch)
        self.recovery = Recovery(self.store, self.dispatch, self._status, self.supervisor)
        self.recovery.start()
        self.handlers = await start_handlers(self.settings, self.dispatch)
        parts = SessionParts(self.settings, self.limits, self.publisher, self.dispatch, self.store)
        if self.console_mount is not None:
            ctx = ConsoleContext(self.store, self.node_id, self.readiness, self.settings.auth.mode)
            self.console = self.console_mount(ctx)
        self.server = WsServer(parts, self.node_id, self.readiness, self.console)
        if self.settings.auth.mode == "open":
            log.warning("auth_open_mode", message="authentication is OFF (auth.mode = open): anyone who can reach "
                        "this port can publish and consume. Configure [[tokens]] and auth.mode = tokens.")  # fmt: skip
        await self.server.start()
        log.info(
            "broker_started",
            node=self.node_id,
            host=self.settings.server.host,
            port=self.server.port,
            durable=self.durable,
            embedded_redis=self.embedded.url if self.embedded else None,
            connect=connect_hint(self.settings, self.server.port),
        )

    async def _nag(self) -> None:
        while True:
            await asyncio.sleep(60)
            log.critical("redis_nondurable_fallback", message="still running on fakeredis: NOTHING IS DURABLE")

    def _status(self) -> dict[str, str]:
        """What this node tells `broker stats` through its heartbeat (a few hundred bytes, once a second)."""
        consumers: dict[str, int] = {}
        for (topic, group), gd in self.dispatch.dispatchers.items():
            if gd.consumers:
                consumers[f"{topic}/{group}"] = len(gd.consumers)
        breakers = {self.redis_breaker.name: self.redis_breaker.state.value}
        mb = self.store.master_breakers
        if mb is not None:  # a Redis Cluster: the node's own Redis breaker is unused, each master has one
            breakers = {b.name: b.state.value for b in mb.by_master.values()}
        breakers.update({h.breaker.name: h.breaker.state.value for h in self.handlers})
        ready, reasons = self.readiness()
        down = {m: {"state": st.value, "topics": ts} for m, (st, ts) in self.store.master_outage().down.items()}
        supervisor: Supervisor | None = getattr(self, "supervisor", None)
        loops = supervisor.problems() if supervisor is not None else {}
        return {
            "consumers": orjson.dumps(consumers).decode(),
            "counts": orjson.dumps(self.dispatch.counts).decode(),
            "breakers": orjson.dumps(breakers).decode(),
            "ready": "1" if ready else "0",
            "reasons": orjson.dumps(reasons).decode(),
            "loops": orjson.dumps(loops).decode(),
            "masters_down": orjson.dumps(down).decode(),
            "pid": str(os.getpid()),
        }

    def readiness(self) -> tuple[bool, list[str]]:
        """(ready, reasons). Ready with reasons is *degraded*: on a Redis Cluster some masters' breakers are not
        closed (each named with its topics, ``degraded: ...``), the other masters' topics are served. Unready when
        no master's breaker is closed (nothing can be served). A loop failing with ``unavailable`` during such a
        partial outage is part of it (degraded too); any other loop problem makes the node unready as ever."""
        reasons = []
        if self.stopping:
            reasons.append("shutting down")
        state = self.redis_breaker.state
        if state is not BreakerState.CLOSED:
            reasons.append(f"redis breaker {state.value}")
        store: RedisStore | None = getattr(self, "store", None)
        outage = store.master_outage() if store is not None else None
        partial = outage is not None and bool(outage.down) and not outage.total
        degraded: list[str] = []
        supervisor: Supervisor | None = getattr(self, "supervisor", None)
        if supervisor is not None:
            if partial:
                hard, unavailable = supervisor.split_reasons()
                reasons += hard
                degraded += unavailable
            else:
                reasons += supervisor.reasons()
        if outage is not None and outage.down:
            if partial:
                degraded = outage.reasons() + degraded
            else:
                reasons += outage.reasons()
        if store is not None and store.refused_at is not None and time.monotonic() - store.refused_at < 5.0:
            reasons.append(f"redis refusing writes: {store.refusal}")
        return (not reasons, reasons + [f"degraded: {d}" for d in degraded])

    async def stop(self) -> None:
        """Graceful, in phases with deadlines (safe after a partial start):
        stop accepting -> stop claiming -> wait for in-flight acks -> close connections (unsent deliveries go back
        as they were, unacked ones are requeued) -> settle -> stop loops -> close Redis last."""
        if self.stopping:
            return
        self.stopping = True
        grace = self.settings.server.shutdown_grace_ms / 1000
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + grace

        def budget(share: float, floor: float = 0.05) -> float:
            """A phase gets its share of the grace, never past the overall deadline (but at least ``floor``)."""
            return max(floor, min(share * grace, deadline - loop.time()))

        log.info("shutdown_started", grace_s=grace)
        server: WsServer | None = getattr(self, "server", None)
        dispatch: Dispatch | None = getattr(self, "dispatch", None)
        if server is not None:
            server.stop_accepting()
        if dispatch is not None:
            await dispatch.stop(budget(0.25))  # no new claims from here on
            for h in self.handlers:
                await h.stop(budget(0.25))
            cut = await self._wait_inflight(budget(0.5))
            if cut:
                log.warning(
                    "shutdown_inflight_cut", deliveries=cut, note="given back, no attempt counted; delivered again"
                )
        publisher: Publisher | None = getattr(self, "publisher", None)
        if publisher is not None and (cut := await publisher.stop(budget(0.25))):
            log.warning("shutdown_publishes_cut", pending=cut)
        if server is not None:
            await server.close_all(budget(0.25))
        if self.console is not None:  # a console job (reprocess, purge) still running stops between its batches
            await self.console.close()
        if dispatch is not None:
            # settle what the closed sessions handed back: worth a short overrun (else their attempts are burned)
            await dispatch.stop(budget(0.25, floor=1.0))
        supervisor: Supervisor | None = getattr(self, "supervisor", None)
        if supervisor is not None:  # the background loops (recovery's, the watchdog; delivery loops ended above)
            await supervisor.stop(budget(0.1, floor=0.5))
        if self._nondurable_nag:
            self._nondurable_nag.cancel()
        await self.redis_breaker.close()
        store: RedisStore | None = getattr(self, "store", None)
        if store is not None:
            await store.close()
        if self.embedded:
            self.embedded.stop()
        log.info("shutdown_complete", took_s=round(loop.time() - started, 3))

    async def _wait_inflight(self, timeout_s: float) -> int:
        """Let consumers ack what they hold (up to the deadline). Returns how many deliveries were still held."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s

        def held() -> int:
            """Deliveries written to consumers and not settled (claimed-but-unsent ones can never be acked)."""
            server: WsServer | None = getattr(self, "server", None)
            if server is None:
                return 0
            total = 0
            for s in server.sessions:
                unsent = s.unsent()
                total += sum(len(c.inflight) - len(unsent.get(c, ())) for c in s.consumers)
            return total

        while held() and loop.time() < deadline:  # noqa: ASYNC110 (polling a count, bounded)
            await asyncio.sleep(0.02)
        return held()

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
        except BrokerError as e:  # expected (settings, Redis unreachable): said in one line, no traceback
            log.error("startup_failed", error=e.message)
            await self.stop()
            raise
        except BaseException:
            log.exception("startup_failed")
            await self.stop()
            raise
        await stop.wait()
        await self.stop()


def _redact(url: str) -> str:
    if "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
