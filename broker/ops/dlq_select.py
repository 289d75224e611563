"""An operator's choice of dead letters as a ``Filter``: filter flags, named ids and the ids of a ``dlq export``
file; and what was named but not found. Pure: no I/O (the caller reads the file)."""

from __future__ import annotations

from collections.abc import Iterable

from broker.core.records import LineError, parse_lines
from broker.ops.dlq import Filter, parse_duration_ms
from broker.store.dead_letters import DeadLetter


def make_filter(
    topic: str | None = None,
    group: str | None = None,
    error: str | None = None,
    older_than: str | None = None,
    newer_than: str | None = None,
    ids: Iterable[str] = (),
) -> Filter:
    """Durations as operators write them (30s, 10m, 2h, 7d); a bad one is a ``ValueError`` that says so."""
    older = parse_duration_ms(older_than) if older_than else None
    newer = parse_duration_ms(newer_than) if newer_than else None
    return Filter(topic, group, error, older, newer, frozenset(ids))


def ids_from_export(data: bytes) -> frozenset[str]:
    """The dead-letter ids a ``dlq export`` file names (empty when it names none). The whole file is checked first:
    a malformed line is a ``LineError`` naming its line number."""
    ids = set()
    for n, row in parse_lines(data):
        if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not row["id"]:
            raise LineError(n, "expected a dead letter object with an 'id'")
        ids.add(row["id"])
    return frozenset(ids)


def unknown_ids(f: Filter, found: Iterable[DeadLetter]) -> list[str]:
    """Ids the filter names that matched no dead letter (unknown, already reprocessed, purged or expired), sorted."""
    return sorted(f.ids - {d.id for d in found})
