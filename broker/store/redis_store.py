"""Typed async operations over Redis; each public method is one Lua call or one pipeline.

Redis exceptions never leave this module: they become ``UnavailableError`` (Redis unreachable, breaker open),
``StoreRefusedError`` (Redis refused a write) or ``BrokerError`` (code internal: any other error reply, such as
WRONGTYPE or a script error; it does not count against the breaker). Every call runs behind the Redis breaker.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from importlib import resources
from typing import Any, TypeVar, cast

import orjson
import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, OutOfMemoryError, ReadOnlyError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.core.config import Settings
from broker.core.errors import BrokerError, StoreRefusedError, UnavailableError
from broker.core.model import (
    AckItem,
    Delivery,
    GroupDepth,
    NackItem,
    PublishRequest,
    PublishResult,
    new_message_id,
    now_ms,
)
from broker.runtime import metrics
from broker.runtime.resilience import Breaker, BreakerOpenError, jitter_factor
from broker.store.keys import SCHEMA_VERSION, TopicKeys, node_key, nodes_key, schema_key, topics_key
from broker.store.packer import connection_class

T = TypeVar("T")
log = structlog.get_logger("broker.store")

_REFUSALS = ("OOM", "MISCONF", "READONLY", "NOREPLICAS", "BUSY")


class AckOutcome(IntEnum):
    STALE = 0  # not leased, or leased under another receipt
    ACKED = 1
    ACKED_NEXT_LIVE = 2  # acked, and the next message of its ordering key went live (worth a claim)


@dataclass(slots=True)
class ClaimRequest:
    """A claim to run in another call's round trip (``publish_many``); ``result`` is set when it ran."""

    topic: str
    group: str
    n: int
    lease_ms: int
    consumer: str
    result: list[Delivery] | BrokerError | None = None
    tag: str = ""  # set when the call is built: the receipt prefix of this claim


class NackOutcome(StrEnum):
    RETRY = "retry"
    READY = "ready"
    DEAD = "dead"
    STALE = "stale"


def connect_redis(url: str, settings: Settings) -> aioredis.Redis:
    """A client whose own retries are off: an outage must reach the breaker at once, not after 10 silent tries."""
    extra: dict[str, Any] = {"connection_class": connection_class()} if url.startswith("redis://") else {}
    return aioredis.Redis.from_url(
        url,
        **extra,
        decode_responses=True,
        socket_timeout=settings.redis.socket_timeout_ms / 1000,
        socket_connect_timeout=settings.redis.connect_timeout_ms / 1000,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
    )


def script_call(script: AsyncScript, keys: list[str], args: list[Any]) -> Callable[[], Awaitable[Any]]:
    """A zero-argument call of ``script`` (what ``RedisStore._run`` takes), bound now rather than at call time."""

    async def go() -> Any:
        return await script(keys=keys, args=args)

    return go


def load_script(name: str) -> str:
    lib = resources.files("broker.store").joinpath("scripts/_lib.lua").read_text()
    return lib + "\n" + resources.files("broker.store").joinpath(f"scripts/{name}.lua").read_text()


_PIPELINE_ERROR = re.compile(r"of pipeline caused error: \(['\"]-?(\S+)")


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


class _Answered:
    """Redis answered a call with an error reply that is not an outage (WRONGTYPE, a script error): carried out of
    the breaker as a value so it does not count as a Redis failure (one bad key must not open the breaker for all)."""

    __slots__ = ("error",)

    def __init__(self, error: ResponseError) -> None:
        self.error = error


