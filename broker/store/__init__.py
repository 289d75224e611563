"""The only package that talks to Redis."""

from redis.asyncio import Redis

from broker.store.redis_store import AckOutcome, ClaimRequest, NackOutcome, RedisStore, connect_redis

__all__ = ["AckOutcome", "ClaimRequest", "NackOutcome", "Redis", "RedisStore", "connect_redis"]
