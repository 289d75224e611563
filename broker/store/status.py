"""Where one message is now, per group (``broker message ID``): read-only, a few pipelined calls per topic."""

from __future__ import annotations

from typing import Any

from .redis_store import RedisStore


async def message_status(store: RedisStore, msg_id: str, topic: str | None = None) -> list[dict[str, Any]]:
    """One row per (topic, group) that knows the message. ``state``: ready | leased | retry_wait | key_wait (behind
    an earlier message of its ordering key) | dead | done (acked by this group, or published before the group
    existed: Redis keeps nothing for it)."""
    r = store.redis
    pairs = [p for p in await store.all_pairs() if topic is None or p[0] == topic]
    topics = sorted({t for t, _ in pairs})
    async with r.pipeline(transaction=False) as p:
        for t in topics:
            p.hmget(store.keys(t).body(msg_id), "published_at", "key")
        bodies = dict(zip(topics, await p.execute(), strict=True))
    rows: list[dict[str, Any]] = []
    for t, g in pairs:
        gk = store.keys(t).group(g)
        async with r.pipeline(transaction=False) as p:
            p.zscore(gk.leased, msg_id)
            p.zscore(gk.delayed, msg_id)
            p.lpos(gk.ready, msg_id)
            p.hgetall(gk.delivery(msg_id))
            p.hmget(gk.dead_letter(msg_id), "reason", "died_at", "attempts")
            p.ttl(gk.dead_letter(msg_id))
            okey = bodies[t][1]
            p.lpos(gk.key_line(okey) if okey else gk.ready, msg_id)
            p.zscore(gk.acked, msg_id)
            leased, due, pos, dlv, dead, ttl, line_pos, acked_at = await p.execute()
        row: dict[str, Any] = {"topic": t, "group": g, "attempts": int(dlv.get("attempts", 0)) if dlv else 0}
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
        elif bodies[t][0] is not None:
            row.update(state="done")
        else:
            continue  # this topic never had it (or it is finished everywhere)
        if dlv and dlv.get("errors"):
            row["last_error"] = dlv["errors"].rsplit('"error":', 1)[-1].split(',"at"', 1)[0].strip('"')
        rows.append(row)
    return rows
