"""``broker diagnose``: checks of the Redis a broker uses, each with a severity and a suggested fix, and the
repairs that are safe to make (seeds 000 and 003: the failures nobody could see).

Safe repairs, each a Lua script that checks and repairs in one atomic step: sweep leases past their deadline or held
by dead nodes (the normal expiry script), drop queue entries whose body is gone (``drop_bodyless.lua``: nothing can
ever be delivered for them), drop dead-letter index entries whose hash expired (``prune_dead.lua``, as the broker's
own pruning), make the head of a stuck ordering-key line live again (``repair_key.lua``).
Every read goes through the store's gateway: Redis down ends ``broker diagnose`` with an error, not a traceback.
Not repaired, only reported: bodies no queue refers to (they may be data someone needs), persistence and eviction
settings (operator decisions), an unknown schema version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from broker.store.cluster import scan_slot_of
from broker.store.dead_letters import DeadLetters
from broker.store.keys import SCHEMA_VERSION, GroupKeys
from broker.store.leases import held_state
from broker.store.redis_store import RedisStore

SCAN_LIMIT = 100_000  # most ids looked at per queue; bounded so diagnose never stalls a big Redis
STALE_GRACE_MS = 5_000  # a lease this far past its deadline means no broker is sweeping
REPAIR_BATCH = 500  # ids per repair script call


@dataclass
class Finding:
    severity: str  # "error" | "warning"
    check: str
    message: str
    fix: str
    repaired: str = ""
    details: dict[str, Any] = field(default_factory=dict)


async def diagnose(store: RedisStore, repair: bool = False) -> list[Finding]:
    out: list[Finding] = []
    version = await store.schema_version()
    if version is not None and version != SCHEMA_VERSION:
        out.append(
            Finding(
                "error",
                "schema_version",
                f"key schema version {version!r} is unknown to this broker (speaks {SCHEMA_VERSION})",
                "run the broker release that wrote it, or migrate",
            )
        )
    for problem in await store.persistence_warnings():
        sev = "error" if "maxmemory-policy" in problem or "no persistence" in problem else "warning"
        out.append(Finding(sev, "persistence", problem, "set appendonly yes and maxmemory-policy noeviction"))
    used, limit = await store.reads.memory_info()
    if limit and used > 0.9 * limit:
        out.append(
            Finding(
                "warning",
                "memory",
                f"Redis uses {used} of maxmemory {limit} bytes ({used / limit:.0%})",
                "drain or purge queues, or raise maxmemory: at the limit every publish is refused",
            )
        )

    now = store.clock()
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
    heartbeats = await store.nodes.heartbeats()
    timeout = store.settings.delivery.node_timeout_ms
    dead_nodes = sorted(n for n, beat in heartbeats.items() if now - beat > timeout)
    stale_pairs: list[tuple[str, str]] = []
    orphan_lease_pairs: list[tuple[str, str]] = []
    dl = DeadLetters(store)
    referenced: set[tuple[str, str]] = set()  # (topic, id) that some queue refers to
    for topic, group in pairs:
        g = store.keys(topic).group(group)
        k = store.keys(topic)

        def queues(p: Pipeline, g: GroupKeys = g) -> None:
            p.zrange(g.leased, 0, SCAN_LIMIT - 1, withscores=True)
            p.lrange(g.ready, 0, SCAN_LIMIT - 1)
            p.zrange(g.delayed, 0, SCAN_LIMIT - 1)

        leased_rows, ready_rows, delayed_rows = await store.gateway.pipeline(queues, "diagnose_queues")
        leased = [(str(row[0]), int(row[1])) for row in leased_rows]
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
            owners = await _hget_many(store, [g.delivery(m) for m, _ in leased], "node")
            firsts = await _hmget(store, g.held, [m for m, _ in leased])  # first deliveries: their lease records
            owners = [held_state(v)["node"] if v is not None else o for o, v in zip(owners, firsts, strict=True)]
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
        ready = [str(x) for x in ready_rows]
        delayed = [str(x) for x in delayed_rows]
        ids = ready + delayed + [m for m, _ in leased]
        referenced.update((topic, i) for i in ids)
        waiting = await _check_key_lines(store, topic, group, set(ids), repair, out)
        referenced.update((topic, i) for i in waiting)
        present = await _exists_many(store, [k.body(i) for i in ids])
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
                removed = await _drop_bodyless(store, topic, group, missing)
                f.repaired = f"removed {removed} entries"
            out.append(f)
        dead_ids = [i for i, _ in await dl.ids(topic, group)]
        referenced.update((topic, i) for i in dead_ids)
        if dead_ids:
            exists = await _exists_many(store, [g.dead_letter(i) for i in dead_ids])
            gone = [i for i, e in zip(dead_ids, exists, strict=True) if not e]
            if gone:
                f = Finding(
                    "warning",
                    "expired_dead_letters_indexed",
                    f"{topic}/{group}: {len(gone)} dead-letter index entr(y/ies) point at expired dead letters",
                    "--repair drops them (also done by the broker every dlq.prune_interval_s)",
                    details={"ids": gone[:20]},
                )
                if repair:  # the broker's own pruning, verifying every entry of the index
                    dropped = await dl.prune([(topic, group)], verify=len(dead_ids))
                    f.repaired = f"dropped {dropped} index entries"
                out.append(f)

    orphans = await _orphan_bodies(store, sorted({t for t, _ in pairs}), referenced)
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


async def _exists_many(store: RedisStore, keys: Sequence[str]) -> list[bool]:
    out: list[bool] = []
    for i in range(0, len(keys), REPAIR_BATCH):
        chunk = keys[i : i + REPAIR_BATCH]

        def build(p: Pipeline, chunk: Sequence[str] = chunk) -> None:
            for key in chunk:
                p.exists(key)

        out += [bool(int(x)) for x in await store.gateway.pipeline(build, "diagnose_exists")]
    return out


async def _hmget(store: RedisStore, key: str, fields: Sequence[str]) -> list[str | None]:
    out: list[str | None] = []
    for i in range(0, len(fields), REPAIR_BATCH):
        chunk = list(fields[i : i + REPAIR_BATCH])

        async def read(r: aioredis.Redis, chunk: list[str] = chunk) -> list[Any]:
            return list(await r.hmget(key, chunk))

        values = await store.gateway.call(read, "diagnose_hget")
        out += [None if x is None else str(x) for x in values]
    return out


async def _hget_many(store: RedisStore, keys: Sequence[str], field: str) -> list[str | None]:
    out: list[str | None] = []
    for i in range(0, len(keys), REPAIR_BATCH):
        chunk = keys[i : i + REPAIR_BATCH]

        def build(p: Pipeline, chunk: Sequence[str] = chunk) -> None:
            for key in chunk:
                p.hget(key, field)

        out += [None if x is None else str(x) for x in await store.gateway.pipeline(build, "diagnose_hget")]
    return out


async def _drop_bodyless(store: RedisStore, topic: str, group: str, ids: Sequence[str]) -> int:
    """Remove the queue entries of ``ids`` whose body is (still) gone: ``drop_bodyless.lua``, every key declared."""
    k = store.keys(topic)
    g = k.group(group)
    removed = 0
    for i in range(0, len(ids), REPAIR_BATCH):
        chunk = list(ids[i : i + REPAIR_BATCH])
        keys = [g.ready, g.delayed, g.leased, g.held]
        for msg_id in chunk:
            keys += [k.body(msg_id), g.delivery(msg_id)]
        removed += int(await store.scripts.call("drop_bodyless", keys, chunk, "diagnose_drop_bodyless"))
    return removed


async def _orphan_bodies(store: RedisStore, topics: Sequence[str], referenced: set[tuple[str, str]]) -> list[str]:
    """Up to 1000 "topic/id" whose body no queue refers to."""

    async def go(r: aioredis.Redis) -> list[str]:
        orphans: list[str] = []
        for topic in topics:
            prefix = store.keys(topic).body("")
            async for key in scan_slot_of(r, store.keys(topic).groups, prefix + "*"):
                msg_id = str(key)[len(prefix) :]
                if (topic, msg_id) not in referenced:
                    orphans.append(f"{topic}/{msg_id}")
                if len(orphans) >= 1000:
                    return orphans
        return orphans

    return await store.gateway.call(go, "diagnose_orphans")


async def _check_key_lines(
    store: RedisStore, topic: str, group: str, live: set[str], repair: bool, out: list[Finding]
) -> list[str]:
    """Per-key ordering lines of one group: their head must be live (ready, delayed or leased), else the key is
    stuck forever. The scan here only finds candidates (its reads are not one snapshot, and ``live`` is capped);
    each candidate is checked, and with ``repair`` repaired, by one atomic script (``repair_key.lua``). Returns
    every id waiting in a line (they are referenced, not orphans)."""
    k = store.keys(topic)
    g = k.group(group)
    prefix = g.key_line("")

    async def scan(r: aioredis.Redis) -> tuple[list[str], list[str]]:
        waiting: list[str] = []
        candidates: list[str] = []  # line keys whose head looked not live
        async for line in scan_slot_of(r, g.ready, prefix + "*"):
            members = [str(x) for x in await r.lrange(line, 0, SCAN_LIMIT - 1)]
            waiting += members
            if members and members[0] not in live:
                candidates.append(str(line))
            if len(waiting) >= SCAN_LIMIT:
                break
        return waiting, candidates

    waiting, candidates = await store.gateway.call(scan, "diagnose_key_lines")
    if not candidates:
        return waiting
    mode = "repair" if repair else "check"
    stuck = []
    for line in candidates:
        keys = [line, g.ready, g.leased, g.delayed]
        if await store.scripts.call("repair_key", keys, [k.base, group, store.clock(), mode], "diagnose_repair_key"):
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
