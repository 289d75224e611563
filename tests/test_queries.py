"""The ``status`` request (where one message is now, per group) on a real broker process and redis-server, with
tokens: the same rows as ``broker message ID``, and only for tokens allowed on the topic."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from broker.client.client import BrokerClient
from broker.core.errors import ForbiddenError, ProtocolError
from broker.node.auth import token_hash

from .brokers import BrokerProcess
from .support import RedisServer
from .test_asyncapi import check_frame

OPS, PUBLISHER, OUTSIDER = "ops-token", "publisher-token", "outsider-token"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    cfg: Path = tmp_path_factory.mktemp("status") / "broker.toml"
    cfg.write_text(f"""
[auth]
mode = "tokens"

[[tokens]]
name = "ops"
sha256 = "{token_hash(OPS)}"

[[tokens]]
name = "publisher"
sha256 = "{token_hash(PUBLISHER)}"
publish = ["orders"]
subscribe = []

[[tokens]]
name = "outsider"
sha256 = "{token_hash(OUTSIDER)}"
publish = ["other.*"]
subscribe = ["other.*"]
""")
    with RedisServer() as redis, BrokerProcess(redis.url, config=cfg) as b:
        yield b


@pytest.fixture
async def ops(broker: BrokerProcess) -> AsyncIterator[BrokerClient]:
    async with BrokerClient(broker.url, OPS) as c:
        yield c


async def test_status_of_ready_leased_dead_and_done(ops: BrokerClient) -> None:
    # Given one message in five groups: acked in `done`, pulled and held in `held`, dead in `dead`, nacked for a
    # retry in a minute in `retrying`, and waiting in `waiting`
    for g in ("done", "held", "dead", "retrying", "waiting"):
        assert await ops.pull("orders", g, max=1) == []  # creates the group
    msg_id = (await ops.publish("orders", {"n": 1})).id
    (a,) = await ops.pull("orders", "done", max=1, wait_ms=5_000)
    await a.ack(wait=True)
    (h,) = await ops.pull("orders", "held", max=1, wait_ms=5_000, lease_ms=60_000)
    (d,) = await ops.pull("orders", "dead", max=1, wait_ms=5_000)
    await d.nack("poison", dead=True, wait=True)
    (r,) = await ops.pull("orders", "retrying", max=1, wait_ms=5_000)
    await r.nack("timeout", delay_ms=60_000, wait=True)
    # When a client asks for its status
    rows = await ops.message_status(msg_id, "orders")
    by_group = {r["group"]: r for r in rows}
    frame = {"op": "message_status", "id": msg_id, "topic": "orders", "groups": rows}
    assert check_frame(frame, "broker") == "message_status"  # every row as docs/schema/broker-frames.json says
    # Then each group's row says where it is, with the details of that state
    assert [r["group"] for r in rows] == sorted(by_group) and all(r["topic"] == "orders" for r in rows)
    assert by_group["done"]["state"] == "done"
    assert by_group["waiting"]["state"] == "ready" and by_group["waiting"]["position"] == 0
    assert by_group["waiting"]["attempts"] == 0
    held = by_group["held"]
    assert held["state"] == "leased" and held["attempts"] == 1 and held["until"] == h.lease_expires_at
    assert isinstance(held["consumer"], str) and isinstance(held["node"], str)
    retrying = by_group["retrying"]
    assert retrying["state"] == "retry_wait" and retrying["last_error"] == "timeout"
    assert retrying["due"] >= r.published_at + 60_000 and retrying["attempts"] == 1
    dead = by_group["dead"]
    assert dead["state"] == "dead" and dead["reason"] == "rejected" and dead["attempts"] == 1
    assert dead["ttl_s"] > 600_000 and dead["died_at"] >= d.published_at
    # And once the other groups acked it, they show `done` while the retrying group still needs the message
    await h.ack(wait=True)
    (w,) = await ops.pull("orders", "waiting", max=1, wait_ms=5_000)
    await w.ack(wait=True)
    after = {row["group"]: row["state"] for row in await ops.message_status(msg_id, "orders")}
    assert after == {"dead": "dead", "done": "done", "held": "done", "retrying": "retry_wait", "waiting": "done"}


async def test_unknown_message_has_no_rows(ops: BrokerClient) -> None:
    await ops.publish("orders", 1)
    assert await ops.message_status("0" * 28, "orders") == []
    assert await ops.message_status("0" * 28, "never-used") == []


async def test_status_needs_rights_on_the_topic(broker: BrokerProcess, ops: BrokerClient) -> None:
    msg_id = (await ops.publish("orders", "secret")).id
    # Given a token with no rights on `orders`, When it asks, Then forbidden (and nothing about the message leaks)
    async with BrokerClient(broker.url, OUTSIDER) as outsider:
        with pytest.raises(ForbiddenError, match="may not read message status of topic 'orders'"):
            await outsider.message_status(msg_id, "orders")
        # And it may look at its own topics
        assert await outsider.message_status(msg_id, "other.x") == []
    # Given a token that may only publish to `orders`, Then it may ask (a publisher tracking what it sent)
    async with BrokerClient(broker.url, PUBLISHER) as publisher:
        rows = await publisher.message_status(msg_id, "orders")
        assert {r["state"] for r in rows} >= {"ready"}
        with pytest.raises(ProtocolError):  # the topic is required
            await publisher.request({"op": "status", "id": msg_id})
