"""How operator commands reach Redis: directly, with a breaker of their own, so they work while every broker node is
down. The URL is the configured one, else the embedded ``redis-server`` a local ``broker serve`` started."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from broker.core.config import Settings
from broker.core.errors import ConfigError, UnavailableError
from broker.node.embedded import last_record_path
from broker.runtime.resilience import Breaker
from broker.store import RedisStore, connect_redis

OPERATOR_NODE = "cli"  # the node name operator commands use in the store (never a live broker node's)


@dataclass(frozen=True)
class Found:
    url: str
    where: str  # how it was found, for messages: "redis.url", or the file that recorded an embedded Redis
    data_dir: str = ""  # the embedded Redis's folder (its broker runs next to it)


def find_redis(settings: Settings) -> Found:
    """The documented order: ``--redis-url`` / ``BROKER_REDIS_URL`` / ``redis.url``; else the embedded Redis of a
    broker run from this folder (``<redis.data_dir>/url``); else the last one this user started anywhere
    (``last_record_path()``). ``ConfigError`` naming what to pass when there is none."""
    if settings.redis.url:
        return Found(settings.redis.url, "redis.url")
    here = Path(settings.redis.data_dir).resolve() / "url"
    if here.is_file():
        return Found(here.read_text().strip(), str(here), str(here.parent))
    last = last_record_path()
    lines = last.read_text().split("\n") if last.is_file() else []
    if lines and lines[0].strip():
        return Found(lines[0].strip(), str(last), lines[1].strip() if len(lines) > 1 else "")
    raise ConfigError(
        f"no Redis to talk to: no --redis-url, BROKER_REDIS_URL or redis.url, and no embedded broker recorded "
        f"({here} or {last}); pass --redis-url redis://HOST:PORT/0, or --config with the broker's settings"
    )


def _listening(url: str, timeout_s: float = 1.0) -> bool:
    u = urlsplit(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=timeout_s):
            return True
    except OSError:
        return False


def open_store(settings: Settings) -> RedisStore:
    """A store for one operator command; the caller closes it. ``ConfigError`` when there is no Redis to talk to,
    ``UnavailableError`` when the embedded Redis found is not running (its broker stopped)."""
    found = find_redis(settings)
    if found.data_dir and not _listening(found.url):
        raise UnavailableError(
            f"the embedded Redis {found.url} (recorded in {found.where}) is not running: its broker has stopped. "
            f"Start `broker serve` again where it ran (its data: {found.data_dir}), or pass --redis-url"
        )
    breaker = Breaker("redis", fail_max=1_000, reset_timeout_s=1)
    return RedisStore(connect_redis(found.url, settings), settings, breaker, OPERATOR_NODE)


@asynccontextmanager
async def operator_store(settings: Settings) -> AsyncIterator[RedisStore]:
    """``open_store`` for the length of a ``with`` block, closed however it ends."""
    store = open_store(settings)
    try:
        yield store
    finally:
        await store.close()
