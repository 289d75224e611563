"""Issue 15, the web console's parts that need no broker process: the gate in front of ``/console`` (who may call
what), the rates of its live view, and the cost of one refresh in Redis round trips.

Given 200 topics of 3 groups, when the console's overview is computed, then it takes the same few Redis round trips
as for 2 topics (pipelines, never a call per group): one refresh's server time cannot grow with a round trip per
group. Given requests from a token without admin, a token in the URL, a foreign origin on a POST, a caller on
another machine in open mode, a Host naming another machine, then the gate refuses each and says why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
from redis.asyncio.client import Pipeline, Redis

from broker.console.api import Console
from broker.console.live import Rates, totals
from broker.core.config import AuthSettings, TokenSettings
from broker.core.errors import BrokerError
from broker.core.model import NackItem, PublishRequest
from broker.node.auth import ANONYMOUS, Authenticator, Principal, Refusal, token_hash
from broker.node.console_gate import ConsoleContext, ConsoleRequest, Gate
from broker.ops.stats import Stats
from broker.store import RedisStore
from broker.store.pipe import ScriptPipe
from broker.store.pipe_wire import Replies

from .conftest import StoreFactory

ADMIN, APP = "admin-t", "app-t"
TOKENS = (
    TokenSettings(name="ops", sha256=token_hash(ADMIN), admin=True),
    TokenSettings(name="app", sha256=token_hash(APP)),
)


def gate(mode: str = "tokens", origins: tuple[str, ...] = ()) -> Gate:
    return Gate(Authenticator(AuthSettings(mode=mode, allowed_origins=origins), TOKENS), mode == "open")


def admit(g: Gate, method: str, target: str, peer: str = "127.0.0.1", **headers: str) -> ConsoleRequest | Refusal:
    h = {"host": "127.0.0.1:8765", **{k.lower(): v for k, v in headers.items()}}
    return g.admit(method, target, h, peer)


def status(v: ConsoleRequest | Refusal) -> int:
    return v.status if isinstance(v, Refusal) else 200


def test_the_gate_lets_admin_tokens_in_and_refuses_the_rest() -> None:
    g = gate(origins=("https://ops.example.com",))
    bearer = {"authorization": f"Bearer {ADMIN}"}
    ok = admit(g, "GET", "/console/api/overview?x=1", **bearer)
    assert isinstance(ok, ConsoleRequest) and ok.principal.name == "ops" and ok.query == {"x": "1"}
    assert not ok.local_dev
    assert status(admit(g, "GET", "/console/api/overview")) == 401
    assert status(admit(g, "GET", "/console/api/overview", authorization=f"Bearer {APP}")) == 403
    assert status(admit(g, "GET", f"/console/api/overview?token={ADMIN}")) == 400
    assert status(admit(g, "GET", "/console/api/overview", origin="https://evil.example", **bearer)) == 403
    assert status(admit(g, "GET", "/console/api/overview", origin="https://ops.example.com", **bearer)) == 200
    assert status(admit(g, "DELETE", "/console/api/overview", **bearer)) == 405
    # the page files are public code (GET only)
    page = admit(g, "GET", "/console/")
    assert isinstance(page, ConsoleRequest) and page.principal is ANONYMOUS
    assert status(admit(g, "POST", "/console/")) == 405


def test_a_post_must_come_from_this_broker_or_an_allowed_origin() -> None:
    bearer = {"authorization": f"Bearer {ADMIN}"}
    target = "/console/api/dlq/purge?all=1&confirm=purge&expect=1"
    for g in (gate(), gate(origins=("https://ops.example.com",))):
        assert status(admit(g, "POST", target, origin="http://127.0.0.1:8765", **bearer)) == 200  # its own page
        assert status(admit(g, "POST", target, **bearer)) == 200  # no browser (curl, scripts)
        assert status(admit(g, "POST", target, origin="http://127.0.0.1:9999", **bearer)) == 403
        assert status(admit(g, "POST", target, origin="null", **bearer)) == 403
    assert status(admit(gate(origins=("https://ops.example.com",)), "POST", target,
                        origin="https://ops.example.com", **bearer)) == 200  # fmt: skip
    # without an origin list, a GET from anywhere is answered (reads are refused to pages elsewhere by CORS)
    assert status(admit(gate(), "GET", "/console/api/overview", origin="https://x.example", **bearer)) == 200


def test_open_mode_serves_this_machine_only() -> None:
    g = gate(mode="open")
    ok = admit(g, "GET", "/console/api/overview")
    assert isinstance(ok, ConsoleRequest) and ok.local_dev and ok.principal is ANONYMOUS
    assert status(admit(g, "GET", "/console/api/overview", peer="::1", host="[::1]:8765")) == 200
    assert status(admit(g, "GET", "/console/api/overview", host="localhost:8765")) == 200
    assert status(admit(g, "GET", "/console/api/overview", peer="10.0.0.7")) == 403
    assert status(admit(g, "GET", "/console/api/overview", host="rebound.example:8765")) == 403


def _stats(published: int, acked: int) -> Stats:
    rows = [{"topic": "t", "group": g, "published": published, "delivered": 0, "acked": acked, "nacked": 0}
            for g in ("a", "b")]  # fmt: skip
    return Stats(rows, [], [])


def test_rates_compare_with_a_snapshot_at_least_a_second_old() -> None:
    now = [100.0]
    r = Rates(clock=lambda: now[0], wall=lambda: 1e9 + now[0])
    first = _stats(10, 0)
    r.apply(first)
    assert first.groups[0]["published_per_s"] is None and not r.points
    now[0] += 0.2  # a refresh soon after: compared with the first one (0.2 s), no new snapshot, no chart point
    s = _stats(12, 2)
    r.apply(s)
    assert s.groups[0]["published_per_s"] == 10.0 and len(r.snapshots) == 1 and not r.points
    now[0] += 1.8  # two seconds after the first: a point for the chart, totals counted once per topic
    s = _stats(30, 10)
    r.apply(s)
    assert s.groups[0]["published_per_s"] == 10.0 and s.groups[1]["acked_per_s"] == 5.0
    assert list(r.points) == [{"t": 1e9 + 102.0, "published_per_s": 10.0, "acked_per_s": 10.0}]
    assert totals(s.groups) == (10.0, 10.0)


class RoundTrips:
    """Counts what reaches Redis: a command alone, or one pipeline (however many commands it carries)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        command, pipeline = Redis.execute_command, Pipeline.execute

        async def counted_command(r: Redis, *args: Any, **kw: Any) -> Any:
            self.count += 1
            return await command(r, *args, **kw)

        async def counted_pipeline(p: Pipeline, *args: Any, **kw: Any) -> Any:
            self.count += 1
            return await pipeline(p, *args, **kw)

        monkeypatch.setattr(Redis, "execute_command", counted_command)
        monkeypatch.setattr(Pipeline, "execute", counted_pipeline)
        # script calls go through the store's pipe (broker/store/pipe.py): one write and its replies per _send on
        # its writer task's path...
        send = ScriptPipe._send

        async def counted_send(conn: Any, cmds: list[tuple[Any, ...]]) -> list[Any]:
            self.count += 1
            return await send(conn, cmds)

        monkeypatch.setattr(ScriptPipe, "_send", staticmethod(counted_send))
        # ... or, on its protocol path (after its first batch), one write per round trip (broker/store/pipe_wire.py)
        write = Replies.write

        def counted_write(proto: Replies, data: bytes) -> None:
            self.count += 1
            write(proto, data)

        monkeypatch.setattr(Replies, "write", counted_write)

    async def of(self, fn: Callable[[], Any]) -> int:
        before = self.count
        await fn()
        return self.count - before


