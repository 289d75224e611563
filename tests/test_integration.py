"""The core broker end to end: real broker processes over a real redis-server (fresh one per test module).

Given/When/Then comments; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import collections

import orjson
import pytest
import websockets

from broker.client.client import BrokerClient, Message, Subscription
from broker.core.errors import BrokerError, StaleReceiptError

from .brokers import BrokerProcess
from .support import RedisServer

FAST = {"BROKER_DELIVERY_SWEEP_INTERVAL_MS": "100", "BROKER_DELIVERY_POLL_INTERVAL_MS": "100"}


async def take(sub: Subscription, n: int, timeout: float = 10.0) -> list[Message]:
    out = []
    async with asyncio.timeout(timeout):
        for _ in range(n):
            out.append(await sub.get())
    return out


async def nothing_more(sub: Subscription, wait_s: float = 0.3) -> bool:
    try:
        await sub.get(timeout=wait_s)
    except TimeoutError:
        return True
    return False


async def test_publish_consume_ack(client: BrokerClient, redis: RedisServer) -> None:
    # Given a subscriber
    sub = await client.subscribe("orders", prefetch=20)
    # When 50 messages are published and each is acked
    ids = [(await client.publish("orders", {"n": i})).id for i in range(50)]
    got = []
    async with asyncio.timeout(10):
        while len(got) < 50:
            m = await sub.get()
            got.append(m)
            await m.ack(wait=True)
    # Then they arrive once each, in publish order, to group default, and Redis keeps nothing for them
    assert [m.id for m in got] == ids
    assert [m.payload["n"] for m in got] == list(range(50))
    assert all(m.group == "default" and m.attempt == 1 for m in got)
    assert redis.cli("KEYS", "mq:{orders}:msg:*") == ""
    assert redis.cli("LLEN", "mq:{orders}:g:default:ready") == "0"
    assert redis.cli("ZCARD", "mq:{orders}:g:default:leased") == "0"


async def test_two_groups_each_get_everything(client: BrokerClient) -> None:
    # Given two groups on one topic
    a = await client.subscribe("events", "a", prefetch=100)
    b = await client.subscribe("events", "b", prefetch=100)
    # When 200 messages are published
    for i in range(200):
        await client.publish("events", i)
    # Then each group gets all 200
    for sub in (a, b):
        msgs = await take(sub, 100)  # prefetch 100: the rest comes as these are acked
        for m in msgs:
            await m.ack()
        msgs += await take(sub, 100)
        for m in msgs[100:]:
            await m.ack()
        assert sorted(m.payload for m in msgs) == list(range(200))
    assert await nothing_more(a) and await nothing_more(b)


async def test_competing_consumers_split_3000(broker: BrokerProcess) -> None:
    # Given three consumers in one group on separate connections
    clients = [BrokerClient(broker.url) for _ in range(3)]
    for c in clients:
        await c.connect()
    subs = [await c.subscribe("jobs", "workers", prefetch=50) for c in clients]
    seen: collections.Counter[int] = collections.Counter()
    per_consumer = [0, 0, 0]

    async def work(i: int, sub: Subscription) -> None:
        while True:
            m = await sub.get()
            seen[m.payload] += 1
            per_consumer[i] += 1
            await m.ack()

    workers = [asyncio.create_task(work(i, s)) for i, s in enumerate(subs)]
    # When 3,000 messages are published
    async with BrokerClient(broker.url) as pub:
        await asyncio.gather(*[pub.publish("jobs", i) for i in range(3000)])
    async with asyncio.timeout(30):
        while sum(seen.values()) < 3000:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    for w in workers:
        w.cancel()
    for c in clients:
        await c.close()
    # Then every message was processed exactly once, and all three consumers took part
    assert len(seen) == 3000 and set(seen.values()) == {1}
    assert all(n > 0 for n in per_consumer), per_consumer


async def test_disconnect_while_holding_redelivers_to_another(broker: BrokerProcess) -> None:
    # Given consumer A holding 5 unacked messages, and consumer B in the same group
    async with BrokerClient(broker.url) as pub:
        a = BrokerClient(broker.url, reconnect=False)
        await a.connect()
        sub_a = await a.subscribe("tasks", "w", prefetch=5)
        for i in range(5):
            await pub.publish("tasks", i)
        held = await take(sub_a, 5)
        async with BrokerClient(broker.url) as b:
            sub_b = await b.subscribe("tasks", "w", prefetch=10)
            assert await nothing_more(sub_b)
            # When A disconnects without acking
            await a.close()
            # Then B receives the same 5 messages, as attempt 2
            again = await take(sub_b, 5)
            assert sorted(m.id for m in again) == sorted(m.id for m in held)
            assert {m.attempt for m in again} == {2}


async def test_lease_expiry_redelivers_and_refuses_late_ack(redis: RedisServer) -> None:
    redis.cli("FLUSHALL")
    env = {**FAST, "BROKER_RETRY_BACKOFF_BASE_MS": "50"}
    with BrokerProcess(redis.url, env=env) as broker:
        async with BrokerClient(broker.url) as c:
            # Given a consumer that takes a message with a 300 ms lease and never acks it
            sub = await c.subscribe("slow", prefetch=1, lease_ms=300)
            await c.publish("slow", "x")
            first = await take(sub, 1)
            # When the lease runs out
            second = await take(sub, 1, timeout=10)
            # Then the message is delivered again with a new receipt, and the late ack of the first is refused
            assert second[0].id == first[0].id and second[0].attempt == 2
            assert second[0].receipt != first[0].receipt
            with pytest.raises(StaleReceiptError):
                await first[0].ack(wait=True)
            await second[0].ack(wait=True)


async def test_two_brokers_share_one_group(redis: RedisServer) -> None:
    # Given two broker processes on one Redis, with one consumer of group g on each
    redis.cli("FLUSHALL")
    with BrokerProcess(redis.url, env=FAST) as b1, BrokerProcess(redis.url, env=FAST) as b2:
        c1, c2 = BrokerClient(b1.url), BrokerClient(b2.url)
        await c1.connect()
        await c2.connect()
        subs = [await c1.subscribe("shared", "g", prefetch=20), await c2.subscribe("shared", "g", prefetch=20)]
        seen: collections.Counter[int] = collections.Counter()
        counts = [0, 0]

        async def work(i: int) -> None:
            while True:
                m = await subs[i].get()
                seen[m.payload] += 1
                counts[i] += 1
                await asyncio.sleep(0.001)
                await m.ack()

        tasks = [asyncio.create_task(work(i)) for i in range(2)]
        # When 1,000 messages are published through both brokers
        await asyncio.gather(*[(c1 if i % 2 else c2).publish("shared", i) for i in range(1000)])
        async with asyncio.timeout(30):
            while sum(seen.values()) < 1000:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        for t in tasks:
            t.cancel()
        await c1.close()
        await c2.close()
        # Then no message was delivered twice and both brokers' consumers did work
        assert len(seen) == 1000 and set(seen.values()) == {1}
        assert min(counts) > 0, counts


async def test_a_publish_on_another_node_wakes_this_nodes_consumers(redis: RedisServer) -> None:
    # Given two brokers that would otherwise only look for work every 30 s, and a consumer on the second
    redis.cli("FLUSHALL")
    slow = {"BROKER_DELIVERY_POLL_INTERVAL_MS": "30000"}
    with BrokerProcess(redis.url, env=slow) as b1, BrokerProcess(redis.url, env=slow) as b2:
        async with BrokerClient(b1.url) as pub, BrokerClient(b2.url) as con:
            sub = await con.subscribe("elsewhere", "g", prefetch=10)
            await asyncio.sleep(1.5)  # the second node's wake-up listener is subscribed (it beats every second)
            # When messages are published through the first node, one by one
            for i in range(5):
                await pub.publish("elsewhere", i)
                # Then each reaches the consumer on the second node long before its 30 s poll (Pub/Sub wake-up)
                m = await sub.get(timeout=10)
                assert m.payload == i
                await m.ack(wait=True)


async def test_idempotent_publish(client: BrokerClient, redis: RedisServer) -> None:
    # Given a message published with an idempotency key
    first = await client.publish("pay", {"amount": 5}, idempotency_key="order-17")
    # When it is published again with the same key
    again = await client.publish("pay", {"amount": 5}, idempotency_key="order-17")
    # Then the broker answers with the same id, marks it duplicate, and stores it once
    assert again.id == first.id and again.duplicate and not first.duplicate
    assert redis.cli("LLEN", "mq:{pay}:g:default:ready") == "1"


async def test_delayed_publish(client: BrokerClient) -> None:
    # Given a subscriber
    sub = await client.subscribe("later", prefetch=5)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    # When a message is published with delay_ms=700
    await client.publish("later", "x", delay_ms=700)
    m = (await take(sub, 1, timeout=10))[0]
    # Then it is not delivered before its due time
    assert loop.time() - t0 >= 0.65
    await m.ack()


async def test_per_message_retry_policy_and_ordering_key(client: BrokerClient, redis: RedisServer) -> None:
    # Given a subscriber, and a message allowed 2 attempts with a 50 ms backoff, followed by one of the same key
    sub = await client.subscribe("policy", "g", prefetch=10)
    first = await client.publish("policy", "once", key="acct-1", max_attempts=2, backoff_base_ms=50)
    await client.publish("policy", "next", key="acct-1")
    # When the first fails twice (the second message of its key waits meanwhile)
    m = (await take(sub, 1))[0]
    assert (m.id, m.attempt, m.key) == (first.id, 1, "acct-1")
    await m.nack("boom", wait=True)
    again = (await take(sub, 1))[0]
    assert (again.id, again.attempt) == (first.id, 2)  # its retry came before the next message of its key
    await again.nack("boom again", wait=True)
    # Then it is dead-lettered after its own 2 attempts (not the default 5), and its key moves on
    nxt = (await take(sub, 1))[0]
    assert nxt.payload == "next"
    await nxt.ack(wait=True)
    assert redis.cli("HGET", f"mq:{{policy}}:g:g:dead:{first.id}", "attempts") == "2"
    # And a policy outside the configured bounds is refused, storing nothing
    with pytest.raises(BrokerError) as e:
        await client.publish("policy", "x", max_attempts=1_000, retry=False)
    assert e.value.code == "bad_request"
    assert await nothing_more(sub)


async def test_publish_without_group_is_kept_for_default(client: BrokerClient) -> None:
    # Given a topic nobody subscribed to yet
    await client.publish("nobody-yet", "kept")
    # When a consumer joins group default later
    sub = await client.subscribe("nobody-yet")
    # Then it receives the message published before it came
    m = (await take(sub, 1))[0]
    assert m.payload == "kept"


async def test_publish_without_group_rejected_when_configured(redis: RedisServer) -> None:
    redis.cli("FLUSHALL")
    env = {**FAST, "BROKER_DELIVERY_PUBLISH_WITHOUT_GROUP": "reject"}
    with BrokerProcess(redis.url, env=env) as broker:
        async with websockets.connect(broker.url) as ws:
            await ws.send(orjson.dumps({"op": "publish", "ref": 1, "topic": "void", "payload": 1}).decode())
            reply = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
    assert reply["op"] == "error" and reply["code"] == "not_found" and reply["ref"] == 1
    assert redis.cli("KEYS", "mq:{void}:*") == "mq:{void}:groups" or redis.cli("KEYS", "mq:{void}:*") == ""


BAD_FRAMES = [
    ("{not json", "bad_request"),
    ("[1,2]", "bad_request"),
    ('{"op":"explode","ref":7}', "bad_request"),
    ('{"op":"publish","ref":8,"payload":1}', "bad_request"),
    ('{"op":"publish","ref":9,"topic":"a b","payload":1}', "bad_request"),
    ('{"op":"publish","ref":10,"topic":"{x}","payload":1}', "bad_request"),
    ('{"op":"publish","ref":11,"topic":"t","payload":1,"delay_ms":"soon"}', "bad_request"),
    ('{"op":"subscribe","ref":12,"topic":"t","prefetch":-1}', "bad_request"),
    ('{"op":"ack","ref":13,"id":5}', "bad_request"),
    ('{"op":"ack","ref":14,"id":"nope","receipt":"r"}', "stale_receipt"),
]


async def test_bad_input_gets_error_and_connection_stays_usable(broker: BrokerProcess, redis: RedisServer) -> None:
    async with websockets.connect(broker.url) as ws:
        for text, code in BAD_FRAMES:
            # When a bad frame is sent
            await ws.send(text)
            reply = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
            # Then the documented error comes back (with the ref when one was readable)
            assert reply["op"] == "error" and reply["code"] == code, (text, reply)
            if '"ref"' in text:
                assert "ref" in reply
        # And a binary frame is refused too
        await ws.send(b"\x00\x01")
        reply = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
        assert reply["code"] == "bad_request"
        # And the connection still works, and nothing was stored by the bad frames
        await ws.send('{"op":"ping","ref":"p"}')
        assert orjson.loads(await asyncio.wait_for(ws.recv(), 5)) == {"op": "pong", "ref": "p"}
    assert redis.cli("KEYS", "mq:{*}:msg:*") == ""


async def test_oversized_payload_refused(broker: BrokerProcess) -> None:
    async with websockets.connect(broker.url, max_size=None) as ws:
        big = "x" * 300_000
        await ws.send(orjson.dumps({"op": "publish", "ref": 1, "topic": "t", "payload": big}).decode())
        reply = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
        assert reply["code"] == "payload_too_large" and reply["ref"] == 1
        # A frame over the frame limit closes the connection with 1009
        await ws.send("x" * 1_100_000)
        with pytest.raises(websockets.ConnectionClosed) as e:
            await asyncio.wait_for(ws.recv(), 5)
        assert e.value.rcvd is not None and e.value.rcvd.code == 1009


async def test_health_endpoints(broker: BrokerProcess) -> None:
    assert broker.get("/healthz")[0] == 200
    status, body = broker.get("/readyz")
    assert status == 200 and orjson.loads(body)["ready"] is True
    status, body = broker.get("/metrics")
    assert status == 200 and b"broker_open_connections" in body
    assert broker.get("/nope")[0] == 404


async def test_batch_publish_and_batch_delivery(client: BrokerClient, redis: RedisServer) -> None:
    # Given a batch subscription
    sub = await client.subscribe("bulk", "g", prefetch=500, batch=True)
    # When 300 messages are published in 3 batch frames, one of them with a repeated idempotency key
    results = []
    for b in range(3):
        results += await client.publish_batch([{"topic": "bulk", "payload": b * 100 + i} for i in range(100)])
    again = await client.publish_batch([{"topic": "bulk", "payload": 0, "idempotency_key": "k1"}] * 2)
    # Then every message got an id in order, the repeated key stored once
    assert all(not isinstance(r, Exception) for r in results) and len({r.id for r in results}) == 300
    assert [r.duplicate for r in again] == [False, True] and again[0].id == again[1].id
    # And the consumer receives all 301 (in publish order) and acks them in one frame
    got = await take(sub, 301)
    assert [m.payload for m in got[:300]] == list(range(300))
    async with websockets.connect(client.url) as raw:  # a bad message inside a batch refuses the whole frame
        await raw.send(
            orjson.dumps(
                {
                    "op": "publish",
                    "ref": 1,
                    "messages": [{"topic": "bulk", "payload": 1}, {"topic": "a b", "payload": 2}],
                }
            ).decode()
        )
        reply = orjson.loads(await asyncio.wait_for(raw.recv(), 5))
        assert reply["code"] == "bad_request" and "messages[1]" in reply["message"]
    for m in got:
        await m.ack()
    assert await nothing_more(sub)
    assert redis.cli("LLEN", "mq:{bulk}:g:g:ready") == "0"
