"""Dead-letter queue operations: list, get, reprocess, purge, prune. Each mutation is one script per batch."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from broker.store.redis_store import RedisStore
from broker.store.scripts import ScriptCall

BATCH = 500


@dataclass(frozen=True)
class DeadLetter:
    id: str
    topic: str
    group: str
    payload: str  # JSON text
    headers: str  # JSON text
    published_at: int
    attempts: int
    errors: list[dict[str, Any]]
    reason: str
    died_at: int
    ttl_s: int
    key: str | None = None
    last_consumer: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "topic": self.topic,
            "group": self.group,
            "payload": orjson.Fragment(self.payload),
            "headers": orjson.Fragment(self.headers),
            "key": self.key,
            "published_at": self.published_at,
            "attempts": self.attempts,
            "errors": self.errors,
            "reason": self.reason,
            "died_at": self.died_at,
            "last_consumer": self.last_consumer,
            "ttl_s": self.ttl_s,
        }


def _parse(h: dict[str, str], ttl: int) -> DeadLetter:
    return DeadLetter(
        id=h["id"],
        topic=h["topic"],
        group=h["group"],
        payload=h.get("payload", "null"),
        headers=h.get("headers", "{}"),
        published_at=int(h.get("published_at", "0")),
        attempts=int(h.get("attempts", "0")),
        errors=orjson.loads(h.get("errors", "[]")),
        reason=h.get("reason", ""),
        died_at=int(h.get("died_at", "0")),
        ttl_s=ttl,
        key=h.get("key"),
        last_consumer=h.get("last_consumer", ""),
    )


class DeadLetters:
    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.gateway = store.gateway

    async def ids(self, topic: str, group: str) -> list[tuple[str, int]]:
        """(id, died_at) oldest first, straight from the index (may include entries that just expired)."""
        idx = self.store.keys(topic).group(group).dead
        rows = await self.gateway.call(lambda r: r.zrange(idx, 0, -1, withscores=True), "dlq_ids")
        return [(str(row[0]), int(row[1])) for row in rows]

    async def get_many(self, topic: str, group: str, ids: Sequence[str]) -> list[DeadLetter]:
        """Present dead letters among ``ids``; index entries whose hash expired are dropped from the index."""
        # Rounded like Redis TTL does; -1 (no TTL) and -2 stay as they are.
        return [_parse(h, (ms + 500) // 1000 if ms > 0 else ms) for _, h, ms in await self.raw_many(topic, group, ids)]

    async def raw_many(self, topic: str, group: str, ids: Sequence[str]) -> list[tuple[str, dict[str, str], int]]:
        """(id, hash as Redis holds it, PTTL in ms or -1) of the present dead letters among ``ids``; index entries
        whose hash expired are dropped from the index."""
        g = self.store.keys(topic).group(group)
        out: list[tuple[str, dict[str, str], int]] = []
        for i in range(0, len(ids), BATCH):
            chunk = ids[i : i + BATCH]

            def build(p: Pipeline, chunk: Sequence[str] = chunk) -> None:
                for msg_id in chunk:
                    p.hgetall(g.dead_letter(msg_id))
                    p.pttl(g.dead_letter(msg_id))

            res = await self.gateway.pipeline(build, "dlq_get")
            gone = []
            for j, msg_id in enumerate(chunk):
                h, ttl = res[2 * j], res[2 * j + 1]
                if h:
                    out.append((msg_id, h, int(ttl)))
                else:
                    gone.append(msg_id)
            if gone:
                await self.gateway.call(_zrem(g.dead, gone), "dlq_prune_index")
        return out

    async def reprocess(self, topic: str, group: str, ids: Sequence[str], who: str = "operator") -> list[bool]:
        k = self.store.keys(topic)
        g = k.group(group)
        out: list[bool] = []
        for i in range(0, len(ids), BATCH):
            chunk = list(ids[i : i + BATCH])
            res = await self.store.scripts.call(
                "reprocess", [g.dead, g.ready], [k.base, group, self.store.clock(), who, *chunk], "dlq_reprocess"
            )
            out += [x == "ok" for x in res]
        return out

    async def purge(self, topic: str, group: str, ids: Sequence[str]) -> list[bool]:
        g = self.store.keys(topic).group(group)
        out: list[bool] = []
        for i in range(0, len(ids), BATCH):
            chunk = list(ids[i : i + BATCH])
            res = await self.store.scripts.call("purge_dead", [g.dead], [g.base, *chunk], "dlq_purge")
            out += [bool(int(x)) for x in res]
        return out

    async def prune(self, pairs: Sequence[tuple[str, str]], verify: int = 50) -> int:
        cutoff = self.store.clock() - self.store.settings.dlq.ttl_s * 1000
        if not pairs:
            return 0
        prune = self.store.scripts.get("prune_dead")
        calls: list[ScriptCall] = []
        for topic, group in pairs:
            g = self.store.keys(topic).group(group)
            calls.append((prune, [g.dead], [g.base, cutoff, verify]))
        return sum(int(x) for x in await self.store.scripts.run(calls, "dlq_prune"))


def _zrem(key: str, members: list[str]) -> Callable[[aioredis.Redis], Awaitable[Any]]:
    async def go(r: aioredis.Redis) -> Any:
        return await r.zrem(key, *members)

    return go
