"""`broker export` reads a group in one step (``_snapshot.lua``), its ordering-key lines included: a line the SCAN
did not see (born after it) is still read, found from its live first message, and the script touches only declared
or run-time keys of its slot. On fakeredis and a real redis-server. The live proof, under keyed traffic, is
``mission_critical/test_export_live_keyed_traffic.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.core.model import NackItem, PublishRequest, PublishResult
from broker.ops import transfer
from broker.store import RedisStore

from .conftest import StoreFactory
from .test_lua_schema import audit  # noqa: F401 (the fixture: every script registered runs under the key audit)

T = "orders"


@pytest.fixture
def blind_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """SCAN finds nothing: as if every ordering-key line was born after it ran."""

    async def nothing(self: aioredis.Redis, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        for _ in ():
            yield _

    monkeypatch.setattr(aioredis.Redis, "scan_iter", nothing)


async def _publish(store: RedisStore, payload: str, **kw: Any) -> str:
    (res,) = await store.publish_many([PublishRequest(T, payload, **kw)])
    assert isinstance(res, PublishResult), res
    return res.id


async def test_snapshot_reads_every_key_line_without_the_scan(
    store_factory: StoreFactory, audit: None, blind_scan: None  # noqa: F811
) -> None:
    # Given a group with three ordering-key lines, led by a ready, a leased and a delayed (retry) message, each
    # with messages waiting behind; plus an unkeyed message and a dead letter
    store = await store_factory()
    await store.ensure_group(T, "g")
    a1, a2, a3 = [await _publish(store, f"a{i}", key="a") for i in range(3)]
    b1, b2 = [await _publish(store, f"b{i}", key="b") for i in range(2)]
    plain = await _publish(store, "plain")
    c1, c2 = [await _publish(store, f"c{i}", key="c") for i in range(2)]
    dead = await _publish(store, "dead")
    got = {d.id: d for d in await store.claim(T, "g", 10, 60_000, "c")}
    assert set(got) == {a1, b1, plain, c1, dead}
    await store.nack_many(T, "g", [(NackItem(c1, got[c1].receipt, "later", 3_600_000), 1, "c")])
    await store.nack_many(T, "g", [(NackItem(dead, got[dead].receipt, "bad", dead=True), 1, "c")])
    await store.nack_many(T, "g", [(NackItem(a1, got[a1].receipt, "again", 0), 1, "c")])  # back to ready

    # When it is exported, with a SCAN that finds no line
    f, missing = await transfer.export(store, [T])

    # Then every waiting message is in the file, in its key's order behind its live head
    states = {m.id: m.groups["g"].state for m in f.messages}
    assert not missing
    assert {a2, a3, b2, c2} <= set(states), states
    assert {states[i] for i in (a2, a3, b2, c2)} == {"waiting"}
    assert (states[a1], states[b1], states[c1], states[plain]) == ("ready", "leased", "delayed", "leased")
    pos = {m.id: m.groups["g"].position for m in f.messages}
    assert pos[a2] < pos[a3]
    assert [d.id for d in f.dead] == [dead]
