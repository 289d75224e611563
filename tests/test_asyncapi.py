"""docs/asyncapi.json describes the real WebSocket API.

Statically: it is an AsyncAPI 3.0.0 document with one channel on ``/``, a ``receive`` operation per client frame and a
``send`` operation per broker frame, one message per frame type, each message's payload a ``$ref`` into
docs/schema/client-frames.json or docs/schema/broker-frames.json (resolved relative to the document, as AsyncAPI
tools do), and its examples valid. Live: against a real broker on a real redis-server, every frame the test sends and
every frame it receives matches exactly one message of the document, of the right direction, and the whole
client-frame or broker-frame schema; frames the broker refuses as ``bad_request`` are refused by the schema too.

The schema files declare JSON Schema 2020-12 and the document declares their format as draft-07 (the JSON Schema
format every AsyncAPI tool supports): every verdict here is checked under both dialects and must agree.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urljoin

import orjson
import pytest
import websockets
from jsonschema import Draft7Validator, Draft202012Validator
from referencing import Registry, Resource

from broker.core.protocol import OPS

from .brokers import BrokerProcess
from .proxy import TcpProxy
from .support import RedisServer

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SPEC_PATH = DOCS / "asyncapi.json"
SPEC: dict[str, Any] = orjson.loads(SPEC_PATH.read_bytes())
SCHEMA_FILES = {"client": DOCS / "schema" / "client-frames.json", "broker": DOCS / "schema" / "broker-frames.json"}
SCHEMAS: dict[str, dict[str, Any]] = {side: orjson.loads(p.read_bytes()) for side, p in SCHEMA_FILES.items()}
ACTION = {"client": "receive", "broker": "send"}  # the document describes the broker

Frame = dict[str, Any]


def _registry() -> Registry:
    """Each schema file under its file URI (what a relative ``$ref`` in the document resolves to) and its ``$id``."""
    resources = []
    for side, path in SCHEMA_FILES.items():
        resource = Resource.from_contents(SCHEMAS[side])
        resources += [(path.resolve().as_uri(), resource), (SCHEMAS[side]["$id"], resource)]
    return Registry().with_resources(resources)


REGISTRY = _registry()


class Validators:
    """One schema checked in both dialects; they must agree on every instance."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.v2020 = Draft202012Validator(schema, registry=REGISTRY)
        self.v7 = Draft7Validator(schema, registry=REGISTRY)

    def ok(self, instance: Any) -> bool:
        a, b = self.v2020.is_valid(instance), self.v7.is_valid(instance)
        assert a == b, f"draft 2020-12 says {a}, draft-07 says {b} for {instance!r}"
        return a

    def errors(self, instance: Any) -> list[str]:
        return [e.message for e in self.v2020.iter_errors(instance)]


def _resolve(ref: str) -> Any:
    """An internal ``#/...`` reference of the AsyncAPI document."""
    assert ref.startswith("#/"), ref
    node: Any = SPEC
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _deref(node: dict[str, Any]) -> Any:
    return _resolve(node["$ref"]) if "$ref" in node else node


def _messages() -> dict[str, tuple[str, Validators]]:
    """Channel message name -> (action of the operation that carries it, payload validators)."""
    channel = SPEC["channels"]["broker"]
    action_of: dict[str, str] = {}
    for op_name, op in SPEC["operations"].items():
        for m in op["messages"]:
            name = m["$ref"].removeprefix("#/channels/broker/messages/")
            assert name not in action_of, f"message {name} is used by two operations ({op_name})"
            action_of[name] = op["action"]
    out = {}
    for name, ref in channel["messages"].items():
        msg = _deref(ref)
        payload = msg["payload"]
        assert payload["schemaFormat"] == "application/schema+json;version=draft-07", name
        target = urljoin(SPEC_PATH.resolve().as_uri(), payload["schema"]["$ref"])
        out[name] = (action_of[name], Validators({"$ref": target}))
    return out


MESSAGES = _messages()
WHOLE = {side: Validators(schema) for side, schema in SCHEMAS.items()}


def matches(frame: Frame) -> list[str]:
    return [name for name, (_, v) in MESSAGES.items() if v.ok(frame)]


def check_frame(frame: Frame, side: str) -> str:
    """The one message ``frame`` matches; it must be of ``side``'s direction and valid against the whole schema."""
    assert WHOLE[side].ok(frame), (frame, WHOLE[side].errors(frame))
    names = matches(frame)
    assert len(names) == 1, f"{frame!r} matches {names}, not exactly one message"
    assert MESSAGES[names[0]][0] == ACTION[side], (frame, names[0])
    return names[0]


