"""Memory per topic, for ``broker stats``: Redis ``MEMORY USAGE`` summed over the topic's keys (read-only).

The keys are found with ``SCAN MATCH <prefix>:{<topic>}:*`` (one pass over the keyspace for all topics, matching
``<prefix>:{*``, when more than one topic is asked for). Bounded cost:

- a topic with at most ``exact_keys`` keys is measured key by key: ``estimated`` is False;
- a bigger topic is measured on a uniform random sample of ``sample_keys`` of its keys (reservoir sampling during
  the scan), scaled by its key count: ``estimated`` is True, and ``sampled`` says how many keys were measured.

Either way each key's own figure is Redis's: ``MEMORY USAGE`` looks at up to 5 elements of a large list, hash or
sorted set and extrapolates (its default ``SAMPLES``). A key removed between the scan and the measurement counts 0.
"""

from __future__ import annotations

import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode

from broker.store.cluster import scan_page, scan_targets
from broker.store.redis_store import RedisStore

EXACT_KEYS = 1_000
SAMPLE_KEYS = 200
SCAN_COUNT = 1_000
_GLOB = re.compile(r"([*?\[\]\\])")


@dataclass(frozen=True)
class TopicMemory:
    topic: str
    keys: int
    bytes: int
    estimated: bool
    sampled: int  # keys measured with MEMORY USAGE

    def to_json(self) -> dict[str, Any]:
        return {"topic": self.topic, "keys": self.keys, "memory_bytes": self.bytes, "estimated": self.estimated,
                "sampled_keys": self.sampled}  # fmt: skip


@dataclass
class _Tally:
    """Keys of one topic seen by the scan: all names up to the exact limit, and a reservoir sample throughout."""

    exact_keys: int
    sample_keys: int
    rng: random.Random
    count: int = 0
    names: set[str] = field(default_factory=set)
    sample: list[str] = field(default_factory=list)

    def add(self, key: str) -> None:
        if self.count <= self.exact_keys:
            if key in self.names:
                return  # SCAN may return a key twice
            self.names.add(key)
        self.count += 1
        if len(self.sample) < self.sample_keys:
            self.sample.append(key)
        else:
            j = self.rng.randrange(self.count)
            if j < self.sample_keys:
                self.sample[j] = key

    @property
    def exact(self) -> bool:
        return self.count <= self.exact_keys


def _escape(text: str) -> str:
    return _GLOB.sub(r"\\\1", text)


def _topic_of(key: str, head: int) -> str | None:
    end = key.find("}:", head)
    return key[head:end] if end > head else None


async def topic_memory(
    store: RedisStore,
    topics: list[str],
    exact_keys: int = EXACT_KEYS,
    sample_keys: int = SAMPLE_KEYS,
    rng: random.Random | None = None,
) -> list[TopicMemory]:
    """One ``TopicMemory`` per topic in ``topics`` (in that order)."""
    if not topics:
        return []
    rng = rng or random.Random()
    tallies = {t: _Tally(exact_keys, sample_keys, rng) for t in topics}
    head = len(store.prefix) + 2  # after "<prefix>:{"
    pattern = f"{_escape(store.prefix)}:{{{_escape(topics[0])}}}:*" if len(topics) == 1 else f"{store.prefix}:{{*"
    route = store.keys(topics[0]).groups if len(topics) == 1 else None  # one topic: its master; else every one
    for target in await store.gateway.call(lambda r: scan_targets(r, route), "scan"):
        cursor: int = 0
        while True:
            cursor, keys = await store.gateway.call(_scan_page(target, cursor, pattern), "scan")
            for key in keys:
                tally = tallies.get(_topic_of(key, head) or "")
                if tally is not None:
                    tally.add(key)
            if cursor == 0:
                break
    out = []
    for topic, tally in tallies.items():
        measure = sorted(tally.names) if tally.exact else tally.sample
        sizes = await _memory_usage(store, measure)
        if tally.exact:
            out.append(TopicMemory(topic, tally.count, sum(sizes), False, len(measure)))
        else:
            mean = sum(sizes) / max(1, len(sizes))
            out.append(TopicMemory(topic, tally.count, round(mean * tally.count), True, len(measure)))
    return out


def _scan_page(
    target: ClusterNode | None, cursor: int, pattern: str
) -> Callable[[aioredis.Redis], Awaitable[tuple[int, list[str]]]]:
    async def go(r: aioredis.Redis) -> tuple[int, list[str]]:
        return await scan_page(r, target, cursor, pattern, SCAN_COUNT)

    return go


async def _memory_usage(store: RedisStore, keys: list[str]) -> list[int]:
    sizes: list[int] = []
    for i in range(0, len(keys), 500):
        chunk = keys[i : i + 500]

        def build(p: Pipeline, chunk: list[str] = chunk) -> None:
            for k in chunk:
                p.memory_usage(k)

        sizes += [int(n) if n is not None else 0 for n in await store.gateway.pipeline(build, "memory_usage")]
    return sizes
