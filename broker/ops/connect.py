"""How operator commands reach Redis: directly, with a breaker of their own, so they work while every broker node is
down. The URL is the configured one, else the embedded ``redis-server`` a local ``broker serve`` started."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from broker.core.config import Settings
from broker.core.errors import ConfigError
from broker.runtime.resilience import Breaker
from broker.store import RedisStore, connect_redis

OPERATOR_NODE = "cli"  # the node name operator commands use in the store (never a live broker node's)


def embedded_url(settings: Settings) -> str | None:
    """The URL of the embedded ``redis-server`` that a broker started with these settings wrote down, if any."""
    f = Path(settings.redis.data_dir) / "url"
    return f.read_text().strip() if f.is_file() else None


def open_store(settings: Settings) -> RedisStore:
    """A store for one operator command; the caller closes it. ``ConfigError`` when there is no Redis to talk to."""
    url = settings.redis.url or embedded_url(settings)
    if not url:
        raise ConfigError("no Redis URL: set BROKER_REDIS_URL or --redis-url, or start the embedded broker first")
    breaker = Breaker("redis", fail_max=1_000, reset_timeout_s=1)
    return RedisStore(connect_redis(url, settings), settings, breaker, OPERATOR_NODE)


@asynccontextmanager
async def operator_store(settings: Settings) -> AsyncIterator[RedisStore]:
    """``open_store`` for the length of a ``with`` block, closed however it ends."""
    store = open_store(settings)
    try:
        yield store
    finally:
        await store.close()
