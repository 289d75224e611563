"""``RedisStore``: the one object the node and the operator tools hold. Typed async operations over Redis, each
one Lua call or one pipeline, made of parts with one job each:

- ``gateway.Gateway``: the breaker and the translation of Redis errors; every Redis call passes through it;
- ``scripts.Scripts``: loading and calling the Lua scripts (by SHA, many per pipeline);
- ``topology.Topology``: schema version, topic registry, groups;
- ``messages.Messages``: publish, claim, ack, nack, release, extend, reconciliation of lost claim replies;
- ``sweep.Sweeper``: lease expiry and retry promotion;
- ``nodes.Nodes``: heartbeats, the node registry, the wake-up listener;
- ``reads.Reads``: depths, queue age, persistence and memory settings.

Dead letters, export/import, ``diagnose``, message status and memory per topic are modules of their own over the
same store (``dead_letters``, ``snapshot``, ``diagnose``, ``status``, ``memory``).

Time: every ``now`` the store passes to a script (and every cutoff it computes) comes from ``clock`` (epoch ms;
default the wall clock), so tests step time instead of sleeping. Redis keeps real time for TTLs only.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from broker.core.config import Settings
from broker.core.errors import BrokerError
from broker.core.model import AckItem, Delivery, GroupDepth, NackItem, PublishRequest, PublishResult, now_ms
from broker.runtime.resilience import Breaker, BreakerState
from broker.store.breakers import MasterBreakers
from broker.store.cluster import masters, node_of
from broker.store.gateway import Gateway
from broker.store.keys import TopicKeys
from broker.store.messages import AckOutcome, ClaimRequest, Messages, NackOutcome, NackReply, StrictOrder
from broker.store.nodes import Nodes
from broker.store.reads import Reads
from broker.store.scripts import Scripts
from broker.store.sweep import Sweeper, Swept
from broker.store.topology import Topology

Clock = Callable[[], int]


@dataclass(frozen=True, slots=True)
class MasterOutage:
    """Cluster masters whose breaker is not closed: state and the affected topics (of those asked about) per master;
    ``total`` when no master of the cluster has a closed breaker (nothing can be served)."""

    down: dict[str, tuple[BreakerState, list[str]]] = field(default_factory=dict)
    total: bool = False

    def reasons(self) -> list[str]:
        """One line per master, for /readyz and the logs."""
        return [
            f"redis master {m} breaker {state.value}: topics {', '.join(topics) if topics else '(none here)'}"
            for m, (state, topics) in sorted(self.down.items())
        ]


class RedisStore:
    def __init__(
        self,
        client: aioredis.Redis,
        settings: Settings,
        breaker: Breaker,
        node_id: str,
        clock: Clock = now_ms,
    ) -> None:
        self.settings = settings
        self.prefix = settings.redis.key_prefix
        self.breaker = breaker
        self.node_id = node_id
        self.clock = clock
        self.gateway = Gateway(client, breaker)
        self.scripts = Scripts(self.gateway)
        self.topology = Topology(self.gateway, self.prefix)
        strict = StrictOrder(settings)
        self._strict = strict
        self.messages = Messages(self.scripts, self.topology, settings, strict, node_id, clock)
        self.sweeper = Sweeper(self.scripts, self.topology, settings, strict, clock, node_id)
        self.nodes = Nodes(self.gateway, settings, self.prefix, node_id, clock)
        self.reads = Reads(self.gateway, self.topology, self.scripts)

    @property
    def redis(self) -> aioredis.Redis:
        """The client (for the store's own modules and tests; everything else goes through the methods)."""
        return self.gateway.client

    @property
    def refused_at(self) -> float | None:
        """``time.monotonic()`` of the last write Redis refused (for /readyz)."""
        return self.gateway.refused_at

    @property
    def refusal(self) -> str:
        return self.gateway.refusal

    def keys(self, topic: str) -> TopicKeys:
        return self.topology.keys(topic)

    @property
    def master_breakers(self) -> MasterBreakers | None:
        """On a Redis Cluster, the breaker of each master (None on a single Redis)."""
        return self.gateway.masters

    def master_outage(self, topics: Iterable[str] = ()) -> MasterOutage:
        """Which cluster masters' breakers are not closed, each with the ones of ``topics`` (default: the topics
        this process knows) whose slot it serves. No Redis call (the client's slot map). Empty on a single Redis."""
        mb = self.gateway.masters
        if mb is None or not mb.by_master:
            return MasterOutage()
        client = self.gateway.client
        known = {n.name for n in masters(client)} or None  # empty before the client knows the cluster
        down = mb.not_closed(known)
        if not down:
            return MasterOutage()
        affected: dict[str, list[str]] = {m: [] for m in down}
        for t in sorted(set(topics) or self.topology.known_topics):
            try:
                m = node_of(client, self.keys(t).groups).name
            except Exception:  # a slot nobody serves right now: no master to name it under
                continue
            if m in affected:
                affected[m].append(t)
        total = known is not None and known <= set(down)
        return MasterOutage({m: (state, affected[m]) for m, state in down.items()}, total)

    def is_strict(self, topic: str, group: str) -> bool:
        return self._strict.is_strict(topic, group)

    async def ping(self) -> bool:
        return bool(await self.gateway.call(lambda r: r.ping(), "ping"))

    async def probe(self) -> None:
        """One ``PING`` outside the breaker: how an open breaker learns that Redis answers again (never real work)."""
        await self.gateway.probe()

    async def close(self) -> None:
        await self.scripts.close()
        await self.gateway.close()

    # ---- topology ------------------------------------------------------------------------------------------

    async def schema_version(self) -> str | None:
        return await self.topology.schema_version()

    async def init_schema(self) -> str | None:
        return await self.topology.init_schema()

    async def ensure_group(self, topic: str, group: str) -> None:
        await self.topology.ensure_group(topic, group)

    async def topics(self) -> list[str]:
        return await self.topology.topics()

    async def groups(self, topic: str) -> list[str]:
        return await self.topology.groups(topic)

    async def all_pairs(self, broken: list[str] | None = None) -> list[tuple[str, str]]:
        return await self.topology.all_pairs(broken)

    # ---- messages ------------------------------------------------------------------------------------------

    async def publish_many(
        self, reqs: Sequence[PublishRequest], claims: Sequence[ClaimRequest] = ()
    ) -> list[PublishResult | BrokerError]:
        return await self.messages.publish_many(reqs, claims)

    async def claim(self, topic: str, group: str, n: int, lease_ms: int, consumer: str) -> list[Delivery]:
        return await self.messages.claim(topic, group, n, lease_ms, consumer)

    async def reconcile_claims(self) -> int:
        return await self.messages.reconcile_claims()

    async def ack_many(
        self, topic: str, group: str, items: Sequence[AckItem], *, ride: bool = False
    ) -> list[AckOutcome]:
        return await self.messages.ack_many(topic, group, items, ride=ride)

    def send_riders(self) -> None:
        """Send the script calls that wait to ride on the next write (``ScriptPipe``) now: someone waits on one."""
        self.scripts.pipe.send_riders()

    async def nack_many(self, topic: str, group: str, items: Sequence[tuple[NackItem, int, str]]) -> list[NackOutcome]:
        return await self.messages.nack_many(topic, group, items)

    async def nack_due(self, topic: str, group: str, items: Sequence[tuple[NackItem, int, str]]) -> NackReply:
        return await self.messages.nack_due(topic, group, items)

    async def release(self, topic: str, group: str, items: Sequence[AckItem]) -> int:
        return await self.messages.release(topic, group, items)

    async def extend(self, topic: str, group: str, msg_id: str, receipt: str, lease_ms: int) -> int | None:
        return await self.messages.extend(topic, group, msg_id, receipt, lease_ms)

    # ---- recovery and nodes --------------------------------------------------------------------------------

    async def sweep(
        self,
        pairs: Sequence[tuple[str, str]],
        limit: int = 500,
        dead_nodes: Sequence[str] = (),
        failed: list[str] | None = None,
    ) -> list[tuple[int, int, int]]:
        return await self.sweeper.sweep(pairs, limit, dead_nodes, failed)

    async def sweep_due(
        self,
        pairs: Sequence[tuple[str, str]],
        limit: int = 500,
        dead_nodes: Sequence[str] = (),
        failed: list[str] | None = None,
    ) -> list[Swept]:
        return await self.sweeper.sweep_due(pairs, limit, dead_nodes, failed)

    async def heartbeat(self, status: dict[str, str] | None = None) -> None:
        await self.nodes.heartbeat(status)

    async def node_status(self) -> list[dict[str, str]]:
        return await self.nodes.node_status()

    async def dead_nodes(self, timeout_ms: int) -> list[str]:
        return await self.nodes.dead_nodes(timeout_ms)

    async def forget_nodes(self, nodes: Sequence[str]) -> None:
        await self.nodes.forget_nodes(nodes)

    async def listen_wakes(
        self,
        on_topic: Callable[[str], None],
        beat: Callable[[], None],
        should_run: Callable[[], bool],
        on_subscribed: Callable[[], None] | None = None,
        on_due: Callable[[str], None] | None = None,
        topics: Callable[[], Collection[str]] = frozenset,
    ) -> None:
        await self.nodes.listen_wakes(on_topic, beat, should_run, on_subscribed, on_due, topics)

    # ---- reads ---------------------------------------------------------------------------------------------

    async def depths(self, pairs: Sequence[tuple[str, str]]) -> list[GroupDepth]:
        return await self.reads.depths(pairs)

    async def oldest_ready(self, pairs: Sequence[tuple[str, str]]) -> list[int | None]:
        return await self.reads.oldest_ready(pairs)

    async def group_stats(
        self, topics: Sequence[str], broken: list[str] | None = None
    ) -> list[tuple[GroupDepth, int | None]]:
        return await self.reads.group_stats(topics, broken)

    async def persistence_warnings(self) -> list[str]:
        return await self.reads.persistence_warnings()

    async def memory_hints(self) -> list[str]:
        return await self.reads.memory_hints()
