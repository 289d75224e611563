"""Operator work on queues as library code: peek at a group's ready messages, who holds its leased deliveries,
and the removals (``broker group purge | delete``, ``broker topic delete``) with the check that nobody consumes."""

from __future__ import annotations

import orjson

from broker.store import RedisStore
from broker.store.queues import Holder, Peeked, Queues, Removed

__all__ = ["Holder", "Peeked", "Queues", "Removed", "consumers_of", "depth_of"]


async def consumers_of(store: RedisStore, topic: str, group: str | None = None) -> dict[str, int]:
    """Consumers now connected, per ``topic/group`` of ``topic`` (one group, or all), summed over the live nodes."""
    counts: dict[str, int] = {}
    for n in await store.node_status():
        for pair, c in orjson.loads(n.get("consumers", "{}")).items():
            counts[pair] = counts.get(pair, 0) + int(c)
    return {pair: n for pair, n in counts.items()
            if pair.partition("/")[0] == topic and (group is None or pair == f"{topic}/{group}") and n}  # fmt: skip


async def depth_of(store: RedisStore, topic: str, group: str) -> dict[str, int]:
    (d,) = await store.depths([(topic, group)])
    return {"ready": d.ready, "delayed": d.delayed, "leased": d.leased, "dead": d.dead}


def payload_text(p: Peeked) -> str:
    """The payload as one line of JSON (as stored: the broker re-encoded it compactly)."""
    return p.payload if "\n" not in p.payload else orjson.dumps(orjson.loads(p.payload)).decode()
