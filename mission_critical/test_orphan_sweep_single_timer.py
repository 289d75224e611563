"""Incident (seeds/003, bug #2): two threads both saw "no timer for this customer" and each started one, so the
same buffered message was processed twice. Here the equivalent race is recovery: every broker node runs the orphan
sweep, so when a node dies, all survivors race to reschedule the same orphaned leases at the same moment.

Guarantee: the orphan sweep is safe on N nodes. However many nodes sweep a dead node's leases together, each
message is rescheduled exactly once (one retry schedule, one entry in its error history) and redelivered once.

Given broker A (leases of 60 s, so only the orphan sweep can bring messages back quickly) and a raw consumer that
      takes 200 messages (prefetch 200) and never acks them
When A is killed with SIGKILL and three brokers B, C, D start together on the same Redis
Then every one of the 200 delivery hashes holds exactly one error entry, naming A as the dead node; the survivors'
     `orphaned_leases_recovered` log events add up to exactly 200; and consumers on B, C and D receive each message
     exactly once, as attempt 2.
"""

from __future__ import annotations

import asyncio
import collections
import re
from typing import Any

import orjson
import redis as redislib
import websockets

from broker.client.client import BrokerClient
from tests.brokers import BrokerProcess
from tests.support import RedisServer, until

N = 200
TOPIC, GROUP = "orders", "fulfil"
ENV = {
    "BROKER_DELIVERY_LEASE_MS": "60000",
    "BROKER_DELIVERY_NODE_TIMEOUT_MS": "1500",
    "BROKER_DELIVERY_SWEEP_INTERVAL_MS": "50",
    "BROKER_DELIVERY_POLL_INTERVAL_MS": "50",
    "BROKER_RETRY_BACKOFF_BASE_MS": "500",
}


def _node_of(broker: BrokerProcess) -> str:
    status, body = broker.get("/healthz")
    assert status == 200
    return str(orjson.loads(body)["node"])


def _recovered_events(broker: BrokerProcess) -> list[dict[str, object]]:
    out = []
    for line in broker.log_text().splitlines():
        if '"orphaned_leases_recovered"' in line:
            out.append(orjson.loads(line))
    return out


