"""What every sub-command shares: settings from the flags, the operator's store, reading and writing files, tables
and progress on the terminal."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from broker.core.config import Settings, load_settings
from broker.ops.connect import operator_store
from broker.store import RedisStore

DEFAULT_CONFIG = Path("config/broker.toml")


class UsageError(Exception):
    """A mistake in the command line or its input files: printed as ``usage error: ...``, exit 2."""


def settings(args: argparse.Namespace) -> Settings:
    cli: dict[str, dict[str, Any]] = {}
    if getattr(args, "host", None):
        cli.setdefault("server", {})["host"] = args.host
    if getattr(args, "port", None) is not None:
        cli.setdefault("server", {})["port"] = args.port
    if getattr(args, "redis_url", None):
        cli.setdefault("redis", {})["url"] = args.redis_url
    config = args.config or os.environ.get("BROKER_CONFIG") or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    return load_settings(config, cli=cli)


def store(args: argparse.Namespace) -> AbstractAsyncContextManager[RedisStore]:
    """Operator commands talk to Redis directly (they work while every broker node is down)."""
    return operator_store(settings(args))


def read_input(path: str) -> bytes:
    """A whole input file ('-': stdin): files are checked whole before anything acts on them."""
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e}") from None


async def write_output(out: str | None, data: bytes) -> None:
    """To the file ``out``, or stdout when it is None or '-'."""
    if out and out != "-":
        await asyncio.to_thread(Path(out).write_bytes, data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


def print_table(rows: list[dict[str, Any]], cols: list[str], indent: str = "") -> None:
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in cols}
    print(indent + "  ".join(c.ljust(widths[c]) for c in cols).rstrip())
    for r in rows:
        print(indent + "  ".join(str(r[c]).ljust(widths[c]) for c in cols).rstrip())


def human_duration(seconds: float) -> str:
    """``45s``, ``12m``, ``3h05m``, ``2d04h``: the two largest units, for ages, TTLs and ETAs."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s < 600 else f"{s // 60}m"
    if s < 86_400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86_400}d{s % 86_400 // 3600:02d}h"


def human_time(epoch_ms: int, now_ms: float | None = None) -> str:
    """An epoch-ms time as UTC, and how far from now: ``2026-12-07 11:03:12Z (4m ago)`` / ``(in 30s)``."""
    now = time.time() * 1000 if now_ms is None else now_ms
    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(epoch_ms / 1000))
    delta = (now - epoch_ms) / 1000
    return f"{stamp} ({human_duration(delta)} ago)" if delta >= 0 else f"{stamp} (in {human_duration(-delta)})"


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def progress(label: str) -> Callable[[int, int], None]:
    """A progress line on stderr: bar, count, percent, rate and ETA. On a terminal it redraws in place (10 a
    second at most); otherwise one line every 2 s. The final line is printed once, however often it is reported."""
    tty = sys.stderr.isatty()
    start = time.monotonic()
    last = [0.0]
    finished = [False]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if finished[0] or (done < total and now - last[0] < (0.1 if tty else 2.0)):
            return
        last[0] = now
        finished[0] = done >= total
        width = 30
        filled = int(width * done / max(1, total))
        bar = "#" * filled + "." * (width - filled)
        elapsed = now - start
        rate = done / elapsed if elapsed > 0 else 0.0
        if done >= total:
            tail = f"in {human_duration(elapsed)}"
        else:
            tail = f"ETA {human_duration((total - done) / rate)}" if rate > 0 else "ETA ?"
        end = "\r" if tty and done < total else "\n"
        line = f"{label} [{bar}] {done:,}/{total:,} {100 * done / max(1, total):.0f}% {rate:,.0f}/s {tail}"
        print(line.ljust(79) if tty else line, end=end, file=sys.stderr, flush=True)

    return show


def more(items: list[str], shown: int = 10) -> str:
    """The first ``shown`` items, comma-separated, and how many more there are."""
    rest = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + rest
