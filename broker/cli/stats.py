"""``broker stats``: the snapshot of ``broker.ops.stats`` as a table or JSON, once or every --watch seconds."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import orjson

from broker.cli.common import human_bytes, human_duration, print_table, store
from broker.cli.exits import EXIT_FAILURE, EXIT_OK
from broker.ops import stats as ops_stats
from broker.ops.stats import RATED, PairKey, Row

COLUMNS = ["topic", "group", "ready", "leased", "delayed", "dead", "consumers", "oldest_ready"]


async def stats(args: argparse.Namespace) -> int:
    """Depths, consumers, oldest message age per topic/group; node readiness and breaker states. Rates (publish,
    deliver, ack, nack per second) come from two snapshots: every refresh with --watch, or 2 s apart with --rates."""
    previous: dict[PairKey, Row] = {}
    t_prev = 0.0
    async with store(args) as s:
        if args.rates and not args.watch:
            first = await ops_stats.collect(s, args.topic)
            previous, t_prev = ops_stats.by_pair(first.groups), time.monotonic()
            await asyncio.sleep(2.0)
        while True:
            snap = await ops_stats.collect(s, args.topic, memory=not args.no_memory)
            for problem in snap.broken:  # the rest is still shown; the exit status says something is wrong
                print(f"unreadable topic (run `broker diagnose`): {problem}", file=sys.stderr)
            t = time.monotonic()
            if previous:
                ops_stats.add_rates(snap.groups, previous, t - t_prev)
            previous, t_prev = ops_stats.by_pair(snap.groups), t
            if args.json:
                doc: Any = snap.groups if not args.nodes else {"groups": snap.groups, "nodes": snap.nodes,
                                                               "topics": snap.topics}  # fmt: skip
                print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
            else:
                _print(snap, clear=bool(args.watch))
            if not args.watch:
                return EXIT_FAILURE if snap.broken else EXIT_OK
            await asyncio.sleep(args.watch)


def _print(snap: ops_stats.Stats, clear: bool) -> None:
    if clear:
        print("\033[2J\033[H", end="")
    rows = snap.groups
    cols = list(COLUMNS)
    if any("acked_per_s" in r for r in rows):
        cols += [f"{w}_per_s" for w in RATED]
    if rows:
        print_table([{c: _cell(r, c) for c in cols} for r in rows], cols)
    else:
        print("(no topics)")
    if snap.topics:
        print()
        print_table([_memory_cells(m) for m in snap.topics], ["topic", "keys", "memory"])
    print()
    for n in snap.nodes:
        state = "ready" if n["ready"] else "NOT READY: " + "; ".join(n["reasons"])
        breakers = ", ".join(f"{k}={v}" for k, v in n["breakers"].items())
        print(f"node {n['node']}: {state}; breakers {breakers}; heartbeat {n['heartbeat_age_s']}s ago")
        for name, problem in n["loops"].items():
            print(f"  unhealthy loop {name}: {problem}")
    if not snap.nodes:
        print("(no broker node is running)")


def _cell(row: Row, col: str) -> Any:
    """The table's cells: the oldest ready message's age as a duration (``--json`` keeps the seconds)."""
    if col == "oldest_ready":
        age = row.get("oldest_ready_age_s")
        return "" if age is None else human_duration(age)
    return "" if row.get(col) is None else row[col]


def _memory_cells(m: dict[str, Any]) -> dict[str, Any]:
    size = human_bytes(int(m["memory_bytes"]))
    how = f"~{size} (estimate from {m['sampled_keys']} sampled keys)" if m["estimated"] else size
    return {"topic": m["topic"], "keys": m["keys"], "memory": how}
