"""What an operator sees, on a real broker over a real redis-server: /metrics, /readyz, the JSON log, `broker stats`.

- /metrics parses as Prometheus text and its counters move by exactly the number of messages that flowed;
- /readyz turns 503 with its reasons while Redis is cut (TcpProxy) and 200 again once it is back, by itself;
- a refused handshake (unknown path) is logged as `connection_refused` with its reason, though it never became a
  connection; `connection_opened` and `connection_closed` of one connection carry the same `conn_id`;
- `broker stats --json` reports the ready/leased/delayed/dead counts of the state the test made;
- docs/operations.md names exactly the metrics the broker registers.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus

from broker.client.client import BrokerClient
from broker.runtime import metrics

from .brokers import BrokerProcess
from .proxy import TcpProxy
from .support import RedisServer

REPO = Path(__file__).resolve().parent.parent
FAST = {"BROKER_DELIVERY_SWEEP_INTERVAL_MS": "100", "BROKER_DELIVERY_POLL_INTERVAL_MS": "100"}
OUTAGE = {
    **FAST,
    "BROKER_BREAKERS_REDIS_RESET_TIMEOUT_S": "1",
    "BROKER_BREAKERS_REDIS_CALL_TIMEOUT_MS": "500",
    "BROKER_REDIS_SOCKET_TIMEOUT_MS": "500",
    "BROKER_REDIS_CONNECT_TIMEOUT_MS": "300",
}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(broker: BrokerProcess) -> Samples:
    """Every sample of /metrics by (sample name, sorted labels); the text must parse as Prometheus exposition."""
    status, body = broker.get("/metrics")
    assert status == 200
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        assert family.name.startswith("broker_"), family.name
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def log_events(broker: BrokerProcess) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in broker.log_text().splitlines() if line.startswith("{")]


async def wait_for_event(
    broker: BrokerProcess, pred: Callable[[dict[str, Any]], bool], timeout_s: float = 10.0
) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        while True:
            for e in log_events(broker):
                if pred(e):
                    return e
            await asyncio.sleep(0.05)


def readyz(broker: BrokerProcess) -> tuple[int, dict[str, Any]]:
    status, body = broker.get("/readyz")
    return status, (orjson.loads(body) if body else {})


# ---- /metrics --------------------------------------------------------------------------------------------------


async def test_metrics_parse_and_count_the_messages_that_flowed(broker: BrokerProcess) -> None:
    n = 7
    before = scrape(broker)
    async with BrokerClient(broker.url) as client:
        sub = await client.subscribe("obs", "g", prefetch=n)
        ids = [(await client.publish("obs", {"i": i})).id for i in range(n)]
        got = []
        async with asyncio.timeout(10):
            while len(got) < n:
                m = await sub.get()
                got.append(m.id)
                await m.ack(wait=True)
    assert sorted(got) == sorted(ids)
    after = scrape(broker)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("broker_published_total", topic="obs") == n
    assert delta("broker_delivered_total", topic="obs", group="g") == n
    assert delta("broker_acked_total", topic="obs", group="g") == n
    assert delta("broker_frames_in_total", op="publish") == n
    assert delta("broker_connections_total", outcome="accepted") == 1
    assert value(after, "broker_breaker_state", breaker="redis") == 0  # closed
    assert value(after, "broker_publish_failed_total", code="unavailable") == 0
    assert not [name for name, _ in after if name.endswith("_created")], "no _created series on /metrics"


def test_operations_doc_names_exactly_the_registered_metrics() -> None:
    # a counter's family is named without its `_total` suffix; the exposition (and the doc) use it
    registered = {f"{m.name}_total" if m.type == "counter" else m.name for m in metrics.REGISTRY.collect()}
    text = (REPO / "docs" / "operations.md").read_text()
    table = set(re.findall(r"^\| `(broker_[a-z_]+)` \|", text, re.M))  # the Metrics table, one row per metric
    assert registered - table == set(), f"metrics missing from docs/operations.md: {sorted(registered - table)}"
    assert table - registered == set(), f"docs/operations.md lists unknown metrics: {sorted(table - registered)}"
    # and every metric quoted with labels elsewhere (runbook steps, alerts) exists
    quoted = {re.sub(r"_(bucket|count|sum)$", "", m) for m in re.findall(r"(broker_[a-z_]+)\{", text)}
    assert quoted <= registered, sorted(quoted - registered)


# ---- /readyz ---------------------------------------------------------------------------------------------------


async def test_readyz_is_503_with_reasons_while_redis_is_cut_and_200_after(redis: RedisServer) -> None:
    with TcpProxy(redis.port) as proxy, BrokerProcess(proxy.url, env=OUTAGE) as broker:
        status, body = readyz(broker)
        assert status == 200 and body["ready"] is True and body["reasons"] == [], body
        node = body["node"]
        # When Redis becomes unreachable
        proxy.cut()
        async with asyncio.timeout(15):
            while readyz(broker)[0] != 503:
                await asyncio.sleep(0.1)
        # Then /readyz says why, as JSON, and the breaker metrics agree
        async with asyncio.timeout(15):
            while not any(r.startswith("redis breaker") for r in readyz(broker)[1]["reasons"]):
                await asyncio.sleep(0.1)
        status, body = readyz(broker)
        assert status == 503 and body["ready"] is False and body["node"] == node, body
        assert all(isinstance(r, str) and r for r in body["reasons"]), body
        samples = scrape(broker)
        assert value(samples, "broker_breaker_state", breaker="redis") in (1, 2)  # half-open or open
        assert value(samples, "broker_breaker_transitions_total", breaker="redis", to="open") >= 1
        # When Redis is back, readiness returns without anyone doing anything
        proxy.restore()
        async with asyncio.timeout(30):
            while readyz(broker)[0] != 200:
                await asyncio.sleep(0.1)
        status, body = readyz(broker)
        assert body == {"ready": True, "reasons": [], "node": node}
        assert value(scrape(broker), "broker_breaker_state", breaker="redis") == 0
        changes = [(e["old"], e["new"]) for e in log_events(broker) if e["event"] == "breaker_state_changed"]
        assert ("closed", "open") in changes and changes[-1][1] == "closed", changes


# ---- the log ---------------------------------------------------------------------------------------------------


async def test_refused_handshake_is_logged_with_its_reason(broker: BrokerProcess) -> None:
    before = scrape(broker)
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(f"ws://127.0.0.1:{broker.port}/nope?x=1"):
            pass
    assert refused.value.response.status_code == 404
    e = await wait_for_event(broker, lambda e: e["event"] == "connection_refused")
    assert (e["level"], e["path"], e["reason"]) == ("info", "/nope", "unknown path"), e
    assert re.fullmatch(r"127\.0\.0\.1:\d+", e["peer"]), e
    assert "conn_id" not in e  # it never became a connection
    after = scrape(broker)
    assert (
        value(after, "broker_connections_total", outcome="refused_path")
        - value(before, "broker_connections_total", outcome="refused_path")
        == 1
    )
    assert not any(x["event"] == "connection_opened" for x in log_events(broker))


async def test_connection_opened_and_closed_carry_the_same_conn_id(broker: BrokerProcess) -> None:
    async with websockets.connect(broker.url, ping_interval=None) as ws:
        host, port = ws.local_address[:2]
        await ws.send(orjson.dumps({"op": "subscribe", "ref": 1, "topic": "logs", "group": "g"}).decode())
        assert orjson.loads(await ws.recv())["op"] == "subscribed"
    peer = f"{host}:{port}"
    opened = await wait_for_event(broker, lambda e: e["event"] == "connection_opened" and e["peer"] == peer)
    conn_id = opened["conn_id"]
    assert re.fullmatch(r"[0-9a-f]{4}-c\d+", conn_id) and opened["path"] == "/", opened  # unique across nodes
    closed = await wait_for_event(broker, lambda e: e["event"] == "connection_closed" and e["conn_id"] == conn_id)
    assert closed["reason"] == "client closed" and closed["code"] == 1000, closed
    subscribed = [e for e in log_events(broker) if e["event"] == "subscribed"]
    assert [e["conn_id"] for e in subscribed] == [conn_id]
    for e in log_events(broker):  # the JSON-lines convention: every line has event, level, timestamp
        assert {"event", "level", "timestamp"} <= set(e), e
        assert e["level"] in ("debug", "info", "warning", "error", "critical"), e


# ---- broker stats ----------------------------------------------------------------------------------------------


async def broker_stats_json(redis_url: str) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_REDIS_URL"] = redis_url
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "stats", "--json",
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return orjson.loads(out)  # stdout holds the JSON document and nothing else


async def test_broker_stats_json_matches_the_state_made() -> None:
    with RedisServer() as redis, BrokerProcess(redis.url, env=FAST) as broker:
        async with websockets.connect(broker.url, ping_interval=None) as ws:

            async def call(frame: dict[str, Any]) -> dict[str, Any]:
                await ws.send(orjson.dumps(frame).decode())
                async with asyncio.timeout(10):
                    while True:
                        reply = orjson.loads(await ws.recv())
                        if reply.get("ref") == frame["ref"]:
                            return reply
                        held.append(reply)

            held: list[dict[str, Any]] = []  # deliveries (and anything else not answering a ref)
            # Given a consumer of stats/g holding 3 deliveries, one of which it dead-letters
            await call({"op": "subscribe", "ref": "s", "topic": "stats", "group": "g", "prefetch": 3,
                        "lease_ms": 600_000})  # fmt: skip
            for i in range(3):
                assert (await call({"op": "publish", "ref": i, "topic": "stats", "payload": i}))["op"] == "published"
            async with asyncio.timeout(10):
                while len([f for f in held if f["op"] == "message"]) < 3:
                    held.append(orjson.loads(await ws.recv()))
            first = next(f for f in held if f["op"] == "message")
            nacked = await call(
                {"op": "nack", "ref": "n", "id": first["id"], "receipt": first["receipt"], "dead": True}
            )
            assert nacked["outcome"] == "dead"
            # and then stops consuming (it keeps holding the other two)
            assert (await call({"op": "unsubscribe", "ref": "u", "topic": "stats", "group": "g"}))["removed"] == 1
            # When 4 more are published, 2 delayed for 10 minutes, and a second topic gets 1 for group default
            for i in range(4):
                await call({"op": "publish", "ref": f"r{i}", "topic": "stats", "payload": i})
            for i in range(2):
                await call({"op": "publish", "ref": f"d{i}", "topic": "stats", "payload": i, "delay_ms": 600_000})
            await call({"op": "publish", "ref": "o", "topic": "stats.other", "payload": "x"})

            # Then `broker stats --json` reports exactly that
            out = await broker_stats_json(redis.url)
            rows = out if isinstance(out, list) else out["groups"]
            keys = ("topic", "group", "ready", "leased", "delayed", "dead")
            got = sorted(tuple(r[k] for k in keys) for r in rows)
            assert got == [("stats", "g", 4, 2, 2, 1), ("stats.other", "default", 1, 0, 0, 0)], got


def test_metrics_can_be_disabled() -> None:
    # Given a broker with server.metrics_enabled = false, Then /metrics is gone and it still serves
    with RedisServer() as redis, BrokerProcess(redis.url, env={"BROKER_SERVER_METRICS_ENABLED": "false"}) as b:
        assert b.get("/metrics")[0] == 404
        assert b.get("/readyz")[0] == 200


def test_tally_histogram_exposes_what_a_prometheus_histogram_would() -> None:
    # Given a TallyHistogram and a prometheus Histogram of the same name and buckets, each in a registry of its own
    buckets = (0.001, 0.005, 0.1, 1, 60)
    ours_reg, theirs_reg = CollectorRegistry(), CollectorRegistry()
    ours = metrics.TallyHistogram("x_seconds", "doc", buckets, ours_reg)
    theirs = Histogram("x_seconds", "doc", buckets=buckets, registry=theirs_reg)
    # When both observe the same values (on a bucket bound, between bounds, beyond the last, zero)
    for v in (0.0, 0.001, 0.0011, 0.003, 0.1, 0.5, 60.0, 61.0, 1e9, 0.001):
        ours.observe(v)
        theirs.observe(v)
    # Then /metrics shows the same series with the same values
    assert generate_latest(ours_reg) == generate_latest(theirs_reg)
    assert b'x_seconds_bucket{le="0.001"} 3.0' in generate_latest(ours_reg)
