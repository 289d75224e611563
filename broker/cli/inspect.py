"""``broker diagnose``, ``broker message`` and ``broker token-hash``: looking at a broker's state and settings."""

from __future__ import annotations

import argparse
import sys

import orjson

from broker.cli.common import UsageError, human_duration, human_time, print_table, store
from broker.cli.exits import EXIT_FAILURE, EXIT_OK
from broker.ops import diagnose as ops_diagnose
from broker.ops import message as ops_message


async def diagnose(args: argparse.Namespace) -> int:
    async with store(args) as s:
        report = await ops_diagnose.check(s, repair=args.repair)
    if args.json:
        print(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode())
    elif not report.findings:
        print("ok: no problems found")
    for f in report.findings if not args.json else []:
        print(f"[{f.severity.upper()}] {f.check}: {f.message}")
        print(f"    fix: {f.fix}")
        if f.repaired:
            print(f"    repaired: {f.repaired}")
    return EXIT_FAILURE if report.unrepaired else EXIT_OK


async def message(args: argparse.Namespace) -> int:
    async with store(args) as s:
        rows = await ops_message.where(s, args.id, args.topic)
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    elif rows:
        cols = [*ops_message.ROW_HEAD, *ops_message.detail_columns(rows)]
        print_table([{c: _cell(c, r.get(c, "")) for c in cols} for r in rows], cols)
    if not rows:
        print(f"message {args.id!r} is not in Redis: acked by every group (or never published)", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


_TIMES = frozenset({"until", "due", "died_at", "acked_at"})  # epoch-ms fields of `broker.store.status` rows


def _cell(col: str, value: object) -> object:
    """Times as UTC and how far from now (``--json`` keeps epoch ms), TTLs as durations."""
    if col in _TIMES and isinstance(value, int):
        return human_time(value)
    if col == "ttl_s" and isinstance(value, int):
        return human_duration(value)
    return value


async def token_hash(args: argparse.Namespace) -> int:
    from broker.node.auth import token_hash

    token = args.token if args.token not in (None, "-") else sys.stdin.readline().strip()
    if not token:
        raise UsageError("give a token (or - to read it from stdin)")
    h = token_hash(token)
    if args.json:
        print(orjson.dumps({"sha256": h}).decode())
        return EXIT_OK
    print(h)
    print(f'[[tokens]]\nname = "<client name>"\nsha256 = "{h}"\npublish = ["*"]\nsubscribe = ["*"]', file=sys.stderr)
    return EXIT_OK
