"""Read-only checks of the Redis a broker uses (startup warnings; `broker diagnose` builds on these)."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import RedisError

SAFE_EVICTION = {"noeviction"}


async def persistence_warnings(client: aioredis.Redis) -> list[str]:
    """Problems that can lose queued messages: no persistence, an eviction policy that may drop keys."""
    out: list[str] = []
    try:
        cfg = await client.config_get("appendonly")
        cfg.update(await client.config_get("save"))
        cfg.update(await client.config_get("maxmemory-policy"))
    except RedisError as e:  # managed Redis often forbids CONFIG: say we could not check
        return [f"could not read Redis persistence settings ({e}); check them by hand"]
    if cfg.get("appendonly") != "yes" and not cfg.get("save"):
        out.append("Redis has no persistence (appendonly no, no save points): a Redis restart loses every message")
    policy = cfg.get("maxmemory-policy", "noeviction")
    if policy not in SAFE_EVICTION:
        out.append(f"Redis maxmemory-policy is {policy!r}: under memory pressure it may evict queue keys")
    return out
