"""Incident (seeds/003): a service restart cut requests mid-flight and their callers could not tell what had been
kept. Here: a broker shutting down while Redis is slow left up to a thousand publishes without any answer (the
connection closed under them) and still stored some of them afterwards, so a publisher that retried them created
duplicates, and a batch publish cancelled by the shutdown would have been answered `internal` (not retryable).

Guarantee: a graceful shutdown answers every publish it took with `published` or `unavailable` (retryable), never
`internal`, and the answers leave before the close frame. A publish it could not answer is one it never stored.

Given a broker whose Redis answers every round trip 80 ms late (a slow path: flushes pile up), and two publishers
      sending as fast as they are let, one single publishes, one batches of 5, each payload naming its frame
When the broker gets SIGTERM while they publish
Then every error, single or in a batch, is `unavailable`; every confirmed publish is in Redis; and every frame
     that got no answer at all stored nothing (it was refused before Redis, or never read).
"""

from __future__ import annotations

import asyncio
import collections

import orjson
import redis as redislib
import websockets
from websockets.exceptions import ConnectionClosed

from tests.brokers import BrokerProcess
from tests.proxy import TcpProxy
from tests.support import RedisServer

BATCH = 5
DELAY_S = 0.08
ENV = {"BROKER_SERVER_SHUTDOWN_GRACE_MS": "2000", "BROKER_SERVER_MAX_UNCONFIRMED_PUBLISHES": "5000"}


async def test_every_publish_taken_during_shutdown_is_answered_unavailable_or_never_stored(
    redis: RedisServer,
) -> None:
    with TcpProxy(redis.port) as proxy, BrokerProcess(proxy.url, env=ENV) as broker:
        sent: dict[str, list[int]] = {"single": [], "batch": []}
        answers: dict[str, dict[int, list[dict[str, object]]]] = {"single": {}, "batch": {}}
        confirmed: set[str] = set()
        codes: collections.Counter[str] = collections.Counter()

        async with websockets.connect(broker.url, ping_interval=None) as sub:  # the topic gets a group
            await sub.send(orjson.dumps({"op": "subscribe", "ref": "s", "topic": "t", "group": "g"}).decode())
            assert orjson.loads(await asyncio.wait_for(sub.recv(), 10))["op"] == "subscribed"
        conns = {name: await websockets.connect(broker.url, ping_interval=None) for name in sent}

        async def publish(name: str) -> None:
            ws = conns[name]
            try:
                for ref in range(20_000):  # bounded; the shutdown ends it long before
                    if name == "single":
                        frame: dict[str, object] = {"op": "publish", "ref": ref, "topic": "t", "payload": [name, ref]}
                    else:
                        msgs = [{"topic": "t", "payload": [name, ref, i]} for i in range(BATCH)]
                        frame = {"op": "publish", "ref": ref, "messages": msgs}
                    await ws.send(orjson.dumps(frame).decode())
                    sent[name].append(ref)
                    await asyncio.sleep(0.003)
            except ConnectionClosed:
                pass

        async def read(name: str) -> None:
            try:
                async for raw in conns[name]:
                    f = orjson.loads(raw)
                    if f["op"] == "error":
                        codes[str(f["code"])] += 1
                        answers[name][int(f["ref"])] = [f]
                    elif f["op"] == "published" and "results" in f:
                        answers[name][int(f["ref"])] = f["results"]
                        for r in f["results"]:
                            if "error" in r:
                                codes[str(r["error"]["code"])] += 1
                            else:
                                confirmed.add(str(r["id"]))
                    elif f["op"] == "published":
                        answers[name][int(f["ref"])] = [f]
                        confirmed.add(str(f["id"]))
            except ConnectionClosed:
                pass

        proxy.delay(DELAY_S)
        tasks = [asyncio.create_task(fn(n)) for n in sent for fn in (publish, read)]
        await asyncio.sleep(1.5)
        # When
        assert broker.proc is not None
        broker.proc.send_signal(15)
        code = await asyncio.to_thread(broker.proc.wait, 30)
        async with asyncio.timeout(10):
            await asyncio.gather(*tasks)
        assert code == 0, broker.log_tail()

    # Then: what Redis holds, by payload
    with redislib.Redis.from_url(redis.url, decode_responses=True) as r:
        ids = r.lrange("mq:{t}:g:g:ready", 0, -1)
        payloads = {i: r.hget(f"mq:{{t}}:msg:{i}", "payload") for i in ids}
    stored: dict[str, set[int]] = {"single": set(), "batch": set()}
    for p in payloads.values():
        name, ref, *_ = orjson.loads(str(p))
        stored[name].add(ref)
    unanswered = {n: [ref for ref in sent[n] if ref not in answers[n]] for n in sent}
    print(f"sent single={len(sent['single'])} batch={len(sent['batch'])}x{BATCH}; confirmed={len(confirmed)}; "
          f"errors={dict(codes)}; unanswered single={len(unanswered['single'])} batch={len(unanswered['batch'])}; "
          f"stored={len(ids)}")  # fmt: skip
    for name in sent:
        assert not stored[name] & set(unanswered[name]), (name, sorted(stored[name] & set(unanswered[name]))[:20])
    assert confirmed <= set(ids), confirmed - set(ids)
    assert set(codes) <= {"unavailable"}, codes
    cut_short = sum(codes.values()) + sum(map(len, unanswered.values()))
    assert cut_short > 0, "every publish was confirmed: the shutdown did not meet publishes in flight"