async def test_orphan_sweep_on_three_nodes_reschedules_each_message_once(redis: RedisServer) -> None:
    a = BrokerProcess(redis.url, env=ENV).start()
    survivors = [BrokerProcess(redis.url, env=ENV) for _ in range(3)]
    try:
        node_a = _node_of(a)
        # Given: a consumer on A holds 200 leases and never acks
        async with websockets.connect(a.url, ping_interval=None) as raw:
            await raw.send(orjson.dumps({"op": "subscribe", "ref": 0, "topic": TOPIC, "group": GROUP,
                                         "prefetch": N}).decode())  # fmt: skip
            assert orjson.loads(await asyncio.wait_for(raw.recv(), 10))["op"] == "subscribed"
            async with BrokerClient(a.url, reconnect=False) as pub:
                published = {(await pub.publish(TOPIC, {"n": i})).id for i in range(N)}
            held: dict[str, int] = {}
            async with asyncio.timeout(20):
                while len(held) < N:
                    f = orjson.loads(await raw.recv())
                    if f["op"] == "message":
                        held[f["id"]] = f["attempt"]
            assert set(held) == published and set(held.values()) == {1}
            assert redis.cli("ZCARD", f"mq:{{{TOPIC}}}:g:{GROUP}:leased") == str(N)

            # When: A dies, and three nodes start at once
            a.kill()
        await asyncio.gather(*(asyncio.to_thread(b.start) for b in survivors))

        # Then: the leases come back long before their 60 s deadline, all of them, each once
        leased_key = f"mq:{{{TOPIC}}}:g:{GROUP}:leased"
        async with asyncio.timeout(20):
            while redis.cli("ZCARD", leased_key) != "0":
                await asyncio.sleep(0.05)
        with redislib.Redis.from_url(redis.url, decode_responses=True) as r:
            dlv = {i: r.hmget(f"mq:{{{TOPIC}}}:g:{GROUP}:dlv:{i}", "errors", "attempts") for i in published}
        for msg_id, (history, attempts) in dlv.items():
            errors = orjson.loads(f"[{history}]")  # comma-joined JSON objects (docs/keys.md)
            assert len(errors) == 1, (msg_id, errors)
            assert errors[0]["error"] == f"broker node {node_a} died holding the lease", errors[0]
            assert errors[0]["attempt"] == 1
            assert attempts == "1"
        # One retry schedule per message: exactly N ids across delayed + ready, no id twice. Both read in one
        # MULTI: the survivors promote due retries from delayed to ready meanwhile, and two separate reads could
        # see an id in both (or in neither).
        with redislib.Redis.from_url(redis.url, decode_responses=True) as r:
            pipe = r.pipeline(transaction=True)
            pipe.zrange(f"mq:{{{TOPIC}}}:g:{GROUP}:delayed", 0, -1)
            pipe.lrange(f"mq:{{{TOPIC}}}:g:{GROUP}:ready", 0, -1)
            delayed, ready = pipe.execute()
        assert sorted(delayed + ready) == sorted(published)

        # (a sweep logs after its script returned: the leased set can be empty a moment before the last line is out)
        def recovered() -> list[dict[str, object]]:
            return [e for b in survivors for e in _recovered_events(b)]

        await until(lambda: sum(int(str(e["count"])) for e in recovered()) >= N, "the sweeps' log lines", 20)
        events = recovered()
        assert events, "no orphaned_leases_recovered log event on B, C or D"
        assert all(e["dead_nodes"] == [node_a] and e["topic"] == TOPIC and e["group"] == GROUP for e in events)
        assert sum(int(str(e["count"])) for e in events) == N, events  # the three sweeps together: 200, not 600
        # each survivor says whom it takes for dead, once, before its sweep expires anything (the one record if that
        # sweep's reply is lost); a survivor whose sweep came after the others had done the work says so later
        # (or, had its own heartbeat failed once under load, one node timeout later: recovery.py)
        def judged(b: BrokerProcess) -> list[dict[str, Any]]:
            return [orjson.loads(x) for x in b.log_text().splitlines() if '"nodes_taken_for_dead"' in x]

        async with asyncio.timeout(20):
            while not all(judged(b) for b in survivors):
                await asyncio.sleep(0.1)
        for b in survivors:
            assert sum(e["nodes"].count(node_a) for e in judged(b)) == 1, (b.port, judged(b))

        # And: redelivered once each, attempt 2, to consumers on any of B, C, D
        received: collections.Counter[str] = collections.Counter()
        attempts: dict[str, int] = {}
        clients = [BrokerClient(b.url, reconnect=False) for b in survivors]
        for c in clients:
            await c.connect()
        try:

            async def consume(c: BrokerClient) -> None:
                sub = await c.subscribe(TOPIC, GROUP, prefetch=50)
                while True:
                    m = await sub.get()
                    received[m.id] += 1
                    attempts[m.id] = m.attempt
                    await m.ack(wait=True)

            tasks = [asyncio.create_task(consume(c)) for c in clients]
            async with asyncio.timeout(20):
                while set(received) != published:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # room for a duplicate to show up
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for c in clients:
                await c.close()
        assert set(received.values()) == {1}, [i for i, n in received.items() if n > 1]
        assert set(attempts.values()) == {2}
        assert redis.cli("ZCARD", f"mq:{{{TOPIC}}}:g:{GROUP}:dead") == "0"
        assert redis.cli("--scan", "--pattern", f"mq:{{{TOPIC}}}:g:{GROUP}:dlv:*") == ""
        per_node = {b.port: len(re.findall('"orphaned_leases_recovered"', b.log_text())) for b in survivors}
        print(f"orphaned_leases_recovered events per node: {per_node}; redelivered={len(received)}")
    finally:
        a.close()
        for b in survivors:
            if b.proc is not None and b.proc.poll() is not None:
                print(f"--- broker log tail {b.port} ---\n{b.log_tail(20)}")
            b.close()
