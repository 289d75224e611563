"""Incident class: retention nobody sees. A queue that delivers and acks everything can still grow Redis without
bound if a transition forgets a key (a body whose reference count never reaches 0, a delivery hash left behind).
Nothing fails; memory just climbs until Redis refuses writes.

Guarantee: a message acked by every group leaves nothing behind. Its body (`msg:<id>`, reference-counted over the
groups), its per-group delivery state (`dlv:<id>`) and its queue entries are gone; the only key still naming it is
its idempotency key (`idem:<key>` → id), kept on purpose for the dedup window with a Redis TTL of
`delivery.idempotency_ttl_s` (10 min by default, shortened here), counted by `broker stats` as the topic's memory,
and gone after the window: then nothing of an acked message remains at all.

Given a real broker on a real redis-server and a topic with two groups
When 10,000 messages are published and every one is consumed and acked in both groups (in one of them, every
     50th message is nacked once first and acked on its redelivery)
Then a SCAN of the whole Redis finds no `msg:`, `dlv:` or `dead:` key and no key whose name holds a message id;
     the topic's keys are its `groups` set and idempotency keys, each naming one of the messages with a TTL within
     the window; `broker stats --json --nodes` reports those keys and their memory as the topic's (an estimate,
     marked so); and once the window has passed the topic's only key is its `groups` set.
"""

from __future__ import annotations

import asyncio
import os
import sys

import orjson
import redis as redislib

from broker.client.client import BrokerClient, Subscription
from tests.brokers import ROOT, BrokerProcess
from tests.support import RedisServer

N = 10_000
TOPIC = "ledger"
GROUPS = ("billing", "audit")
IDEM_TTL_S = 20  # the dedup window for this test (delivery.idempotency_ttl_s), so it can be waited out


async def consume_all(sub: Subscription, nack_every: int = 0) -> set[str]:
    """Ack every message; with ``nack_every``, first nack every nth once (redelivered at once, then acked)."""
    got: set[str] = set()
    async with asyncio.timeout(180):
        while len(got) < N:
            m = await sub.get()
            if nack_every and m.attempt == 1 and m.payload["n"] % nack_every == 0:
                await m.nack("try again", delay_ms=0)
                continue
            got.add(m.id)
            await m.ack()
    return got


async def test_acked_messages_leave_no_keys_behind(redis: RedisServer) -> None:
    with BrokerProcess(redis.url, env={"BROKER_DELIVERY_IDEMPOTENCY_TTL_S": str(IDEM_TTL_S)}) as broker:
        async with BrokerClient(broker.url) as pub, BrokerClient(broker.url) as con:
            # Given: both groups exist before the first publish
            subs = [await con.subscribe(TOPIC, g, prefetch=1000) for g in GROUPS]
            # (one group nacks every 50th message once first: a retried delivery must not leave its state behind)
            consumers = [asyncio.create_task(consume_all(s, nack_every=50 * i)) for i, s in enumerate(subs)]
            # When: 10,000 messages are published (batches of 500) and consumed and acked in both groups
            ids: list[str] = []
            for start in range(0, N, 500):
                res = await pub.publish_batch(
                    [{"topic": TOPIC, "payload": {"n": i}} for i in range(start, start + 500)]
                )
                ids += [r.id for r in res]  # type: ignore[union-attr]
            assert len(set(ids)) == N
            received = await asyncio.gather(*consumers)
            assert all(r == set(ids) for r in received)
            # the last acks were sent without waiting: wait until Redis has settled them (bounded)
            with redislib.Redis.from_url(redis.url, decode_responses=True) as r:
                async with asyncio.timeout(60):
                    while any(
                        r.zcard(f"mq:{{{TOPIC}}}:g:{g}:leased") or r.llen(f"mq:{{{TOPIC}}}:g:{g}:ready") for g in GROUPS
                    ):
                        await asyncio.sleep(0.05)

                # Then: nothing per message is left but the idempotency keys
                keys = list(r.scan_iter(count=1000))
                id_set = set(ids)
                per_message = [k for k in keys if any(f":{part}:" in k for part in ("msg", "dlv", "dead"))]
                assert per_message == [], per_message[:10]
                naming_an_id = [k for k in keys if k.rsplit(":", 1)[-1] in id_set]
                assert naming_an_id == [], naming_an_id[:10]
                topic_keys = sorted(k for k in keys if k.startswith(f"mq:{{{TOPIC}}}:"))
                idem = [k for k in topic_keys if k.startswith(f"mq:{{{TOPIC}}}:idem:")]
                assert set(topic_keys) - set(idem) == {f"mq:{{{TOPIC}}}:groups"}, topic_keys[:10]
                assert 0 < len(idem) <= N  # one per message, none expired yet unless this run was slow
                with r.pipeline(transaction=False) as p:
                    for k in idem:
                        p.ttl(k)
                        p.get(k)
                    answers = p.execute()
                ttls, values = answers[0::2], answers[1::2]
                assert all(0 < t <= IDEM_TTL_S or t == -2 for t in ttls), sorted(set(ttls))[:5]  # -2: just expired
                assert {v for v in values if v is not None} <= id_set  # each names one message, for the window
                other = [k for k in keys if not k.startswith(f"mq:{{{TOPIC}}}:")]
                assert all(k.startswith(("mq:node", "mq:topics", "mq:schema")) for k in other), other

        # And: `broker stats` shows that retention as the topic's memory (sampled: more keys than the exact limit)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")} | {"BROKER_REDIS_URL": redis.url}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "broker", "stats", "--json", "--nodes",
            cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        (mem,) = [t for t in orjson.loads(out)["topics"] if t["topic"] == TOPIC]
        keys_then = mem["keys"] - 1  # idempotency keys still in their window when stats ran
        assert 1_000 < keys_then <= N and mem["estimated"] is True and mem["sampled_keys"] == 200, mem
        assert keys_then * 50 < mem["memory_bytes"] < keys_then * 1000, mem  # tens of bytes per key, not nothing

        # And: after the window nothing of an acked message remains (strict: not even its idempotency key)
        with redislib.Redis.from_url(redis.url, decode_responses=True) as r:
            async with asyncio.timeout(IDEM_TTL_S + 30):
                while left := [k for k in r.scan_iter(match=f"mq:{{{TOPIC}}}:*", count=1000)]:
                    if left == [f"mq:{{{TOPIC}}}:groups"]:
                        break
                    await asyncio.sleep(0.5)
            assert left == [f"mq:{{{TOPIC}}}:groups"], left[:10]
