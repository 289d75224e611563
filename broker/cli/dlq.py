"""``broker dlq list | show | reprocess | purge | export``: selection and moves are ``broker.ops.dlq``; here the flags
become a ``Filter`` and the results become lines."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time

import orjson

from broker.cli.common import (
    UsageError,
    human_duration,
    human_time,
    more,
    print_table,
    progress,
    read_input,
    store,
    write_output,
)
from broker.cli.exits import EXIT_FAILURE, EXIT_OK
from broker.core.records import LineError
from broker.ops import dlq as dlq_ops
from broker.ops.dlq import Filter
from broker.ops.dlq_select import ids_from_export, make_filter, unknown_ids
from broker.store.dead_letters import DeadLetter


def _ids_from_file(path: str) -> frozenset[str]:
    """Dead-letter ids named in a `dlq export` file; a malformed line or an empty file changes nothing."""
    try:
        ids = ids_from_export(read_input(path))
    except LineError as e:
        raise UsageError(f"{path}:{e.line}: {e.message}; nothing changed") from None
    if not ids:
        raise UsageError(f"{path}: no dead letters in the file; nothing changed")
    return ids


def _filter(args: argparse.Namespace) -> Filter:
    ids = frozenset(getattr(args, "ids", None) or ())
    try:
        f = make_filter(args.topic, args.group, args.error, args.older_than, args.newer_than, ids)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if getattr(args, "from_file", None):
        f = dataclasses.replace(f, ids=f.ids | _ids_from_file(args.from_file))
    return f


async def dlq_list(args: argparse.Namespace) -> int:
    async with store(args) as s:
        letters = await dlq_ops.select(s, _filter(args), args.limit)
    if args.json:
        print(orjson.dumps([d.to_json() for d in letters], option=orjson.OPT_INDENT_2).decode())
        return EXIT_OK
    now = time.time() * 1000
    rows = [
        {
            "id": d.id, "topic": d.topic, "group": d.group, "attempts": d.attempts, "reason": d.reason,
            "died": f"{human_duration((now - d.died_at) / 1000)} ago", "ttl": human_duration(d.ttl_s),
            "last_error": (str(d.errors[-1].get("error", "")) if d.errors else "")[:60],
        }
        for d in letters
    ]  # fmt: skip
    if rows:
        print_table(rows, ["id", "topic", "group", "attempts", "reason", "died", "ttl", "last_error"])
    else:
        print("(no dead letters match)")
    return EXIT_OK


async def dlq_show(args: argparse.Namespace) -> int:
    async with store(args) as s:
        letters = await dlq_ops.select(s, Filter(args.topic, args.group, ids=frozenset([args.id])))
    if not letters:
        print(f"no dead letter {args.id!r} (unknown id, already reprocessed, purged or expired)", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        for d in letters:
            print(orjson.dumps(d.to_json(), option=orjson.OPT_INDENT_2).decode())
        return EXIT_OK
    for n, d in enumerate(letters):
        if n:
            print()
        _show(d)
    return EXIT_OK


def _show(d: DeadLetter) -> None:
    """One dead letter for a person: what it was, why it died, when, and every attempt's error."""
    now = time.time() * 1000
    fields = [
        ("id", d.id), ("topic/group", f"{d.topic}/{d.group}"), ("reason", d.reason), ("attempts", d.attempts),
        ("published", human_time(d.published_at, now)), ("died", human_time(d.died_at, now)),
        ("expires", f"in {human_duration(d.ttl_s)}"), ("last consumer", d.last_consumer or "-"),
        ("ordering key", d.key or "-"), ("headers", d.headers), ("payload", d.payload),
    ]  # fmt: skip
    for name, value in fields:
        print(f"{name + ':':<15}{value}")
    print("errors:")
    rows = [
        {"attempt": e.get("attempt", ""), "at": human_time(int(e["at"]), now) if e.get("at") else "",
         "consumer": e.get("consumer", ""), "error": e.get("error", "")}
        for e in d.errors
    ]  # fmt: skip
    if rows:
        print_table(rows, ["attempt", "at", "consumer", "error"], indent="  ")
    else:
        print("  (none recorded)")


async def dlq_move(args: argparse.Namespace) -> int:
    """reprocess / purge: select, (confirm), apply, report. Exit 1 if nothing matched or anything was missing."""
    f = _filter(args)
    if f.is_empty() and not args.all:
        raise UsageError("name ids, or a filter (--topic/--group/--error/--older-than/--newer-than), or --all")
    async with store(args) as s:
        letters = await dlq_ops.select(s, f)
        # Named ids that matched nothing are reported, never skipped silently (and make the exit non-zero).
        unknown = unknown_ids(f, letters)
        if unknown:
            print(f"no dead letter {more(unknown)} (unknown id, already reprocessed, purged or expired)",
                  file=sys.stderr)  # fmt: skip
        if not letters:
            print("no dead letters match: nothing changed", file=sys.stderr)
            return EXIT_FAILURE
        verb = args.cmd_dlq
        done = {"reprocess": "reprocessed", "purge": "purged"}[verb]
        if args.dry_run:
            for d in letters:
                print(f"would {verb} {d.id} ({d.topic}/{d.group}, {d.attempts} attempts, {d.reason})")
            print(f"dry run: {len(letters)} dead letter(s) would be {done}; nothing changed", file=sys.stderr)
            return EXIT_FAILURE if unknown else EXIT_OK
        if verb == "purge" and not args.yes:
            if not sys.stdin.isatty():
                raise UsageError(f"purge of {len(letters)} dead letter(s) needs --yes when not interactive")
            answer = await asyncio.to_thread(input, f"permanently delete {len(letters)} dead letter(s)? type 'yes': ")
            if answer.strip() != "yes":
                print("not confirmed: nothing changed", file=sys.stderr)
                return EXIT_FAILURE
        shown = progress(verb) if len(letters) > 100 else None
        if verb == "reprocess":
            moved, missing = await dlq_ops.reprocess(s, letters, args.rate, shown)
        else:
            moved, missing = await dlq_ops.purge(s, letters, shown)
    print(orjson.dumps({done: moved, "missing": unknown + missing}).decode())
    if missing:
        print(f"{len(missing)} dead letter(s) were gone before they could be {done}", file=sys.stderr)
    return EXIT_FAILURE if missing or unknown else EXIT_OK


async def dlq_export(args: argparse.Namespace) -> int:
    async with store(args) as s:
        letters = await dlq_ops.select(s, _filter(args))
    await write_output(args.out, dlq_ops.export_lines(letters))
    print(f"exported {len(letters)} dead letter(s)", file=sys.stderr)
    return EXIT_OK
