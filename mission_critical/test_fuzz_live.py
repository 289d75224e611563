"""Hostile clients against a live broker: malformed frames must never hurt the broker or a well-behaved client.

The parser has its own property test (tests/test_protocol.py); this one goes through the whole live path: the
WebSocket library's frame limits, the session's dispatch of every op, the replies, the close codes, and a real
Redis behind it, while legitimate traffic flows.

Guarantee: whatever a client sends, the broker answers it with an `error` frame whose code is in the closed set of
docs/protocol.md (or, for a frame over server.max_frame_bytes, closes with 1009; for abuse, 1008), never with
`internal`, never crashes or logs a traceback, and a well-behaved client on other connections loses nothing.

Given a broker, a consumer (group `good`) and a publisher on their own connections, and 4 hostile connections
      each with its own fixed-seed random stream of frames: bad UTF-8 and other binary frames, random text, truncated
      JSON, huge numbers (1e400, 2**70), arrays nested 5,000 deep, unknown ops, valid ops with wrong field types or
      out-of-range values, invalid topic names, payloads and headers over their limits, acks/nacks/extends of
      leases nobody holds, a few valid edge cases (payload 2**70, nesting 200 deep), and frames over 1 MiB
When the publisher publishes 2,000 messages (each confirmed) while the consumer acks what it gets (each confirmed)
     and the hostile connections send their frames one at a time, each followed by a `ping` sentinel (so every
     reply is attributed to the frame that caused it), reconnecting after a close and every 500 frames (to stay under
     server.max_bad_frames)
Then every hostile frame got an `error` with a documented code (or the expected reply for the valid ones, or a
     1009/1008 close), none got `internal`, the broker is alive with /healthz 200, its log holds no traceback, and
     all 2,000 confirmed messages were delivered and acked once each, leaving nothing in Redis for the group.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from broker.client.client import BrokerClient, Subscription
from broker.core.errors import ERROR_CODES
from tests.brokers import BrokerProcess
from tests.support import RedisServer

SEED = 20_251_124
N_GOOD = 2_000
HOSTILE = 4
FRAMES_PER_CONN = 1_500  # 6,000 hostile frames in total
RECONNECT_EVERY = 500  # the default server.max_bad_frames is 1,000 per connection
REPLY_TIMEOUT_S = 10.0
PUBLISH_WINDOW = 8  # confirmed publishes in flight: the good traffic lasts about as long as the fuzzing
GOOD_TOPIC, GOOD_GROUP = "good", "good"
SINK = "fuzz-sink"  # where the hostile connections' valid publishes go (never consumed)
MAX_FRAME = 1_048_576  # server.max_frame_bytes
CODES = ERROR_CODES  # the documented closed set
CLOSE_CODES = {1008, 1009}
ENV = {"BROKER_DELIVERY_POLL_INTERVAL_MS": "50", "BROKER_DELIVERY_SWEEP_INTERVAL_MS": "200"}
BIG = 2**70
PUBLISH_MAY = frozenset({"rate_limited"})  # a valid publish may be refused by server.publish_rate_per_s


@dataclass
class Fuzz:
    label: str  # which generator made it (reported with any violation)
    data: str | bytes
    ref: str | int | None = None  # a valid ref the answer must echo
    valid: bool = False  # a valid edge case: answered with this reply op, not an error
    ok_op: str = ""
    oversized: bool = False  # over server.max_frame_bytes: the answer is a 1009 close
    allowed: frozenset[str] = frozenset()  # error codes a valid frame may legitimately get

    def show(self) -> str:
        text = repr(self.data[:160])
        return f"{self.label} ({len(self.data)} bytes): {text}{'...' if len(self.data) > 160 else ''}"


def _j(obj: Any) -> str:
    """JSON text; integers beyond 64 bits are written exactly (orjson cannot)."""
    try:
        return orjson.dumps(obj).decode()
    except TypeError:
        import json

        return json.dumps(obj, separators=(",", ":"))


def _random_text(rng: random.Random, n: int) -> str:
    pools = [
        "abcdefghijklmnopqrstuvwxyz0123456789",
        '{}[]":,\\ \t\n-+.eE0123456789truefalsnul',
        "éüß中文字😀🎉\u200b\u00a0\ufeff",
    ]
    out = []
    for _ in range(n):
        pool = rng.choice(pools)
        out.append(rng.choice(pool) if rng.random() < 0.9 else chr(rng.choice([rng.randint(1, 0xD7FF), 0x10FFFF])))
    return "".join(out)


def _nest(depth: int, inner: str = "", open_: str = "[", close: str = "]") -> str:
    return open_ * depth + inner + close * depth


class Generator:
    """One hostile connection's frames, from its own seeded random stream (reproducible whatever the timing)."""

    def __init__(self, conn: int) -> None:
        self.rng = random.Random(SEED + conn)
        self.conn = conn
        self.n = 0
        kinds: list[tuple[str, int]] = [
            ("bad_utf8", 6),
            ("binary", 4),
            ("random_text", 10),
            ("truncated_json", 10),
            ("huge_number", 8),
            ("deep", 5),
            ("unknown_op", 8),
            ("wrong_types", 25),
            ("bad_topic", 8),
            ("stale", 6),
            ("too_large", 3),
            ("valid_edge", 3),
        ]
        self.kinds = [k for k, _ in kinds]
        self.weights = [w for _, w in kinds]

    def ref(self) -> str:
        return f"h{self.conn}-{self.n}"

    def next(self) -> Fuzz:
        self.n += 1
        if self.n % 150 == 75:  # 10 per connection: each costs a reconnect
            return self.oversized()
        kind = self.rng.choices(self.kinds, self.weights)[0]
        fuzz: Fuzz = getattr(self, kind)()
        return fuzz

    # ---- generators ----------------------------------------------------------------------------------------

    def oversized(self) -> Fuzz:
        size = MAX_FRAME + self.rng.randint(1, 200_000)
        if self.rng.random() < 0.5:
            body = _j({"op": "publish", "ref": self.ref(), "topic": SINK, "payload": "x" * size})
            return Fuzz("oversized_text", body, oversized=True)
        return Fuzz("oversized_binary", self.rng.randbytes(size), oversized=True)

    def bad_utf8(self) -> Fuzz:
        r = self.rng
        bad = r.choice([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf", b"\x80"])
        prefix = r.choice([b"", b'{"op":"ping","ref":"', b'{"op":"publish","topic":"t","payload":"'])
        return Fuzz("bad_utf8_binary", prefix + bad + r.randbytes(r.randint(0, 40)))

    def binary(self) -> Fuzz:
        r = self.rng
        data = r.choice(
            [
                r.randbytes(r.randint(0, 300)),
                b'{"op":"ping","ref":1}',
                _j({"op": "publish", "topic": SINK, "payload": 1}).encode(),
                b"",
            ]
        )
        return Fuzz("binary", data)

    def random_text(self) -> Fuzz:
        return Fuzz("random_text", _random_text(self.rng, self.rng.randint(0, 200)))

    def truncated_json(self) -> Fuzz:
        r = self.rng
        ref = self.ref()
        whole = _j(
            r.choice(
                [
                    {"op": "publish", "ref": ref, "topic": SINK, "payload": {"a": [1, 2, {"b": "c"}]}},
                    {"op": "subscribe", "ref": ref, "topic": SINK, "group": "g", "prefetch": 5},
                    {"op": "ack", "ref": ref, "items": [{"id": "a" * 28, "receipt": "1-1"}]},
                    {"op": "ping", "ref": ref},
                ]
            )
        )
        return Fuzz("truncated_json", whole[: r.randint(0, len(whole) - 1)])

    def huge_number(self) -> Fuzz:
        r = self.rng
        ref = self.ref()
        q = f'"{ref}"'
        # (frame, whether the answer carries the ref: not when the JSON itself is refused or the ref is invalid)
        text, has_ref = r.choice(
            [
                ("1e400", False),
                ("-1e400", False),
                (f'{{"op":"ping","ref":{BIG}}}', False),
                ('{"op":"ping","ref":1e400}', False),
                (f'{{"op":"ping","ref":{q},"x":1e400}}', False),
                (f'{{"op":"publish","ref":{q},"topic":"{SINK}","payload":1e400}}', False),
                (f'{{"op":"publish","ref":{q},"topic":"{SINK}","payload":[1,-1e999]}}', False),
                (f'{{"op":"publish","ref":{q},"topic":"{SINK}","payload":{"9" * 5000}}}', False),
                (f'{{"op":"subscribe","ref":{q},"topic":"{SINK}","prefetch":{BIG}}}', True),
                (f'{{"op":"subscribe","ref":{q},"topic":"{SINK}","lease_ms":{BIG}}}', True),
                (f'{{"op":"publish","ref":{q},"topic":"{SINK}","payload":1,"delay_ms":{BIG}}}', True),
                (f'{{"op":"nack","ref":{q},"id":"x","receipt":"1-1","delay_ms":{2**64}}}', True),
                (f'{{"op":"extend","ref":{q},"id":"x","receipt":"1-1","lease_ms":{-BIG}}}', True),
                (f'{{"op":"ping","ref":{2**53 + 1}}}', False),
            ]
        )
        return Fuzz("huge_number", text, ref=ref if has_ref else None)

    def deep(self) -> Fuzz:
        r = self.rng
        ref = self.ref()
        choice = r.randrange(6)
        if choice == 0:
            return Fuzz("deep_array_5000", _nest(5000))
        if choice == 1:
            return Fuzz("deep_payload_5000", f'{{"op":"publish","topic":"{SINK}","payload":{_nest(5000)}}}')
        if choice == 2:
            deep_objects = _nest(5000, "1", '{"a":', "}")
            return Fuzz("deep_field_5000", '{"op":"ping","x":' + deep_objects + "}")
        if choice == 3:  # parses (depth <= 1024) but cannot be re-encoded (depth > 255)
            return Fuzz(
                "deep_payload_300", f'{{"op":"publish","ref":"{ref}","topic":"{SINK}","payload":{_nest(300)}}}', ref
            )
        if choice == 4:  # a huge integer forces the exact re-read, 1,000 deep
            frame = f'{{"op":"publish","ref":"{ref}","topic":"{SINK}","payload":{_nest(1000, str(BIG))}}}'
            return Fuzz("deep_huge_int_1000", frame)
        return Fuzz("deep_topics_5000", f'{{"op":"subscribe","ref":"{ref}","topics":{_nest(5000)}}}')

    def unknown_op(self) -> Fuzz:
        r = self.rng
        ref = self.ref()
        op = r.choice(
            ["PUBLISH", "publish ", "subscribe2", "", "drop", "admin", "flushall", "acked", "message", "error",
             5, True, None, [], {"op": "ping"}, "x" * 10_000, "pub\u0000lish"]
        )  # fmt: skip
        frame: dict[str, Any] = {"op": op, "ref": ref} if op is not None else {"ref": ref, "topic": SINK}
        if r.random() < 0.3:
            frame.pop("op", None)
        return Fuzz("unknown_op", _j(frame), ref=ref)

    def wrong_types(self) -> Fuzz:
        r = self.rng
        ref = self.ref()
        good = "a" * 28
        frames: list[dict[str, Any]] = [
            {"op": "publish", "topic": 5, "payload": 1},
            {"op": "publish", "topic": SINK},
            {"op": "publish", "topic": SINK, "payload": 1, "headers": ["a", "b"]},
            {"op": "publish", "topic": SINK, "payload": 1, "headers": {"a": 1}},
            {"op": "publish", "topic": SINK, "payload": 1, "headers": "x"},
            {"op": "publish", "topic": SINK, "payload": 1, "delay_ms": -1},
            {"op": "publish", "topic": SINK, "payload": 1, "delay_ms": 5.0},
            {"op": "publish", "topic": SINK, "payload": 1, "delay_ms": "5"},
            {"op": "publish", "topic": SINK, "payload": 1, "delay_ms": True},
            {"op": "publish", "topic": SINK, "payload": 1, "delay_ms": 604_800_001},
            {"op": "publish", "topic": SINK, "payload": 1, "idempotency_key": ""},
            {"op": "publish", "topic": SINK, "payload": 1, "idempotency_key": 5},
            {"op": "publish", "topic": SINK, "payload": 1, "key": "k" * 201},
            {"op": "publish", "topic": SINK, "payload": 1, "key": ["k"]},
            {"op": "publish", "messages": []},
            {"op": "publish", "messages": "x"},
            {"op": "publish", "messages": [1, 2]},
            {"op": "publish", "messages": [{"topic": SINK, "payload": 1}, {"topic": "a b", "payload": 1}]},
            {"op": "publish", "messages": [{"topic": SINK, "payload": 1}], "topic": SINK},
            {"op": "publish", "messages": [{"topic": SINK, "payload": i} for i in range(1001)]},
            {"op": "publish", "messages": [{"topic": SINK}]},
            {"op": "ack", "items": "x"},
            {"op": "ack", "items": []},
            {"op": "ack", "items": [1]},
            {"op": "ack", "items": [{"id": 5, "receipt": "1-1"}]},
            {"op": "ack", "items": [{"id": good}]},
            {"op": "ack", "id": good},
            {"op": "ack", "receipt": "1-1"},
            {"op": "ack", "id": "x" * 65, "receipt": "1-1"},
            {"op": "ack", "items": [{"id": good, "receipt": "1-1"}] * 1001},
            {"op": "nack", "id": good, "receipt": "1-1", "dead": "true"},
            {"op": "nack", "id": good, "receipt": "1-1", "error": 5},
            {"op": "nack", "id": good, "receipt": "1-1", "error": None},
            {"op": "nack", "id": good, "receipt": "1-1", "delay_ms": -5},
            {"op": "nack", "id": good},
            {"op": "extend", "id": good, "receipt": "1-1"},
            {"op": "extend", "id": good, "receipt": "1-1", "lease_ms": 99},
            {"op": "extend", "id": good, "receipt": "1-1", "lease_ms": "1000"},
            {"op": "subscribe", "topic": SINK, "prefetch": 10**9},
            {"op": "subscribe", "topic": SINK, "prefetch": 0},
            {"op": "subscribe", "topic": SINK, "prefetch": "10"},
            {"op": "subscribe", "topic": SINK, "prefetch": 1.5},
            {"op": "subscribe", "topic": SINK, "lease_ms": 50},
            {"op": "subscribe", "topic": SINK, "group": None},
            {"op": "subscribe", "topic": SINK, "group": 7},
            {"op": "subscribe", "topic": SINK, "batch": "yes"},
            {"op": "subscribe", "topics": []},
            {"op": "subscribe", "topics": "abc"},
            {"op": "subscribe", "topics": [SINK, 5]},
            {"op": "subscribe", "topics": [f"t{i}" for i in range(101)]},
            {"op": "subscribe"},
            {"op": "unsubscribe", "topics": {}},
            {"op": "unsubscribe", "topic": SINK, "group": None},
            {"op": "pull", "topic": SINK},
            {"op": "pull", "topic": SINK, "max": 0},
            {"op": "pull", "topic": SINK, "max": 1001},
            {"op": "pull", "topic": SINK, "max": "1"},
            {"op": "pull", "topic": SINK, "max": 1, "wait_ms": -1},
            {"op": "pull", "topic": SINK, "max": 1, "wait_ms": 10**9},
            {"op": "pull", "topic": SINK, "max": 1, "lease_ms": 10},
            {"op": "pull", "topic": SINK, "max": 1, "group": None},
            {"op": "pull", "topics": [SINK], "max": 1},
            {"op": "status", "topic": SINK},
            {"op": "status", "id": good},
            {"op": "status", "topic": SINK, "id": 5},
            {"op": "status", "topic": "a b", "id": good},
        ]
        frame = dict(r.choice(frames))
        if r.random() < 0.15:  # and sometimes the ref itself is wrong: the error then carries none
            frame["ref"] = r.choice([True, 1.5, [1], {"a": 1}, "r" * 129, -(2**53) - 1])
            return Fuzz("wrong_types+bad_ref", _j(frame))
        frame["ref"] = ref
        return Fuzz(f"wrong_types:{frame['op']}", _j(frame), ref=ref)

    def bad_topic(self) -> Fuzz:
        r = self.rng
        ref = self.ref()
        name = r.choice(["a b", "{x}", "x" * 500, "x" * 129, "", "-a", ".a", "a:b", "a*", "a?", "ü", "a\n", "a/b",
                         "mq:{good}:g", "a\u0000b", " ", "\t"])  # fmt: skip
        op = r.choice(["publish", "subscribe", "unsubscribe", "subscribe_group", "batch"])
        if op == "publish":
            frame: dict[str, Any] = {"op": "publish", "topic": name, "payload": 1}
        elif op == "subscribe_group":
            frame = {"op": "subscribe", "topic": SINK, "group": name}
        elif op == "batch":
            frame = {"op": "publish", "messages": [{"topic": SINK, "payload": 1}, {"topic": name, "payload": 2}]}
        else:
            frame = {"op": op, "topics": [SINK, name]}
        frame["ref"] = ref
        return Fuzz(f"bad_topic:{op}", _j(frame), ref=ref)

    def stale(self) -> Fuzz:
        """Well-formed settlements of leases this connection does not hold: stale_receipt, nothing else."""
        r = self.rng
        ref = self.ref()
        mid = "".join(r.choice("0123456789abcdef") for _ in range(28))
        rec = f"{r.randint(0, 2**40)}-{r.randint(0, 99)}"
        frame = r.choice(
            [
                {"op": "ack", "id": mid, "receipt": rec},
                {"op": "ack", "items": [{"id": mid, "receipt": rec}, {"id": mid[::-1], "receipt": "0-0"}]},
                {"op": "nack", "id": mid, "receipt": rec, "delay_ms": 0},
                {"op": "nack", "id": mid, "receipt": rec, "dead": True},
                {"op": "extend", "id": mid, "receipt": rec, "lease_ms": 1000},
            ]
        )
        if r.random() < 0.3 and frame["op"] != "extend":  # no ref: still answered (extend's answer may come late)
            return Fuzz(f"stale:{frame['op']}", _j(frame))
        return Fuzz(f"stale:{frame['op']}", _j({**frame, "ref": ref}), ref=ref)

    def too_large(self) -> Fuzz:
        r = self.rng
        ref = self.ref()
        if r.random() < 0.5:
            frame = {"op": "publish", "ref": ref, "topic": SINK, "payload": "p" * 270_000}
        else:
            frame = {"op": "publish", "ref": ref, "topic": SINK, "payload": 1, "headers": {"h": "v" * 9_000}}
        return Fuzz("too_large", _j(frame), ref=ref)

    def valid_edge(self) -> Fuzz:
        """Valid frames at the edges: they must be served, not refused."""
        r = self.rng
        ref = self.ref()
        choice = r.randrange(8)
        if choice == 6:  # a pull that does not wait, on a topic nobody publishes to: answered with no items
            frame = {"op": "pull", "ref": ref, "topic": f"quiet-{self.conn}-{r.randrange(300)}", "max": 1000}
            return Fuzz("valid:pull_quiet", _j(frame), ref, True, "pulled", allowed=frozenset({"bad_request"}))
        if choice == 7:  # any id, even one that was never a message id: answered with the rows (here none)
            frame = {"op": "status", "ref": ref, "topic": SINK, "id": _random_text(r, r.randint(1, 20))[:64] or "x"}
            return Fuzz("valid:status_unknown_id", _j(frame), ref, True, "message_status")
        if choice == 5:  # topics nobody publishes to; over server.max_subscriptions_per_connection: bad_request
            topics = [f"quiet-{self.conn}-{r.randrange(300)}" for _ in range(r.randint(1, 30))]
            frame = {"op": "subscribe", "ref": ref, "topics": topics, "group": "hostile", "prefetch": 1000}
            return Fuzz("valid:subscribe_quiet", _j(frame), ref, True, "subscribed", allowed=frozenset({"bad_request"}))
        if choice == 0:
            return Fuzz("valid:payload_2**70", _j({"op": "publish", "ref": ref, "topic": SINK, "payload": BIG}),
                        ref, True, "published", allowed=PUBLISH_MAY)  # fmt: skip
        if choice == 1:
            text = f'{{"op":"publish","ref":"{ref}","topic":"{SINK}","payload":{_nest(200, "null")}}}'
            return Fuzz("valid:payload_depth_200", text, ref, True, "published", allowed=PUBLISH_MAY)
        if choice == 2:
            frame = {"op": "publish", "ref": ref, "topic": SINK, "payload": _random_text(r, 50), "key": "ké",
                     "headers": {"ü": "😀"}, "idempotency_key": f"idem-{self.conn}-{self.n}"}  # fmt: skip
            return Fuzz("valid:unicode", _j(frame), ref, True, "published", allowed=PUBLISH_MAY)
        if choice == 3:
            return Fuzz("valid:unsubscribe_nothing", _j({"op": "unsubscribe", "ref": ref, "topic": SINK}), ref, True,
                        "unsubscribed")  # fmt: skip
        return Fuzz("valid:ping_unknown_fields", _j({"op": "ping", "ref": ref, "zzz": [1e300, {"a": None}]}), ref,
                    True, "pong")  # fmt: skip


@dataclass
class Report:
    replies: collections.Counter[str]
    frames: int = 0
    reconnects: int = 0
    violations: list[str] | None = None
    internal: list[str] | None = None


async def _hostile(url: str, conn: int, deadline: float) -> Report:
    """Send this connection's frames one at a time, each followed by a ping sentinel; attribute every reply."""
    gen = Generator(conn)
    rep = Report(collections.Counter(), violations=[], internal=[])
    assert rep.violations is not None and rep.internal is not None
    ws: websockets.ClientConnection | None = None
    sent_on_conn = 0
    by_ref: dict[str | int, Fuzz] = {}  # frames whose answer carries a ref, until it came

    def record(f: dict[str, Any], fuzz: Fuzz | None) -> None:
        op = f.get("op")
        if fuzz is None:
            rep.replies["unattributed"] += 1  # e.g. the second stale item of one ack
        if op == "error":
            code = f.get("code")
            rep.replies[f"error:{code}"] += 1
            if code not in CODES:
                rep.violations.append(f"error code {code!r} not in the documented set, for {fuzz and fuzz.show()}")
            if code == "internal":
                rep.internal.append(f"{fuzz.show() if fuzz else '?'} -> {f.get('message')}")
            if fuzz is not None and fuzz.valid and code not in fuzz.allowed:
                rep.violations.append(f"valid frame refused with {code}: {f.get('message')}: {fuzz.show()}")
        else:
            rep.replies[f"op:{op}"] += 1
            if fuzz is not None and not fuzz.valid and op != "pong":
                rep.violations.append(f"invalid frame answered with {op!r}: {fuzz.show()}")
            if fuzz is not None and fuzz.valid and op != fuzz.ok_op:
                rep.violations.append(f"valid frame answered with {op!r}, not {fuzz.ok_op!r}: {fuzz.show()}")

    for _ in range(FRAMES_PER_CONN):
        if time.monotonic() > deadline:
            rep.violations.append(f"conn {conn}: out of time after {rep.frames} frames")
            break
        if ws is None or sent_on_conn >= RECONNECT_EVERY:
            if ws is not None:
                await ws.close()
                rep.reconnects += 1
            ws = await websockets.connect(url, max_size=None, compression=None, open_timeout=10)
            sent_on_conn = 0
        fuzz = gen.next()
        rep.frames += 1
        sent_on_conn += 1
        sentinel = f"s{conn}-{gen.n}"
        answered = False
        if fuzz.ref is not None:
            by_ref[fuzz.ref] = fuzz
        try:
            await ws.send(fuzz.data)
            await ws.send(_j({"op": "ping", "ref": sentinel}))
            async with asyncio.timeout(REPLY_TIMEOUT_S):
                got_sentinel = False
                while not got_sentinel or (fuzz.ref is not None and fuzz.ref in by_ref):
                    f = orjson.loads(await ws.recv())
                    ref = f.get("ref")
                    if ref == sentinel:
                        got_sentinel = True
                        continue
                    owner = by_ref.pop(ref, None) if isinstance(ref, str | int) else None
                    if owner is None and ref is None and not got_sentinel:
                        owner = fuzz  # errors about frames whose ref could not be read come before the sentinel
                    if owner is fuzz:
                        answered = True
                    record(f, owner)
        except TimeoutError:
            rep.violations.append(f"no answer within {REPLY_TIMEOUT_S}s to {fuzz.show()}")
            await ws.close()
            ws = None
            continue
        except ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd is not None else None
            rep.replies[f"close:{code}"] += 1
            if code not in CLOSE_CODES:
                rep.violations.append(f"closed with {code} ({e}) after {fuzz.show()}")
            elif fuzz.oversized and code != 1009:
                rep.violations.append(f"oversized frame closed with {code}, not 1009")
            elif not fuzz.oversized and code == 1009:
                rep.violations.append(f"frame under the limit closed with 1009: {fuzz.show()}")
            by_ref.clear()
            ws = None
            rep.reconnects += 1
            continue
        if fuzz.oversized:
            rep.violations.append(f"oversized frame was not closed with 1009: {fuzz.show()}")
        elif not answered:
            rep.violations.append(f"no answer to {fuzz.show()}")
    if ws is not None:
        await ws.close()
    return rep


@pytest.mark.timeout(90)
async def test_fuzz_frames_against_live_broker(redis: RedisServer) -> None:
    t0 = time.monotonic()
    broker = BrokerProcess(redis.url, env=ENV).start()
    try:
        async with asyncio.timeout(75):
            reports, published, acked, timings = await _scenario(broker, t0 + 60)
        alive = broker.proc is not None and broker.proc.poll() is None
        health = broker.get("/healthz")[0]
        log = broker.log_text()
    finally:
        broker.close()
    replies: collections.Counter[str] = collections.Counter()
    violations: list[str] = []
    internal: list[str] = []
    for r in reports:
        replies.update(r.replies)
        violations += r.violations or []
        internal += r.internal or []
    frames = sum(r.frames for r in reports)
    print(f"hostile frames={frames} reconnects={sum(r.reconnects for r in reports)} timings={timings}")
    print("replies: " + ", ".join(f"{k}={v}" for k, v in sorted(replies.items())))
    for v in violations[:20]:
        print("VIOLATION", v)
    # Then the broker is alive and healthy, and never hit an unhandled case or logged a traceback
    assert alive, "the broker process died"
    assert health == 200
    assert not internal, f"{len(internal)} frames answered with internal, e.g. {internal[:5]}"
    assert '"exception"' not in log and "Traceback" not in log, "broker log holds a traceback"
    # and every hostile frame got a documented answer
    assert frames == HOSTILE * FRAMES_PER_CONN
    assert not violations, f"{len(violations)} violations, e.g. {violations[:5]}"
    assert replies["close:1009"] == HOSTILE * (FRAMES_PER_CONN // 150)
    # and the well-behaved client lost nothing: every confirmed message delivered and acked
    assert len(published) == N_GOOD
    assert acked == published
    for key in ("ready", "leased", "delayed"):
        kind = "LLEN" if key == "ready" else "ZCARD"
        assert redis.cli(kind, f"mq:{{{GOOD_TOPIC}}}:g:{GOOD_GROUP}:{key}") == "0", key
    assert redis.cli("ZCARD", f"mq:{{{GOOD_TOPIC}}}:g:{GOOD_GROUP}:dead") == "0"


async def _scenario(
    broker: BrokerProcess, deadline: float
) -> tuple[list[Report], set[str], set[str], dict[str, float]]:
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    published: set[str] = set()
    acked: set[str] = set()
    delivered: collections.Counter[str] = collections.Counter()
    async with BrokerClient(broker.url) as consumer, BrokerClient(broker.url) as publisher:
        # Given a consumer of group `good` on its own connection
        sub = await consumer.subscribe(GOOD_TOPIC, GOOD_GROUP, prefetch=100)

        async def consume(s: Subscription) -> None:
            while len(acked) < N_GOOD:
                m = await s.get()
                delivered[m.id] += 1
                await m.ack(wait=True)
                acked.add(m.id)
            timings["good_acked_s"] = round(time.monotonic() - t0, 1)

        async def publish() -> None:
            window = asyncio.Semaphore(PUBLISH_WINDOW)

            async def one(i: int) -> None:
                async with window:
                    published.add((await publisher.publish(GOOD_TOPIC, {"i": i, "pad": "g" * 100})).id)

            await asyncio.gather(*(one(i) for i in range(N_GOOD)))
            timings["good_published_s"] = round(time.monotonic() - t0, 1)

        async def hostile(k: int) -> Report:
            rep = await _hostile(broker.url, k, deadline)
            timings[f"hostile{k}_s"] = round(time.monotonic() - t0, 1)
            return rep

        # When the publisher publishes, the consumer acks, and the hostile connections fuzz, all at once
        consuming = asyncio.create_task(consume(sub))
        results = await asyncio.gather(publish(), *(hostile(k) for k in range(HOSTILE)))
        async with asyncio.timeout(max(1.0, deadline - time.monotonic())):
            await consuming
    assert set(delivered.values()) == {1}, "a good message was delivered twice"
    return list(results[1:]), published, acked, timings
