"""The queue commands people expect of a broker CLI, against a real broker and redis-server: `peek` looks without
consuming, `consumers` says who holds what, `group purge | delete` and `topic delete` ask first and say what they
removed, and `consume --ephemeral` leaves no group behind.

Given a real broker (open mode) on a real redis-server, and `broker` commands run as subprocesses from a temp folder
When messages are peeked, held, purged, deleted
Then no attempt is counted by a peek, the counts printed are what Redis lost, other groups keep every message they
had, and after a topic delete no key of the topic is left.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from broker.client.client import BrokerClient
from tests.brokers import BrokerProcess
from tests.support import RedisServer


def run(redis: RedisServer, cwd: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER")}
    return subprocess.run(
        [sys.executable, "-m", "broker", *args, "--redis-url", redis.url], cwd=cwd, env=env, input=stdin,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def ok_json(p: subprocess.CompletedProcess[str]) -> Any:
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    return orjson.loads(p.stdout)


def topic_keys(redis: RedisServer, topic: str) -> list[str]:
    return sorted(k for k in redis.cli("--scan", "--pattern", f"mq:{{{topic}}}:*").splitlines() if k)


async def make_groups(broker: BrokerProcess, topic: str, *groups: str) -> None:
    async with BrokerClient(broker.url) as c:
        for g in groups:
            await c.subscribe(topic, g)


async def test_peek_shows_ready_messages_and_counts_no_attempt(
    broker: BrokerProcess, redis: RedisServer, tmp_path: Path
) -> None:
    await make_groups(broker, "orders", "billing")
    async with BrokerClient(broker.url) as c:
        ids = [(await c.publish("orders", {"n": i}, key="k" if i == 2 else None)).id for i in range(3)]
    # When the group is peeked twice (table, then JSON)
    table = run(redis, tmp_path, "peek", "orders", "--group", "billing")
    assert table.returncode == 0 and all(i in table.stdout for i in ids), table
    assert "3 of 3 ready message(s) of orders/billing shown" in table.stderr and "nothing was consumed" in table.stderr
    shown = ok_json(run(redis, tmp_path, "peek", "orders", "--group", "billing", "--json", "--count", "2"))
    assert [(p["id"], p["payload"], p["position"], p["attempts"]) for p in shown] == [
        (ids[0], {"n": 0}, 0, 0), (ids[1], {"n": 1}, 1, 0)]  # fmt: skip
    # Then a consumer still gets each message on its first attempt, in order
    async with BrokerClient(broker.url) as c:
        sub = await c.subscribe("orders", "billing")
        got = [await sub.get(timeout=10) for _ in ids]
        assert [(m.id, m.attempt) for m in got] == [(i, 1) for i in ids]
        for m in got:
            await m.ack(wait=True)
    p = run(redis, tmp_path, "peek", "orders", "--group", "nosuch")
    assert p.returncode == 2 and "has no group 'nosuch'" in p.stderr and "billing" in p.stderr, p.stderr


async def test_consumers_shows_what_each_consumer_holds(
    broker: BrokerProcess, redis: RedisServer, tmp_path: Path
) -> None:
    await make_groups(broker, "orders", "billing")
    async with BrokerClient(broker.url) as c:
        sub = await c.subscribe("orders", "billing", prefetch=5)
        for i in range(3):
            await c.publish("orders", {"n": i})
        held = [await sub.get(timeout=10) for _ in range(3)]
        deadline = time.monotonic() + 10  # the node reports its consumers with its heartbeat (every second)
        while True:
            (row,) = ok_json(run(redis, tmp_path, "consumers", "orders", "--group", "billing", "--json"))
            if row["connected"] == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert row["connected"] == 1, row
        assert [(h["held"], h["redelivered"]) for h in row["holders"]] == [(3, 0)], row
        text = run(redis, tmp_path, "consumers", "orders")
        assert "orders/billing: 1 consumer(s) connected, 3 deliveries held by 1" in text.stdout, text
        for m in held:
            await m.ack(wait=True)


async def test_purge_and_delete_say_what_they_removed_and_spare_other_groups(
    broker: BrokerProcess, redis: RedisServer, tmp_path: Path
) -> None:
    await make_groups(broker, "orders", "billing", "audit")
    async with BrokerClient(broker.url) as c:
        for i in range(3):
            await c.publish("orders", {"n": i})
        await c.publish("orders", {"k": 1}, key="k")
        await c.publish("orders", {"k": 2}, key="k")  # waits behind the first of key k
        await c.publish("orders", {"later": 1}, delay_ms=600_000)
    # Without --yes and without a terminal: refused, nothing changed
    p = run(redis, tmp_path, "group", "purge", "orders", "billing")
    assert p.returncode == 2 and "needs --yes" in p.stderr and "4 ready and 1 delayed" in p.stderr, p.stderr
    purged = ok_json(run(redis, tmp_path, "group", "purge", "orders", "billing", "--yes", "--json"))
    print(purged)
    assert (purged["ready"], purged["delayed"], purged["waiting"], purged["messages"]) == (4, 1, 1, 6)
    stats = {r["group"]: r for r in ok_json(run(redis, tmp_path, "stats", "--json", "--no-memory"))}
    assert (stats["billing"]["ready"], stats["billing"]["delayed"]) == (0, 0)
    assert (stats["audit"]["ready"], stats["audit"]["delayed"]) == (4, 1)  # the other group lost nothing
    assert len(ok_json(run(redis, tmp_path, "peek", "orders", "--group", "audit", "--json"))) == 4  # bodies kept
    # Deleting a group with a consumer connected is refused unless --force
    async with BrokerClient(broker.url) as c:
        await c.subscribe("orders", "audit", prefetch=1)
        deadline = time.monotonic() + 10  # the node reports its consumers with its heartbeat (every second)
        while time.monotonic() < deadline:
            (row,) = ok_json(run(redis, tmp_path, "consumers", "orders", "--group", "audit", "--json"))
            if row["connected"]:
                break
            time.sleep(0.2)
        p = run(redis, tmp_path, "group", "delete", "orders", "audit", "--yes")
        assert p.returncode == 2 and "consumer(s) of orders/audit are connected" in p.stderr, p.stderr
    deleted = ok_json(run(redis, tmp_path, "group", "delete", "orders", "audit", "--yes", "--json", "--force"))
    assert deleted["messages"] == 6, deleted  # 4 ready (or leased by the consumer that was there), 1 delayed, 1 waiting
    assert "audit" not in redis.cli("SMEMBERS", "mq:{orders}:groups").split()
    left = [k for k in topic_keys(redis, "orders") if ":idem:" not in k]
    assert left == ["mq:{orders}:groups"], left  # no body, no delivery, no key line, no queue of either group
    # (the node reports its consumers with its heartbeat: for up to a second after the consumer left, a delete is
    # refused naming it, correctly; then it goes through)
    deadline = time.monotonic() + 10
    while True:
        removed = run(redis, tmp_path, "topic", "delete", "orders", "--yes")
        if removed.returncode == 0 or time.monotonic() > deadline:
            break
        assert "consumers are connected (orders/audit: 1)" in removed.stderr, removed
        time.sleep(0.2)
    assert removed.returncode == 0 and "deleted topic orders" in removed.stdout, removed
    assert topic_keys(redis, "orders") == []


def test_ephemeral_consume_leaves_no_group_behind(broker: BrokerProcess, redis: RedisServer, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER")}
    consumer = subprocess.Popen(
        [sys.executable, "-m", "broker", "consume", "news", "--ephemeral", "--count", "1", "--timeout", "30",
         "--url", broker.url, "--redis-url", redis.url],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while "ephemeral-" not in redis.cli("SMEMBERS", "mq:{news}:groups") and time.monotonic() < deadline:
            time.sleep(0.05)
        p = subprocess.run([sys.executable, "-m", "broker", "publish", "news", '{"n": 1}', "--url", broker.url],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert p.returncode == 0, p.stderr
        out, err = consumer.communicate(timeout=60)
    finally:
        consumer.kill()
    assert consumer.returncode == 0 and "Traceback" not in err, err
    assert orjson.loads(out)["payload"] == {"n": 1}
    assert "ephemeral" not in redis.cli("SMEMBERS", "mq:{news}:groups")
    assert not [k for k in topic_keys(redis, "news") if ":g:" in k or ":msg:" in k]
