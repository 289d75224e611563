"""Retention of finished work: acked messages leave nothing in Redis unless the optional, bounded "recently acked"
audit record is on. Runs on fakeredis and a real redis-server."""

from __future__ import annotations

from broker.core.config import Settings
from broker.core.model import AckItem, PublishRequest
from broker.store import RedisStore
from broker.store.status import message_status

from .conftest import StoreFactory

T = "audit"


async def publish_claim_ack(store_factory: StoreFactory, settings: Settings, n: int) -> tuple[RedisStore, list[str]]:
    store = await store_factory(settings)
    await store.ensure_group(T, "g")
    await store.publish_many([PublishRequest(T, str(i)) for i in range(n)])
    got = await store.claim(T, "g", n, 30_000, "c1")
    assert await store.ack_many(T, "g", [AckItem(d.id, d.receipt) for d in got]) == [True] * n
    return store, [d.id for d in got]


async def test_acked_messages_leave_nothing_by_default(store_factory: StoreFactory) -> None:
    store, ids = await publish_claim_ack(store_factory, Settings(), 5)
    p = store.prefix
    keys = {k async for k in store.redis.scan_iter(match=f"{p}:*")}
    assert keys == {f"{p}:topics", f"{p}:{{{T}}}:groups"}
    # And the status lookup has nothing to say about an acked message
    assert await message_status(store, ids[0], T) == []


async def test_audit_record_is_bounded_in_count_and_time(store_factory: StoreFactory) -> None:
    settings = Settings().replace("retention", acked_audit_max=3, acked_audit_ttl_s=120)
    store, ids = await publish_claim_ack(store_factory, settings, 5)
    g = store.keys(T).group("g")
    r = store.redis
    # Then only the newest 3 acks are recorded, with a TTL, and nothing else of the messages remains
    assert await r.zcard(g.acked) == 3
    assert 0 < await r.ttl(g.acked) <= 120
    assert not [k async for k in r.scan_iter(match=f"{store.prefix}:{{{T}}}:msg:*")]
    # And the status lookup says when the group acked a recorded message
    (row,) = await message_status(store, ids[-1], T)
    assert row["state"] == "done" and isinstance(row["acked_at"], int)
    # And entries older than the TTL are dropped on the next ack
    await r.zadd(g.acked, {"old-entry": 1})
    await store.publish_many([PublishRequest(T, "x")])
    (d,) = await store.claim(T, "g", 1, 30_000, "c1")
    await store.ack_many(T, "g", [AckItem(d.id, d.receipt)])
    members = await r.zrange(g.acked, 0, -1)
    assert "old-entry" not in members and len(members) == 3
