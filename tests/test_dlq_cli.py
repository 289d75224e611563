"""Issue 4: the operator's dead-letter tools, end to end: ``python -m broker dlq ...`` run as a subprocess against a
real redis-server, with dead letters made by a real broker process and a real consumer.

Incident (seeds/001): messages marked FAILED were abandoned forever, with no way to look at them or bring them back;
seeds/004: a DLQ you can only read from code is not an operator's tool. So a message that keeps failing must end in
a dead letter that says everything (payload, every error with its time, a Redis TTL), and an operator must be able to
list, show, export, reprocess exactly once, and purge it from the command line, with no surprises: a dry run or a
refused command changes nothing, and a command that did not do what was asked exits non-zero.

Given/When/Then comments; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from broker.client.client import BrokerClient, Message, Subscription

from .brokers import BrokerProcess
from .support import Cli, RedisServer

FAST = {
    "BROKER_DELIVERY_SWEEP_INTERVAL_MS": "50",
    "BROKER_DELIVERY_POLL_INTERVAL_MS": "50",
    "BROKER_RETRY_BACKOFF_BASE_MS": "20",
}
SEVEN_DAYS_S = 604_800


@pytest.fixture
def cli(redis: RedisServer) -> Cli:
    return Cli(redis)


async def get(sub: Subscription, timeout: float = 10.0) -> Message:
    return await sub.get(timeout=timeout)


async def nothing_more(sub: Subscription, wait_s: float = 0.5) -> bool:
    try:
        m = await sub.get(timeout=wait_s)
    except TimeoutError:
        return True
    print(f"unexpected delivery: {m}")
    return False


async def reject(client: BrokerClient, sub: Subscription, topic: str, payload: Any, error: str) -> str:
    """Publish one message and nack it with dead=True (straight to the DLQ); returns its id."""
    pub = await client.publish(topic, payload)
    m = await get(sub)
    assert m.id == pub.id
    await m.nack(error, dead=True, wait=True)
    return pub.id


def dead_count(redis: RedisServer, topic: str, group: str = "default") -> int:
    return int(redis.cli("ZCARD", f"mq:{{{topic}}}:g:{group}:dead"))


def ready_count(redis: RedisServer, topic: str, group: str = "default") -> int:
    return int(redis.cli("LLEN", f"mq:{{{topic}}}:g:{group}:ready"))


def snapshot(redis: RedisServer) -> dict[str, str]:
    """Every topic key with its serialized value (DUMP): equal snapshots mean nothing changed."""
    keys = sorted(k for k in redis.cli("--scan", "--pattern", "mq:{*}:*").splitlines() if k)
    return {k: redis.cli("DUMP", k) for k in keys}


async def test_five_nacks_dead_letter_then_list_show_reprocess_exactly_once(
    client: BrokerClient, redis: RedisServer, cli: Cli
) -> None:
    # Given a consumer of orders/billing that fails one message five times (backoff base 20 ms)
    sub = await client.subscribe("orders", "billing", prefetch=1)
    pub = await client.publish("orders", {"order": 17}, headers={"trace": "t-1"})
    for attempt in range(1, 6):
        m = await get(sub)
        assert (m.id, m.attempt) == (pub.id, attempt)
        await m.nack(f"boom {attempt}", wait=True)

    # Then it is a dead letter with its 5 errors and a 7-day Redis TTL
    assert dead_count(redis, "orders", "billing") == 1
    key = f"mq:{{orders}}:g:billing:dead:{pub.id}"
    ttl = int(redis.cli("TTL", key))
    assert SEVEN_DAYS_S - 60 <= ttl <= SEVEN_DAYS_S, ttl
    assert redis.cli("HGET", key, "reason") == "max_attempts"
    assert len(orjson.loads(redis.cli("HGET", key, "errors"))) == 5
    assert await nothing_more(sub)

    # When an operator lists the DLQ, Then it is there (JSON and table)
    (row,) = await cli.json("dlq", "list", "--json")
    assert (row["id"], row["topic"], row["group"], row["attempts"], row["reason"]) == (
        pub.id,
        "orders",
        "billing",
        5,
        "max_attempts",
    )
    assert row["payload"] == {"order": 17} and row["headers"] == {"trace": "t-1"}
    assert [e["error"] for e in row["errors"]] == [f"boom {i}" for i in range(1, 6)]
    assert SEVEN_DAYS_S - 60 <= row["ttl_s"] <= SEVEN_DAYS_S
    table = await cli("dlq", "list")
    assert table.returncode == 0 and pub.id in table.stdout and "max_attempts" in table.stdout

    # And `dlq show` prints the whole history: every attempt, its error, its time and its consumer
    shown = await cli.json("dlq", "show", pub.id, "--json")
    assert [(e["attempt"], e["error"]) for e in shown["errors"]] == [(i, f"boom {i}") for i in range(1, 6)]
    times = [e["at"] for e in shown["errors"]]
    assert times == sorted(times) and times[-1] <= shown["died_at"]
    assert all(e["consumer"] for e in shown["errors"]) and shown["last_consumer"]
    assert shown["payload"] == {"order": 17}

    # When a dry run of "reprocess everything" runs, Then it names the letter and changes nothing
    before = snapshot(redis)
    dry = await cli("dlq", "reprocess", "--dry-run", "--all")
    assert dry.returncode == 0, dry.stderr
    assert f"would reprocess {pub.id}" in dry.stdout and "nothing changed" in dry.stderr
    assert snapshot(redis) == before
    assert await nothing_more(sub)

    # When it is reprocessed, Then the consumer gets it back as attempt 1 and acks it
    done = await cli("dlq", "reprocess", pub.id)
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == {"reprocessed": 1, "missing": []}
    m = await get(sub)
    assert (m.id, m.attempt, m.payload, m.headers) == (pub.id, 1, {"order": 17}, {"trace": "t-1"})
    await m.ack(wait=True)
    assert dead_count(redis, "orders", "billing") == 0

    # When it is reprocessed a second time, Then the command fails and nothing is queued again (no duplicate)
    before = snapshot(redis)
    again = await cli("dlq", "reprocess", pub.id)
    assert again.returncode != 0
    assert pub.id in again.stderr and "nothing changed" in again.stderr
    assert snapshot(redis) == before
    assert await nothing_more(sub)
    assert ready_count(redis, "orders", "billing") == 0
    assert [k for k in redis.cli("--scan", "--pattern", "mq:{orders}:*").splitlines() if pub.id in k] == []


async def test_purge_needs_yes_without_a_tty(client: BrokerClient, redis: RedisServer, cli: Cli) -> None:
    # Given two dead letters
    sub = await client.subscribe("mail", prefetch=1)
    ids = [await reject(client, sub, "mail", {"n": i}, f"bad address {i}") for i in range(2)]
    before = snapshot(redis)

    # When purge runs without --yes and stdin is not a terminal, Then it is a usage error and nothing is deleted
    p = await cli("dlq", "purge", "--all")
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "--yes" in p.stderr
    assert snapshot(redis) == before

    # And a dry run names both and deletes nothing
    dry = await cli("dlq", "purge", "--all", "--dry-run")
    assert dry.returncode == 0 and all(f"would purge {i}" in dry.stdout for i in ids)
    assert snapshot(redis) == before

    # When purge runs with --yes, Then both dead letters and their index entries are gone
    p = await cli("dlq", "purge", "--all", "--yes")
    assert p.returncode == 0, p.stderr
    assert orjson.loads(p.stdout) == {"purged": 2, "missing": []}
    assert dead_count(redis, "mail") == 0
    assert all(redis.cli("EXISTS", f"mq:{{mail}}:g:default:dead:{i}") == "0" for i in ids)
    assert await cli.json("dlq", "list", "--json") == []
    assert await nothing_more(sub)


async def test_export_writes_json_lines(client: BrokerClient, redis: RedisServer, cli: Cli, tmp_path: Path) -> None:
    # Given three dead letters on two topics
    a = await client.subscribe("orders", prefetch=1)
    b = await client.subscribe("mail", prefetch=1)
    ids = {
        await reject(client, a, "orders", {"n": 1}, "timeout"),
        await reject(client, a, "orders", [1, "two"], "timeout"),
        await reject(client, b, "mail", "plain text", "invalid"),
    }
    before = snapshot(redis)

    # When exported to a file
    out = tmp_path / "dlq.jsonl"
    p = await cli("dlq", "export", "--out", str(out))

    # Then every line is one JSON object with the payload as JSON (not as a string), and nothing changed
    assert p.returncode == 0, p.stderr
    assert "exported 3" in p.stderr
    lines = out.read_bytes().splitlines()
    rows = [orjson.loads(line) for line in lines]
    assert len(rows) == 3 and {r["id"] for r in rows} == ids
    assert sorted(orjson.dumps(r["payload"]) for r in rows) == sorted(
        orjson.dumps(x) for x in ({"n": 1}, [1, "two"], "plain text")
    )
    assert all(r["errors"] and r["reason"] == "rejected" and r["ttl_s"] > 0 for r in rows)
    assert snapshot(redis) == before

    # And a filtered export to stdout holds only what matched
    p = await cli("dlq", "export", "--topic", "mail")
    assert p.returncode == 0
    assert [orjson.loads(x)["topic"] for x in p.stdout.splitlines()] == ["mail"]


async def test_filters_by_error_topic_and_age(client: BrokerClient, redis: RedisServer, cli: Cli) -> None:
    # Given two orders dead of a timeout and one mail dead of a validation error
    orders = await client.subscribe("orders", prefetch=1)
    mail = await client.subscribe("mail", prefetch=1)
    o1 = await reject(client, orders, "orders", 1, "Timeout talking to db")
    o2 = await reject(client, orders, "orders", 2, "upstream TIMEOUT")
    m1 = await reject(client, mail, "mail", 3, "validation failed: bad address")

    def ids(rows: list[dict[str, Any]]) -> set[str]:
        return {r["id"] for r in rows}

    # When listed with filters, Then each selects what it says (error text case-insensitive, in any error)
    assert ids(await cli.json("dlq", "list", "--json", "--error", "timeout")) == {o1, o2}
    assert ids(await cli.json("dlq", "list", "--json", "--topic", "mail")) == {m1}
    assert ids(await cli.json("dlq", "list", "--json", "--topic", "orders", "--error", "validation")) == set()
    assert ids(await cli.json("dlq", "list", "--json", "--error", "rejected")) == {o1, o2, m1}  # the reason
    assert ids(await cli.json("dlq", "list", "--json", "--older-than", "1h")) == set()
    assert ids(await cli.json("dlq", "list", "--json", "--newer-than", "1h")) == {o1, o2, m1}
    await asyncio.sleep(1.2)
    assert ids(await cli.json("dlq", "list", "--json", "--older-than", "1s")) == {o1, o2, m1}
    assert ids(await cli.json("dlq", "list", "--json", "--newer-than", "500ms")) == set()
    assert len(await cli.json("dlq", "list", "--json", "--limit", "2")) == 2

    # When the timeouts are reprocessed by filter, Then exactly those two come back; the mail one stays dead
    p = await cli("dlq", "reprocess", "--error", "timeout")
    assert p.returncode == 0, p.stderr
    assert orjson.loads(p.stdout) == {"reprocessed": 2, "missing": []}
    back = []
    for _ in range(2):  # prefetch 1: the second comes after the first is acked
        back.append(await get(orders))
        await back[-1].ack(wait=True)
    assert {m.id for m in back} == {o1, o2} and {m.attempt for m in back} == {1}
    assert await nothing_more(mail)
    assert dead_count(redis, "orders") == 0 and dead_count(redis, "mail") == 1

    # When a filter matches nothing, Then the command fails and nothing changes
    before = snapshot(redis)
    p = await cli("dlq", "reprocess", "--older-than", "1h")
    assert p.returncode == 1 and "nothing changed" in p.stderr
    p = await cli("dlq", "purge", "--topic", "orders", "--yes")
    assert p.returncode == 1 and "nothing changed" in p.stderr
    assert snapshot(redis) == before


async def test_bad_input_is_refused_and_changes_nothing(client: BrokerClient, redis: RedisServer, cli: Cli) -> None:
    # Given one dead letter
    sub = await client.subscribe("orders", prefetch=1)
    good = await reject(client, sub, "orders", {"n": 1}, "bad")
    unknown = "0" * 28
    before = snapshot(redis)

    # When an unknown id is reprocessed, Then the message names it, the exit is non-zero, and nothing changed
    p = await cli("dlq", "reprocess", unknown)
    assert p.returncode == 1
    assert unknown in p.stderr and "nothing changed" in p.stderr
    assert snapshot(redis) == before
    p = await cli("dlq", "show", unknown)
    assert p.returncode == 1 and unknown in p.stderr

    # When a filter matches nothing, Then non-zero and nothing changed
    p = await cli("dlq", "reprocess", "--topic", "nosuch")
    assert p.returncode == 1 and "no dead letters match" in p.stderr
    assert snapshot(redis) == before

    # When a duration is malformed or nothing is selected, Then it is a usage error (exit 2) and nothing changed
    for args in (
        ("dlq", "list", "--older-than", "5x"),
        ("dlq", "reprocess", "--all", "--older-than", "soon"),
        ("dlq", "purge", "--all", "--newer-than", "3 days", "--yes"),
        ("dlq", "export", "--older-than", "h"),
        ("dlq", "reprocess"),
        ("dlq", "purge", "--yes"),
    ):
        p = await cli(*args)
        assert p.returncode == 2, (args, p.returncode, p.stderr)
        assert "usage" in p.stderr, (args, p.stderr)
    assert snapshot(redis) == before

    # When a known and an unknown id are reprocessed together, Then the known one comes back, the unknown one is
    # reported, and the exit is non-zero (the operator asked for something that did not happen)
    p = await cli("dlq", "reprocess", good, unknown)
    assert p.returncode == 1, p.stderr
    assert unknown in p.stderr
    out = orjson.loads(p.stdout)
    assert out["reprocessed"] == 1 and unknown in out["missing"]
    m = await get(sub)
    assert (m.id, m.attempt) == (good, 1)
    await m.ack(wait=True)
    assert await nothing_more(sub)


async def test_expired_dead_letters_leave_no_index_entries(redis: RedisServer) -> None:
    # Given a broker whose dead letters live 1 s and whose prune runs every second
    redis.cli("FLUSHALL")
    env = {**FAST, "BROKER_DLQ_TTL_S": "1", "BROKER_DLQ_PRUNE_INTERVAL_S": "1"}
    cli = Cli(redis)
    with BrokerProcess(redis.url, env=env) as broker:
        async with BrokerClient(broker.url) as client:
            sub = await client.subscribe("short", prefetch=1)
            ids = [await reject(client, sub, "short", i, f"bad {i}") for i in range(5)]
            # Then each dead letter carries that TTL
            assert dead_count(redis, "short") == 5
            assert all(int(redis.cli("TTL", f"mq:{{short}}:g:default:dead:{i}")) in (0, 1) for i in ids)

            # When the TTL runs out, Then the broker's prune drops every index entry (nothing lists them first)
            deadline = time.monotonic() + 10
            while dead_count(redis, "short") and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert dead_count(redis, "short") == 0
            assert all(redis.cli("EXISTS", f"mq:{{short}}:g:default:dead:{i}") == "0" for i in ids)

            # And the operator's tools agree: no dead letter listed, none counted
            assert await cli.json("dlq", "list", "--json") == []
            (row,) = await cli.json("stats", "--json", "--topic", "short")
            assert row["dead"] == 0
            p = await cli("dlq", "reprocess", *ids)
            assert p.returncode == 1 and "nothing changed" in p.stderr
            assert await nothing_more(sub)


async def test_reprocess_from_export_file_and_malformed_file(
    client: BrokerClient, redis: RedisServer, cli: Cli, tmp_path: Path
) -> None:
    # Given two dead letters exported to a file, and one more that is not in the file
    sub = await client.subscribe("orders", prefetch=1)
    first = await reject(client, sub, "orders", 1, "timeout")
    second = await reject(client, sub, "orders", 2, "timeout")
    out = tmp_path / "dlq.jsonl"
    assert (await cli("dlq", "export", "--out", str(out))).returncode == 0
    third = await reject(client, sub, "orders", 3, "timeout")

    # When a malformed export file is given, Then the line is named, the exit is non-zero, and nothing changed
    bad = tmp_path / "bad.jsonl"
    bad.write_text(out.read_text() + '{"id": "x"\n')
    before = snapshot(redis)
    p = await cli("dlq", "reprocess", "--from-file", str(bad))
    assert p.returncode == 2 and f"{bad}:3: not JSON" in p.stderr
    assert snapshot(redis) == before

    # When the good file is given, Then exactly the two listed dead letters are reprocessed
    p = await cli("dlq", "reprocess", "--from-file", str(out))
    assert p.returncode == 0, p.stderr
    assert orjson.loads(p.stdout)["reprocessed"] == 2
    got = set()
    for _ in range(2):
        m = await get(sub)
        got.add(m.id)
        await m.ack(wait=True)
    assert got == {first, second}
    assert redis.cli("EXISTS", f"mq:{{orders}}:g:default:dead:{third}") == "1"