# ---- the document ----------------------------------------------------------------------------------------------


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_document_is_asyncapi_3_with_one_channel_on_root() -> None:
    assert SPEC["asyncapi"] == "3.0.0"
    assert {"asyncapi", "info", "servers", "channels", "operations", "components"} <= set(SPEC)
    assert isinstance(SPEC["info"]["title"], str) and SPEC["info"]["title"]
    assert isinstance(SPEC["info"]["version"], str) and SPEC["info"]["version"]
    assert SPEC["defaultContentType"] == "application/json"
    server = SPEC["servers"]["local"]
    assert (server["host"], server["protocol"], server["pathname"]) == ("127.0.0.1:8765", "ws", "/")
    assert list(SPEC["channels"]) == ["broker"]
    assert SPEC["channels"]["broker"]["address"] == "/"
    for name, op in SPEC["operations"].items():
        assert op["action"] in ("send", "receive"), name
        assert op["channel"] == {"$ref": "#/channels/broker"}, name
        reply = op.get("reply")
        if reply is not None:
            assert op["action"] == "receive", name
            for m in reply["messages"]:
                assert MESSAGES[m["$ref"].rsplit("/", 1)[1]][0] == "send", (name, m)
    for ref in _refs(SPEC):
        if ref.startswith("#/"):
            _resolve(ref)  # raises KeyError when dangling
        else:
            path = (SPEC_PATH.parent / urldefrag(ref)[0]).resolve()
            assert path in {p.resolve() for p in SCHEMA_FILES.values()}, ref


def test_schema_files_are_valid_in_both_dialects() -> None:
    for schema in SCHEMAS.values():
        Draft202012Validator.check_schema(schema)
        Draft7Validator.check_schema(schema)


def test_one_message_per_frame_type() -> None:
    """The messages of each direction are exactly the frame types (the ``oneOf`` branches) of that schema file."""
    for side, schema in SCHEMAS.items():
        frame_types = {b["$ref"] for b in schema["oneOf"]}
        declared = set()
        for name, ref in SPEC["channels"]["broker"]["messages"].items():
            if MESSAGES[name][0] != ACTION[side]:
                continue
            target = _deref(ref)["payload"]["schema"]["$ref"]
            file, fragment = urldefrag(target)
            assert Path(file).name == SCHEMA_FILES[side].name, (name, target)
            declared.add(f"#{fragment}")
        assert declared == frame_types, (side, sorted(declared ^ frame_types))
    assert len(MESSAGES) == sum(len(s["oneOf"]) for s in SCHEMAS.values())


def test_examples_match_their_own_message_only() -> None:
    for name, ref in SPEC["channels"]["broker"]["messages"].items():
        examples = _deref(ref)["examples"]
        assert examples, name
        side = "client" if MESSAGES[name][0] == "receive" else "broker"
        for ex in examples:
            assert check_frame(ex["payload"], side) == name, ex


def test_protocol_md_links_the_schema_files_and_documents_every_op() -> None:
    """docs/protocol.md links both schema files (one copy of each: the files), has a section per client op and a
    table row per broker op."""
    text = (DOCS / "protocol.md").read_text()
    for side in ("client", "broker"):
        assert f"](schema/{SCHEMA_FILES[side].name})" in text, side
    assert set(SCHEMAS["client"]["properties"]["op"]["enum"]) == set(OPS)
    for op in OPS:
        assert f"### `{op}`" in text, op
    for op in SCHEMAS["broker"]["properties"]["op"]["enum"]:
        assert f"\n| `{op}` " in text, op


# ---- real frames -----------------------------------------------------------------------------------------------


