"""The one door to Redis: every call of the store runs through ``Gateway.call`` (the Redis breaker, a latency metric,
and the translation of redis-py's exceptions into ours).

Redis exceptions never leave the store: they become ``UnavailableError`` (Redis unreachable, breaker open),
``StoreRefusedError`` (Redis refused a write) or ``BrokerError`` (code internal: any other error reply, such as
WRONGTYPE or a script error; it does not count against the breaker).

The client is handed to the function a call runs (``call(lambda r: r.get(key), "what")``), so code of the store
reaches Redis only through here. The one exception is the wake-up listener (``nodes.py``): a Pub/Sub connection
that blocks by design and must not count as calls of the breaker; it translates its own errors the same way.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
import structlog
from redis.asyncio.client import Pipeline
from redis.exceptions import ClusterError, OutOfMemoryError, ReadOnlyError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.core.errors import BrokerError, StoreRefusedError, UnavailableError
from broker.runtime import metrics
from broker.runtime.resilience import Breaker, BreakerOpenError, Unguarded
from broker.store.breakers import MasterBreakers
from broker.store.cluster import CLUSTER_BUGS, CLUSTER_OUTAGES, as_cluster, is_cluster, is_migrating
from broker.store.migration import RETRY_AFTER_MS

T = TypeVar("T")
log = structlog.get_logger("broker.store")

_REFUSALS = ("OOM", "MISCONF", "READONLY", "NOREPLICAS", "BUSY")
_PIPELINE_ERROR = re.compile(r"of pipeline caused error: \(['\"]-?(\S+)")
_LOST = (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError)
OUTAGES: tuple[type[BaseException], ...] = (*_LOST, *CLUSTER_OUTAGES)


def is_refusal(exc: BaseException) -> bool:
    """Redis answered but would not write (OOM, MISCONF, READONLY, ...): the store is up but cannot take data.

    redis-py strips the code from errors it maps to classes (OOM -> ``OutOfMemoryError``, with ``status_code``), and a
    pipeline rewrites the message as ``Command # N (...) of pipeline caused error: ('<reply>',)``: check all three."""
    if not isinstance(exc, ResponseError):
        return False
    if isinstance(exc, OutOfMemoryError | ReadOnlyError):
        return True
    code = getattr(exc, "status_code", None)
    if code:
        return str(code).upper() in _REFUSALS
    text = str(exc)
    m = _PIPELINE_ERROR.search(text)
    first = m.group(1) if m else text.split(" ", 1)[0].lstrip("-")
    return first.upper() in _REFUSALS


def is_outage(value: Any) -> bool:
    """A reply (or exception) that means Redis could not be reached, as opposed to an error reply (on a cluster
    also: the slot's master is failing over, CLUSTERDOWN / TRYAGAIN)."""
    return isinstance(value, (RedisConnectionError, RedisTimeoutError, *CLUSTER_OUTAGES))


def raise_outages(replies: Sequence[Any]) -> None:
    """Pipelines run with ``raise_on_error=False`` keep error replies in place; an outage is still an outage (the
    breaker must see it)."""
    for r in replies:
        if is_outage(r):
            raise r


