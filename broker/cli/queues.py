"""``broker peek``, ``broker consumers``, ``broker group purge | delete`` and ``broker topic delete``: looking into a
group's queue without consuming, who holds what, and the removals (asked for confirmation, or ``--yes``; each says
what it removed). Library code: ``broker.ops.queues``."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import orjson

from broker.cli.common import UsageError, human_duration, human_time, print_table, progress, store
from broker.cli.exits import EXIT_FAILURE, EXIT_OK
from broker.ops.queues import Queues, Removed, consumers_of, depth_of, payload_text
from broker.store import RedisStore


async def _known_group(s: RedisStore, topic: str, group: str) -> None:
    groups = await s.groups(topic)
    if group not in groups:
        known = ", ".join(sorted(groups)) or "none"
        raise UsageError(f"topic {topic!r} has no group {group!r} (its groups: {known}; `broker stats` lists them)")


async def confirm(yes: bool, question: str) -> bool:
    """``--yes``, or 'yes' typed on a terminal; without a terminal and without ``--yes``: a usage error."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise UsageError(f"{question.rstrip('?')}: needs --yes when not interactive")
    answer = await asyncio.to_thread(input, f"{question} type 'yes': ")
    if answer.strip() != "yes":
        print("not confirmed: nothing changed", file=sys.stderr)
        return False
    return True


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


async def peek(args: argparse.Namespace) -> int:
    """The next ready messages of a group, as a consumer would get them, without taking them: no lease, no attempt
    counted, nothing removed."""
    if args.count < 1:
        raise UsageError("--count must be at least 1")
    async with store(args) as s:
        await _known_group(s, args.topic, args.group)
        items = await Queues(s).peek(args.topic, args.group, args.count, args.start)
        depth = await depth_of(s, args.topic, args.group)
    if args.json:
        doc = [{**p.to_json(), "payload": orjson.Fragment(p.payload), "headers": orjson.Fragment(p.headers)}
               for p in items]  # fmt: skip
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    elif items:
        now = time.time() * 1000
        rows = [{"#": p.position, "id": p.id, "published": human_time(p.published_at, now), "attempts": p.attempts,
                 "key": p.key or "-", "payload": _clip(payload_text(p))} for p in items]  # fmt: skip
        print_table(rows, ["#", "id", "published", "attempts", "key", "payload"])
    pair = f"{args.topic}/{args.group}"
    print(f"{len(items)} of {depth['ready']} ready message(s) of {pair} shown ({depth['delayed']} delayed, "
          f"{depth['leased']} leased); nothing was consumed", file=sys.stderr)  # fmt: skip
    return EXIT_OK


async def consumers(args: argparse.Namespace) -> int:
    """Per group of a topic: consumers connected (from the nodes' heartbeats) and, per consumer holding deliveries,
    how many it holds (acks pending), how many of those are redeliveries, and when its next lease runs out."""
    async with store(args) as s:
        groups = [args.group] if args.group else sorted(await s.groups(args.topic))
        if args.group:
            await _known_group(s, args.topic, args.group)
        connected = await consumers_of(s, args.topic)
        q = Queues(s)
        held = {g: await q.holders(args.topic, g) for g in groups}
    if args.json:
        doc = [{"topic": args.topic, "group": g, "connected": connected.get(f"{args.topic}/{g}", 0),
                "holders": [h.to_json() for h in held[g]]} for g in groups]  # fmt: skip
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        return EXIT_OK
    if not groups:
        print(f"(topic {args.topic!r} has no groups)")
        return EXIT_OK
    now = time.time() * 1000
    for n, g in enumerate(groups):
        if n:
            print()
        holders = held[g]
        print(f"{args.topic}/{g}: {connected.get(f'{args.topic}/{g}', 0)} consumer(s) connected, "
              f"{sum(h.held for h in holders)} deliveries held by {len(holders)}")  # fmt: skip
        if holders:
            rows = [{"consumer": h.consumer, "node": h.node, "held": h.held, "redelivered": h.redelivered,
                     "next_lease_ends": _until(h.next_deadline, now)} for h in holders]  # fmt: skip
            print_table(rows, ["consumer", "node", "held", "redelivered", "next_lease_ends"], indent="  ")
    return EXIT_OK


