"""publish.lua's and promote.lua's wake-up notes go out only when a node other than the publishing (sweeping) one
listens (one Redis).

Each node's wake-up listener subscribes to ``<prefix>:listeners`` and ``<prefix>:listener:<node id>`` before its
pattern; the script compares their ``PUBSUB NUMSUB`` counts. Whether a note went out is read in order on a plain
pattern subscriber of the test's own (not a node: not counted): the test publishes a marker note of its own after
the broker's publish, and Redis delivers a subscriber's notes in the order it sent them."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.core.config import Settings
from broker.core.model import PublishRequest
from broker.store import RedisStore, connect_redis
from broker.store.keys import TopicKeys, listeners_channel
from tests.support import RedisServer, make_store

BOUND_S = 10.0  # a bound on waits for state (never a timing assertion)


@pytest.fixture
async def nodes(redis_server: RedisServer) -> AsyncIterator[Callable[[str], RedisStore]]:
    """``nodes(node_id)`` -> a store of that node on the session's redis-server, all under one fresh prefix."""
    settings = Settings().replace("redis", key_prefix=f"t{uuid.uuid4().hex[:12]}")
    made: list[RedisStore] = []

    def node(node_id: str) -> RedisStore:
        store = make_store(connect_redis(redis_server.url, settings), settings, node_id=node_id)
        made.append(store)
        return store

    yield node
    for s in made:
        await s.close()


class Listener:
    """A node's wake-up listener running as a task; ``topics`` gets each note's topic."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.topics: asyncio.Queue[str] = asyncio.Queue()
        self.running = True
        self.task = asyncio.create_task(store.listen_wakes(self.topics.put_nowait, lambda: None, lambda: self.running))

    async def stop(self) -> None:
        self.running = False
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    async with asyncio.timeout(BOUND_S):
        while not await check():
            await asyncio.sleep(0.01)


async def listening(r: aioredis.Redis, prefix: str, count: int) -> None:
    """Wait until ``count`` node listeners are subscribed (their pattern too: it goes on the same connection)."""

    async def check() -> bool:
        got = dict(await r.pubsub_numsub(listeners_channel(prefix)))
        return got.get(listeners_channel(prefix), 0) == count and (count == 0 or await r.pubsub_numpat() > 0)

    await until(check)


async def notes_of_one_publish(publisher: RedisStore, topic: str) -> list[str]:
    """The notes a publish through ``publisher`` sent on the topic's channel, read by a plain subscriber."""

    async def publish() -> None:
        [res] = await publisher.publish_many([PublishRequest(topic=topic, payload='"x"')])
        assert not isinstance(res, Exception) and res.groups == 1

    return await notes_of(publisher, topic, publish)


async def notes_of_one_promotion(node: RedisStore, topic: str) -> list[str]:
    """The notes a sweep step of ``node`` sent on the topic's channel when it promoted a delayed message."""
    [res] = await node.publish_many([PublishRequest(topic=topic, payload='"later"', delay_ms=1)])
    assert not isinstance(res, Exception) and res.groups == 1
    due = node.clock() + 1
    await until(lambda: _now_past(node, due))  # (a bound on a wait for the due time, no assertion on it)

    async def sweep() -> None:
        [(_, _, promoted)] = await node.sweep([(topic, "default")])
        assert promoted == 1

    return await notes_of(node, topic, sweep)


async def _now_past(node: RedisStore, due: int) -> bool:
    await asyncio.sleep(0.002)
    return node.clock() > due


async def notes_of(node: RedisStore, topic: str, action: Callable[[], Awaitable[None]]) -> list[str]:
    """The notes ``action`` sent on the topic's channel, read by a plain subscriber."""
    r = node.redis
    channel = TopicKeys(node.prefix, topic).wake
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    await pubsub.psubscribe(f"{node.prefix}:{{*}}:wake")
    try:
        await until(lambda: _numpat_at_least(r, 1))
        await action()
        marker = f"marker-{uuid.uuid4().hex}"
        await r.publish(channel, marker)
        notes: list[str] = []
        async with asyncio.timeout(BOUND_S):
            while True:
                m: Any = await pubsub.get_message(timeout=1.0)
                if m is None:
                    continue
                if m["data"] == marker:
                    return notes
                notes.append(m["data"])
    finally:
        await pubsub.aclose()


