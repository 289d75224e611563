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


def print_table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols).rstrip())
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols).rstrip())


def progress(label: str) -> Callable[[int, int], None]:
    tty = sys.stderr.isatty()
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < (0.1 if tty else 2.0):
            return
        last[0] = now
        width = 30
        filled = int(width * done / max(1, total))
        bar = "#" * filled + "." * (width - filled)
        end = "\r" if tty and done < total else "\n"
        print(f"{label} [{bar}] {done}/{total}", end=end, file=sys.stderr, flush=True)

    return show


def more(items: list[str], shown: int = 10) -> str:
    """The first ``shown`` items, comma-separated, and how many more there are."""
    rest = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + rest
