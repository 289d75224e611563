"""The delivery transitions of messages (docs: the table in ``broker/core/model.py``): publish, claim, ack, nack,
release, extend, and the reconciliation of claims whose reply was lost. Each call is one script call or one
pipeline of script calls, through the gateway; every ``now`` comes from the store's clock.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

import orjson
import structlog

from broker.core.config import Settings
from broker.core.errors import BrokerError, UnavailableError
from broker.core.model import AckItem, Delivery, NackItem, PublishRequest, PublishResult, new_message_id
from broker.runtime import metrics
from broker.runtime.resilience import jitter_factor
from broker.store.keys import TopicKeys, listener_channel, listeners_channel
from broker.store.replication import Wait
from broker.store.scripts import ScriptCall, Scripts
from broker.store.topology import Topology

log = structlog.get_logger("broker.store")


class AckOutcome(IntEnum):
    STALE = 0  # not leased, or leased under another receipt
    ACKED = 1
    ACKED_NEXT_LIVE = 2  # acked, and the next message of its ordering key went live (worth a claim)
    ACKED_NEXT_DELAYED = 3  # acked, and the next message of its ordering key waits for its publish delay


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


@dataclass(slots=True, frozen=True)
class NackReply:
    """One nack flush: an outcome per item, and when the group's earliest retry is due (epoch ms; None: nothing
    waits), so the node can arm its timer for the group (``nack.lua``'s last reply element)."""

    outcomes: list[NackOutcome]
    due: int | None


def error_entry(attempt: int, error: str, at: int, consumer: str) -> str:
    """One entry of a delivery's error history, as JSON text (the scripts append it to the ``errors`` field)."""
    return orjson.dumps({"attempt": attempt, "error": error, "at": at, "consumer": consumer}).decode()


class StrictOrder:
    """The (topic, group) pairs in strict-order mode (``delivery.strict_order_groups``, entries "topic/group")."""

    def __init__(self, settings: Settings) -> None:
        self._groups = frozenset(settings.delivery.strict_order_groups)
        self._of: dict[str, tuple[str, ...]] = {}  # topic -> its strict-order groups
        for entry in sorted(self._groups):
            t, g = entry.split("/", 1)
            self._of[t] = (*self._of.get(t, ()), g)

    def is_strict(self, topic: str, group: str) -> bool:
        return f"{topic}/{group}" in self._groups

    def flag(self, topic: str, group: str) -> str:
        """The scripts' argument: "1" strict, "0" not."""
        return "1" if self.is_strict(topic, group) else "0"

    def groups_of(self, topic: str) -> tuple[str, ...]:
        return self._of.get(topic, ())


class Messages:
    def __init__(
        self,
        scripts: Scripts,
        topology: Topology,
        settings: Settings,
        strict: StrictOrder,
        node_id: str,
        clock: Callable[[], int],
    ) -> None:
        self.scripts = scripts
        self.gateway = scripts.gateway
        self.topology = topology
        self.settings = settings
        self.strict = strict
        self.node_id = node_id
        self.clock = clock
        # publish.lua's note goes out only when another node's listener is subscribed (PUBSUB NUMSUB of these two
        # channels). Not on a cluster: there a count is one node's own, and the notes are sharded per topic.
        prefix = topology.prefix
        self._listeners = [] if scripts.on_cluster else [listeners_channel(prefix), listener_channel(prefix, node_id)]
        self._uncertain_claims: list[tuple[str, str, str, str, int]] = []
        self._claim_seq = itertools.count()
        self._rng = random.Random()

    def keys(self, topic: str) -> TopicKeys:
        return self.topology.keys(topic)

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
        now = self.clock()
        ttl = str(self.settings.delivery.idempotency_ttl_s)
        policy = self.settings.delivery.publish_without_group
        ids = [new_message_id(now) for _ in reqs]
        script = self.scripts.get("publish")
        await self.topology.register_topics(by_topic)  # registry first: never a queue nobody can find
        calls: list[ScriptCall] = []
        for topic, idxs in by_topic.items():
            k = self.keys(topic)
            args: list[Any] = [k.base, now, ttl, policy, len(idxs)]
            for i in idxs:
                r = reqs[i]
                args += [ids[i], r.payload, r.headers, r.idempotency_key or "", r.delay_ms, r.key or ""]
                args += [r.max_attempts or "", r.backoff_base_ms or ""]
            strict = self.strict.groups_of(topic)
            args += [len(strict), *strict, self.node_id, *self._listeners]
            calls.append((script, [k.groups], args))
        calls += [self.claim_call(c, now) for c in claims]
        try:
            # with claims, a refusal (a full Redis refusing the publish) must not discard the replies of claims
            # that did run: each reply is handled on its own below
            # (and with a WAIT, each topic's publish is refused or confirmed on its own: on a cluster, by its master)
            wait = self._wait(len(by_topic))
            replies = await self.scripts.run(
                calls, "publish", keep_errors=True, keep_refusals=bool(claims) or wait is not None, wait=wait
            )
        except UnavailableError:  # the claims may have run with their replies lost
            for c in claims:
                self.uncertain(c, now)
            raise
        for c, flat in zip(claims, replies[len(by_topic) :], strict=True):
            if isinstance(flat, UnavailableError):  # its cluster master failed: the claim may have run
                self.uncertain(c, now)
                c.result = flat
            elif isinstance(flat, Exception):
                c.result = self.gateway.reply_error(flat, f"claim from {c.topic}/{c.group}")
            else:
                c.result = self.deliveries(c.topic, c.group, flat, now + c.lease_ms)
        out: list[PublishResult | BrokerError] = [BrokerError("not stored")] * len(reqs)
        for (topic, idxs), flat in zip(by_topic.items(), replies, strict=False):
            if isinstance(flat, Exception):  # this topic's script failed; the other topics' did not
                err = self.gateway.reply_error(flat, f"publish to {topic}")
                for i in idxs:
                    out[i] = err
                continue
            for j, i in enumerate(idxs):
                out[i] = PublishResult(str(flat[3 * j]), bool(int(flat[3 * j + 1])), int(flat[3 * j + 2]))
        return out

    def _wait(self, publishes: int) -> Wait | None:
        """With ``redis.replicas_to_ack``: the WAIT that must vouch for a batch's ``publishes`` (replication.py)."""
        rd = self.settings.redis
        return Wait(rd.replicas_to_ack, rd.replicas_ack_timeout_ms, publishes) if rd.replicas_to_ack else None

    # ---- claims --------------------------------------------------------------------------------------------

    async def claim(self, topic: str, group: str, n: int, lease_ms: int, consumer: str) -> list[Delivery]:
        now = self.clock()
        req = ClaimRequest(topic, group, n, lease_ms, consumer)
        call = self.claim_call(req, now)
        try:
            (flat,) = await self.scripts.run([call], "claim")
        except UnavailableError:
            # The script may have run with its reply lost: remember the claim, give its leases back later.
            self.uncertain(req, now)
            raise
        return self.deliveries(topic, group, flat, now + lease_ms)

    def claim_call(self, c: ClaimRequest, now: int) -> ScriptCall:
        """The script call of one claim (run alone by ``claim``, or riding on a publish); sets its tag."""
        k = self.keys(c.topic)
        g = k.group(c.group)
        c.tag = f"{now}.{next(self._claim_seq)}"
        strict = self.strict.flag(c.topic, c.group)
        args = [k.base, c.group, c.n, now, now + c.lease_ms, c.consumer, self.node_id, strict, c.tag]
        return self.scripts.get("claim"), [g.ready, g.leased, g.held], args

    def uncertain(self, c: ClaimRequest, now: int) -> None:
        """A claim whose reply was lost: ``reconcile_claims`` gives its leases back (found by consumer, claim tag
        and deadline: only that claim's deliveries match)."""
        self._uncertain_claims.append((c.topic, c.group, c.consumer, f"{c.tag}-", now + c.lease_ms))

    def deliveries(self, topic: str, group: str, flat: list[Any], deadline: int) -> list[Delivery]:
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
        pending, self._uncertain_claims = self._uncertain_claims, []
        try:
            while pending:
                topic, group, consumer, prefix, deadline = pending[0]
                k = self.keys(topic)
                g = k.group(group)
                try:
                    n = await self.scripts.call(
                        "unclaim", [g.ready, g.leased, g.held], [k.base, group, consumer, prefix, deadline], "unclaim"
                    )
                except UnavailableError:
                    if self.gateway.masters is None:
                        raise  # one Redis: the others cannot be reached either
                    # on a cluster only this topic's master is away: kept for the next pass, the others go on
                    self._uncertain_claims.append(pending.pop(0))
                    continue
                pending.pop(0)
                if int(n):
                    log.warning("lost_claim_reply_reconciled", topic=topic, group=group, given_back=int(n))
                    given += int(n)
        finally:
            self._uncertain_claims[:0] = pending  # what was not tried yet stays first, in order
        return given

    # ---- settling ------------------------------------------------------------------------------------------

    async def ack_many(
        self, topic: str, group: str, items: Sequence[AckItem], *, ride: bool = False
    ) -> list[AckOutcome]:
        """Per item: ACKED (truthy), ACKED_NEXT_LIVE (truthy: and its ordering key's next message went live), or
        STALE (0: the receipt no longer holds the lease). ``ride``: no caller waits on the answer, so the call may
        wait (briefly) to share the next script batch's write (``Scripts.run``)."""
        k = self.keys(topic)
        rt = self.settings.retention
        g = k.group(group)
        args: list[Any] = [k.base, group, self.clock(), rt.acked_audit_max, rt.acked_audit_ttl_s]
        for it in items:
            args += [it.id, it.receipt]
        res = await self.scripts.call("ack", [g.leased, g.acked, g.ready, g.delayed, g.held], args, "ack", ride=ride)
        return [AckOutcome(int(x)) for x in res]

    async def nack_many(self, topic: str, group: str, items: Sequence[tuple[NackItem, int, str]]) -> list[NackOutcome]:
        """items: (nack, attempt it was delivered as, consumer). Delay None -> jittered backoff for that attempt,
        computed in the script (a message may carry its own backoff base and max attempts)."""
        return (await self.nack_due(topic, group, items)).outcomes

    async def nack_due(self, topic: str, group: str, items: Sequence[tuple[NackItem, int, str]]) -> NackReply:
        """``nack_many``, also saying when the group's earliest retry is due (for the node's timer)."""
        k = self.keys(topic)
        g = k.group(group)
        r = self.settings.retry
        now = self.clock()
        args: list[Any] = [k.base, topic, group, now, r.max_attempts, self.settings.dlq.ttl_s]
        args += [self.strict.flag(topic, group), r.backoff_base_ms, r.backoff_multiplier, r.backoff_cap_ms]
        for it, attempt, consumer in items:
            delay = -1 if it.delay_ms is None else it.delay_ms
            entry = error_entry(attempt, it.error, now, consumer)
            args += [it.id, it.receipt, entry, delay, "1" if it.dead else "0", jitter_factor(r.jitter, self._rng)]
        res = await self.scripts.call("nack", [g.ready, g.leased, g.delayed, g.dead, g.held], args, "nack")
        due = int(res[-1])
        return NackReply([NackOutcome(x) for x in res[:-1]], due if due >= 0 else None)

    async def release(self, topic: str, group: str, items: Sequence[AckItem]) -> int:
        if not items:
            return 0
        k = self.keys(topic)
        g = k.group(group)
        args: list[Any] = [k.base, group]
        for it in items:
            args += [it.id, it.receipt]
        return int(await self.scripts.call("release", [g.ready, g.leased, g.held], args, "release"))

    async def extend(self, topic: str, group: str, msg_id: str, receipt: str, lease_ms: int) -> int | None:
        k = self.keys(topic)
        deadline = self.clock() + lease_ms
        g = k.group(group)
        ok = await self.scripts.call("extend", [g.leased, g.held], [k.base, group, msg_id, receipt, deadline], "extend")
        return deadline if int(ok) else None
