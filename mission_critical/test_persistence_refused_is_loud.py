"""Incident (seeds/000): the queue's state file could not be written (disk, permissions, a missing temp file); the
error was caught and logged in passing, the processor carried on, and messages sat in PENDING with nobody told.

Guarantee: when the store refuses to persist, every layer says so. Redis refusing a write (here: maxmemory reached
with `noeviction`) is never a `published`: the publisher gets an `error` frame with code `unavailable` and a retry
hint, the broker logs `redis_write_refused` and counts the failure on /metrics. A Redis set up so that it can lose
queued messages (no persistence, or an eviction policy) is reported at startup as `redis_persistence_risk`.

Given a redis-server with --maxmemory 2mb --maxmemory-policy noeviction
When large payloads are published until Redis refuses them
Then no refused message is confirmed, every confirmed one is in its queue, the publisher sees `unavailable`,
     the log has `redis_write_refused`, broker_publish_failed_total{code="unavailable"} counts the refusals and
     /readyz is red; and since Redis still answers, a consumer can drain the queue, after which a publisher's
     retry goes through (the refusals must not open the Redis breaker, which would block the drain too).
And  a broker on a Redis without AOF and save points, or with maxmemory-policy allkeys-lru, logs
     `redis_persistence_risk` at startup; one on an AOF, noeviction Redis does not.
"""

from __future__ import annotations

import asyncio
import re

import orjson
import websockets

from broker.client.client import BrokerClient
from tests.brokers import BrokerProcess
from tests.support import RedisServer

PAYLOAD = "x" * 100_000
TOPIC = "reports"


def _metric(text: str, name: str, labels: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_redis_refusing_writes_is_never_a_published() -> None:
    with (
        RedisServer(extra_args=["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]) as redis,
        BrokerProcess(redis.url) as broker,
    ):
        confirmed: list[str] = []
        refused: list[dict[str, object]] = []
        async with websockets.connect(broker.url, ping_interval=None) as ws:
            await ws.send(orjson.dumps({"op": "subscribe", "ref": "s", "topic": TOPIC, "group": "archive"}).decode())
            # no consumer reads: the group's queue only grows
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 10))["op"] == "subscribed"
            await ws.send(orjson.dumps({"op": "unsubscribe", "ref": "u", "topic": TOPIC, "group": "archive"}).decode())
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 10))["op"] == "unsubscribed"
            # When: publish 100 kB payloads one at a time until Redis refuses a few
            async with asyncio.timeout(30):
                for i in range(200):
                    frame = {"op": "publish", "ref": i, "topic": TOPIC, "payload": PAYLOAD, "idempotency_key": f"k{i}"}
                    await ws.send(orjson.dumps(frame).decode())
                    reply = orjson.loads(await ws.recv())
                    assert reply["ref"] == i, reply
                    if reply["op"] == "published":
                        assert not refused, "a publish was confirmed after Redis started refusing"
                        confirmed.append(str(reply["id"]))
                    else:
                        refused.append(reply)
                        if len(refused) >= 8:
                            break

        # Then: /readyz says why this node cannot take publishes right now
        status, body = broker.get("/readyz")
        assert status == 503 and any("refusing writes" in r for r in orjson.loads(body)["reasons"]), body
        # And: Redis did fill up, and the publisher was told each time, with a retry hint
        assert 3 <= len(confirmed) < 200, len(confirmed)
        assert len(refused) >= 8
        assert all(r["op"] == "error" and r["code"] == "unavailable" for r in refused), refused
        assert all(isinstance(r["retry_after_ms"], int) and r["retry_after_ms"] > 0 for r in refused), refused
        assert any("maxmemory" in str(r["message"]) for r in refused), refused  # the cause reaches the client
        # And: what was confirmed is stored, and nothing else is
        ready = redis.cli("LRANGE", f"mq:{{{TOPIC}}}:g:archive:ready", "0", "-1").split()
        assert ready == confirmed
        for msg_id in confirmed:
            assert int(redis.cli("HSTRLEN", f"mq:{{{TOPIC}}}:msg:{msg_id}", "payload")) == len(PAYLOAD) + 2
        assert redis.cli("--scan", "--pattern", f"mq:{{{TOPIC}}}:idem:*").count("\n") + 1 == len(confirmed)
        # And: the broker logged it and counted it
        text = broker.log_text()
        events = [orjson.loads(x) for x in text.splitlines() if '"redis_write_refused"' in x]
        assert events, broker.log_tail()
        assert "maxmemory" in str(events[0]["error"]) and events[0]["level"] in ("error", "critical")
        status, body = broker.get("/metrics")
        assert status == 200
        failed = _metric(body.decode(), "broker_publish_failed_total", 'code="unavailable"')
        assert failed == len(refused), (failed, len(refused))
        assert _metric(body.decode(), "broker_frame_errors_total", 'code="unavailable"') >= len(refused)

        # And: a refusal is not an outage. A consumer (newly connected) can still drain the full queue while a
        # publisher keeps retrying; once drained, the retried publish is confirmed. No operator, no restart.
        async with BrokerClient(broker.url) as pub, BrokerClient(broker.url) as con:
            retried = asyncio.create_task(pub.publish(TOPIC, PAYLOAD, idempotency_key="after-drain"))
            await asyncio.sleep(0.5)
            assert not retried.done()  # still refused: Redis is full
            drained: list[str] = []
            async with asyncio.timeout(30):
                sub = await con.subscribe(TOPIC, "archive", prefetch=10)
                while len(drained) < len(confirmed):
                    m = await sub.get()
                    drained.append(m.id)
                    await m.ack(wait=True)
                after = await retried
                # And the retried publish is stored and delivered like any other (the consumer is still
                # subscribed, so it may already hold it: no assumption on where in the group it sits now)
                last = await sub.get()
                assert last.id == after.id
                await last.ack(wait=True)
        assert drained == confirmed
        assert redis.cli("LLEN", f"mq:{{{TOPIC}}}:g:archive:ready") == "0"


async def test_persistence_risks_are_reported_at_startup() -> None:
    cases = {
        "no persistence": ["--appendonly", "no", "--save", ""],
        "eviction": ["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"],
        "safe": [],  # the helper's default: AOF with fsync always, noeviction
    }
    seen: dict[str, list[str]] = {}
    for name, args in cases.items():
        with RedisServer(extra_args=args) as redis, BrokerProcess(redis.url) as broker:
            started = ""
            async with asyncio.timeout(10):
                while '"broker_started"' not in started:
                    await asyncio.sleep(0.05)
                    started = broker.log_text()
            seen[name] = [
                str(orjson.loads(x)["problem"]) for x in started.splitlines() if '"redis_persistence_risk"' in x
            ]
    assert len(seen["no persistence"]) == 1 and "no persistence" in seen["no persistence"][0], seen
    assert len(seen["eviction"]) == 1 and "allkeys-lru" in seen["eviction"][0], seen
    assert seen["safe"] == [], seen