async def _numpat_at_least(r: aioredis.Redis, n: int) -> bool:
    return int(await r.pubsub_numpat()) >= n


async def test_a_node_alone_sends_no_note_for_its_publishes(nodes: Callable[[str], RedisStore]) -> None:
    # Given one node whose wake-up listener is subscribed, and no other node
    a = nodes("node-a")
    la = Listener(a)
    try:
        await listening(a.redis, a.prefix, 1)
        # When it publishes, Then no wake-up note goes out (its own listener would only drop it)
        assert await notes_of_one_publish(a, "alone") == []
    finally:
        await la.stop()


async def test_another_listening_node_gets_the_note(nodes: Callable[[str], RedisStore]) -> None:
    # Given two nodes, both listening
    a, b = nodes("node-a"), nodes("node-b")
    la, lb = Listener(a), Listener(b)
    try:
        await listening(a.redis, a.prefix, 2)
        # When node a publishes, Then the note goes out, and node b's listener wakes the topic
        assert await notes_of_one_publish(a, "shared") == ["node-a"]
        async with asyncio.timeout(BOUND_S):
            assert await lb.topics.get() == "shared"
    finally:
        await la.stop()
        await lb.stop()


async def test_the_note_goes_out_when_the_publishing_nodes_own_listener_is_down(
    nodes: Callable[[str], RedisStore],
) -> None:
    # Given node b listening, and node a (the publisher) whose listener is not subscribed (down, or not started)
    a, b = nodes("node-a"), nodes("node-b")
    lb = Listener(b)
    try:
        await listening(b.redis, b.prefix, 1)
        # When node a publishes, Then the note goes out: the one listener counted is another node's
        assert await notes_of_one_publish(a, "half") == ["node-a"]
        async with asyncio.timeout(BOUND_S):
            assert await lb.topics.get() == "half"
    finally:
        await lb.stop()


async def test_a_node_that_stopped_listening_is_no_longer_counted(nodes: Callable[[str], RedisStore]) -> None:
    # Given two listening nodes, then node b's listener stops (its connection closes)
    a, b = nodes("node-a"), nodes("node-b")
    la, lb = Listener(a), Listener(b)
    try:
        await listening(a.redis, a.prefix, 2)
        await lb.stop()
        await listening(a.redis, a.prefix, 1)
        # When node a publishes, Then no note goes out
        assert await notes_of_one_publish(a, "left") == []
    finally:
        await la.stop()


async def test_a_node_alone_sends_no_note_for_its_promotions(nodes: Callable[[str], RedisStore]) -> None:
    # Given one node whose wake-up listener is subscribed, and no other node
    a = nodes("node-a")
    la = Listener(a)
    try:
        await listening(a.redis, a.prefix, 1)
        # When its sweep step promotes a due message, Then no wake-up note goes out (the node wakes its own loop from
        # the step's reply)
        assert await notes_of_one_promotion(a, "alone-later") == []
    finally:
        await la.stop()


async def test_another_listening_node_gets_the_note_of_a_promotion(nodes: Callable[[str], RedisStore]) -> None:
    # Given two nodes, both listening
    a, b = nodes("node-a"), nodes("node-b")
    la, lb = Listener(a), Listener(b)
    try:
        await listening(a.redis, a.prefix, 2)
        # When node a's sweep step promotes a due message, Then the note goes out and node b's listener wakes the topic
        assert await notes_of_one_promotion(a, "shared-later") == ["r"]
        async with asyncio.timeout(BOUND_S):
            while (topic := await lb.topics.get()) != "shared-later":
                pass
        assert topic == "shared-later"
    finally:
        await la.stop()
        await lb.stop()