def _until(deadline_ms: int, now_ms: float) -> str:
    left = (deadline_ms - now_ms) / 1000
    return f"in {human_duration(left)}" if left >= 0 else f"{human_duration(-left)} ago (to be swept)"


def _removed_text(r: Removed) -> str:
    c = r.counts
    parts = [f"{c['ready']} ready", f"{c['delayed']} delayed", f"{c['waiting']} waiting behind an ordering key"]
    if c["leased"] or c["dead"]:
        parts += [f"{c['leased']} leased", f"{c['dead']} dead letter(s)"]
    return ", ".join(parts) + (f"; {r.keys} other key(s)" if r.keys else "")


def _report(args: argparse.Namespace, what: str, removed: Removed, extra: dict[str, Any]) -> None:
    if args.json:
        print(orjson.dumps({**extra, **removed.to_json()}).decode())
    else:
        print(f"{what}: removed {_removed_text(removed)}")


async def group_purge(args: argparse.Namespace) -> int:
    """Empty a group's queue: its ready and delayed messages (and those waiting behind their ordering key) are
    removed; leased ones stay with their consumers; the group stays and keeps getting new messages."""
    pair = f"{args.topic}/{args.group}"
    async with store(args) as s:
        await _known_group(s, args.topic, args.group)
        d = await depth_of(s, args.topic, args.group)
        question = f"remove {d['ready']} ready and {d['delayed']} delayed message(s) of {pair} for good?"
        if not await confirm(args.yes, question):
            return EXIT_FAILURE
        shown = progress("purge") if d["ready"] + d["delayed"] > 10_000 else None
        total = d["ready"] + d["delayed"]
        removed = await Queues(s).purge(
            args.topic, args.group, progress=(lambda n: shown(min(n, total), total)) if shown else None
        )
    _report(args, f"purged {pair}", removed, {"topic": args.topic, "group": args.group, "purged": True})
    return EXIT_OK


async def group_delete(args: argparse.Namespace) -> int:
    """Delete a group: later publishes no longer store for it, and everything it held goes (ready, delayed, leased,
    dead letters). Refused while consumers of it are connected, unless --force."""
    pair = f"{args.topic}/{args.group}"
    async with store(args) as s:
        await _known_group(s, args.topic, args.group)
        using = await consumers_of(s, args.topic, args.group)
        d = await depth_of(s, args.topic, args.group)
        if (using or d["leased"]) and not args.force:
            raise UsageError(f"{sum(using.values())} consumer(s) of {pair} are connected and {d['leased']} "
                             "deliveries leased: stop them first, or pass --force (their acks will then be refused "
                             "as stale)")  # fmt: skip
        question = (f"delete group {pair} and its {d['ready']} ready, {d['delayed']} delayed, {d['leased']} leased "
                    f"message(s) and {d['dead']} dead letter(s)?")  # fmt: skip
        if not await confirm(args.yes, question):
            return EXIT_FAILURE
        removed = await Queues(s).purge(args.topic, args.group, whole_group=True)
    _report(args, f"deleted group {pair}", removed, {"topic": args.topic, "group": args.group, "deleted": True})
    return EXIT_OK


async def topic_delete(args: argparse.Namespace) -> int:
    """Delete every group of a topic and every key under its hash tag. Refused while anyone consumes it."""
    async with store(args) as s:
        groups = sorted(await s.groups(args.topic))
        if not groups and args.topic not in await s.topics():
            raise UsageError(f"no topic {args.topic!r} (`broker stats` lists the topics)")
        using = await consumers_of(s, args.topic)
        if using and not args.force:
            raise UsageError(f"consumers are connected ({', '.join(f'{p}: {n}' for p, n in using.items())}): stop "
                             "them first, or pass --force")  # fmt: skip
        question = f"delete topic {args.topic!r} with its {len(groups)} group(s) ({', '.join(groups) or 'none'})?"
        if not await confirm(args.yes, question):
            return EXIT_FAILURE
        removed = await Queues(s).delete_topic(args.topic)
    _report(args, f"deleted topic {args.topic} ({len(groups)} group(s))", removed,
            {"topic": args.topic, "groups": groups, "deleted": True})  # fmt: skip
    return EXIT_OK