class RedisStore:
    SCRIPTS = ("publish", "claim", "ack", "nack", "release", "extend", "expire", "promote", "unclaim")

    def __init__(
        self,
        client: aioredis.Redis,
        settings: Settings,
        breaker: Breaker,
        node_id: str,
        *,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.clock = clock  # epoch ms: the "now" every script call is given (tests step it)
        self.redis = client
        self.settings = settings
        self.prefix = settings.redis.key_prefix
        self.breaker = breaker
        self.node_id = node_id
        self._scripts = {name: client.register_script(load_script(name)) for name in self.SCRIPTS}
        self._known_topics: set[str] = set()
        self._strict_groups = frozenset(settings.delivery.strict_order_groups)
        self._strict_of: dict[str, tuple[str, ...]] = {}  # topic -> its strict-order groups
        for entry in sorted(self._strict_groups):
            t, g = entry.split("/", 1)
            self._strict_of[t] = (*self._strict_of.get(t, ()), g)
        self._uncertain_claims: list[tuple[str, str, str, str, int]] = []
        self._claim_seq = itertools.count()
        self._error_counts: dict[str, int] = {}
        self.refused_at: float | None = None  # time.monotonic() of the last write Redis refused (for /readyz)
        self.refusal = ""
        self._rng = random.Random()

    def is_strict(self, topic: str, group: str) -> bool:
        return f"{topic}/{group}" in self._strict_groups

    def _strict(self, topic: str, group: str) -> str:
        return "1" if self.is_strict(topic, group) else "0"

    def keys(self, topic: str) -> TopicKeys:
        return TopicKeys(self.prefix, topic)

    async def _run(self, fn: Callable[[], Awaitable[T]], what: str) -> T:
        async def answered() -> T | _Answered:
            t0 = time.perf_counter()
            try:
                return await fn()
            except ResponseError as e:  # refusals too: Redis is up and answering (reads, acks, deletes still work)
                return _Answered(e)
            finally:
                metrics.child(metrics.redis_latency, what).observe(time.perf_counter() - t0)

        try:
            res = await self.breaker.call(answered)
        except BreakerOpenError as e:
            raise UnavailableError(
                f"redis unavailable (breaker open) during {what}", retry_after_ms=e.retry_after_ms
            ) from None
        except (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError) as e:
            raise UnavailableError(f"redis unreachable during {what}: {e}", retry_after_ms=1_000) from None
        except RedisError as e:
            raise UnavailableError(f"redis error during {what}: {e}", retry_after_ms=1_000) from None
        if isinstance(res, _Answered):
            if is_refusal(res.error):
                # Not a breaker failure: an open breaker would also block the claims and acks that drain a full
                # Redis (and a publisher's retry as the half-open trial would re-open it: never recovering).
                self.refused_at, self.refusal = time.monotonic(), str(res.error)
                self._log_bounded("redis_write_refused", what, res.error)
                raise StoreRefusedError(f"redis refused {what}: {res.error}", retry_after_ms=1_000)
            self._log_bounded("redis_error_reply", what, res.error)
            raise BrokerError(f"redis error reply during {what}: {res.error}")
        return res

    # ---- topology ------------------------------------------------------------------------------------------

    async def ping(self) -> bool:
        return bool(await self._run(lambda: self.redis.ping(), "ping"))

    async def probe(self) -> None:
        """One ``PING`` outside the breaker: how an open breaker learns that Redis answers again (never real work)."""
        await self.redis.ping()

    async def init_schema(self) -> str | None:
        """Write the schema version if absent; return what was there (a different value is the caller's alarm)."""

        async def go() -> str | None:
            old = await self.redis.set(schema_key(self.prefix), SCHEMA_VERSION, nx=True, get=True)
            return None if old is None else str(old)

        return await self._run(go, "init_schema")

    async def ensure_group(self, topic: str, group: str) -> None:
        k = self.keys(topic)

        async def go() -> None:
            # Check first: SADD is refused while Redis is at maxmemory even when nothing is added, and a consumer
            # must be able to (re)subscribe to an existing group to drain a full Redis.
            async with self.redis.pipeline(transaction=False) as p:
                p.sismember(topics_key(self.prefix), topic)
                p.sismember(k.groups, group)
                known = await p.execute()
            if all(known):
                return
            async with self.redis.pipeline(transaction=False) as p:
                p.sadd(topics_key(self.prefix), topic)  # registry first: never a queue nobody can find
                p.sadd(k.groups, group)
                await p.execute()

        await self._run(go, "ensure_group")
        self._known_topics.add(topic)

    async def topics(self) -> list[str]:
        return await self._run(lambda: self._members(topics_key(self.prefix)), "topics")

    async def groups(self, topic: str) -> list[str]:
        return await self._run(lambda: self._members(self.keys(topic).groups), "groups")

    async def _members(self, key: str) -> list[str]:
        return sorted(str(m) for m in await self.redis.smembers(key))

    # ---- publish -------------------------------------------------------------------------------------------

    async def publish_many(
        self, reqs: Sequence[PublishRequest], claims: Sequence[ClaimRequest] = ()
    ) -> list[PublishResult | BrokerError]:
        """Store a batch (any topics) in one pipeline, one script call per topic. Order within a topic is kept.
        ``groups == -1`` in a result: the topic has no group and the policy is ``reject`` (nothing stored).

        ``claims`` ride in the same round trip, after the publishes (Redis runs a pipeline in order): a consumer
        waiting for work gets the new messages without a second round trip. Each one's deliveries (or the error
        of its claim alone) are set on it as ``result``; a lost reply makes them uncertain, as in ``claim``."""
        by_topic: dict[str, list[int]] = {}
        for i, r in enumerate(reqs):
            by_topic.setdefault(r.topic, []).append(i)
        new_topics = [t for t in by_topic if t not in self._known_topics]
        now = self.clock()
        ttl = str(self.settings.delivery.idempotency_ttl_s)
        policy = self.settings.delivery.publish_without_group
        ids = [new_message_id(now) for _ in reqs]
        script = self._scripts["publish"]
        if new_topics:  # registry first: never a queue nobody can find (idempotent, once per topic per process)
            await self._run(lambda: self.redis.sadd(topics_key(self.prefix), *new_topics), "register_topics")
            self._known_topics.update(new_topics)
        calls: list[tuple[AsyncScript, list[str], list[Any]]] = []
        for topic, idxs in by_topic.items():
            k = self.keys(topic)
            args: list[Any] = [k.base, now, ttl, policy, len(idxs)]
            for i in idxs:
                r = reqs[i]
                args += [ids[i], r.payload, r.headers, r.idempotency_key or "", r.delay_ms, r.key or ""]
                args += [r.max_attempts or "", r.backoff_base_ms or ""]
            strict = self._strict_of.get(topic, ())
            args += [len(strict), *strict, self.node_id]
            calls.append((script, [k.groups], args))
        calls += [self._claim_call(c, now) for c in claims]
        try:
            # with claims, a refusal (a full Redis refusing the publish) must not discard the replies of claims
            # that did run: each reply is handled on its own below
            replies = await self._run(lambda: self._eval_many(calls, keep_refusals=bool(claims)), "publish")
        except UnavailableError:  # the claims may have run with their replies lost
            for c in claims:
                self._uncertain(c, now)
            raise
        for c, flat in zip(claims, replies[len(by_topic) :], strict=True):
            if isinstance(flat, Exception):
                c.result = self._translate_reply_error(flat, f"claim from {c.topic}/{c.group}")
            else:
                c.result = self._deliveries(c.topic, c.group, flat, now + c.lease_ms)
        out: list[PublishResult | BrokerError] = [BrokerError("not stored")] * len(reqs)
        for (topic, idxs), flat in zip(by_topic.items(), replies, strict=False):
            if isinstance(flat, Exception):  # this topic's script failed; the other topics' did not
                err = self._translate_reply_error(flat, f"publish to {topic}")
                for i in idxs:
                    out[i] = err
                continue
            for j, i in enumerate(idxs):
                out[i] = PublishResult(str(flat[3 * j]), bool(int(flat[3 * j + 1])), int(flat[3 * j + 2]))
        return out

    async def _eval_many(
        self, calls: Sequence[tuple[AsyncScript, list[str], list[Any]]], keep_refusals: bool = False
    ) -> list[Any]:
        """Run scripts in one pipeline by SHA. redis-py's own script pipelining sends SCRIPT EXISTS first on every
        execute (a second round trip); instead, only calls answered NOSCRIPT (they did not run) are loaded and
        re-sent. Error replies come back as exception values, in place; a refusal (OOM, READONLY...) fails the
        whole call unless ``keep_refusals`` (the caller then handles each reply, e.g. claims that did run)."""
        if len(calls) == 1 and not keep_refusals:  # a plain EVALSHA costs a fraction of a pipeline's client work
            return [await self._eval_one(*calls[0])]
        async with self.redis.pipeline(transaction=False) as p:
            for script, keys, args in calls:
                p.evalsha(script.sha, len(keys), *keys, *args)
            res: list[Any] = list(await p.execute(raise_on_error=False))
        again = [i for i, r in enumerate(res) if isinstance(r, NoScriptError)]
        if again:
            for script in {calls[i][0].sha: calls[i][0] for i in again}.values():
                await self.redis.script_load(script.script)
            async with self.redis.pipeline(transaction=False) as p:
                for i in again:
                    script, keys, args = calls[i]
                    p.evalsha(script.sha, len(keys), *keys, *args)
                for i, r in zip(again, await p.execute(raise_on_error=False), strict=True):
                    res[i] = r
        for r in res:  # an outage reaches the breaker as an exception; a refusal fails the call (not the breaker)
            if isinstance(r, RedisConnectionError | RedisTimeoutError) or (
                not keep_refusals and isinstance(r, ResponseError) and is_refusal(r)
            ):
                raise r
        return res

    async def _eval_one(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """``_eval_many`` for one call: an error reply comes back as a value, an outage or refusal raises."""
        try:
            return await script(keys=keys, args=args)  # EVALSHA, loading the script on NOSCRIPT
        except ResponseError as e:
            if is_refusal(e):
                raise
            return e

    def _log_bounded(self, event: str, what: str, error: Exception) -> None:
        """Loud but bounded: the first of a kind, then every 100th (with the running count). The metrics count all."""
        n = self._error_counts[event] = self._error_counts.get(event, 0) + 1
        metrics.child(metrics.store_errors, what, event).inc()
        if n != 1 and n % 100:
            return
        if event == "redis_write_refused":
            log.error("redis_write_refused", op=what, error=str(error), count=n)
        else:
            log.error("redis_error_reply", op=what, error=str(error), count=n)

    def _translate_reply_error(self, exc: Exception, what: str) -> BrokerError:
        if isinstance(exc, ResponseError) and is_refusal(exc):
            self.refused_at, self.refusal = time.monotonic(), str(exc)  # for /readyz, as in _run
            self._log_bounded("redis_write_refused", what, exc)
            return StoreRefusedError(f"redis refused {what}: {exc}", retry_after_ms=1_000)
        self._log_bounded("redis_error_reply", what, exc)
        return BrokerError(f"redis error reply during {what}: {exc}")

    # ---- deliveries ----------------------------------------------------------------------------------------

    async def claim(self, topic: str, group: str, n: int, lease_ms: int, consumer: str) -> list[Delivery]:
        now = self.clock()
        req = ClaimRequest(topic, group, n, lease_ms, consumer)
        script, keys, args = self._claim_call(req, now)
        try:
            flat = await self._run(script_call(script, keys, args), "claim")
        except UnavailableError:
            # The script may have run with its reply lost: remember the claim, give its leases back later.
            self._uncertain(req, now)
            raise
        return self._deliveries(topic, group, flat, now + lease_ms)

    def _claim_call(self, c: ClaimRequest, now: int) -> tuple[AsyncScript, list[str], list[Any]]:
        k = self.keys(c.topic)
        g = k.group(c.group)
        c.tag = f"{now}.{next(self._claim_seq)}"
        args = [k.base, c.group, c.n, now, c.lease_ms, c.consumer, self.node_id, self._strict(c.topic, c.group), c.tag]
        return self._scripts["claim"], [g.ready, g.leased], args

    def _uncertain(self, c: ClaimRequest, now: int) -> None:
        """A claim whose reply was lost: ``reconcile_claims`` gives its leases back (found by consumer, claim tag
        and deadline: only that claim's deliveries match)."""
        self._uncertain_claims.append((c.topic, c.group, c.consumer, f"{c.tag}-", now + c.lease_ms))

    def _deliveries(self, topic: str, group: str, flat: list[Any], deadline: int) -> list[Delivery]:
        """claim.lua's flat reply (7 fields per message) as deliveries; an id whose body is gone is reported."""
        out = []
        for i in range(0, len(flat), 7):
            msg_id, payload = flat[i], flat[i + 1]
            if payload is None or payload is False:
                log.error("queue_entry_without_body", topic=topic, group=group, message_id=msg_id)
                metrics.orphans.inc()
                continue
            key = flat[i + 4] or None
            out.append(
                Delivery(
                    msg_id,
                    topic,
                    group,
                    payload,
                    flat[i + 2],
                    int(flat[i + 5]),
                    flat[i + 6],
                    int(flat[i + 3]),
                    deadline,
                    key,
                )
            )
        return out

    async def reconcile_claims(self) -> int:
        """Give back deliveries of claims whose reply was lost in an outage (they never reached a consumer), so
        an outage costs no attempts. Returns how many were given back; claims still unreachable are kept."""
        given = 0
        while self._uncertain_claims:
            topic, group, consumer, prefix, deadline = self._uncertain_claims[0]
            k = self.keys(topic)
            g = k.group(group)
            n = await self._run(
                script_call(self._scripts["unclaim"], [g.ready, g.leased], [k.base, group, consumer, prefix, deadline]),
                "unclaim",
            )
            self._uncertain_claims.pop(0)
            if int(n):
                log.warning("lost_claim_reply_reconciled", topic=topic, group=group, given_back=int(n))
                given += int(n)
        return given

    async def ack_many(self, topic: str, group: str, items: Sequence[AckItem]) -> list[AckOutcome]:
        """Per item: ACKED (truthy), ACKED_NEXT_LIVE (truthy: and its ordering key's next message went live), or
        STALE (0: the receipt no longer holds the lease)."""
        k = self.keys(topic)
        rt = self.settings.retention
        g = k.group(group)
        args: list[Any] = [k.base, group, self.clock(), rt.acked_audit_max, rt.acked_audit_ttl_s]
        for it in items:
            args += [it.id, it.receipt]
        res = await self._run(
            lambda: self._scripts["ack"](keys=[g.leased, g.acked, g.ready, g.delayed], args=args), "ack"
        )
        return [AckOutcome(int(x)) for x in res]

    async def nack_many(self, topic: str, group: str, items: Sequence[tuple[NackItem, int, str]]) -> list[NackOutcome]:
        """items: (nack, attempt it was delivered as, consumer). Delay None -> jittered backoff for that attempt,
        computed in the script (a message may carry its own backoff base and max attempts)."""
        k = self.keys(topic)
        g = k.group(group)
        r = self.settings.retry
        now = self.clock()
        args: list[Any] = [k.base, topic, group, now, r.max_attempts, self.settings.dlq.ttl_s]
        args += [self._strict(topic, group), r.backoff_base_ms, r.backoff_multiplier, r.backoff_cap_ms]
        for it, attempt, consumer in items:
            delay = -1 if it.delay_ms is None else it.delay_ms
            entry = _error_entry(attempt, it.error, now, consumer)
            args += [it.id, it.receipt, entry, delay, "1" if it.dead else "0", jitter_factor(r.jitter, self._rng)]
        res = await self._run(
            lambda: self._scripts["nack"](keys=[g.ready, g.leased, g.delayed, g.dead], args=args), "nack"
        )
        return [NackOutcome(x) for x in res]

    async def release(self, topic: str, group: str, items: Sequence[AckItem]) -> int:
        if not items:
            return 0
        k = self.keys(topic)
        g = k.group(group)
        args: list[Any] = [k.base, group]
        for it in items:
            args += [it.id, it.receipt]
        return int(await self._run(lambda: self._scripts["release"](keys=[g.ready, g.leased], args=args), "release"))

    async def extend(self, topic: str, group: str, msg_id: str, receipt: str, lease_ms: int) -> int | None:
        k = self.keys(topic)
        deadline = self.clock() + lease_ms
        ok = await self._run(
            lambda: self._scripts["extend"](
                keys=[k.group(group).leased], args=[k.base, group, msg_id, receipt, deadline]
            ),
            "extend",
        )
        return deadline if int(ok) else None

    # ---- recovery ------------------------------------------------------------------------------------------

    async def sweep(
        self,
        pairs: Sequence[tuple[str, str]],
        limit: int = 500,
        dead_nodes: Sequence[str] = (),
        failed: list[str] | None = None,
    ) -> list[tuple[int, int, int]]:
        """Expire due leases (and every lease held by one of ``dead_nodes``) and promote due retries for many
        (topic, group) pairs in one pipeline. Returns per pair (expired->retry, expired->dead, promoted).
        A pair whose scripts fail (an error reply, e.g. WRONGTYPE on a damaged key) fails the call, unless
        ``failed`` is given: then it counts (0, 0, 0) and "topic/group: error" is appended there."""
        if not pairs:
            return []
        r = self.settings.retry
        now = self.clock()
        jitters = [jitter_factor(r.jitter, self._rng) for _ in range(8)]

        calls: list[tuple[AsyncScript, list[str], list[Any]]] = []
        for topic, group in pairs:
            k = self.keys(topic)
            g = k.group(group)
            expire_args = [k.base, topic, group, now, r.max_attempts, self.settings.dlq.ttl_s, limit]
            expire_args += [len(dead_nodes), *dead_nodes, self._strict(topic, group)]
            expire_args += [r.backoff_base_ms, r.backoff_multiplier, r.backoff_cap_ms, *jitters]
            calls.append((self._scripts["expire"], [g.leased, g.delayed, g.dead, g.ready], expire_args))
            calls.append((self._scripts["promote"], [g.delayed, g.ready], [now, limit, k.wake]))

        async def go() -> list[Any]:
            res = await self._eval_many(calls)
            if failed is None:
                for x in res:
                    if isinstance(x, Exception):
                        raise x
            return res

        res = await self._run(go, "sweep")
        for (topic, group), i in zip(pairs, range(0, len(res), 2), strict=True):
            bad = next((x for x in (res[i], res[i + 1]) if isinstance(x, Exception)), None)
            if bad is not None:
                assert failed is not None
                self._log_bounded("redis_error_reply", "sweep", bad)
                failed.append(f"{topic}/{group}: {bad}")
                res[i], res[i + 1] = (0, 0, 0), 0
                continue
            if int(res[i][2]):
                log.warning(
                    "orphaned_leases_recovered",
                    topic=topic,
                    group=group,
                    count=int(res[i][2]),
                    dead_nodes=list(dead_nodes),
                )
        return [(int(res[i][0]), int(res[i][1]), int(res[i + 1])) for i in range(0, len(res), 2)]

    async def listen_wakes(
        self, on_topic: Callable[[str], None], beat: Callable[[], None], should_run: Callable[[], bool]
    ) -> None:
        """Wake-up notes of every topic (Pub/Sub ``<prefix>:{<topic>}:wake``, published by the scripts that make
        messages claimable), so this node claims at once what another node published, promoted or unblocked,
        rather than at its next poll. Notes this node's own publishes sent are skipped (it woke itself already).
        Runs until ``should_run()`` is false; a lost connection raises ``UnavailableError`` (the caller's loop
        restarts it). Best effort by design: a missed note costs at most one poll interval."""
        pattern = f"{self.prefix}:{{*}}:wake"
        head, tail = len(self.prefix) + 2, -len("}:wake")
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.psubscribe(pattern)
            while should_run():
                beat()
                msg = await pubsub.get_message(timeout=1.0)
                if msg is None or msg.get("type") != "pmessage" or msg.get("data") == self.node_id:
                    continue
                on_topic(str(msg["channel"])[head:tail])
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise UnavailableError(f"redis unreachable (wake-up listener): {e}", retry_after_ms=1_000) from None
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    async def dead_nodes(self, timeout_ms: int) -> list[str]:
        """Nodes whose last heartbeat is older than ``timeout_ms`` (never this node)."""
        cutoff = self.clock() - timeout_ms

        async def go() -> list[str]:
            return [str(n) for n in await self.redis.zrangebyscore(nodes_key(self.prefix), "-inf", cutoff)]

        return [n for n in await self._run(go, "dead_nodes") if n != self.node_id]

    async def forget_nodes(self, nodes: Sequence[str]) -> None:
        if nodes:
            await self._run(lambda: self.redis.zrem(nodes_key(self.prefix), *nodes), "forget_nodes")

    async def all_pairs(self, broken: list[str] | None = None) -> list[tuple[str, str]]:
        """Every (topic, group). A topic whose group set cannot be read (an error reply such as WRONGTYPE) fails the
        call, unless ``broken`` is given: then it is skipped and its "topic: error" appended there, so one damaged
        key does not stop the work on every other topic (the caller still reports it)."""
        topics = await self.topics()
        if not topics:
            return []

        async def go() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as p:
                for t in topics:
                    p.smembers(self.keys(t).groups)
                res: list[Any] = await p.execute(raise_on_error=broken is None)
            for r in res:  # an outage is still an outage (the breaker must see it)
                if isinstance(r, RedisConnectionError | RedisTimeoutError):
                    raise r
            return res

        groups = await self._run(go, "all_pairs")
        out: list[tuple[str, str]] = []
        for t, gs in zip(topics, groups, strict=True):
            if isinstance(gs, Exception):
                assert broken is not None
                self._log_bounded("redis_error_reply", "all_pairs", gs)
                broken.append(f"{t}: {gs}")
                continue
            out += [(t, g) for g in sorted(gs)]
        return out

    async def heartbeat(self, status: dict[str, str] | None = None) -> None:
        """Record that this node is alive (ZSET used by the orphan sweep) and, with ``status``, what it is doing
        (a HASH that expires by itself when the node stops: read by ``broker stats``)."""
        now = self.clock()

        async def go() -> None:
            async with self.redis.pipeline(transaction=False) as p:
                p.zadd(nodes_key(self.prefix), {self.node_id: now})
                if status is not None:
                    key = node_key(self.prefix, self.node_id)
                    p.hset(key, mapping=cast(Any, status))
                    p.hset(key, "heartbeat", str(now))
                    p.expire(key, max(5, self.settings.delivery.node_timeout_ms * 3 // 1000))
                await p.execute()

        await self._run(go, "heartbeat")

    async def node_status(self) -> list[dict[str, str]]:
        """Every live node's status hash (see ``heartbeat``)."""

        async def go() -> list[dict[str, str]]:
            nodes = [str(n) for n in await self.redis.zrange(nodes_key(self.prefix), 0, -1)]
            async with self.redis.pipeline(transaction=False) as p:
                for n in nodes:
                    p.hgetall(node_key(self.prefix, n))
                rows = await p.execute()
            return [{"node": n, **row} for n, row in zip(nodes, rows, strict=True) if row]

        return await self._run(go, "node_status")

    async def oldest_ready(self, pairs: Sequence[tuple[str, str]]) -> list[int | None]:
        """``published_at`` of the message at the head of each group's ready list (None when empty)."""

        async def go() -> list[int | None]:
            async with self.redis.pipeline(transaction=False) as p:
                for topic, group in pairs:
                    p.lindex(self.keys(topic).group(group).ready, 0)
                heads = await p.execute()
            async with self.redis.pipeline(transaction=False) as p:
                for (topic, _), head in zip(pairs, heads, strict=True):
                    p.hget(self.keys(topic).body(head or "-"), "published_at")
                stamps = await p.execute()
            return [int(s) if s else None for s in stamps]

        return await self._run(go, "oldest_ready")

    # ---- inspection ----------------------------------------------------------------------------------------

    async def depths(self, pairs: Sequence[tuple[str, str]]) -> list[GroupDepth]:
        async def go() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as p:
                for topic, group in pairs:
                    g = self.keys(topic).group(group)
                    p.llen(g.ready)
                    p.zcard(g.leased)
                    p.zcard(g.delayed)
                    p.zcard(g.dead)
                return await p.execute()

        res = await self._run(go, "depths")
        return [
            GroupDepth(t, g, int(res[4 * i]), int(res[4 * i + 1]), int(res[4 * i + 2]), int(res[4 * i + 3]))
            for i, (t, g) in enumerate(pairs)
        ]

    async def close(self) -> None:
        await self.redis.aclose()


def _error_entry(attempt: int, error: str, at: int, consumer: str) -> str:
    return orjson.dumps({"attempt": attempt, "error": error, "at": at, "consumer": consumer}).decode()
