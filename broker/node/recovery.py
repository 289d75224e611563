"""Background upkeep, safe on N nodes (every step is one idempotent script): lease expiry, due-retry promotion,
orphan sweep, node heartbeats, DLQ index pruning, queue-depth gauges. The steps are plain coroutines; the loops
around them are the supervisor's (broker/supervisor.py), so none fails, stalls or ends silently.

The periodic sweep is the safety net behind the groups' timers (broker/node/dispatch.py). Each pass visits the groups
this node has no working timer for whose next work (as the last visit reported it, or as this node learnt since:
its own delayed publishes, nacks, claims) is due or unknown; every group when a node died (its leases go at once);
and every group on a full pass each ``FULL_PASS_S`` (work whose due time this node was not told: an import,
another node's delayed publish to a group that has consumers here). So a group with nothing due costs no Redis call
between full passes, with or without consumers."""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from broker.core.errors import UnavailableError
from broker.node.dispatch import Dispatch
from broker.runtime import metrics
from broker.runtime.supervisor import DegradedError, Loop, Supervisor
from broker.store import RedisStore
from broker.store.dead_letters import DeadLetters

log = structlog.get_logger("broker.recovery")

PAIRS_REFRESH_S = 2.0
FORGET_NODE_MS = 3_600_000  # after this long its heartbeat entry is removed
GAUGE_INTERVAL_S = 5.0  # queue-depth gauges in /metrics are this fresh
HEARTBEAT_S = 1.0
FULL_PASS_S = 30.0  # groups with a timer on this node are swept this often too


