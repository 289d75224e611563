"""What exists in a Redis: the key schema version, the topic registry and each topic's groups."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from broker.store.gateway import Gateway
from broker.store.keys import SCHEMA_VERSION, TopicKeys, schema_key, topics_key


class Topology:
    def __init__(self, gateway: Gateway, prefix: str) -> None:
        self.gateway = gateway
        self.prefix = prefix
        self._known_topics: set[str] = set()

    def keys(self, topic: str) -> TopicKeys:
        return TopicKeys(self.prefix, topic)

    @property
    def known_topics(self) -> frozenset[str]:
        """The topics this process registered or subscribed to (no Redis call)."""
        return frozenset(self._known_topics)

    async def schema_version(self) -> str | None:
        """The key schema version Redis holds (None: none written yet); read-only."""
        v = await self.gateway.call(lambda r: r.get(schema_key(self.prefix)), "schema_version")
        return None if v is None else str(v)

    async def init_schema(self) -> str | None:
        """Write the schema version if absent; return what was there (a different value is the caller's alarm)."""

        async def go(r: aioredis.Redis) -> str | None:
            old = await r.set(schema_key(self.prefix), SCHEMA_VERSION, nx=True, get=True)
            return None if old is None else str(old)

        return await self.gateway.call(go, "init_schema")

    async def ensure_group(self, topic: str, group: str) -> None:
        k = self.keys(topic)

        async def go(r: aioredis.Redis) -> None:
            # Check first: SADD is refused while Redis is at maxmemory even when nothing is added, and a consumer
            # must be able to (re)subscribe to an existing group to drain a full Redis.
            async with r.pipeline(transaction=False) as p:
                p.sismember(topics_key(self.prefix), topic)
                p.sismember(k.groups, group)
                known = await p.execute()
            if all(known):
                return
            async with r.pipeline(transaction=False) as p:
                p.sadd(topics_key(self.prefix), topic)  # registry first: never a queue nobody can find
                p.sadd(k.groups, group)
                await p.execute()

        await self.gateway.call(go, "ensure_group")
        self._known_topics.add(topic)

    async def register_topics(self, topics: Iterable[str], what: str = "register_topics", cached: bool = True) -> None:
        """Add topics to the registry (outside any topic's slot) before their first message: never a queue nobody
        can find. Idempotent; once per topic per process unless not ``cached``."""
        new = [t for t in topics if not cached or t not in self._known_topics]
        if new:
            await self.gateway.call(lambda r: r.sadd(topics_key(self.prefix), *new), what)
            self._known_topics.update(new)

    async def topics(self) -> list[str]:
        return await self.gateway.call(lambda r: _members(r, topics_key(self.prefix)), "topics")

    async def groups(self, topic: str) -> list[str]:
        return await self.gateway.call(lambda r: _members(r, self.keys(topic).groups), "groups")

    async def all_pairs(self, broken: list[str] | None = None) -> list[tuple[str, str]]:
        """Every (topic, group). A topic whose group set cannot be read (an error reply such as WRONGTYPE) fails the
        call, unless ``broken`` is given: then it is skipped and its "topic: error" appended there, so one damaged
        key does not stop the work on every other topic (the caller still reports it)."""
        topics = await self.topics()
        if not topics:
            return []

        def build(p: Pipeline) -> None:
            for t in topics:
                p.smembers(self.keys(t).groups)

        groups = await self.gateway.pipeline(build, "all_pairs", keep_errors=broken is not None)
        out: list[tuple[str, str]] = []
        for t, gs in zip(topics, groups, strict=True):
            if isinstance(gs, Exception):
                assert broken is not None
                self.gateway.log_bounded("redis_error_reply", "all_pairs", gs)
                broken.append(f"{t}: {gs}")
                continue
            out += [(t, g) for g in sorted(gs)]
        return out


async def _members(r: aioredis.Redis, key: str) -> list[str]:
    members: Any = await r.smembers(key)
    return sorted(str(m) for m in members)
