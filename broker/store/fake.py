"""In-process fakeredis, the last-resort embedded default when no redis-server binary exists. NOT durable."""

from __future__ import annotations

import redis.asyncio as aioredis


def fake_client() -> aioredis.Redis:
    import fakeredis

    client: aioredis.Redis = fakeredis.FakeAsyncRedis(decode_responses=True)
    return client
