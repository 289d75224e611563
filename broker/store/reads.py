"""Read-only views for the node and operators: queue depths, the age of each queue's head, Redis's own
persistence and memory settings. Each is one gateway call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from broker.core.errors import UnavailableError
from broker.core.model import GroupDepth
from broker.store.cluster import config_of_each_master, is_cluster, on_each_master
from broker.store.connection import (
    MEMORY_SETTINGS,
    PERSISTENCE_SETTINGS,
    config_values,
    memory_hints,
    persistence_problems,
)
from broker.store.gateway import Gateway
from broker.store.scripts import Scripts
from broker.store.topology import Topology

GroupStats = tuple[GroupDepth, int | None]  # the depths, and the published_at of the oldest ready message (or None)


class Reads:
    def __init__(self, gateway: Gateway, topology: Topology, scripts: Scripts) -> None:
        self.gateway = gateway
        self.topology = topology
        self.scripts = scripts

    async def group_stats(self, topics: Sequence[str], broken: list[str] | None = None) -> list[GroupStats]:
        """Every group of ``topics`` (in topic order, then group name order) with its depths and the ``published_at``
        of the head of its ready list: one ``_depths.lua`` call per topic, all in one pipeline (``depths`` and
        ``oldest_ready`` for every pair, at a fraction of the client's work). A topic whose group set cannot be read
        (an error reply such as WRONGTYPE) fails the call, unless ``broken`` is given: then it is left out and its
        "topic: error" appended there, as ``Topology.all_pairs`` does."""
        if not topics:
            return []
        script = self.scripts.get("_depths")
        keys = self.topology.keys
        calls = [(script, [keys(t).groups], [keys(t).base]) for t in topics]
        replies = await self.scripts.run(calls, "group_stats", keep_errors=broken is not None)
        out: list[GroupStats] = []
        for topic, flat in zip(topics, replies, strict=True):
            if isinstance(flat, UnavailableError):
                raise flat  # a cluster master that does not answer: named, never its topics left out silently
            if isinstance(flat, Exception):
                assert broken is not None
                self.gateway.log_bounded("redis_error_reply", "group_stats", flat)
                broken.append(f"{topic}: {flat}")
                continue
            for i in range(0, len(flat), 6):
                group, ready, leased, delayed, dead, at = flat[i : i + 6]
                depth = GroupDepth(topic, str(group), int(ready), int(leased), int(delayed), int(dead))
                out.append((depth, int(at) if int(at) >= 0 else None))
        return out

    async def depths(self, pairs: Sequence[tuple[str, str]]) -> list[GroupDepth]:
        def build(p: Pipeline) -> None:
            for topic, group in pairs:
                g = self.topology.keys(topic).group(group)
                p.llen(g.ready)
                p.zcard(g.leased)
                p.zcard(g.delayed)
                p.zcard(g.dead)

        res = await self.gateway.pipeline(build, "depths")
        return [
            GroupDepth(t, g, int(res[4 * i]), int(res[4 * i + 1]), int(res[4 * i + 2]), int(res[4 * i + 3]))
            for i, (t, g) in enumerate(pairs)
        ]

    async def oldest_ready(self, pairs: Sequence[tuple[str, str]]) -> list[int | None]:
        """``published_at`` of the message at the head of each group's ready list (None when empty)."""
        keys = self.topology.keys

        async def go(r: aioredis.Redis) -> list[int | None]:
            async with r.pipeline(transaction=False) as p:
                for topic, group in pairs:
                    p.lindex(keys(topic).group(group).ready, 0)
                heads = await p.execute()
            async with r.pipeline(transaction=False) as p:
                for (topic, _), head in zip(pairs, heads, strict=True):
                    p.hget(keys(topic).body(head or "-"), "published_at")
                stamps = await p.execute()
            return [int(s) if s else None for s in stamps]

        return await self.gateway.call(go, "oldest_ready")

    async def _configs(self, names: Sequence[str], what: str) -> dict[str, dict[str, str]] | str:
        """CONFIG GET of ``names``: {master: {setting: value}} ("" for a single Redis; on a cluster every master, each
        with its own settings), or the error text where CONFIG is forbidden (managed Redis often forbids it)."""

        async def go(r: aioredis.Redis) -> dict[str, dict[str, str]] | str:
            try:
                if is_cluster(r):
                    return await config_of_each_master(r, names)
                return {"": await config_values(r, names)}
            except ResponseError as e:  # an answer, not a failure: not logged or counted as a bad reply
                return str(e)

        return await self.gateway.call(go, what)

    async def persistence_warnings(self) -> list[str]:
        """Problems that can lose queued messages: no persistence, an eviction policy that may drop keys. Where
        CONFIG is forbidden the one warning says we could not check. Redis down raises."""
        cfgs = await self._configs(PERSISTENCE_SETTINGS, "persistence_config")
        if isinstance(cfgs, str):
            return [f"could not read Redis persistence settings ({cfgs}); check them by hand"]
        return [f"master {m}: {p}" if m else p for m, cfg in cfgs.items() for p in persistence_problems(cfg)]

    async def memory_hints(self) -> list[str]:
        """Settings that make queued messages cost more memory than needed (``connection.memory_hints``); none
        where CONFIG is forbidden (``persistence_warnings`` says so already)."""
        cfgs = await self._configs(MEMORY_SETTINGS, "memory_config")
        if isinstance(cfgs, str):
            return []
        return [f"master {m}: {h}" if m else h for m, cfg in cfgs.items() for h in memory_hints(cfg)]

    async def memory_info(self) -> tuple[int, int]:
        """(used_memory, maxmemory) in bytes; maxmemory 0 means no limit. On a cluster, of the master nearest its
        limit (each master has its own; one unreachable fails the call rather than answer for the others)."""

        async def go(r: aioredis.Redis) -> list[dict[str, Any]]:
            if is_cluster(r):
                return list((await on_each_master(r, "INFO", "memory")).values())
            return [await r.info("memory")]

        infos = await self.gateway.call(go, "memory_info")
        pairs = [(int(i.get("used_memory", 0)), int(i.get("maxmemory", 0))) for i in infos]
        return max(pairs, key=lambda p: (p[0] / p[1] if p[1] else -1.0, p[0]))
