"""Issue 15, the web console's JSON API at ``/console/api`` (docs/console.md), over HTTP against a real broker
process and redis-server, with dead letters made by a real consumer.

Given a broker with an admin token, a token without admin and an allowed browser origin: the page files are public,
the API answers the admin token only (401 without a token, 403 for the other, 400 for a token in the URL); the
console's answers are the CLI's (the same library): its dead-letter list and export name the same letters as ``broker
dlq list/export``, its depths are ``broker stats``'; reprocess and purge change nothing unless confirmed with the verb
and the count the preview gave, refuse a foreign origin, and when confirmed do what the CLI would (a reprocessed
dead letter is delivered again). In open mode the console serves this machine only.

Given/When/Then comments; every wait is bounded, no assertion on time.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from broker.client.client import BrokerClient

from .brokers import BrokerProcess
from .console_support import ADMIN, ALLOWED, APP, FAST, call, console_broker, console_config, reject, wait_job
from .support import Cli, RedisServer


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerProcess, RedisServer]]:
    with console_broker(tmp_path_factory.mktemp("console")) as pair:
        yield pair


@pytest.fixture
def broker(served: tuple[BrokerProcess, RedisServer]) -> BrokerProcess:
    served[1].cli("FLUSHALL")
    return served[0]


@pytest.fixture
def cli(served: tuple[BrokerProcess, RedisServer]) -> Cli:
    return Cli(served[1])


def dead_count(redis: RedisServer, topic: str, group: str) -> int:
    return int(redis.cli("ZCARD", f"mq:{{{topic}}}:g:{group}:dead"))


async def three_dead(broker: BrokerProcess) -> dict[str, str]:
    """Two orders/billing dead of a timeout, one orders/billing of a validation error; ids by name."""
    async with BrokerClient(broker.url, ADMIN) as c:
        sub = await c.subscribe("orders", group="billing")
        return {
            "t1": await reject(c, sub, "orders", {"n": 1}, "timeout talking to the bank"),
            "t2": await reject(c, sub, "orders", {"n": 2}, "Timeout again"),
            "v": await reject(c, sub, "orders", {"n": 3}, "validation failed: no amount"),
        }


def test_the_page_files_are_public_code_with_a_strict_policy(broker: BrokerProcess) -> None:
    # When a browser opens /console, Then it is sent to /console/ (relative links), which is the page
    status, body = broker.get("/console/")
    assert status == 200 and b'<script type="module" src="console.js">' in body
    for name in ("console.js", "chart.js", "console.css"):
        assert broker.get(f"/console/{name}")[0] == 200, name
    # And nothing else is served from there, whatever the path
    for target in ("/console/nope.js", "/console/../pyproject.toml", "/console/static/console.js", "/console//etc"):
        assert broker.get(target)[0] == 404, target
    with urllib.request.urlopen(f"{broker.http}/console", timeout=5) as r:  # follows the redirect
        assert r.url == f"{broker.http}/console/"
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
        assert r.headers["X-Frame-Options"] == "DENY"


def test_only_an_admin_token_in_the_header_may_use_the_api(broker: BrokerProcess) -> None:
    # Given no token, a token without admin, a token in the URL, a wrong origin
    assert call(broker, "overview")[0] == 401
    status, body = call(broker, "overview", APP)
    assert status == 403 and "admin" in body["message"]
    status, body = call(broker, "overview", query={"token": ADMIN})
    assert status == 400 and "Authorization header" in body["message"]
    assert call(broker, "overview", ADMIN, headers={"Origin": "https://elsewhere.example"})[0] == 403
    # Then each is refused, logged without the token; the admin token gets the overview
    status, body = call(broker, "overview", ADMIN, headers={"Origin": ALLOWED})
    assert status == 200 and body["principal"] == "ops" and body["local_dev"] is False
    assert ADMIN not in broker.log_text()
    assert "console_refused" in broker.log_text()


async def test_the_overview_shows_what_broker_stats_shows(broker: BrokerProcess, cli: Cli) -> None:
    # Given 5 messages on orders for two groups, one consumer holding one of billing's
    async with BrokerClient(broker.url, ADMIN) as c:
        billing = await c.subscribe("orders", group="billing", prefetch=1)
        for i in range(5):
            await c.publish("orders", {"i": i})
        await billing.get(timeout=10)
        # When the console and `broker stats --json` are asked (polled until the claim and the node show)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status, o = call(broker, "overview", ADMIN)
            assert status == 200, o
            rows = {(g["topic"], g["group"]): g for g in o["groups"]}
            if rows.get(("orders", "billing"), {}).get("leased") == 1 and o["nodes"]:  # (a heartbeat after FLUSHALL)
                break
            await asyncio.sleep(0.05)
        stats = await cli.json("stats", "--json")
    # Then they agree on every depth, and the console adds this node's readiness and the nodes' breakers
    by_cli = {(g["topic"], g["group"]): g for g in stats}
    for key in ("ready", "leased", "delayed", "dead"):
        assert rows[("orders", "billing")][key] == by_cli[("orders", "billing")][key], key
    assert rows[("orders", "billing")]["ready"] == 4
    assert o["readyz"] == {"ready": True, "reasons": []}
    assert o["nodes"] and o["nodes"][0]["breakers"]["redis"] == "closed"
    assert o["server_ms"] > 0


async def test_dead_letters_filter_show_and_export_as_the_cli_does(broker: BrokerProcess, cli: Cli) -> None:
    ids = await three_dead(broker)
    # When filtered by error text (case-insensitive), topic, group and age
    status, body = call(broker, "dlq", ADMIN, error="timeout")
    assert status == 200 and {d["id"] for d in body["letters"]} == {ids["t1"], ids["t2"]}
    status, body = call(broker, "dlq", ADMIN, topic="orders", group="billing")
    assert {d["id"] for d in body["letters"]} == set(ids.values())
    assert call(broker, "dlq", ADMIN, topic="mail")[1]["letters"] == []
    assert call(broker, "dlq", ADMIN, group="audit")[1]["letters"] == []
    assert len(call(broker, "dlq", ADMIN, newer_than="1h")[1]["letters"]) == 3
    assert call(broker, "dlq", ADMIN, older_than="1h")[1]["letters"] == []
    status, body = call(broker, "dlq", ADMIN, limit=2)
    assert len(body["letters"]) == 2 and body["more"] is True
    assert call(broker, "dlq", ADMIN, older_than="soon")[0] == 400
    # Then the list is the CLI's
    by_cli = await cli.json("dlq", "list", "--error", "timeout", "--json")
    assert {d["id"] for d in by_cli} == {ids["t1"], ids["t2"]}
    # And one entry shows its whole history
    status, body = call(broker, "dlq/show", ADMIN, id=ids["v"])
    (letter,) = body["letters"]
    assert letter["payload"] == {"n": 3} and letter["errors"][-1]["error"] == "validation failed: no amount"
    assert call(broker, "dlq/show", ADMIN, id="nope")[0] == 404
    # And the export is `broker dlq export`'s file
    status, exported = call(broker, "dlq/export", ADMIN, error="timeout")
    out = Path(broker.log_path).with_suffix(".jsonl")
    await cli.json("dlq", "list", "--json")  # (a read between: the export is not consumed by it)
    p = await cli("dlq", "export", "--error", "timeout", "--out", str(out))
    assert p.returncode == 0, p.stderr
    mine = [orjson.loads(line) for line in exported.splitlines()]
    theirs = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    out.unlink()
    assert [d["id"] for d in mine] == [d["id"] for d in theirs] and len(mine) == 2
    assert [d["errors"] for d in mine] == [d["errors"] for d in theirs]


async def test_reprocess_by_filter_needs_the_previewed_count_and_then_delivers(
    broker: BrokerProcess, served: tuple[BrokerProcess, RedisServer]
) -> None:
    redis = served[1]
    ids = await three_dead(broker)
    before = redis.cli("ZRANGE", "mq:{orders}:g:billing:dead", "0", "-1")
    # Given the preview of the timeouts
    status, preview = call(broker, "dlq/preview", ADMIN, error="timeout")
    assert status == 200 and preview["count"] == 2 and preview["groups"] == {"orders/billing": 2}
    # When the reprocess is not confirmed, confirmed with another count, sent as GET, from a foreign origin, or
    # with no filter at all
    sel = {"error": "timeout"}
    assert call(broker, "dlq/reprocess", ADMIN, "POST", **sel)[0] == 400
    assert call(broker, "dlq/reprocess", ADMIN, "POST", confirm="purge", expect=2, **sel)[0] == 400
    assert call(broker, "dlq/reprocess", ADMIN, "POST", confirm="reprocess", expect=3, **sel)[0] == 409
    assert call(broker, "dlq/reprocess", ADMIN, "GET", confirm="reprocess", expect=2, **sel)[0] == 404
    foreign = {"Origin": "https://elsewhere.example"}
    assert call(broker, "dlq/reprocess", ADMIN, "POST", foreign, confirm="reprocess", expect=2, **sel)[0] == 403
    assert call(broker, "dlq/reprocess", APP, "POST", confirm="reprocess", expect=2, **sel)[0] == 403
    assert call(broker, "dlq/reprocess", ADMIN, "POST", confirm="reprocess", expect=3)[0] == 400
    # Then nothing changed
    assert redis.cli("ZRANGE", "mq:{orders}:g:billing:dead", "0", "-1") == before
    # When it is confirmed (from the broker's own origin, at a rate)
    own = {"Origin": broker.http}
    status, job = call(broker, "dlq/reprocess", ADMIN, "POST", own, confirm="reprocess", expect=2, rate=100, **sel)
    assert status == 202, job
    job = wait_job(broker, ADMIN, job["id"])
    # Then both moved, the validation one stays dead, and a consumer gets exactly the two again
    assert (job["state"], job["moved"], job["missing"], job["principal"]) == ("done", 2, [], "ops")
    assert dead_count(redis, "orders", "billing") == 1
    async with BrokerClient(broker.url, ADMIN) as c:
        sub = await c.subscribe("orders", group="billing")
        got = {(await sub.get(timeout=10)).id for _ in range(2)}
        assert got == {ids["t1"], ids["t2"]}
        with pytest.raises(TimeoutError):
            await sub.get(timeout=0.3)
    assert "console_job_done" in broker.log_text()


async def test_purge_of_selected_ids_asks_for_the_verb_and_reports_what_was_gone(
    broker: BrokerProcess, served: tuple[BrokerProcess, RedisServer]
) -> None:
    redis = served[1]
    ids = await three_dead(broker)
    chosen = f"{ids['t1']},{ids['v']},no-such-id"
    status, preview = call(broker, "dlq/preview", ADMIN, ids=chosen)
    assert (preview["count"], preview["unknown"]) == (2, ["no-such-id"])
    # When the purge is confirmed as a reprocess, Then nothing is deleted
    assert call(broker, "dlq/purge", ADMIN, "POST", ids=chosen, confirm="reprocess", expect=2)[0] == 400
    assert dead_count(redis, "orders", "billing") == 3
    # When confirmed as a purge, Then exactly the two named ones are gone and the unknown id is reported
    status, job = call(broker, "dlq/purge", ADMIN, "POST", ids=chosen, confirm="purge", expect=2)
    assert status == 202
    job = wait_job(broker, ADMIN, job["id"])
    assert (job["state"], job["moved"], job["unknown"]) == ("done", 2, ["no-such-id"])
    assert redis.cli("ZRANGE", "mq:{orders}:g:billing:dead", "0", "-1") == ids["t2"]
    assert redis.cli("EXISTS", f"mq:{{orders}}:g:billing:dead:{ids['t1']}") == "0"
    # And a second purge of the same selection finds nothing to do
    status, body = call(broker, "dlq/purge", ADMIN, "POST", ids=chosen, confirm="purge", expect=0)
    assert status == 404, body


async def test_message_lookup_gives_the_rows_of_broker_message(broker: BrokerProcess, cli: Cli) -> None:
    ids = await three_dead(broker)
    status, body = call(broker, "message", ADMIN, id=ids["v"])
    assert status == 200
    assert [(r["topic"], r["group"], r["state"]) for r in body["rows"]] == [("orders", "billing", "dead")]
    assert body["columns"][:3] == ["topic", "group", "state"]
    drop_ttl = lambda rows: [{k: v for k, v in r.items() if k != "ttl_s"} for r in rows]  # noqa: E731 (ticks down)
    assert drop_ttl(body["rows"]) == drop_ttl(await cli.json("message", ids["v"], "--json"))
    assert call(broker, "message", ADMIN, id="01nothing")[1]["rows"] == []
    assert call(broker, "message", ADMIN)[0] == 400


def test_in_open_mode_the_console_serves_this_machine_only(redis: RedisServer) -> None:
    with BrokerProcess(redis.url, env={"BROKER_AUTH_MODE": "open"}) as b:
        # Given no token at all: from this machine the console works and says it is local development
        status, body = call(b, "overview")
        assert status == 200 and body["local_dev"] is True and body["auth_mode"] == "open"
        # When a page names another host (DNS rebinding to 127.0.0.1), Then it is refused
        status, body = call(b, "overview", headers={"Host": "attacker.example"})
        assert status == 403 and "this machine" in body["message"]


def test_with_redis_down_the_console_answers_unavailable_and_says_so(tmp_path: Path) -> None:
    cfg = console_config(tmp_path / "broker.toml")
    with RedisServer() as redis, BrokerProcess(redis.url, env=FAST, config=cfg) as b:
        assert call(b, "overview", ADMIN)[0] == 200
        # When Redis goes away, Then each call is a 503 naming the outage (the page shows it), and the log has it
        redis.stop()
        for path in ("overview", "dlq"):
            status, body = call(b, path, ADMIN)
            assert status == 503 and body["error"] == "unavailable", body
        assert "console_call_failed" in b.log_text()