class Recorder:
    """A raw WebSocket connection that keeps every frame sent and received; replies are picked by predicate, since
    answers may arrive in a different order than requests."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.sent: list[Frame] = []
        self.received: list[Frame] = []
        self._unclaimed: list[Frame] = []

    async def send(self, frame: Frame) -> None:
        self.sent.append(frame)
        await self.ws.send(orjson.dumps(frame).decode())

    async def send_invalid(self, frame: Frame) -> None:
        """A frame that is meant to be refused (not part of ``sent``)."""
        await self.ws.send(orjson.dumps(frame).decode())

    async def expect(self, pred: Callable[[Frame], bool], timeout_s: float = 10.0) -> Frame:
        for f in self._unclaimed:
            if pred(f):
                self._unclaimed.remove(f)
                return f
        async with asyncio.timeout(timeout_s):
            while True:
                f = orjson.loads(await self.ws.recv())
                self.received.append(f)
                if pred(f):
                    return f
                self._unclaimed.append(f)

    async def reply(self, ref: Any, timeout_s: float = 10.0) -> Frame:
        return await self.expect(lambda f: f.get("ref") == ref and f["op"] not in ("message", "messages"), timeout_s)

    async def delivery(self, topic: str, timeout_s: float = 10.0) -> Frame:
        return await self.expect(lambda f: f["op"] == "message" and f["topic"] == topic, timeout_s)


FAST = {"BROKER_DELIVERY_SWEEP_INTERVAL_MS": "100", "BROKER_DELIVERY_POLL_INTERVAL_MS": "100"}


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as r:
        yield r


async def test_real_frames_each_match_exactly_one_message(redis: RedisServer) -> None:
    with BrokerProcess(redis.url, env=FAST) as broker:
        async with websockets.connect(broker.url, ping_interval=None) as ws:
            c = Recorder(ws)
            # subscribe: one plain subscription, one with batch deliveries
            await c.send({"op": "subscribe", "ref": "s1", "topic": "orders", "group": "g", "prefetch": 10})
            assert (await c.reply("s1"))["op"] == "subscribed"
            await c.send({"op": "subscribe", "ref": "s2", "topics": ["bulk"], "group": "g", "batch": True})
            assert (await c.reply("s2"))["op"] == "subscribed"

            # publish, single form, then the same idempotency key again
            single = {"topic": "orders", "payload": {"n": 1}, "headers": {"h": "v"}, "key": "k1"}
            await c.send({"op": "publish", "ref": 1, **single, "idempotency_key": "i1"})
            first = await c.reply(1)
            assert first["op"] == "published" and "duplicate" not in first
            await c.send({"op": "publish", "ref": 2, **single, "idempotency_key": "i1"})
            assert (await c.reply(2)) == {"op": "published", "ref": 2, "id": first["id"], "duplicate": True}
            m1 = await c.delivery("orders")
            assert (m1["id"], m1["key"], m1["headers"]) == (first["id"], "k1", {"h": "v"})

            # publish, batch form: three for the batch subscription, one for the plain one
            batch = [{"topic": "bulk", "payload": i} for i in range(3)] + [{"topic": "orders", "payload": "two"}]
            await c.send({"op": "publish", "ref": 3, "messages": batch})
            results = (await c.reply(3))["results"]
            assert len(results) == 4 and all("id" in r for r in results)
            bulk: list[Frame] = []
            while len(bulk) < 3:
                bulk += (await c.expect(lambda f: f["op"] == "messages"))["items"]
            assert sorted(m["id"] for m in bulk) == sorted(r["id"] for r in results[:3])
            m2 = await c.delivery("orders")

            # ack with ref (single), extend with ref, nack with ref: ready (delay 0), then dead
            await c.send({"op": "ack", "ref": "a1", "id": m1["id"], "receipt": m1["receipt"]})
            assert (await c.reply("a1")) == {"op": "acked", "ref": "a1", "ids": [m1["id"]]}
            await c.send({"op": "extend", "ref": "e1", "id": m2["id"], "receipt": m2["receipt"], "lease_ms": 60_000})
            extended = await c.reply("e1")
            assert extended["op"] == "extended" and extended["lease_expires_at"] > m2["lease_expires_at"]
            await c.send({"op": "nack", "ref": "n1", "id": m2["id"], "receipt": m2["receipt"], "delay_ms": 0})
            assert (await c.reply("n1"))["outcome"] == "ready"
            again = await c.delivery("orders")
            assert again["id"] == m2["id"] and again["attempt"] == 2
            await c.send({"op": "nack", "ref": "n2", "id": again["id"], "receipt": again["receipt"], "dead": True})
            assert (await c.reply("n2"))["outcome"] == "dead"
            # nack without delay: the backoff schedules a retry
            await c.send({"op": "publish", "ref": 4, "topic": "orders", "payload": None})
            await c.reply(4)
            m3 = await c.delivery("orders")
            await c.send({"op": "nack", "ref": "n3", "id": m3["id"], "receipt": m3["receipt"], "error": "boom"})
            assert (await c.reply("n3"))["outcome"] == "retry"

            # ack, batched form, with ref
            await c.send({"op": "ack", "ref": "a2", "items": [{"id": m["id"], "receipt": m["receipt"]} for m in bulk]})
            assert sorted((await c.reply("a2"))["ids"]) == sorted(m["id"] for m in bulk)

            # pull: one delivery waiting, its status while leased, then a pull whose wait runs out
            await c.send({"op": "publish", "ref": 6, "topic": "pulls", "payload": {"p": 1}})
            pub6 = await c.reply(6)
            await c.send({"op": "pull", "ref": "pl1", "topic": "pulls", "max": 5, "wait_ms": 5_000})
            pulled = await c.reply("pl1")
            assert [m["id"] for m in pulled["items"]] == [pub6["id"]]
            await c.send({"op": "status", "ref": "st1", "topic": "pulls", "id": pub6["id"]})
            status = await c.reply("st1")
            assert [(r["group"], r["state"]) for r in status["groups"]] == [("default", "leased")]
            await c.send({"op": "ack", "ref": "a4", "id": pub6["id"], "receipt": pulled["items"][0]["receipt"]})
            assert (await c.reply("a4"))["ids"] == [pub6["id"]]
            await c.send({"op": "pull", "ref": "pl2", "topic": "pulls", "group": "default", "max": 1, "wait_ms": 100})
            assert (await c.reply("pl2"))["items"] == []

            # ping / pong, with and without ref
            await c.send({"op": "ping", "ref": "p1"})
            assert (await c.reply("p1")) == {"op": "pong", "ref": "p1"}
            await c.send({"op": "ping"})
            assert (await c.expect(lambda f: f == {"op": "pong"})) == {"op": "pong"}

            # error frames for schema-valid requests: a stale receipt, a payload over server.max_payload_bytes
            await c.send({"op": "ack", "ref": "a3", "id": m1["id"], "receipt": m1["receipt"]})
            stale = await c.reply("a3")
            assert (stale["op"], stale["code"], stale["id"]) == ("error", "stale_receipt", m1["id"])
            await c.send({"op": "publish", "ref": 5, "topic": "orders", "payload": "x" * 300_000})
            assert (await c.reply(5))["code"] == "payload_too_large"

            # frames the broker refuses as bad_request are refused by the client schema too
            invalid = [
                {"op": "nope", "ref": "bad1"},
                {"op": "publish", "ref": "bad2", "topic": "no spaces", "payload": 1},
                {"op": "publish", "ref": "bad3", "messages": []},
                {"op": "ack", "ref": "bad4", "id": m1["id"]},
                {"op": "subscribe", "ref": "bad5", "topic": "orders", "prefetch": 0},
                {"op": "extend", "ref": "bad6", "id": m1["id"], "receipt": m1["receipt"], "lease_ms": 50},
                {"op": "nack", "ref": "bad7", "id": m1["id"], "receipt": m1["receipt"], "dead": None},
                {"op": "pull", "ref": "bad8", "topic": "orders", "max": 0},
                {"op": "pull", "ref": "bad9", "topic": "orders", "max": 1, "wait_ms": -1},
                {"op": "status", "ref": "bad10", "id": m1["id"]},
            ]
            for frame in invalid:
                assert not WHOLE["client"].ok(frame), frame
                assert matches(frame) == [], frame
                await c.send_invalid(frame)
                answer = await c.reply(frame["ref"])
                assert (answer["op"], answer["code"]) == ("error", "bad_request"), (frame, answer)

            # unsubscribe
            await c.send({"op": "unsubscribe", "ref": "u1", "topic": "orders", "group": "g"})
            assert (await c.reply("u1"))["removed"] == 1
            await c.send({"op": "unsubscribe", "ref": "u2", "topics": ["bulk"], "group": "g"})
            assert (await c.reply("u2"))["removed"] == 1

        sent = {check_frame(f, "client") for f in c.sent}
        received = {check_frame(f, "broker") for f in c.received}
    assert sent == {"publish", "subscribe", "unsubscribe", "ack", "nack", "extend", "ping", "pull", "status"}
    assert received == {
        "published", "publishedBatch", "subscribed", "unsubscribed", "message", "messages",
        "acked", "nacked", "extended", "pong", "error", "pulled", "message_status",
    }  # fmt: skip


OUTAGE = {
    **FAST,
    "BROKER_BREAKERS_REDIS_RESET_TIMEOUT_S": "1",
    "BROKER_BREAKERS_REDIS_CALL_TIMEOUT_MS": "500",
    "BROKER_REDIS_SOCKET_TIMEOUT_MS": "500",
    "BROKER_REDIS_CONNECT_TIMEOUT_MS": "300",
}


async def test_paused_resumed_and_unavailable_frames_match_their_messages(redis: RedisServer) -> None:
    with TcpProxy(redis.port) as proxy, BrokerProcess(proxy.url, env=OUTAGE) as broker:
        async with websockets.connect(broker.url, ping_interval=None) as ws:
            c = Recorder(ws)
            await c.send({"op": "subscribe", "ref": "s", "topic": "outage", "group": "g"})
            assert (await c.reply("s"))["op"] == "subscribed"
            # When Redis goes away, the subscription is paused and a publish is answered unavailable
            proxy.cut()
            paused = await c.expect(lambda f: f["op"] == "paused", timeout_s=15)
            assert (paused["topic"], paused["group"]) == ("outage", "g")
            await c.send({"op": "publish", "ref": 1, "topic": "outage", "payload": 1})
            err = await c.reply(1)
            assert err["code"] == "unavailable" and err["retry_after_ms"] > 0
            # When it comes back, delivery resumes by itself
            proxy.restore()
            resumed = await c.expect(lambda f: f["op"] == "resumed", timeout_s=30)
            assert resumed == {"op": "resumed", "topic": "outage", "group": "g"}
        for f in c.sent:
            check_frame(f, "client")
        assert {check_frame(f, "broker") for f in c.received} >= {"subscribed", "paused", "error", "resumed"}
