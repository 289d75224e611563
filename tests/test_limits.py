"""Limits on a real broker process: each one hit once, with its exact error and the connection state that follows."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import orjson
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from broker.core.limits import TokenBucket

from .brokers import BrokerProcess
from .support import RedisServer

ENV = {
    "BROKER_SERVER_PUBLISH_RATE_PER_S": "500",
    "BROKER_SERVER_PUBLISH_BURST": "1000",
    "BROKER_SERVER_MAX_SUBSCRIPTIONS_PER_CONNECTION": "3",
    "BROKER_SERVER_MAX_BAD_FRAMES": "5",
    "BROKER_SERVER_MAX_CONNECTIONS": "4",
    "BROKER_SERVER_IDLE_TIMEOUT_S": "1.5",
    "BROKER_SERVER_HANDSHAKE_TIMEOUT_S": "1",
}


@pytest.fixture(scope="module")
def broker() -> Iterator[tuple[BrokerProcess, RedisServer]]:
    with RedisServer() as redis, BrokerProcess(redis.url, env=ENV) as b:
        yield b, redis


async def ask(ws: websockets.ClientConnection, frame: dict[str, object]) -> dict[str, object]:
    await ws.send(orjson.dumps(frame).decode())
    reply: dict[str, object] = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
    return reply


def test_token_bucket_is_exact() -> None:
    b = TokenBucket(rate=10, burst=5, now=0.0)
    assert [b.take(1, 0.0) for _ in range(5)] == [0] * 5
    assert b.take(1, 0.0) == 101  # next token in 100 ms (+1 ms rounding up)
    assert b.take(1, 0.1) == 0 and b.take(3, 0.1) > 0  # refused takes nothing
    assert TokenBucket(rate=0, burst=1, now=0).take(10**9, 0) == 0  # 0 = unlimited


async def test_publish_rate_limit(broker: tuple[BrokerProcess, RedisServer]) -> None:
    b, redis = broker
    async with websockets.connect(b.url) as ws:
        # Given a burst of 1,000 and 500/s: a batch of 990, then 200 single publishes at once
        batch = [{"topic": "rl", "payload": i} for i in range(990)]
        await ws.send(orjson.dumps({"op": "publish", "ref": "b", "messages": batch}).decode())
        for i in range(200):
            await ws.send(orjson.dumps({"op": "publish", "ref": i, "topic": "rl", "payload": i}).decode())
        replies = [orjson.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(201)]
        # Then the batch and the first ~10 singles (plus what refills while sending) are stored; the rest get
        # rate_limited with a retry hint
        assert next(r for r in replies if r.get("ref") == "b")["op"] == "published"
        singles = [r for r in replies if r.get("ref") != "b"]
        limited = [r for r in singles if r["op"] == "error"]
        assert {r["code"] for r in limited} == {"rate_limited"} and all(r["retry_after_ms"] > 0 for r in limited)
        stored = [r for r in singles if r["op"] == "published"] + [{}] * 990
        assert len(stored) >= 1000 and len(limited) >= 100 and len(stored) + len(limited) == 1190
        assert int(redis.cli("LLEN", "mq:{rl}:g:default:ready")) == len(stored)
        # And the connection stays usable: after waiting, publishing works again
        await asyncio.sleep(max(r["retry_after_ms"] for r in limited) / 1000)
        assert (await ask(ws, {"op": "publish", "ref": "x", "topic": "rl", "payload": 1}))["op"] == "published"


async def test_subscriptions_per_connection(broker: tuple[BrokerProcess, RedisServer]) -> None:
    b, _ = broker
    async with websockets.connect(b.url) as ws:
        assert (await ask(ws, {"op": "subscribe", "ref": 1, "topics": ["a", "b", "c"]}))["op"] == "subscribed"
        r = await ask(ws, {"op": "subscribe", "ref": 2, "topic": "d"})
        assert r["code"] == "bad_request" and "max_subscriptions_per_connection" in str(r["message"])
        assert (await ask(ws, {"op": "ping", "ref": 3}))["op"] == "pong"


async def test_bad_frames_cap_closes_with_1008(broker: tuple[BrokerProcess, RedisServer]) -> None:
    b, _ = broker
    async with websockets.connect(b.url) as ws:
        for _ in range(5):
            assert (await ask(ws, {"op": "nope"}))["code"] == "bad_request"  # mistakes are answered
        await ws.send("{bad")  # the 6th is abuse
        assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["code"] == "bad_request"
        with pytest.raises(ConnectionClosed) as e:
            await asyncio.wait_for(ws.recv(), 5)
        assert e.value.rcvd is not None and e.value.rcvd.code == 1008


async def test_connection_cap_and_idle_timeout(broker: tuple[BrokerProcess, RedisServer]) -> None:
    b, _ = broker
    conns = [await websockets.connect(b.url) for _ in range(4)]
    try:
        # Given 4 open connections (the cap), When a 5th comes, Then the handshake is refused with 503
        with pytest.raises(InvalidStatus) as e:
            async with websockets.connect(b.url):
                pass
        assert e.value.response.status_code == 503
        # And idle connections are closed after server.idle_timeout_s (1.5 s) with 1000
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(conns[0].recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    finally:
        for c in conns:
            await c.close()
    assert '"reason":"node at server.max_connections (4)"' in b.log_text()


async def test_handshake_timeout(broker: tuple[BrokerProcess, RedisServer]) -> None:
    b, _ = broker
    # Given a TCP connection that never sends its opening handshake
    reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
    try:
        # Then the broker closes it after server.handshake_timeout_s (1 s), holding nothing for it
        t0 = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert 0.5 <= asyncio.get_running_loop().time() - t0 <= 8
    finally:
        writer.close()
