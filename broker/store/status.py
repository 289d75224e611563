"""Where one message is now, per group (``broker message ID``, and the ``status`` request): read-only, one pipeline
per topic, behind the Redis breaker like every store call."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from broker.store.leases import delivery_state
from broker.store.redis_store import RedisStore

_CHEAP = 4  # replies per group in the first pipeline below: leased, delayed, delivery hash, held
_FULL = 8  # replies per group in the second one (one more for a message with an ordering key: its line position)


async def message_status(store: RedisStore, msg_id: str, topic: str | None = None) -> list[dict[str, Any]]:
    """One row per (topic, group) that knows the message. ``state``: ready | leased | retry_wait | key_wait (behind
    an earlier message of its ordering key) | dead | done (acked by this group, or published before the group
    existed: Redis keeps nothing for it). With ``topic``, only that topic's groups are read."""
    if topic is None:
        pairs = await store.all_pairs()
    else:
        pairs = [(topic, g) for g in await store.groups(topic)]
    by_topic: dict[str, list[str]] = {}
    for t, g in pairs:
        by_topic.setdefault(t, []).append(g)
    rows: list[dict[str, Any]] = []
    for t, groups in by_topic.items():
        rows += await _topic_rows(store, t, groups, msg_id)
    return rows


async def _topic_rows(store: RedisStore, topic: str, groups: list[str], msg_id: str) -> list[dict[str, Any]]:
    """Two pipelines. The first reads what is cheap (the lease and retry sets' scores, the delivery hash, the held
    field) and settles every group where the message is leased or waits for a retry. Only the other groups pay the
    second, which adds the list positions: ``LPOS`` scans a list (the ready queue) from its head, O(its length) when
    the id is not in it, which is what a lookup of a leased or waiting message would pay every time (with 20,000
    messages queued, about 2 ms of Redis per scan, during which Redis serves no one else: the S4 benchmark's due-time
    lookups once cost its throughput a third, docs/performance.md). The second pipeline reads its groups in full
    again, so their row comes from one pipeline, as before."""
    k = store.keys(topic)

    async def go(r: aioredis.Redis) -> tuple[list[Any], list[Any], list[Any]]:
        body = await r.hmget(k.body(msg_id), "published_at", "key")
        okey = None if body[1] is None else str(body[1])
        async with r.pipeline(transaction=False) as p:
            for g in groups:
                gk = k.group(g)
                p.zscore(gk.leased, msg_id)
                p.zscore(gk.delayed, msg_id)
                p.hgetall(gk.delivery(msg_id))
                p.hget(gk.held, msg_id)  # a first delivery's lease: its state instead of a delivery hash
            cheap = await p.execute()
        rest = [g for i, g in enumerate(groups) if cheap[_CHEAP * i] is None and cheap[_CHEAP * i + 1] is None]
        if not rest:
            return body, cheap, []
        async with r.pipeline(transaction=False) as p:
            for g in rest:
                gk = k.group(g)
                p.zscore(gk.leased, msg_id)
                p.zscore(gk.delayed, msg_id)
                p.lpos(gk.ready, msg_id)  # O(queue length): an operator's and a client's lookup, not a hot path
                p.hgetall(gk.delivery(msg_id))
                p.hget(gk.held, msg_id)
                p.hmget(gk.dead_letter(msg_id), "reason", "died_at", "attempts")
                p.ttl(gk.dead_letter(msg_id))
                p.zscore(gk.acked, msg_id)
                if okey:
                    p.lpos(gk.key_line(okey), msg_id)
            full = await p.execute()
        return body, cheap, full

    body, cheap, full = await store.gateway.call(go, "message_status")
    published_at, okey = (None if v is None else str(v) for v in body)
    per = _FULL + 1 if okey else _FULL
    more = iter(range(0, len(full), per))
    rows: list[dict[str, Any]] = []
    for i, g in enumerate(groups):
        leased, due, raw, held = cheap[_CHEAP * i : _CHEAP * (i + 1)]
        pos = line_pos = acked_at = None
        dead, ttl = [None, None, None], None
        if leased is None and due is None:  # read again in full by the second pipeline
            j = next(more)
            leased, due, pos, raw, held, dead, ttl, acked_at = full[j : j + _FULL]
            line_pos = full[j + _FULL] if okey else None
        dlv = delivery_state(raw, held if leased is not None else None, leased)
        row: dict[str, Any] = {"topic": topic, "group": g, "attempts": int(dlv.get("attempts", 0)) if dlv else 0}
        if leased is not None:
            row.update(state="leased", consumer=dlv.get("consumer"), node=dlv.get("node"), until=int(leased))
        elif due is not None:
            row.update(state="retry_wait", due=int(due))
        elif pos is not None:
            nb = dlv.get("not_before") if dlv else None
            row.update(state="retry_wait" if nb else "ready", position=int(pos), **({"due": int(nb)} if nb else {}))
        elif dead[0] is not None:
            row.update(state="dead", reason=dead[0], died_at=int(dead[1]), attempts=int(dead[2]), ttl_s=int(ttl))
        elif okey and line_pos is not None:
            row.update(state="key_wait", key=okey, position=int(line_pos))
        elif acked_at is not None:
            row.update(state="done", acked_at=int(acked_at))
        elif published_at is not None:
            row.update(state="done")
        else:
            continue  # this topic never had it (or it is finished everywhere)
        if dlv and dlv.get("errors"):
            row["last_error"] = dlv["errors"].rsplit('"error":', 1)[-1].split(',"at"', 1)[0].strip('"')
        rows.append(row)
    return rows
