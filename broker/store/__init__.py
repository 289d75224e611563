"""The only package that talks to Redis."""

from .redis_store import NackOutcome, RedisStore, connect_redis

__all__ = ["NackOutcome", "RedisStore", "connect_redis"]
