"""Redis side of ``broker export`` / ``broker import``: read one topic's pending messages, dead letters and
idempotency keys as export records; write records back with ``import.lua`` in batches (docs/export.md).

Reading is a snapshot per group: one script (``_snapshot.lua``) reads the group's ready list, lease, delay and
dead-letter indexes and every per-key list in one atomic step, so a message moving between them while brokers run is
seen once and none is missed (a SCAN for the lines before reading them would miss a line born in between: a torn
snapshot). Bodies, delivery hashes and dead letters are read after that, in pipelines; one acked in between is left
out (it is done).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from broker.core.records import DeadRecord, IdempotencyRecord, MessageRecord, Pending, TopicRecord
from broker.store.cluster import scan_slot_of
from broker.store.dead_letters import DeadLetters
from broker.store.keys import GroupKeys
from broker.store.leases import delivery_state
from broker.store.redis_store import RedisStore
from broker.store.scripts import ScriptCall

READ_CHUNK = 500  # hashes per pipeline when reading
OPS_PER_CALL = 200  # import ops per script call (one atomic step)
BYTES_PER_CALL = 512 * 1024  # and at most about this many argument bytes, so one call never blocks Redis long
CALLS_PER_PIPELINE = 16


@dataclass
class TopicDump:
    topic: TopicRecord
    messages: list[MessageRecord] = field(default_factory=list)
    dead: list[DeadRecord] = field(default_factory=list)
    idempotency: list[IdempotencyRecord] = field(default_factory=list)
    missing_bodies: list[str] = field(default_factory=list)  # "<group>/<id>" queued but without a body: skipped


@dataclass
class _GroupSnapshot:
    pending: list[tuple[str, str, int | None]]  # (id, state, due or lease deadline), in import order
    dead: list[tuple[str, int]]  # (id, died_at)


async def _snapshot(store: RedisStore, base: str, group: str, g: GroupKeys) -> _GroupSnapshot:
    """The group at one moment: ``_snapshot.lua`` reads its queues and every ordering-key line in one step (a line
    is found from its live first message; the SCAN adds only damaged lines whose first message is in no state)."""

    async def scan(r: aioredis.Redis) -> list[str]:
        return sorted([k async for k in scan_slot_of(r, g.ready, g.key_line("*"))])

    scanned = await store.gateway.call(scan, "export_scan")
    keys = [g.leased, g.ready, g.delayed, g.dead]
    flat_leased, ready, flat_delayed, flat_dead, lines = await store.scripts.call(
        "_snapshot", keys, [base, group, *scanned], "export_snapshot"
    )
    leased, delayed, dead = (_pairs(x) for x in (flat_leased, flat_delayed, flat_dead))
    seen: set[str] = set()
    pending: list[tuple[str, str, int | None]] = []

    def add(msg_id: Any, state: str, when: int | None) -> None:
        if str(msg_id) not in seen:
            seen.add(str(msg_id))
            pending.append((str(msg_id), state, when))

    # Leases were taken from the head of the queue: they go back before it, oldest (smallest id) first.
    for msg_id, deadline in sorted(leased, key=lambda row: str(row[0])):
        add(msg_id, "leased", int(deadline))
    for msg_id in ready:
        add(msg_id, "ready", None)
    for msg_id, due in delayed:
        add(msg_id, "delayed", int(due))
    for ids in lines:  # the heads are queued above; the rest wait behind them, in key order
        for msg_id in ids:
            add(msg_id, "waiting", None)
    return _GroupSnapshot(pending, [(m, int(s)) for m, s in dead])


def _pairs(flat: Sequence[Any]) -> list[tuple[str, float]]:
    """``ZRANGE ... WITHSCORES`` as a script returns it (id, score, id, score, ...) as (id, score) pairs."""
    return [(str(flat[i]), float(flat[i + 1])) for i in range(0, len(flat), 2)]


def _ttl_s(pttl_ms: int) -> int | None:
    """Whole seconds left, rounded down so an import never lengthens a TTL (None: no TTL)."""
    return pttl_ms // 1000 if pttl_ms > 0 else None  # 0: it runs out before any import


async def _hgetall_many(store: RedisStore, keys: Sequence[str]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for i in range(0, len(keys), READ_CHUNK):
        chunk = keys[i : i + READ_CHUNK]

        def build(p: Pipeline, chunk: Sequence[str] = chunk) -> None:
            for k in chunk:
                p.hgetall(k)

        out += [{str(f): str(v) for f, v in h.items()} for h in await store.gateway.pipeline(build, "export_read")]
    return out


async def _held(store: RedisStore, held_key: str, ids: Sequence[str]) -> dict[str, str]:
    """The held lease records (first deliveries) of ``ids``, by id; ids with none are left out."""
    out: dict[str, str] = {}
    for i in range(0, len(ids), READ_CHUNK):
        chunk = list(ids[i : i + READ_CHUNK])

        async def read(r: aioredis.Redis, chunk: list[str] = chunk) -> list[Any]:
            return list(await r.hmget(held_key, chunk))

        values = await store.gateway.call(read, "export_read")
        out.update({m: str(v) for m, v in zip(chunk, values, strict=True) if v is not None})
    return out


async def _idempotency(store: RedisStore, topic: str) -> list[IdempotencyRecord]:
    k = store.keys(topic)
    prefix = k.idem("")

    async def go(r: aioredis.Redis) -> list[tuple[str, Any, Any]]:
        names = sorted([x async for x in scan_slot_of(r, k.groups, k.idem("*"))])
        rows: list[tuple[str, Any, Any]] = []
        for i in range(0, len(names), READ_CHUNK):
            async with r.pipeline(transaction=False) as p:
                for name in names[i : i + READ_CHUNK]:
                    p.get(name)
                    p.pttl(name)
                res = await p.execute()
            rows += [(n, res[2 * j], res[2 * j + 1]) for j, n in enumerate(names[i : i + READ_CHUNK])]
        return rows

    rows = await store.gateway.call(go, "export_idempotency")
    return [
        IdempotencyRecord(topic, name[len(prefix) :], str(value), _ttl_s(int(ms)))
        for name, value, ms in rows
        if value is not None  # expired between SCAN and GET
    ]


async def read_topic(store: RedisStore, topic: str) -> TopicDump:
    """One topic's groups, pending messages (with each group's delivery state), dead letters and idempotency keys."""
    k = store.keys(topic)
    groups = await store.groups(topic)
    dump = TopicDump(TopicRecord(topic, tuple(groups)))
    per_group: dict[str, dict[str, Pending]] = {}  # id -> group -> pending, ids in first-seen order
    for group in groups:
        g = k.group(group)
        snap = await _snapshot(store, k.base, group, g)
        deliveries = await _hgetall_many(store, [g.delivery(m) for m, _, _ in snap.pending])
        held = await _held(store, g.held, [m for m, state, _ in snap.pending if state == "leased"])
        for pos, (msg_id, _, when) in enumerate(snap.pending):
            if msg_id in held:  # a first delivery: its lease record stands for its delivery hash
                deliveries[pos] = delivery_state(deliveries[pos], held[msg_id], when)
        for pos, ((msg_id, state, when), dlv) in enumerate(zip(snap.pending, deliveries, strict=True)):
            p = Pending(
                state,
                pos,
                due=when if state == "delayed" else None,
                leased_until=when if state == "leased" else None,
                delivery=dlv,
            )
            per_group.setdefault(msg_id, {})[group] = p
        raw = await DeadLetters(store).raw_many(topic, group, [m for m, _ in snap.dead])
        died = dict(snap.dead)
        for msg_id, h, ms in raw:
            dump.dead.append(DeadRecord(topic, group, msg_id, died[msg_id], _ttl_s(ms), h))
    ids = sorted(per_group)  # ids begin with the publish time: publish order
    bodies = await _hgetall_many(store, [k.body(m) for m in ids])
    for msg_id, body in zip(ids, bodies, strict=True):
        if not body:  # acked by every group since the snapshot, or a queue entry without a body (diagnose)
            dump.missing_bodies += [f"{g}/{msg_id}" for g in per_group[msg_id]]
            continue
        body.pop("refs", None)
        dump.messages.append(MessageRecord(topic, msg_id, body, per_group[msg_id]))
    dump.idempotency = await _idempotency(store, topic)
    return dump


# ---- import ------------------------------------------------------------------------------------------------------


def group_op(group: str) -> list[Any]:
    return ["G", group]


def message_op(
    group: str, msg_id: str, due: int | None, note: str, body: Mapping[str, str], dlv: Mapping[str, str]
) -> list[Any]:
    op: list[Any] = ["M", group, msg_id, "" if due is None else due, note, len(body)]
    for f, v in body.items():
        op += [f, v]
    op.append(len(dlv))
    for f, v in dlv.items():
        op += [f, v]
    return op


def dead_op(d: DeadRecord, ttl_s: int | None) -> list[Any]:
    op: list[Any] = ["D", d.group, d.id, d.died_at, "" if ttl_s is None else ttl_s, len(d.fields)]
    for f, v in d.fields.items():
        op += [f, v]
    return op


def idempotency_op(i: IdempotencyRecord, ttl_s: int | None) -> list[Any]:
    return ["I", i.key, i.id, "" if ttl_s is None else ttl_s]


def _size(op: list[Any]) -> int:
    return sum(len(x) if isinstance(x, str) else 8 for x in op)


def batches(ops: Sequence[list[Any]]) -> list[list[list[Any]]]:
    """Ops cut into script calls of at most OPS_PER_CALL ops and about BYTES_PER_CALL bytes, order kept."""
    out: list[list[list[Any]]] = []
    size = 0
    for op in ops:
        s = _size(op)
        if not out or len(out[-1]) >= OPS_PER_CALL or (size + s > BYTES_PER_CALL and out[-1]):
            out.append([])
            size = 0
        out[-1].append(op)
        size += s
    return out


class Importer:
    """Runs ``import.lua`` for one topic at a time: many ops per call, many calls per pipeline."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store

    async def register_topic(self, topic: str) -> None:
        """The topic registry first (outside the topic's slot): never a queue nobody can find."""
        await self.store.topology.register_topics([topic], "import_register_topic", cached=False)

    async def run(
        self, topic: str, calls: Sequence[list[list[Any]]], now: int, ledger_ttl_ms: int, dry_run: bool
    ) -> list[str]:
        """One verdict per op of ``calls`` (see import.lua), in order."""
        k = self.store.keys(topic)
        head: list[Any] = [k.base, now, ledger_ttl_ms, "1" if dry_run else "0"]
        script = self.store.scripts.get("import")
        evals: list[ScriptCall] = [
            (script, [k.groups, k.imported], head + [x for op in call for x in op]) for call in calls
        ]
        replies = await self.store.scripts.run(evals, "import")
        return [str(v) for reply in replies for v in reply]
