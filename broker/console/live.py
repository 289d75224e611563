"""The console's live view: ``broker stats``'s snapshot (``ops.stats.collect``) with per-second rates and a short
history of the total publish and ack rates for the page's chart.

A refresh is compared with the newest kept snapshot at least ``MIN_DT_S`` old (``ops.stats.add_rates``, as ``broker
stats --watch`` does), so rates do not jitter when several pages refresh at once; a snapshot is kept at most once a
second, and a chart point with it."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from broker.ops.stats import RATED, PairKey, Row, Stats, add_rates, by_pair

MIN_DT_S = 1.0
KEEP_SNAPSHOTS = 8
KEEP_POINTS = 120  # two minutes of chart at one point a second


def totals(rows: list[Row]) -> tuple[float, float]:
    """(messages published per second, deliveries acked per second) over every topic and group. ``published`` is a
    topic's counter (repeated on each of its groups' rows): counted once per topic."""
    published: dict[str, float] = {}
    acked = 0.0
    for r in rows:
        published.setdefault(r["topic"], r.get("published_per_s") or 0.0)
        acked += r.get("acked_per_s") or 0.0
    return round(sum(published.values()), 1), round(acked, 1)


class Rates:
    def __init__(self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.wall = wall
        self.snapshots: deque[tuple[float, dict[PairKey, Row]]] = deque(maxlen=KEEP_SNAPSHOTS)
        self.points: deque[dict[str, Any]] = deque(maxlen=KEEP_POINTS)

    def apply(self, stats: Stats) -> None:
        """Add ``<counter>_per_s`` to each row of ``stats.groups`` (None until a snapshot a little older exists)."""
        now = self.clock()
        base = next((s for s in reversed(self.snapshots) if now - s[0] >= MIN_DT_S), None)
        if base is None and self.snapshots and now - self.snapshots[0][0] > 0.05:
            base = self.snapshots[0]
        if base is not None:
            add_rates(stats.groups, base[1], now - base[0])
        else:
            for r in stats.groups:
                r.update({f"{w}_per_s": None for w in RATED})
        if not self.snapshots or now - self.snapshots[-1][0] >= MIN_DT_S:
            self.snapshots.append((now, by_pair(stats.groups)))
            if base is not None:
                published, acked = totals(stats.groups)
                self.points.append({"t": round(self.wall(), 3), "published_per_s": published, "acked_per_s": acked})
