"""``broker diagnose``: checks of the Redis a broker uses, each with a severity and a suggested fix, and the
repairs that are safe to make (seeds 000 and 003: the failures nobody could see).

Safe repairs: sweep leases past their deadline or held by dead nodes (the normal expiry script), drop queue entries
whose body is gone (nothing can ever be delivered for them), drop dead-letter index entries whose hash expired,
make the head of a stuck ordering-key line live again.
Not repaired, only reported: bodies no queue refers to (they may be data someone needs), persistence and eviction
settings (operator decisions), an unknown schema version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from broker.core.model import now_ms
from broker.store.dead_letters import DeadLetters
from broker.store.inspect import persistence_warnings
from broker.store.keys import SCHEMA_VERSION, nodes_key, schema_key
from broker.store.redis_store import RedisStore, load_script

SCAN_LIMIT = 100_000  # most ids looked at per queue; bounded so diagnose never stalls a big Redis
STALE_GRACE_MS = 5_000  # a lease this far past its deadline means no broker is sweeping


@dataclass
class Finding:
    severity: str  # "error" | "warning"
    check: str
    message: str
    fix: str
    repaired: str = ""
    details: dict[str, Any] = field(default_factory=dict)


async def diagnose(store: RedisStore, repair: bool = False) -> list[Finding]:
    r = store.redis
    out: list[Finding] = []
    version = await r.get(schema_key(store.prefix))
    if version is not None and version != SCHEMA_VERSION:
        out.append(
            Finding(
                "error",
                "schema_version",
                f"key schema version {version!r} is unknown to this broker (speaks {SCHEMA_VERSION})",
                "run the broker release that wrote it, or migrate",
            )
        )
    for problem in await persistence_warnings(r):
        sev = "error" if "maxmemory-policy" in problem or "no persistence" in problem else "warning"
        out.append(Finding(sev, "persistence", problem, "set appendonly yes and maxmemory-policy noeviction"))
    info = await r.info("memory")
    used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
    if limit and used > 0.9 * limit:
        out.append(
            Finding(
                "warning",
                "memory",
                f"Redis uses {used} of maxmemory {limit} bytes ({used / limit:.0%})",
                "drain or purge queues, or raise maxmemory: at the limit every publish is refused",
            )
        )

    now = now_ms()
    broken: list[str] = []
    pairs = await store.all_pairs(broken)
    for problem in broken:
        out.append(
            Finding(
                "error",
                "unreadable_topic",
                f"the group set of topic {problem} (not a set?): no broker can sweep or deliver this topic",
                "inspect with TYPE/DUMP, then fix or DEL the key and re-create the groups by subscribing",
            )
        )
    heartbeats = {str(row[0]): int(row[1]) for row in await r.zrange(nodes_key(store.prefix), 0, -1, withscores=True)}
    timeout = store.settings.delivery.node_timeout_ms
    dead_nodes = sorted(n for n, beat in heartbeats.items() if now - beat > timeout)
    stale_pairs: list[tuple[str, str]] = []
    orphan_lease_pairs: list[tuple[str, str]] = []
    dl = DeadLetters(store)
    referenced: set[tuple[str, str]] = set()  # (topic, id) that some queue refers to
    for topic, group in pairs:
        g = store.keys(topic).group(group)
        k = store.keys(topic)
        leased = [(str(row[0]), int(row[1])) for row in await r.zrange(g.leased, 0, SCAN_LIMIT - 1, withscores=True)]
        stale = [m for m, deadline in leased if deadline < now - STALE_GRACE_MS]
        if stale:
            stale_pairs.append((topic, group))
            out.append(
                Finding(
                    "warning",
                    "stale_leases",
                    f"{topic}/{group}: {len(stale)} lease(s) past their deadline: no broker is sweeping this group",
                    "start a broker, or --repair",
                    details={"ids": stale[:20]},
                )
            )
        if dead_nodes and leased:
            async with r.pipeline(transaction=False) as p:
                for m, _ in leased:
                    p.hget(g.delivery(m), "node")
                owners = await p.execute()
            held = [m for (m, _), node in zip(leased, owners, strict=True) if node in dead_nodes]
            if held:
                orphan_lease_pairs.append((topic, group))
                out.append(
                    Finding(
                        "warning",
                        "dead_node_leases",
                        f"{topic}/{group}: {len(held)} lease(s) held by "
                        f"node(s) without heartbeat: {', '.join(dead_nodes)}",
                        "start a broker, or --repair",
                        details={"ids": held[:20]},
                    )
                )
        ready = [str(x) for x in await r.lrange(g.ready, 0, SCAN_LIMIT - 1)]
        delayed = [str(x) for x in await r.zrange(g.delayed, 0, SCAN_LIMIT - 1)]
        ids = ready + delayed + [m for m, _ in leased]
        referenced.update((topic, i) for i in ids)
        waiting = await _check_key_lines(store, topic, group, set(ids), repair, out)
        referenced.update((topic, i) for i in waiting)
        async with r.pipeline(transaction=False) as p:
            for i in ids:
                p.exists(k.body(i))
            present = await p.execute() if ids else []
        missing = [i for i, e in zip(ids, present, strict=True) if not e]
        if missing:
            f = Finding(
                "error",
                "missing_bodies",
                f"{topic}/{group}: {len(missing)} queue entr(y/ies) whose message "
                "body is gone (they can never be delivered)",
                "--repair removes the entries",
                details={"ids": missing[:20]},
            )
            if repair:
                async with r.pipeline(transaction=True) as p:
                    for i in missing:
                        p.lrem(g.ready, 0, i)
                        p.zrem(g.delayed, i)
                        p.zrem(g.leased, i)
                        p.delete(g.delivery(i))
                    await p.execute()
                f.repaired = f"removed {len(missing)} entries"
            out.append(f)
        dead_ids = [i for i, _ in await dl.ids(topic, group)]
        referenced.update((topic, i) for i in dead_ids)
        if dead_ids:
            async with r.pipeline(transaction=False) as p:
                for i in dead_ids:
                    p.exists(g.dead_letter(i))
                exists = await p.execute()
            gone = [i for i, e in zip(dead_ids, exists, strict=True) if not e]
            if gone:
                f = Finding(
                    "warning",
                    "expired_dead_letters_indexed",
                    f"{topic}/{group}: {len(gone)} dead-letter index entr(y/ies) point at expired dead letters",
                    "--repair drops them (also done by the broker every dlq.prune_interval_s)",
                    details={"ids": gone[:20]},
                )
                if repair:
                    await r.zrem(g.dead, *gone)
                    f.repaired = f"dropped {len(gone)} index entries"
                out.append(f)

    orphans: list[str] = []
    for topic in {t for t, _ in pairs}:
        k = store.keys(topic)
        prefix = k.body("")
        async for key in r.scan_iter(match=prefix + "*", count=1000):
            msg_id = str(key)[len(prefix) :]
            if (topic, msg_id) not in referenced:
                orphans.append(f"{topic}/{msg_id}")
            if len(orphans) >= 1000:
                break
    if orphans:
        out.append(
            Finding(
                "warning",
                "orphan_bodies",
                f"{len(orphans)} message bod(y/ies) that no queue refers to",
                "inspect with HGETALL; `broker export`/re-publish what is needed, then DEL",
                details={"ids": orphans[:20]},
            )
        )

    if repair and (stale_pairs or orphan_lease_pairs):
        pairs_to_sweep = sorted(set(stale_pairs) | set(orphan_lease_pairs))
        results = await store.sweep(pairs_to_sweep, dead_nodes=dead_nodes)
        moved = sum(a + b for a, b, _ in results)
        for f in out:
            if f.check in ("stale_leases", "dead_node_leases"):
                f.repaired = f"swept: {moved} lease(s) rescheduled or dead-lettered by the expiry script"
    return out


async def _check_key_lines(
    store: RedisStore, topic: str, group: str, live: set[str], repair: bool, out: list[Finding]
) -> list[str]:
    """Per-key ordering lines of one group: their head must be live (ready, delayed or leased), else the key is
    stuck forever. The scan here only finds candidates (its reads are not one snapshot, and ``live`` is capped);
    each candidate is checked, and with ``repair`` repaired, by one atomic script (``repair_key.lua``). Returns
    every id waiting in a line (they are referenced, not orphans)."""
    r = store.redis
    k = store.keys(topic)
    g = k.group(group)
    prefix = g.key_line("")
    waiting: list[str] = []
    candidates: list[str] = []  # line keys whose head looked not live
    async for line in r.scan_iter(match=prefix + "*", count=1000):
        members = [str(x) for x in await r.lrange(line, 0, SCAN_LIMIT - 1)]
        waiting += members
        if members and members[0] not in live:
            candidates.append(str(line))
        if len(waiting) >= SCAN_LIMIT:
            break
    if not candidates:
        return waiting
    mode = "repair" if repair else "check"
    stuck = []
    script = r.register_script(load_script("repair_key"))
    for line in candidates:
        if await script(keys=[line, g.ready, g.leased, g.delayed], args=[k.base, group, now_ms(), mode]):
            stuck.append(line)
    if stuck:
        f = Finding(
            "error",
            "stuck_key_lines",
            f"{topic}/{group}: {len(stuck)} ordering key(s) whose first message is neither ready, leased nor "
            "waiting for a retry: nothing of these keys will be delivered again",
            "--repair puts each first message back at the tail of the ready queue",
            details={"keys": [line[len(prefix) :] for line in stuck[:20]]},
        )
        if repair:
            f.repaired = f"made {len(stuck)} key line head(s) ready again"
        out.append(f)
    return waiting