async def _groups(store: RedisStore, topics: int, groups: int) -> None:
    for t in range(topics):
        for g in range(groups):
            await store.ensure_group(f"topic{t:03}", f"g{g}")


@pytest.mark.parametrize("backend", ["real"], indirect=True)
async def test_one_refresh_takes_the_same_few_round_trips_for_200_topics_as_for_2(
    store_factory: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await store_factory()
    console = Console(ConsoleContext(store, "n1", lambda: (True, []), "tokens"))
    who = Principal("ops", ("*",), ("*",), admin=True)
    req = ConsoleRequest("GET", "/console/api/overview", {}, who, False)

    async def refresh() -> dict[str, Any]:
        answer = await console(req)
        assert answer.status == 200
        return dict(orjson.loads(answer.body))

    await _groups(store, 2, 3)
    await refresh()  # (the first one loads the script: NOSCRIPT, SCRIPT LOAD, the call again)
    trips = RoundTrips(monkeypatch)
    small = await trips.of(refresh)
    await _groups(store, 200, 3)
    big = await trips.of(refresh)
    assert len((await refresh())["groups"]) == 600
    assert small == big == 4, (small, big)  # the topics, their groups' stats (one pipeline), the nodes (2)


async def test_group_stats_equal_the_per_command_reads_and_skip_an_unreadable_topic(
    store_factory: StoreFactory,
) -> None:
    # Given two topics with groups in every state, a topic without groups, and one whose group set is damaged
    store = await store_factory()
    for t, g in (("orders", "billing"), ("orders", "audit"), ("mail", "default")):
        await store.ensure_group(t, g)
    await store.publish_many([PublishRequest("orders", "1"), PublishRequest("orders", "2"),
                              PublishRequest("orders", "3", delay_ms=60_000), PublishRequest("mail", "4")])  # fmt: skip
    (d,) = await store.claim("orders", "billing", 1, 30_000, "c1")
    await store.nack_many("orders", "billing", [(NackItem(d.id, d.receipt, "bad", dead=True), 1, "c1")])
    await store.claim("orders", "audit", 1, 30_000, "c2")
    await store.topology.register_topics(["broken", "empty"])
    await store.redis.set(store.keys("broken").groups, "not a set")
    # When read with one script call per topic
    broken: list[str] = []
    got = await store.group_stats(["broken", "empty", "mail", "orders"], broken)
    # Then every group is there, equal to what the per-command reads give, and the damaged topic is named
    pairs = [(x.topic, x.group) for x, _ in got]
    assert pairs == [("mail", "default"), ("orders", "audit"), ("orders", "billing")]
    assert [x for x, _ in got] == await store.depths(pairs)
    assert [at for _, at in got] == await store.oldest_ready(pairs)
    assert [(x.ready, x.leased, x.delayed, x.dead) for x, _ in got] == [(1, 0, 0, 0), (1, 1, 1, 0), (1, 0, 1, 1)]
    assert len(broken) == 1 and broken[0].startswith("broken: ")
    with pytest.raises(BrokerError):  # without `broken`, a damaged topic fails the call (as all_pairs does)
        await store.group_stats(["broken", "orders"])
