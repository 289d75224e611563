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
from broker.core.errors import BrokerError, UnavailableError
from broker.ops import stats as ops_stats
from broker.ops.stats import RATED, PairKey, Row
from broker.store import RedisStore

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
            try:
                snap = await ops_stats.collect(s, args.topic, memory=not args.no_memory)
            except UnavailableError:  # a cluster master does not answer: still say what the nodes report about it
                await _print_nodes_anyway(s, args.json)
                raise
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


async def _print_nodes_anyway(s: RedisStore, as_json: bool) -> None:
    """The nodes' view (readiness, breakers, masters down) when the snapshot itself failed (or why not)."""
    try:
        rows = await ops_stats.node_rows(s)
    except BrokerError as e:
        print(f"the nodes' status could not be read either: {e.message}", file=sys.stderr)
        return
    if as_json:
        print(orjson.dumps({"nodes": rows}, option=orjson.OPT_INDENT_2).decode())
    else:
        _print_node_rows(rows)


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
    _print_node_rows(snap.nodes)
    if not snap.nodes:
        print("(no broker node is running)")


def _print_node_rows(rows: list[Row]) -> None:
    for n in rows:
        if not n["ready"]:
            state = "NOT READY: " + "; ".join(n["reasons"])
        else:
            state = "ready, DEGRADED: " + "; ".join(n["reasons"]) if n["reasons"] else "ready"
        breakers = ", ".join(f"{k}={v}" for k, v in n["breakers"].items())
        print(f"node {n['node']}: {state}; breakers {breakers}; heartbeat {n['heartbeat_age_s']}s ago")
        for master, down in n.get("masters_down", {}).items():
            topics = ", ".join(down["topics"]) or "(none on this node)"
            print(f"  redis master {master}: breaker {down['state']}; topics affected: {topics}")
        for name, problem in n["loops"].items():
            print(f"  unhealthy loop {name}: {problem}")


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
