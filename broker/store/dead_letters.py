"""Dead-letter queue operations: list, get, reprocess, purge, prune. Each mutation is one script per batch."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from broker.core.model import now_ms
from broker.store.redis_store import RedisStore, load_script, script_call

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
        r = store.redis
        self._reprocess = r.register_script(load_script("reprocess"))
        self._purge = r.register_script(load_script("purge_dead"))
        self._prune = r.register_script(load_script("prune_dead"))

    def _zrem(self, key: str, members: list[str]) -> Callable[[], Awaitable[Any]]:
        async def go() -> Any:
            return await self.store.redis.zrem(key, *members)

        return go

    async def ids(self, topic: str, group: str) -> list[tuple[str, int]]:
        """(id, died_at) oldest first, straight from the index (may include entries that just expired)."""
        idx = self.store.keys(topic).group(group).dead

        async def go() -> list[Any]:
            return list(await self.store.redis.zrange(idx, 0, -1, withscores=True))

        rows = await self.store._run(go, "dlq_ids")
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

            async def go(chunk: Sequence[str] = chunk) -> list[Any]:
                async with self.store.redis.pipeline(transaction=False) as p:
                    for msg_id in chunk:
                        p.hgetall(g.dead_letter(msg_id))
                        p.pttl(g.dead_letter(msg_id))
                    return list(await p.execute())

            res = await self.store._run(go, "dlq_get")
            gone = []
            for j, msg_id in enumerate(chunk):
                h, ttl = res[2 * j], res[2 * j + 1]
                if h:
                    out.append((msg_id, h, int(ttl)))
                else:
                    gone.append(msg_id)
            if gone:
                await self.store._run(self._zrem(g.dead, gone), "dlq_prune_index")
        return out

    async def reprocess(self, topic: str, group: str, ids: Sequence[str], who: str = "operator") -> list[bool]:
        k = self.store.keys(topic)
        g = k.group(group)
        out: list[bool] = []
        for i in range(0, len(ids), BATCH):
            chunk = list(ids[i : i + BATCH])
            res = await self.store._run(
                script_call(self._reprocess, [g.dead, g.ready], [k.base, group, now_ms(), who, *chunk]), "dlq_reprocess"
            )
            out += [x == "ok" for x in res]
        return out

    async def purge(self, topic: str, group: str, ids: Sequence[str]) -> list[bool]:
        g = self.store.keys(topic).group(group)
        out: list[bool] = []
        for i in range(0, len(ids), BATCH):
            chunk = list(ids[i : i + BATCH])
            res = await self.store._run(script_call(self._purge, [g.dead], [g.base, *chunk]), "dlq_purge")
            out += [bool(int(x)) for x in res]
        return out

    async def prune(self, pairs: Sequence[tuple[str, str]], verify: int = 50) -> int:
        cutoff = now_ms() - self.store.settings.dlq.ttl_s * 1000

        async def go() -> list[Any]:
            async with self.store.redis.pipeline(transaction=False) as p:
                for topic, group in pairs:
                    g = self.store.keys(topic).group(group)
                    await self._prune(keys=[g.dead], args=[g.base, cutoff, verify], client=p)
                return list(await p.execute())

        if not pairs:
            return 0
        return sum(int(x) for x in await self.store._run(go, "dlq_prune"))
