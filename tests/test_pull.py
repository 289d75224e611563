"""Pull consume end to end: real broker processes over a real redis-server (fresh one per test module).

Given/When/Then comments; every wait is bounded; nothing asserts how long something took.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import orjson
import pytest
import websockets

from broker.client.client import BrokerClient, Message
from broker.core.errors import ProtocolError, StaleReceiptError, UnavailableError

from .brokers import ROOT, BrokerProcess
from .proxy import TcpProxy
from .support import RedisServer
from .test_integration import take

FAST = {
    "BROKER_DELIVERY_SWEEP_INTERVAL_MS": "100",
    "BROKER_DELIVERY_POLL_INTERVAL_MS": "100",
    "BROKER_RETRY_BACKOFF_BASE_MS": "50",
}


async def pull_until(c: BrokerClient, topic: str, n: int, group: str | None = None, **kw: Any) -> list[Message]:
    """Pull until ``n`` deliveries came (each pull may bring fewer); bounded."""
    got: list[Message] = []
    async with asyncio.timeout(20):
        while len(got) < n:
            got += await c.pull(topic, group, max=n - len(got), wait_ms=5_000, **kw)
    return got


async def raw_reply(ws: websockets.ClientConnection, ref: object) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            f: dict[str, Any] = orjson.loads(await ws.recv())
            if f.get("ref") == ref:
                return f


async def test_pull_returns_up_to_max(client: BrokerClient, redis: RedisServer) -> None:
    # Given 10 messages waiting in group w
    ids = [(await client.publish("jobs", i)).id for i in range(10)]
    # (group `default`: created by the first publish to a topic without a group)
    # When a client pulls 4, then asks for up to 100
    first = await client.pull("jobs", max=4, wait_ms=5_000)
    rest = await client.pull("jobs", max=100, wait_ms=5_000)
    # Then the first answer holds exactly 4, the second the other 6, in queue order, each a first attempt
    assert [m.id for m in first] == ids[:4]
    assert [m.id for m in rest] == ids[4:]
    assert all(m.attempt == 1 and m.group == "default" and m.lease_expires_at > m.published_at for m in first + rest)
    assert redis.cli("ZCARD", "mq:{jobs}:g:default:leased") == "10"
    # And acks, an extend and a nack-to-dead work on pulled deliveries as on pushed ones
    deadline = await first[0].extend(60_000)
    assert deadline >= first[0].published_at + 60_000
    for m in first[1:] + rest:
        await m.ack(wait=True)
    await first[0].ack(wait=True)
    with pytest.raises(StaleReceiptError):
        await first[0].ack(wait=True)
    assert redis.cli("ZCARD", "mq:{jobs}:g:default:leased") == "0"
    assert redis.cli("KEYS", "mq:{jobs}:msg:*") == ""


async def test_pull_waits_and_answers_empty_when_the_wait_runs_out(client: BrokerClient) -> None:
    # Given an empty queue (group `g` is created by the first pull, as a subscribe would)
    # When a client pulls with a short wait, and without any wait
    waited = await client.pull("quiet", "g", max=5, wait_ms=200)
    at_once = await client.pull("quiet", "g", max=5, wait_ms=0)
    # Then both answers are empty, and the connection still works
    assert waited == [] and at_once == []
    await client.ping()


async def test_no_wait_pull_takes_what_is_ready(client: BrokerClient) -> None:
    # Given 3 ready messages
    for i in range(3):
        await client.publish("ready-now", i)
    # When pulled without waiting, Then they come in the answer
    got = await client.pull("ready-now", max=10, wait_ms=0)
    assert sorted(m.payload for m in got) == [0, 1, 2]


async def test_pull_wakes_up_when_a_publish_arrives(redis: RedisServer) -> None:
    # Given a broker whose group loops only re-check their queue once a minute (so only a wake-up can be quick)
    redis.cli("FLUSHALL")
    env = {**FAST, "BROKER_DELIVERY_POLL_INTERVAL_MS": "60000"}
    with BrokerProcess(redis.url, env=env) as broker:
        async with websockets.connect(broker.url) as ws, BrokerClient(broker.url) as pub:
            # and a pull waiting (up to 50 s) on an empty queue; the pong proves the broker has queued the pull
            pull = {"op": "pull", "ref": "p", "topic": "wake", "max": 5, "wait_ms": 50_000}
            await ws.send(orjson.dumps(pull).decode())
            await ws.send('{"op":"ping","ref":"sync"}')
            assert (await raw_reply(ws, "sync"))["op"] == "pong"
            # When a message is published during the wait
            published = await pub.publish("wake", {"hello": 1})
            # Then the pull is answered with it well before its wait (or a poll) could have run out
            reply = await raw_reply(ws, "p")
    assert reply["op"] == "pulled" and (reply["topic"], reply["group"]) == ("wake", "default")
    assert [m["id"] for m in reply["items"]] == [published.id]
    assert reply["items"][0]["payload"] == {"hello": 1} and reply["items"][0]["op"] == "message"


async def test_nacked_pull_is_retried_and_redelivered(client: BrokerClient, redis: RedisServer) -> None:
    # Given a pulled message
    msg_id = (await client.publish("flaky", "x")).id
    (m,) = await client.pull("flaky", max=1, wait_ms=5_000)
    # When it is nacked with an error (the retry policy's backoff: 50 ms here)
    await m.nack("boom", wait=True)
    # Then a later pull gets it again as attempt 2, with a new receipt
    (again,) = await pull_until(client, "flaky", 1)
    assert again.id == msg_id and again.attempt == 2 and again.receipt != m.receipt
    # And its error history kept the failure; nacked dead it goes to the DLQ
    assert "boom" in redis.cli("HGET", f"mq:{{flaky}}:g:default:dlv:{msg_id}", "errors")
    await again.nack("poison", dead=True, wait=True)
    assert redis.cli("HGET", f"mq:{{flaky}}:g:default:dead:{msg_id}", "reason") == "rejected"


async def test_pull_consumer_disconnecting_hands_its_messages_to_another(broker: BrokerProcess) -> None:
    # Given client A holding 5 pulled, unacked messages, and a push consumer B in the same group
    async with BrokerClient(broker.url) as pub, BrokerClient(broker.url) as b:
        a = BrokerClient(broker.url, reconnect=False)
        await a.connect()
        assert await a.pull("handoff", "w", max=1) == []  # the group exists from the first pull on
        for i in range(5):
            await pub.publish("handoff", i)
        held = await pull_until(a, "handoff", 5, "w")
        sub_b = await b.subscribe("handoff", "w", prefetch=10)
        # When A disconnects without acking
        await a.close()
        # Then B receives the same 5, as attempt 2
        again = await take(sub_b, 5)
        assert sorted(m.id for m in again) == sorted(m.id for m in held)
        assert {m.attempt for m in again} == {2}


async def test_several_waiting_pulls_on_one_connection(client: BrokerClient) -> None:
    # Given three pulls of one connection waiting on an empty group
    await client.subscribe("multi", "side")
    waiting = [asyncio.create_task(client.pull("multi", "w", max=2, wait_ms=20_000)) for _ in range(3)]
    await asyncio.sleep(0)  # the three pull frames go out first...
    await client.ping()  # ...so once this is answered, the broker has queued them
    # When 6 messages are published
    for i in range(6):
        await client.publish("multi", i)
    # Then between them the pulls get all 6 once each (a pull answered early leaves the rest to the others)
    async with asyncio.timeout(20):
        got = [m for batch in await asyncio.gather(*waiting) for m in batch]
        while len(got) < 6:
            got += await client.pull("multi", "w", max=6, wait_ms=5_000)
    assert sorted(m.payload for m in got) == list(range(6))


async def test_unacked_ceiling_holds_pulls_back(redis: RedisServer) -> None:
    # Given delivery.max_prefetch = 10 (the ceiling of pulled deliveries held unsettled per connection and group)
    redis.cli("FLUSHALL")
    with BrokerProcess(redis.url, env={**FAST, "BROKER_DELIVERY_MAX_PREFETCH": "10"}) as broker:
        async with BrokerClient(broker.url) as c:
            for i in range(15):
                await c.publish("capped", i)
            held = await pull_until(c, "capped", 10)
            # When the connection holds 10 unacked and pulls again, Then it gets nothing while 5 are ready
            assert await c.pull("capped", max=5, wait_ms=300) == []
            # And once one is acked, the next pull gets one
            await held[0].ack(wait=True)
            assert len(await c.pull("capped", max=5, wait_ms=5_000)) == 1


async def test_bad_pulls_get_error_frames(redis: RedisServer) -> None:
    redis.cli("FLUSHALL")
    with BrokerProcess(redis.url, env={**FAST, "BROKER_SERVER_MAX_PULLS_PER_CONNECTION": "2"}) as broker:
        async with websockets.connect(broker.url) as ws:
            bad = [
                {"op": "pull", "ref": 1, "topic": "t", "max": 0},
                {"op": "pull", "ref": 2, "topic": "t"},
                {"op": "pull", "ref": 3, "topic": "t", "max": 1, "wait_ms": 60_001},
                {"op": "pull", "ref": 4, "topic": "no spaces", "max": 1},
                {"op": "pull", "ref": 5, "topic": "t", "max": 1001},
            ]
            for frame in bad:
                await ws.send(orjson.dumps(frame).decode())
                reply = await raw_reply(ws, frame["ref"])
                assert (reply["op"], reply["code"]) == ("error", "bad_request"), (frame, reply)
            # Given two pulls waiting (the cap), When a third comes, Then it is refused and the two stay waiting
            for ref in ("w1", "w2", "w3"):
                await ws.send(orjson.dumps({"op": "pull", "ref": ref, "topic": "t", "max": 1, "wait_ms": 400}).decode())
            refused = await raw_reply(ws, "w3")
            assert refused["code"] == "bad_request" and "max_pulls_per_connection" in refused["message"]
            assert (await raw_reply(ws, "w1"))["items"] == [] and (await raw_reply(ws, "w2"))["items"] == []


async def test_client_pull_raises_on_bad_input(client: BrokerClient) -> None:
    with pytest.raises(ProtocolError):
        await client.pull("t", max=0)


def consume_cli(url: str, *args: str) -> tuple[int, list[dict[str, Any]]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    p = subprocess.run([sys.executable, "-m", "broker", "consume", *args, "--url", url],
                       cwd=ROOT, env=env, capture_output=True, timeout=60)  # fmt: skip
    return p.returncode, [orjson.loads(line) for line in p.stdout.splitlines()]


async def test_cli_consume_pull(client: BrokerClient, broker: BrokerProcess, redis: RedisServer) -> None:
    # Given 3 messages waiting
    for i in range(3):
        await client.publish("cli-pull", {"n": i})
    # When `broker consume --pull` takes 3, Then it prints them and acks them
    args = ("cli-pull", "--group=default", "--pull")  # the group a publish to a topic without groups stores for
    code, lines = await asyncio.to_thread(consume_cli, broker.url, *args, "--count=3", "--timeout=5")
    assert code == 0 and [line["payload"] for line in lines] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert redis.cli("LLEN", "mq:{cli-pull}:g:default:ready") == "0"
    assert redis.cli("ZCARD", "mq:{cli-pull}:g:default:leased") == "0"
    # And with nothing left, a pull that runs out empty ends it short of --count (exit 1)
    code, lines = await asyncio.to_thread(consume_cli, broker.url, *args, "--count=1", "--timeout=0.3")
    assert code == 1 and lines == []


OUTAGE = {
    **FAST,
    "BROKER_BREAKERS_REDIS_RESET_TIMEOUT_S": "1",
    "BROKER_BREAKERS_REDIS_CALL_TIMEOUT_MS": "500",
    "BROKER_REDIS_SOCKET_TIMEOUT_MS": "500",
    "BROKER_REDIS_CONNECT_TIMEOUT_MS": "300",
}


async def test_waiting_pull_is_told_when_redis_goes_away(redis: RedisServer) -> None:
    redis.cli("FLUSHALL")
    with TcpProxy(redis.port) as proxy, BrokerProcess(proxy.url, env=OUTAGE) as broker:
        async with BrokerClient(broker.url, reconnect=False) as c:
            # Given a pull waiting (up to 50 s) on an empty group
            assert await c.pull("outage", max=1) == []
            waiting = asyncio.create_task(c.pull("outage", max=5, wait_ms=50_000))
            await asyncio.sleep(0)
            await c.ping()
            # When Redis becomes unreachable, Then the pull is answered `unavailable` (not left to run out empty)
            proxy.cut()
            with pytest.raises(UnavailableError):
                async with asyncio.timeout(20):
                    await waiting
            # And a new pull while delivery is paused is refused the same way at once
            with pytest.raises(UnavailableError, match="paused"):
                await c.pull("outage", max=1, wait_ms=10_000)
            # And once Redis is back (and the group loop has seen it: until then pulls are refused), pulls work again
            proxy.restore()
            got: list[Message] = []
            async with asyncio.timeout(30):
                while True:
                    try:
                        await c.publish("outage", "back", retry=False)
                        break
                    except UnavailableError:
                        await asyncio.sleep(0.2)
                while not got:
                    try:
                        got = await c.pull("outage", max=1, wait_ms=5_000)
                    except UnavailableError as e:
                        assert "paused" in e.message
                        await asyncio.sleep(0.2)
            assert got[0].payload == "back"
