"""The only package that talks to Redis (map: ``redis_store.py``)."""

from broker.store.connection import Redis, connect_redis, fake_client
from broker.store.messages import AckOutcome, ClaimRequest, NackOutcome, NackReply, error_entry
from broker.store.redis_store import Clock, RedisStore
from broker.store.sweep import Swept

__all__ = [
    "AckOutcome",
    "ClaimRequest",
    "Clock",
    "NackOutcome",
    "NackReply",
    "Redis",
    "RedisStore",
    "Swept",
    "connect_redis",
    "error_entry",
    "fake_client",
]
