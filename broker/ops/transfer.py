"""Library code behind ``broker export`` and ``broker import`` (docs/export.md): backups, migrations, moving a
broker's state to another Redis.

Export reads every pending message (ready, leased, delayed, waiting behind its key) with each group's delivery
state, every dead letter and every idempotency key of the chosen topics. Import writes them back through
``import.lua``, idempotently: a record whose state the target holds already, or that the import ledger says was
imported before, is skipped and counted as such. A lease cut by the export comes back ready, attempt count kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.core.errors import ConfigError, NotFoundError
from broker.core.model import now_ms
from broker.core.records import ExportFile, Header, LineError, MessageRecord
from broker.store import RedisStore, error_entry
from broker.store.keys import SCHEMA_VERSION
from broker.store.snapshot import (
    CALLS_PER_PIPELINE,
    Importer,
    batches,
    dead_op,
    group_op,
    idempotency_op,
    message_op,
    read_topic,
)

DEFAULT_LEDGER_TTL_MS = 7 * 86_400_000
LEASE_NOTE = "leased when exported; requeued by import"
KINDS = ("groups", "messages", "deliveries", "dead_letters", "idempotency_keys")

Progress = Callable[[int, int], None]


async def export(store: RedisStore, topics: Sequence[str] = ()) -> tuple[ExportFile, list[str]]:
    """The chosen topics (default: all) as an export; also the "<topic>/<group>/<id>" queue entries left out
    because their body was gone (acked meanwhile, or a broken entry that ``broker diagnose`` reports)."""
    known = await store.topics()
    unknown = sorted(set(topics) - set(known))
    if unknown:
        raise NotFoundError(f"unknown topic(s) {', '.join(unknown)}: nothing exported")
    out = ExportFile(Header(store.prefix, SCHEMA_VERSION, now_ms()))  # TTLs count from here: never lengthened
    missing: list[str] = []
    for topic in sorted(set(topics)) if topics else known:
        dump = await read_topic(store, topic)
        out.topics.append(dump.topic)
        out.messages += dump.messages
        out.dead += dump.dead
        out.idempotency += dump.idempotency
        missing += [f"{topic}/{m}" for m in dump.missing_bodies]
    return out, missing


@dataclass
class ImportSummary:
    dry_run: bool
    topics: int = 0
    counts: dict[str, Counter[str]] = field(default_factory=lambda: {k: Counter() for k in KINDS})

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dry_run": self.dry_run, "topics": self.topics}
        for kind, c in self.counts.items():
            out[kind] = {"imported": c["imported"], "skipped": c["present"] + c["ledger"]}
            if kind in ("dead_letters", "idempotency_keys"):
                out[kind]["expired"] = c["expired"]
        return out

    def text(self) -> str:
        verb = "would import" if self.dry_run else "imported"
        parts = [f"{self.counts[k]['imported']} {k.replace('_', ' ')}" for k in KINDS]
        skipped = [f"{self.counts[k]['present'] + self.counts[k]['ledger']} {k.replace('_', ' ')}" for k in KINDS]
        expired = self.counts["dead_letters"]["expired"] + self.counts["idempotency_keys"]["expired"]
        line = f"{verb} {', '.join(parts)}; skipped as already present: {', '.join(skipped)}"
        if expired:
            line += f"; {expired} dead letter(s) or idempotency key(s) expired since the export"
        return line + ("; dry run: nothing changed" if self.dry_run else "")


def _remaining_s(ttl_s: int | None, exported_at: int, now: int) -> int | None:
    """The TTL left now (None: no TTL); <= 0 means it ran out since the export. Whole seconds elapsed are rounded
    up, as the export rounded the TTL down: an import never lengthens a TTL."""
    return None if ttl_s is None else ttl_s - -(-max(0, now - exported_at) // 1000)


@dataclass
class _Entry:
    kind: str
    op: list[Any] | None  # None: decided without Redis (verdict already set)
    verdict: str = ""
    message: str = ""  # message id, for deliveries


def _plan(f: ExportFile, topic: str, groups: Sequence[str], now: int) -> list[_Entry]:
    """The topic's ops in import order: groups; each group's deliveries in their export position order (so every
    group's queue order is kept); dead letters; idempotency keys."""
    plan = [_Entry("groups", group_op(g)) for g in groups]
    messages: list[MessageRecord] = [m for m in f.messages if m.topic == topic]
    for g in groups:
        mine = sorted((m.groups[g].position, i, m) for i, m in enumerate(messages) if g in m.groups)
        for _, _, m in mine:
            p = m.groups[g]
            note = ""
            if p.state == "leased":  # the claim counted an attempt that never finished: say so in the history
                attempts = int(p.delivery.get("attempts", "0") or 0)
                note = error_entry(attempts, LEASE_NOTE, now, p.delivery.get("consumer", ""))
            due = p.due if p.state == "delayed" else None
            plan.append(_Entry("deliveries", message_op(g, m.id, due, note, m.body, p.delivery), message=m.id))
    for d in (d for d in f.dead if d.topic == topic):
        ttl = _remaining_s(d.ttl_s, f.header.exported_at, now)
        plan.append(_Entry("dead_letters", None, "expired") if ttl is not None and ttl <= 0 else
                    _Entry("dead_letters", dead_op(d, ttl)))  # fmt: skip
    for i in (i for i in f.idempotency if i.topic == topic):
        ttl = _remaining_s(i.ttl_s, f.header.exported_at, now)
        plan.append(_Entry("idempotency_keys", None, "expired") if ttl is not None and ttl <= 0 else
                    _Entry("idempotency_keys", idempotency_op(i, ttl)))  # fmt: skip
    return plan


async def _check_schema(store: RedisStore, header: Header, dry_run: bool) -> None:
    if header.key_schema != SCHEMA_VERSION:
        raise LineError(1, f"exported from key schema {header.key_schema!r}; this broker speaks {SCHEMA_VERSION}")
    if dry_run:
        have = await store.schema_version()
    else:
        have = await store.init_schema()
    if have is not None and str(have) != SCHEMA_VERSION:
        raise ConfigError(f"Redis holds key schema version {have!r}; this broker speaks {SCHEMA_VERSION}")


async def import_file(
    store: RedisStore,
    f: ExportFile,
    *,
    dry_run: bool = False,
    ledger_ttl_ms: int = DEFAULT_LEDGER_TTL_MS,
    progress: Progress | None = None,
    now: int | None = None,
) -> ImportSummary:
    """Load a parsed export (``export_format.parse`` checked it whole). Each script call is one atomic step of up
    to a few hundred records; a run cut short (Redis down) is finished by running it again."""
    now = now_ms() if now is None else now
    await _check_schema(store, f.header, dry_run)
    importer = Importer(store)
    summary = ImportSummary(dry_run, topics=len(f.topics))
    plans = [(t.topic, _plan(f, t.topic, t.groups, now)) for t in f.topics]
    total = sum(len(p) for _, p in plans)
    done = 0
    for topic, plan in plans:
        if not dry_run:
            await importer.register_topic(topic)
        sent = [e for e in plan if e.op is not None]
        calls = batches([e.op for e in sent if e.op is not None])
        verdicts: list[str] = []
        for i in range(0, len(calls), CALLS_PER_PIPELINE):
            part = calls[i : i + CALLS_PER_PIPELINE]
            verdicts += await importer.run(topic, part, now, ledger_ttl_ms, dry_run)
            done += sum(len(c) for c in part)
            if progress is not None:
                progress(done, total)
        for e, v in zip(sent, verdicts, strict=True):
            e.verdict = v
        messages: dict[str, bool] = {}
        for e in plan:
            summary.counts[e.kind][e.verdict] += 1
            if e.kind == "deliveries":
                messages[e.message] = messages.get(e.message, False) or e.verdict == "imported"
        for imported in messages.values():
            summary.counts["messages"]["imported" if imported else "present"] += 1
    if progress is not None:
        progress(total, total)
    return summary