class _Answered:
    """Redis answered a call with an error reply that is not an outage (WRONGTYPE, a script error): carried out of
    the breaker as a value so it does not count as a Redis failure (one bad key must not open the breaker for all)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class Gateway:
    def __init__(self, client: aioredis.Redis, breaker: Breaker) -> None:
        """On a single Redis every call runs behind ``breaker``. On a Redis Cluster each master has a breaker of its
        own, made from ``breaker`` (``masters``; callers route a call to one with ``call(..., breaker=)``), and calls
        for no one master run behind none (``resilience.Unguarded``): see ``breakers.py``."""
        self.client = client
        self.breaker: Breaker | Unguarded = breaker
        self.masters: MasterBreakers | None = None
        if is_cluster(client):
            self.breaker = Unguarded(breaker.call_timeout_s)
            self.masters = MasterBreakers(breaker, self.probe_master)
        self.refused_at: float | None = None  # time.monotonic() of the last write Redis refused (for /readyz)
        self.refusal = ""
        self._error_counts: dict[str, int] = {}

    async def probe(self) -> None:
        """One ``PING`` outside the breaker, for the breaker itself: while it is open, a healthy answer lets it
        half-open at once (``Breaker(probe=...)``). Never real work, so it cannot burn or confirm anything."""
        await self.client.ping()

    async def probe_master(self, master: str) -> None:
        """``PING`` to one cluster master (``host:port``) outside its breaker: the probe of that master's breaker."""
        rc = as_cluster(self.client)
        node = rc.get_node(node_name=master)
        if node is None:
            raise UnavailableError(f"redis master {master} is no longer in the cluster's slot map")
        await rc.execute_command("PING", target_nodes=node)

    async def call(self, fn: Callable[[aioredis.Redis], Awaitable[T]], what: str, breaker: Breaker | None = None) -> T:
        """``await fn(client)`` behind the breaker (``breaker``: a cluster master's, else the gateway's own);
        ``what`` names the call in metrics, logs and errors."""
        client = self.client
        guard = self.breaker if breaker is None else breaker

        async def answered() -> T | _Answered:
            t0 = time.perf_counter()
            try:
                return await fn(client)
            except ResponseError as e:  # refusals too: Redis is up and answering (reads, acks, deletes still work)
                if is_outage(e):  # CLUSTERDOWN is an error reply, but of a slot nobody serves now
                    raise
                return _Answered(e)
            except CLUSTER_BUGS as e:  # keys of one call in two slots, no key to route by: a bug, not an outage
                if isinstance(e, CLUSTER_OUTAGES):
                    raise
                return _Answered(e)
            except ClusterError as e:  # redis-py gave up following a slot on the move ("TTL exhausted"): no outage
                if is_migrating(e):
                    return _Answered(e)
                raise
            finally:
                metrics.child(metrics.redis_latency, what).observe(time.perf_counter() - t0)

        try:
            res = await guard.call(answered)
        except Exception as e:
            err = self.unavailable(e, what, guard.name)
            if err is e:  # not a failure of Redis (a bug): as it is
                raise
            raise err from None
        if isinstance(res, _Answered):
            raise self.reply_error(res.error, what)
        return res

    @staticmethod
    def unavailable(exc: Exception, what: str, name: str = "redis") -> Exception:
        """Our error for a call that failed without an answer (``call`` raises it; the script pipe answers its
        waiters with it): ``UnavailableError`` for a refusal of the breaker, an outage or another redis-py error;
        anything else (a bug) as it is."""
        if isinstance(exc, BreakerOpenError):
            return UnavailableError(
                f"{name} unavailable (breaker open) during {what}", retry_after_ms=exc.retry_after_ms
            )
        if isinstance(exc, OUTAGES):
            return UnavailableError(f"{name} unreachable during {what}: {exc}", retry_after_ms=1_000)
        if isinstance(exc, RedisError):
            return UnavailableError(f"{name} error during {what}: {exc}", retry_after_ms=1_000)
        return exc

    async def pipeline(
        self, build: Callable[[Pipeline], object], what: str, *, keep_errors: bool = False, transaction: bool = False
    ) -> list[Any]:
        """One pipeline (``build`` queues its commands) behind the breaker. With ``keep_errors`` an error reply comes
        back in place as an exception value (an outage still raises); without, the first one fails the call."""

        async def go(r: aioredis.Redis) -> list[Any]:
            async with r.pipeline(transaction=transaction) as p:
                build(p)
                res: list[Any] = list(await p.execute(raise_on_error=not keep_errors))
            raise_outages(res)
            return res

        return await self.call(go, what)

    def reply_error(self, exc: Exception, what: str) -> BrokerError:
        """Our error for one error reply: ``StoreRefusedError`` for a refusal (Redis is up but will not write; not a
        breaker failure: an open breaker would also block the claims and acks that drain a full Redis), else a
        ``BrokerError`` with code internal. A call whose cluster slot is on the move (did not run; see
        ``migration.py``) is ``unavailable`` to retry soon, and neither a refusal nor a breaker failure. One of ours
        (e.g. the ``UnavailableError`` in the place of a call whose cluster master failed) is returned as it is.
        Logged loud but bounded."""
        if isinstance(exc, BrokerError):
            return exc
        if is_migrating(exc):
            self.log_bounded("redis_slot_moving", what, exc)
            return UnavailableError(f"the slot of {what} is moving (resharding): {exc}", retry_after_ms=RETRY_AFTER_MS)
        if isinstance(exc, ResponseError) and is_refusal(exc):
            self.refused_at, self.refusal = time.monotonic(), str(exc)
            self.log_bounded("redis_write_refused", what, exc)
            return StoreRefusedError(f"redis refused {what}: {exc}", retry_after_ms=1_000)
        self.log_bounded("redis_error_reply", what, exc)
        return BrokerError(f"redis error reply during {what}: {exc}")

    def log_bounded(self, event: str, what: str, error: Exception) -> None:
        """Loud but bounded: the first of a kind, then every 100th (with the running count). The metrics count all."""
        n = self._error_counts[event] = self._error_counts.get(event, 0) + 1
        metrics.child(metrics.store_errors, what, event).inc()
        if n != 1 and n % 100:
            return
        if event == "redis_write_refused":
            log.error("redis_write_refused", op=what, error=str(error), count=n)
        elif event == "redis_slot_moving":
            log.warning("redis_slot_moving", op=what, error=str(error), count=n)
        else:
            log.error("redis_error_reply", op=what, error=str(error), count=n)

    async def close(self) -> None:
        if self.masters is not None:
            await self.masters.close()
        await self.client.aclose()
