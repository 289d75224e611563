"""Operator work on whole queues: look at a group's ready messages without taking them (``peek``), empty a group's
queue, delete a group or a topic. The removals go through ``purge_group.lua`` (one atomic step per chunk of ids)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from broker.store.cluster import scan_slot_of
from broker.store.leases import held_state
from broker.store.redis_store import RedisStore

CHUNK = 500  # ids one purge_group.lua call removes at most: ~10-20 ms of Redis time, then others get their turn
STATES = ("ready", "delayed", "waiting", "leased", "dead")


@dataclass
class Removed:
    """What a purge or delete removed, per state (``waiting``: behind an ordering key's head)."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    keys: int = 0  # delete_topic: the topic's other keys (idempotency keys, import ledger, leftover bodies)

    @property
    def messages(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict[str, Any]:
        return {**self.counts, "messages": self.messages, "other_keys": self.keys}


@dataclass(frozen=True)
class Peeked:
    id: str
    position: int
    payload: str  # JSON text
    headers: str
    published_at: int
    key: str
    attempts: int  # attempts already made (a message given back after a failure)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "position": self.position, "payload": self.payload, "headers": self.headers,
                "published_at": self.published_at, "key": self.key or None, "attempts": self.attempts}  # fmt: skip


@dataclass
class Holder:
    """One consumer holding leased deliveries of a group (from the deliveries' state in Redis)."""

    consumer: str
    node: str
    held: int = 0  # deliveries leased to it and not yet acked or nacked
    redelivered: int = 0  # of those, the ones on their second or later attempt
    next_deadline: int = 0  # the earliest lease deadline among them (epoch ms)

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


class Queues:
    def __init__(self, store: RedisStore) -> None:
        self.store = store

    async def peek(self, topic: str, group: str, count: int, start: int = 0) -> list[Peeked]:
        """Up to ``count`` ready messages from position ``start`` (0: the next one a consumer gets), read only:
        nothing is claimed, no attempt is counted, no lease is taken."""
        k = self.store.keys(topic)
        g = k.group(group)

        async def go(r: aioredis.Redis) -> list[Peeked]:
            ids = [str(i) for i in await r.lrange(g.ready, start, start + count - 1)]
            if not ids:
                return []
            async with r.pipeline(transaction=False) as p:
                for i in ids:
                    p.hmget(k.body(i), "payload", "headers", "published_at", "key")
                    p.hget(g.delivery(i), "attempts")
                res = await p.execute()
            out = []
            for n, i in enumerate(ids):
                body, attempts = res[2 * n], res[2 * n + 1]
                if body[0] is None:
                    continue  # acked by a race, or a damaged store (diagnose names it)
                out.append(Peeked(i, start + n, str(body[0]), str(body[1] or "{}"), int(body[2] or 0),
                                  str(body[3] or ""), int(attempts or 0)))  # fmt: skip
            return out

        result: list[Peeked] = await self.store.gateway.call(go, "peek")
        return result

    async def holders(self, topic: str, group: str, limit: int = 100_000) -> list[Holder]:
        """Who holds the group's leased deliveries: per consumer (connection id ``<conn>.<n>``, or an in-process
        handler), how many, how many are redeliveries, and the next lease deadline. Read only."""
        g = self.store.keys(topic).group(group)
        result: list[Holder] = await self.store.gateway.call(
            lambda r: _holders(r, g.leased, g.held, g.delivery, limit), "holders"
        )
        return result

    async def purge(
        self, topic: str, group: str, *, whole_group: bool = False, progress: Callable[[int], None] | None = None
    ) -> Removed:
        """Empty the group's queue (ready, delayed and what waits behind them); ``whole_group``: delete the group
        too (leased messages and dead letters included), so later publishes no longer store for it."""
        k = self.store.keys(topic)
        g = k.group(group)
        keys = [g.ready, g.delayed, g.leased, g.dead, g.acked, k.groups, g.held]
        out = Removed()
        while True:
            res = await self.store.scripts.call(
                "purge_group", keys, [k.base, group, CHUNK, "group" if whole_group else "queue"], "purge_group"
            )
            for name, n in zip(STATES, res[:5], strict=True):
                out.counts[name] += int(n)
            if progress is not None:
                progress(out.messages)
            if not int(res[5]):
                return out

    async def delete_topic(self, topic: str, progress: Callable[[int], None] | None = None) -> Removed:
        """Every group deleted (as ``purge(whole_group=True)``), then every key left under the topic's hash tag
        (idempotency keys, the import ledger) deleted. The name stays in the topic registry: a running node lists a
        topic once, and its sweep finds queues through the registry, so a later publish must find it listed."""
        k = self.store.keys(topic)
        out = Removed()
        for group in await self.store.groups(topic):
            part = await self.purge(topic, group, whole_group=True, progress=progress)
            for name, n in part.counts.items():
                out.counts[name] += n

        async def rest(r: aioredis.Redis) -> int:
            n = 0
            batch: list[str] = []
            async for name in scan_slot_of(r, k.groups, _glob_escape(k.base) + "*"):
                batch.append(name)
                if len(batch) >= 500:
                    n += int(await r.delete(*batch))
                    batch.clear()
            if batch:
                n += int(await r.delete(*batch))
            return n

        out.keys = await self.store.gateway.call(rest, "delete_topic")
        return out


def _glob_escape(s: str) -> str:
    """``s`` as a literal in a SCAN MATCH pattern (names may hold none of these, the prefix might)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


async def _holders(
    r: aioredis.Redis, leased_key: str, held_key: str, delivery: Callable[[str], str], limit: int
) -> list[Holder]:
    raw: list[Any] = await r.zrange(leased_key, 0, limit - 1, withscores=True)
    members = [(str(m), float(d)) for m, d in raw]
    async with r.pipeline(transaction=False) as p:
        for m, _ in members:
            p.hmget(delivery(m), "consumer", "node", "attempts")
            p.hget(held_key, m)  # a first delivery's lease record stands for its delivery hash
        replies = await p.execute()
    states: list[list[str | None]] = []
    for dlv, first in zip(replies[::2], replies[1::2], strict=True):
        lease = held_state(first)
        states.append([lease["consumer"], lease["node"], lease["attempts"]] if lease else dlv)
    by: dict[str, Holder] = {}
    for (_, deadline), (consumer, node, attempts) in zip(members, states, strict=True):
        h = by.get(str(consumer))
        if h is None:
            h = by[str(consumer)] = Holder(str(consumer or "?"), str(node or "?"), next_deadline=int(deadline))
        h.held += 1
        h.redelivered += int(attempts or 1) > 1
        h.next_deadline = min(h.next_deadline, int(deadline))
    return sorted(by.values(), key=lambda h: (h.node, h.consumer))