class Recovery:
    def __init__(
        self,
        store: RedisStore,
        dispatch: Dispatch,
        status: Callable[[], dict[str, str]] | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.store = store
        self.status = status
        self.dispatch = dispatch
        self.supervisor = supervisor if supervisor is not None else dispatch.supervisor
        settings = store.settings
        self.interval = settings.delivery.sweep_interval_ms / 1000
        self.node_timeout_ms = settings.delivery.node_timeout_ms
        self.prune_interval = float(settings.dlq.prune_interval_s)
        self.dead_letters = DeadLetters(store)
        self._pairs: list[tuple[str, str]] = []
        self._broken: list[str] = []  # "topic: error" for topics whose group set could not be read
        self._pairs_at = 0.0
        self._full_at = 0.0
        self._judged_dead: set[str] = set()  # the nodes this node's sweep last took for dead
        # After this node's own heartbeats failed (a Redis outage it saw; every other node's heartbeats likely failed
        # too), it judges no other node dead until one node timeout after they succeed again (``_dead_nodes``)
        self._beats_failed = False
        self._judge_after = 0.0  # time.monotonic()
        self._deferral_logged = 0.0

    def start(self) -> None:
        """Each loop runs under the supervisor (logged, counted, backoff, /readyz; see broker/supervisor.py). The
        heartbeat backs off at most a quarter of the node timeout: a Redis blip must not get this node taken for
        dead by the others (they would expire every lease it holds)."""
        sup = self.supervisor
        sup.periodic("sweep", self.sweep_once, self.interval)
        sup.periodic("heartbeat", self.heartbeat_once, HEARTBEAT_S, backoff_cap_s=self.node_timeout_ms / 4000)
        sup.periodic("dlq_prune", self.prune_once, self.prune_interval)
        sup.periodic("depth_gauges", self.gauges_once, GAUGE_INTERVAL_S)
        wakes = sup.loop("wake_listener", 1.0)
        running = lambda: not sup.stopping.is_set()  # noqa: E731
        sup.run(wakes, lambda: self._listen(wakes, running), running)

    async def _listen(self, loop: Loop, running: Callable[[], bool]) -> None:
        """The wake-up listener. While it is subscribed the delivery loops need no claim on an idle poll; when it
        (re)subscribes, every loop claims once (a note may have been missed while it was away), and the loop is
        well again (after an outage it had ended and been restarted: failing, /readyz red, until this)."""

        def subscribed() -> None:
            loop.succeeded()
            self.dispatch.wakes_live = True
            self.dispatch.wake_all()

        def due(topic: str) -> None:  # another node stored delayed messages: a sweep step reads their due times
            self.dispatch.arm(topic, self.dispatch.clock())

        try:
            await self.store.listen_wakes(self.dispatch.wake, loop.beat, running, subscribed, due, self._topics)
        finally:
            self.dispatch.wakes_live = False

    def _topics(self) -> set[str]:
        """The topics this node has delivery loops for (a cluster's listener subscribes to each one's channel)."""
        return {topic for topic, _ in self.dispatch.dispatchers}

    async def sweep_once(self) -> None:
        if await self.store.reconcile_claims():
            self.dispatch.wake_all()
        now = time.monotonic()
        if now - self._pairs_at > PAIRS_REFRESH_S or not self._pairs:
            try:
                broken: list[str] = []
                self._pairs = await self.store.all_pairs(broken)
                self._broken = broken
            except UnavailableError as e:
                if self.store.master_breakers is None or not self._pairs:
                    raise
                # a cluster master is away: its topics' group sets cannot be read, the other masters' pairs can
                # still be swept (the known pairs; a group created meanwhile waits for the next refresh)
                metrics.store_errors.labels("all_pairs", e.code).inc()
                log.warning("sweep_pairs_not_refreshed", error=e.message, pairs=len(self._pairs))
            self._pairs_at = now
            known = self.dispatch.known_due
            for gone in set(known) - set(self._pairs):
                del known[gone]
        dead_nodes = await self._dead_nodes()
        self._judge(dead_nodes)
        failed: list[str] = []  # "topic/group: error" for pairs whose scripts failed this pass
        pairs = self._pairs
        if dead_nodes or now - self._full_at >= FULL_PASS_S:
            self._full_at = now
        else:  # groups with a timer here, or with nothing due, need no visit
            at = self.dispatch.clock()
            pairs = [p for p in pairs if self.dispatch.sweep_wanted(*p, at)]
        for i in range(0, len(pairs), 100):
            chunk = pairs[i : i + 100]
            results = await self.store.sweep_due(chunk, dead_nodes=dead_nodes, failed=failed)
            for (topic, group), swept in zip(chunk, results, strict=True):
                self.dispatch.swept(topic, group, swept)
        if dead_nodes and not self._broken and not failed:
            # every pair was swept for these nodes' leases in this pass: they hold nothing any more
            await self.store.forget_nodes(await self.store.dead_nodes(FORGET_NODE_MS))
        problems = self._broken + failed
        if problems:  # everything else was swept; these cannot be until someone repairs them: say so
            raise DegradedError(f"{len(problems)} topic(s)/group(s) not swept: {'; '.join(problems[:3])}")

    async def _dead_nodes(self) -> list[str]:
        """The nodes without a heartbeat for a node timeout, unless this node's own heartbeats resumed less than a
        node timeout ago: after an outage of Redis every node's last heartbeat is old, and the first sweep to run
        would take every node whose heartbeat had not landed yet for dead, expiring the leases of its live
        consumers (redeliveries, attempts spent). Nor while its own heartbeats are failing (a sweep can get through
        before the next heartbeat does). Leases still expire at their deadlines meanwhile."""
        dead = await self.store.dead_nodes(self.node_timeout_ms)
        wait_s = self._judge_after - time.monotonic()
        if dead and (self._beats_failed or wait_s > 0):  # (a sweep can succeed before the next heartbeat does)
            key = -1.0 if self._beats_failed else self._judge_after
            if self._deferral_logged != key:  # once per deferral
                self._deferral_logged = key
                reason = "this node's own heartbeats are failing" if self._beats_failed else (
                    "this node's own heartbeats resumed after failing")  # fmt: skip
                log.info("dead_node_judgement_deferred", nodes=sorted(dead), reason=reason,
                         wait_s=None if self._beats_failed else round(wait_s, 2))  # fmt: skip
            return []
        return dead

    def _judge(self, dead_nodes: list[str]) -> None:
        """Say when this node starts taking another for dead (before the sweep expires its leases: that sweep's
        reply may be lost, its ``orphaned_leases_recovered`` with it), and when one leaves the list: it heartbeats
        again (it was alive, its heartbeats late, e.g. through an outage of its own), or it was forgotten after
        ``FORGET_NODE_MS``. Logged on change only: a dead node stays in the list until it is forgotten."""
        now = set(dead_nodes)
        if now - self._judged_dead:
            log.warning("nodes_taken_for_dead", nodes=sorted(now - self._judged_dead),
                        timeout_ms=self.node_timeout_ms)  # fmt: skip
        if self._judged_dead - now:
            log.info("nodes_no_longer_taken_for_dead", nodes=sorted(self._judged_dead - now))
        self._judged_dead = now

    async def gauges_once(self) -> None:
        pairs = await self.store.all_pairs([])  # an unreadable topic is the sweep's to report
        for i in range(0, len(pairs), 200):
            for d in await self.store.depths(pairs[i : i + 200]):
                for state, n in (("ready", d.ready), ("leased", d.leased), ("delayed", d.delayed), ("dead", d.dead)):
                    metrics.child(metrics.queue_depth, d.topic, d.group, state).set(n)

    async def heartbeat_once(self) -> None:
        try:
            await self.store.heartbeat(self.status() if self.status is not None else None)
        except Exception:
            self._beats_failed = True
            raise
        if self._beats_failed:  # the others' heartbeats may have failed as long: give them a node timeout to land
            self._beats_failed = False
            self._judge_after = time.monotonic() + self.node_timeout_ms / 1000

    async def prune_once(self) -> None:
        pairs = await self.store.all_pairs([])  # an unreadable topic is the sweep's to report
        for i in range(0, len(pairs), 100):
            n = await self.dead_letters.prune(pairs[i : i + 100])
            if n:
                log.info("dead_letters_expired", count=n)
