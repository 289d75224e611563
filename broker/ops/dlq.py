"""Operator operations on dead letters: select by filter, reprocess at a capped rate, purge, export.

Library code behind ``broker dlq``; pure selection logic is separate from the store calls so it can be tested.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson

from broker.core.model import now_ms
from broker.store import RedisStore
from broker.store.dead_letters import DeadLetter, DeadLetters

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
SELECT_CHUNK = 500  # dead letters read per round trip by select


def parse_duration_ms(text: str) -> int:
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"bad duration {text!r}: use e.g. 30s, 10m, 2h, 7d")
    return int(float(m.group(1)) * _UNIT_MS[m.group(2)])


@dataclass(frozen=True)
class Filter:
    topic: str | None = None
    group: str | None = None
    error: str | None = None  # case-insensitive substring of any error text or the reason
    older_than_ms: int | None = None
    newer_than_ms: int | None = None
    ids: frozenset[str] = frozenset()

    def is_empty(self) -> bool:
        return not (self.topic or self.group or self.error or self.older_than_ms or self.newer_than_ms or self.ids)

    def pair_ok(self, topic: str, group: str) -> bool:
        return (self.topic is None or topic == self.topic) and (self.group is None or group == self.group)

    def index_ok(self, msg_id: str, died_at: int, now: int) -> bool:
        if self.ids and msg_id not in self.ids:
            return False
        if self.older_than_ms is not None and now - died_at < self.older_than_ms:
            return False
        return not (self.newer_than_ms is not None and now - died_at > self.newer_than_ms)

    def letter_ok(self, d: DeadLetter) -> bool:
        if not self.error:
            return True
        needle = self.error.lower()
        return needle in d.reason.lower() or any(needle in str(e.get("error", "")).lower() for e in d.errors)


async def select(store: RedisStore, f: Filter, limit: int | None = None) -> list[DeadLetter]:
    """Dead letters matching ``f``, oldest first per (topic, group). Expired ones never appear."""
    dl = DeadLetters(store)
    now = now_ms()
    out: list[DeadLetter] = []
    for topic, group in await store.all_pairs():
        if not f.pair_ok(topic, group):
            continue
        ids = [i for i, died in await dl.ids(topic, group) if f.index_ok(i, died, now)]
        # read in chunks: with a limit (a console page, `dlq list --limit`) a big DLQ is not read whole
        for start in range(0, len(ids), SELECT_CHUNK):
            for d in await dl.get_many(topic, group, ids[start : start + SELECT_CHUNK]):
                if f.letter_ok(d):
                    out.append(d)
                    if limit is not None and len(out) >= limit:
                        return out
    return out


def export_lines(letters: Sequence[DeadLetter]) -> bytes:
    """``broker dlq export``'s file: one dead letter per line, as JSON (``DeadLetter.to_json``)."""
    return b"".join(orjson.dumps(d.to_json()) + b"\n" for d in letters)


Progress = Callable[[int, int], None]


async def reprocess(
    store: RedisStore, letters: Sequence[DeadLetter], rate: float | None, progress: Progress | None = None
) -> tuple[int, list[str]]:
    """Move dead letters back to their group's queue. Returns (moved, ids that were no longer there)."""
    return await _apply(store, letters, rate, progress, "reprocess")


async def purge(
    store: RedisStore, letters: Sequence[DeadLetter], progress: Progress | None = None
) -> tuple[int, list[str]]:
    return await _apply(store, letters, None, progress, "purge")


async def _apply(
    store: RedisStore, letters: Sequence[DeadLetter], rate: float | None, progress: Progress | None, what: str
) -> tuple[int, list[str]]:
    dl = DeadLetters(store)
    groups: dict[tuple[str, str], list[str]] = {}
    for d in letters:
        groups.setdefault((d.topic, d.group), []).append(d.id)
    batch = 500 if rate is None else max(1, min(500, int(rate)))
    done = moved = 0
    missing: list[str] = []
    started = time.monotonic()
    for (topic, group), ids in groups.items():
        for i in range(0, len(ids), batch):
            chunk = ids[i : i + batch]
            res = await (dl.reprocess(topic, group, chunk) if what == "reprocess" else dl.purge(topic, group, chunk))
            moved += sum(res)
            missing += [x for x, ok in zip(chunk, res, strict=True) if not ok]
            done += len(chunk)
            if progress is not None:
                progress(done, len(letters))
            if rate is not None:  # pace: `done` messages should take done/rate seconds
                ahead = done / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
    return moved, missing
