"""The recovery sweep: expire due leases (and every lease of a dead node) and promote due retries, for many
(topic, group) pairs in one pipeline of script calls (``expire.lua``, ``promote.lua``)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from broker.core.config import Settings
from broker.core.errors import UnavailableError
from broker.runtime import metrics
from broker.runtime.resilience import jitter_factor
from broker.store.keys import listener_channel, listeners_channel
from broker.store.messages import StrictOrder
from broker.store.scripts import ScriptCall, Scripts
from broker.store.topology import Topology

log = structlog.get_logger("broker.store")


@dataclass(slots=True, frozen=True)
class Swept:
    """What one sweep step did to one (topic, group), and when its next work is due: ``next_due`` is the earlier of
    its lease set's and its delayed set's heads (epoch ms; None: both empty), where the node arms its timer."""

    retried: int  # leases expired -> retry
    dead: int  # leases expired -> dead letter
    promoted: int  # due retries and delayed messages -> ready
    next_due: int | None
    failed: bool = False  # its scripts failed (``failed`` given to ``sweep_due``): nothing is known


class Sweeper:
    def __init__(
        self,
        scripts: Scripts,
        topology: Topology,
        settings: Settings,
        strict: StrictOrder,
        clock: Callable[[], int],
        node_id: str,
    ) -> None:
        self.scripts = scripts
        self.topology = topology
        self.settings = settings
        self.strict = strict
        self.clock = clock
        self._rng = random.Random()
        # promote.lua's note goes out only when another node's listener is subscribed (as publish.lua's). Not on a
        # cluster: there a count is one node's own, and the notes are sharded per topic.
        prefix = topology.prefix
        self._listeners = [] if scripts.on_cluster else [listeners_channel(prefix), listener_channel(prefix, node_id)]

    async def sweep(
        self,
        pairs: Sequence[tuple[str, str]],
        limit: int = 500,
        dead_nodes: Sequence[str] = (),
        failed: list[str] | None = None,
    ) -> list[tuple[int, int, int]]:
        """``sweep_due`` as (expired->retry, expired->dead, promoted) per pair."""
        return [(s.retried, s.dead, s.promoted) for s in await self.sweep_due(pairs, limit, dead_nodes, failed)]

    async def sweep_due(
        self,
        pairs: Sequence[tuple[str, str]],
        limit: int = 500,
        dead_nodes: Sequence[str] = (),
        failed: list[str] | None = None,
    ) -> list[Swept]:
        """Expire due leases (and every lease held by one of ``dead_nodes``) and promote due retries for many
        (topic, group) pairs in one pipeline. Returns per pair what was done and when its next work is due.
        A pair whose scripts fail (an error reply, e.g. WRONGTYPE on a damaged key) fails the call, unless
        ``failed`` is given: then it counts nothing (next due unknown: None) and "topic/group: error" is appended
        there. With ``failed``, a pair whose cluster master is away (``unavailable``) counts nothing either but is
        not listed: it is not damaged, and its master's breaker reports the outage."""
        if not pairs:
            return []
        r = self.settings.retry
        now = self.clock()
        jitters = [jitter_factor(r.jitter, self._rng) for _ in range(8)]
        expire, promote = self.scripts.get("expire"), self.scripts.get("promote")

        calls: list[ScriptCall] = []
        for topic, group in pairs:
            k = self.topology.keys(topic)
            g = k.group(group)
            expire_args: list[Any] = [k.base, topic, group, now, r.max_attempts, self.settings.dlq.ttl_s, limit]
            expire_args += [len(dead_nodes), *dead_nodes, self.strict.flag(topic, group)]
            expire_args += [r.backoff_base_ms, r.backoff_multiplier, r.backoff_cap_ms, *jitters]
            calls.append((expire, [g.leased, g.delayed, g.dead, g.ready, g.held], expire_args))
            calls.append((promote, [g.delayed, g.ready], [now, limit, k.wake, k.base, group, *self._listeners]))

        res = await self.scripts.run(calls, "sweep", keep_errors=failed is not None)
        for (topic, group), i in zip(pairs, range(0, len(res), 2), strict=True):
            bad = next((x for x in (res[i], res[i + 1]) if isinstance(x, Exception)), None)
            if isinstance(bad, UnavailableError):  # its cluster master is away: that master's breaker says so
                metrics.child(metrics.store_errors, "sweep", bad.code).inc()
                res[i] = None
                continue
            if bad is not None:
                assert failed is not None
                self.scripts.gateway.log_bounded("redis_error_reply", "sweep", bad)
                failed.append(f"{topic}/{group}: {bad}")
                res[i] = None
                continue
            if int(res[i][2]):
                log.warning(
                    "orphaned_leases_recovered",
                    topic=topic,
                    group=group,
                    count=int(res[i][2]),
                    dead_nodes=list(dead_nodes),
                )
        out = []
        for i in range(0, len(res), 2):
            if res[i] is None:
                out.append(Swept(0, 0, 0, None, failed=True))
                continue
            heads = [h for h in (int(res[i][3]), int(res[i + 1][1])) if h >= 0]
            out.append(Swept(int(res[i][0]), int(res[i][1]), int(res[i + 1][0]), min(heads) if heads else None))
        return out
