"""parse_frame and the reply builders: every op, every error path, and a fuzz test (pure: no I/O)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from broker.core import errors, protocol
from broker.core.errors import ERROR_CODES, BrokerError, PayloadTooLargeError, ProtocolError
from broker.core.model import Delivery
from broker.core.protocol import (
    MAX_BATCH_ITEMS,
    MAX_ERROR_TEXT,
    MAX_TOPICS_PER_SUBSCRIBE,
    OPS,
    Ack,
    AckRef,
    Extend,
    Limits,
    Nack,
    Ping,
    Publish,
    Pull,
    Status,
    Subscribe,
    Unsubscribe,
    parse_frame,
)

LIMITS = Limits()
REQUEST_TYPES = (Publish, Subscribe, Unsubscribe, Ack, Nack, Extend, Ping, Pull, Status)


def parse(obj: Any, limits: Limits = LIMITS) -> protocol.Request:
    return parse_frame(json.dumps(obj), limits)


def refused(obj: Any, match: str | None = None, cls: type[ProtocolError] = ProtocolError) -> ProtocolError:
    text = obj if isinstance(obj, str | bytes | bytearray | memoryview) else json.dumps(obj)
    with pytest.raises(cls, match=match) as ei:
        parse_frame(text, LIMITS)
    assert ei.value.code in ERROR_CODES
    return ei.value


# ---- each op, valid ------------------------------------------------------------------------------------------------


def test_publish_minimal() -> None:
    # Given the smallest publish, When parsed, Then defaults fill the rest and the payload is JSON text
    assert parse({"op": "publish", "topic": "orders", "payload": {"a": 1}}) == Publish(
        None, "orders", '{"a":1}', "{}", None, 0, None
    )


def test_publish_full() -> None:
    got = parse(
        {
            "op": "publish",
            "ref": "r-1",
            "topic": "orders.eu_1-x",
            "payload": [1, "two", None, True, 2.5],
            "headers": {"trace": "abc", "n": "1"},
            "idempotency_key": "order-42",
            "delay_ms": 1500,
            "key": "customer-7",
            "max_attempts": 3,
            "backoff_base_ms": 250,
        }
    )
    assert got == Publish(
        "r-1",
        "orders.eu_1-x",
        '[1,"two",null,true,2.5]',
        '{"trace":"abc","n":"1"}',
        "order-42",
        1500,
        "customer-7",
        3,
        250,
    )
    # And the request the store gets carries the message's own retry policy
    assert (got.to_request().max_attempts, got.to_request().backoff_base_ms, got.to_request().key) == (
        3,
        250,
        "customer-7",
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_attempts", 0),
        ("max_attempts", LIMITS.max_attempts_limit + 1),
        ("max_attempts", "3"),
        ("backoff_base_ms", LIMITS.backoff_base_min_ms - 1),
        ("backoff_base_ms", LIMITS.backoff_base_max_ms + 1),
        ("backoff_base_ms", 1.5),
        ("key", ""),
        ("key", "k" * 201),
    ],
)
def test_publish_policy_and_key_out_of_bounds_is_bad_request(field: str, value: object) -> None:
    with pytest.raises(ProtocolError) as e:
        parse({"op": "publish", "ref": 9, "topic": "t", "payload": 1, field: value})
    assert e.value.code == "bad_request" and f"'{field}'" in e.value.message and e.value.ref == 9


@pytest.mark.parametrize("payload", [None, 0, -1.5, "text", [], {}, True])
def test_publish_accepts_any_json_payload(payload: Any) -> None:
    got = parse({"op": "publish", "topic": "t", "payload": payload})
    assert isinstance(got, Publish) and json.loads(got.payload) == payload


def test_publish_keeps_integers_beyond_64_bits_exact() -> None:
    # Given a payload with integers that do not fit in 64 bits (a double would round them)
    frame = '{"op":"publish","topic":"t","payload":{"big":123456789012345678901234567890,"neg":-9223372036854775809}}'
    # When parsed, Then the payload JSON text keeps every digit
    got = parse_frame(frame, LIMITS)
    assert isinstance(got, Publish)
    assert got.payload == '{"big":123456789012345678901234567890,"neg":-9223372036854775809}'
    # And ordinary 64-bit integers and floats are unaffected
    got = parse_frame('{"op":"publish","topic":"t","payload":[18446744073709551615,-9223372036854775808,0.1]}', LIMITS)
    assert isinstance(got, Publish) and got.payload == "[18446744073709551615,-9223372036854775808,0.1]"


def test_publish_keeps_unicode() -> None:
    got = parse({"op": "publish", "topic": "t", "payload": "h\u00e9 \U0001f30d \u2028"})
    assert isinstance(got, Publish) and json.loads(got.payload) == "h\u00e9 \U0001f30d \u2028"


def test_subscribe_single_topic_defaults() -> None:
    assert parse({"op": "subscribe", "topic": "orders"}) == Subscribe(None, ("orders",), "default", None, None)


def test_subscribe_many_topics_deduplicated_in_order() -> None:
    got = parse(
        {"op": "subscribe", "ref": 7, "topics": ["b", "a", "b"], "group": "billing", "prefetch": 50, "lease_ms": 5000}
    )
    assert got == Subscribe(7, ("b", "a"), "billing", 50, 5000)


def test_unsubscribe() -> None:
    assert parse({"op": "unsubscribe", "topic": "t"}) == Unsubscribe(None, ("t",), "default")
    assert parse({"op": "unsubscribe", "topics": ["t", "u"], "group": "g"}) == Unsubscribe(None, ("t", "u"), "g")


def test_ack_single_and_batch() -> None:
    assert parse({"op": "ack", "id": "m1", "receipt": "r1"}) == Ack(None, (AckRef("m1", "r1"),))
    got = parse({"op": "ack", "ref": "x", "items": [{"id": "a", "receipt": "1"}, {"id": "b", "receipt": "2"}]})
    assert got == Ack("x", (AckRef("a", "1"), AckRef("b", "2")))


def test_nack_minimal_and_full() -> None:
    assert parse({"op": "nack", "id": "m", "receipt": "r"}) == Nack(None, "m", "r", "", None, False)
    got = parse({"op": "nack", "ref": 1, "id": "m", "receipt": "r", "error": "boom", "delay_ms": 0, "dead": True})
    assert got == Nack(1, "m", "r", "boom", 0, True)


def test_nack_error_text_is_truncated() -> None:
    got = parse({"op": "nack", "id": "m", "receipt": "r", "error": "e" * (MAX_ERROR_TEXT + 500)})
    assert isinstance(got, Nack) and len(got.error) == MAX_ERROR_TEXT


def test_extend() -> None:
    assert parse({"op": "extend", "id": "m", "receipt": "r", "lease_ms": 60_000}) == Extend(None, "m", "r", 60_000)


def test_ping() -> None:
    assert parse({"op": "ping"}) == Ping(None)
    assert parse({"op": "ping", "ref": -(2**53)}) == Ping(-(2**53))
    assert parse({"op": "ping", "ref": "x" * 128}) == Ping("x" * 128)


def test_pull_minimal_and_full() -> None:
    # Given a pull with only topic and max, When parsed, Then group default, no wait, the subscription's lease default
    assert parse({"op": "pull", "topic": "jobs", "max": 1}) == Pull(None, "jobs", "default", 1, 0, None)
    got = parse({"op": "pull", "ref": "p1", "topic": "jobs", "group": "w", "max": 50, "wait_ms": 2500, "lease_ms": 900})
    assert got == Pull("p1", "jobs", "w", 50, 2500, 900)
    # And the upper limits are inclusive
    top = {"op": "pull", "topic": "t", "max": LIMITS.max_prefetch, "wait_ms": LIMITS.max_pull_wait_ms}
    assert parse(top) == Pull(None, "t", "default", LIMITS.max_prefetch, LIMITS.max_pull_wait_ms, None)
    assert parse({**top, "wait_ms": None, "lease_ms": None}) == Pull(None, "t", "default", LIMITS.max_prefetch, 0, None)


def test_pull_limits_come_from_the_settings() -> None:
    # Given a smaller prefetch ceiling and pull wait, When a pull asks for more, Then it is refused with the limit
    limits = Limits(max_prefetch=5, max_pull_wait_ms=1_000)
    assert parse({"op": "pull", "topic": "t", "max": 5, "wait_ms": 1_000}, limits) == Pull(
        None, "t", "default", 5, 1_000, None
    )
    with pytest.raises(ProtocolError, match="'max' must be between 1 and 5"):
        parse({"op": "pull", "topic": "t", "max": 6}, limits)
    with pytest.raises(ProtocolError, match="'wait_ms' must be between 0 and 1000"):
        parse({"op": "pull", "topic": "t", "max": 1, "wait_ms": 1_001}, limits)


def test_status() -> None:
    assert parse({"op": "status", "ref": 3, "topic": "orders", "id": "m1"}) == Status(3, "orders", "m1")


# ---- error paths --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["{", "", "nope", '{"op":"ping",}', "{'op':'ping'}", "NaN", '{"a":1e400}'])
def test_malformed_json(text: str) -> None:
    refused(text, "malformed JSON")


@pytest.mark.parametrize("text", ["[]", "1", '"s"', "null", "true", '[{"op":"ping"}]'])
def test_non_object(text: str) -> None:
    refused(text, "must be a JSON object")


@pytest.mark.parametrize("data", [b'{"op":"ping"}', bytearray(b'{"op":"ping"}'), memoryview(b"{}")])
def test_binary_frame(data: bytes) -> None:
    refused(data, "binary frames")


def test_unknown_and_missing_op() -> None:
    assert refused({"op": "fly", "ref": "r"}, "unknown op").ref == "r"  # type: ignore[attr-defined]
    refused({"op": 5}, "unknown op")
    refused({"op": None}, "missing field 'op'")
    refused({"ref": 1}, "missing field 'op'")
    refused({"op": "PING"}, "unknown op")
    refused({"op": "x" * 10_000}, "unknown op")


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        ({"op": "publish", "payload": 1}, "invalid topic name None"),
        ({"op": "publish", "topic": "t"}, "missing field 'payload'"),
        ({"op": "ack", "receipt": "r"}, "missing field 'id'"),
        ({"op": "ack", "id": "m"}, "missing field 'receipt'"),
        ({"op": "ack", "items": [{"id": "m"}]}, "missing field 'receipt'"),
        ({"op": "nack", "receipt": "r"}, "missing field 'id'"),
        ({"op": "nack", "id": "m"}, "missing field 'receipt'"),
        ({"op": "extend", "id": "m", "receipt": "r"}, "missing field 'lease_ms'"),
        ({"op": "extend", "receipt": "r", "lease_ms": 1000}, "missing field 'id'"),
        ({"op": "subscribe"}, "missing field 'topic'"),
        ({"op": "unsubscribe", "group": "g"}, "missing field 'topic'"),
        ({"op": "pull", "max": 1}, "missing field 'topic'"),
        ({"op": "pull", "topic": "t"}, "missing field 'max'"),
        ({"op": "pull", "topic": "t", "max": None}, "missing field 'max'"),
        ({"op": "status", "id": "m"}, "missing field 'topic'"),
        ({"op": "status", "topic": None, "id": "m"}, "missing field 'topic'"),
        ({"op": "status", "topic": "t"}, "missing field 'id'"),
    ],
)
def test_missing_fields(frame: dict[str, Any], match: str) -> None:
    frame["ref"] = "the-ref"
    assert refused(frame, match).ref == "the-ref"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        ({"op": "publish", "topic": 5, "payload": 1}, "invalid topic"),
        ({"op": "publish", "topic": ["t"], "payload": 1}, "invalid topic"),
        ({"op": "publish", "topic": "t", "payload": 1, "headers": ["h"]}, "'headers'"),
        ({"op": "publish", "topic": "t", "payload": 1, "headers": "h"}, "'headers'"),
        ({"op": "publish", "topic": "t", "payload": 1, "headers": {"n": 1}}, "'headers'"),
        ({"op": "publish", "topic": "t", "payload": 1, "idempotency_key": 5}, "'idempotency_key'"),
        ({"op": "publish", "topic": "t", "payload": 1, "idempotency_key": ""}, "'idempotency_key'"),
        ({"op": "publish", "topic": "t", "payload": 1, "idempotency_key": "k" * 201}, "'idempotency_key'"),
        ({"op": "publish", "topic": "t", "payload": 1, "key": {}}, "'key'"),
        ({"op": "publish", "topic": "t", "payload": 1, "delay_ms": "5"}, "'delay_ms'"),
        ({"op": "publish", "topic": "t", "payload": 1, "delay_ms": True}, "'delay_ms'"),
        ({"op": "publish", "topic": "t", "payload": 1, "delay_ms": 1.5}, "'delay_ms'"),
        ({"op": "publish", "topic": "t", "payload": 1, "delay_ms": -1}, "'delay_ms'"),
        ({"op": "publish", "topic": "t", "payload": 1, "delay_ms": LIMITS.max_delay_ms + 1}, "'delay_ms'"),
        ({"op": "subscribe", "topic": "t", "prefetch": 0}, "'prefetch'"),
        ({"op": "subscribe", "topic": "t", "prefetch": LIMITS.max_prefetch + 1}, "'prefetch'"),
        ({"op": "subscribe", "topic": "t", "lease_ms": 99}, "'lease_ms'"),
        ({"op": "subscribe", "topic": "t", "lease_ms": LIMITS.max_lease_ms + 1}, "'lease_ms'"),
        ({"op": "subscribe", "topics": []}, "'topics'"),
        ({"op": "subscribe", "topics": "t"}, "'topics'"),
        ({"op": "subscribe", "topics": ["t"] * (MAX_TOPICS_PER_SUBSCRIBE + 1)}, "'topics'"),
        ({"op": "subscribe", "topics": ["t", 5]}, "invalid topic"),
        ({"op": "subscribe", "topic": "t", "group": 5}, "invalid group"),
        ({"op": "subscribe", "topic": "t", "group": None}, "invalid group"),
        ({"op": "ack", "id": 5, "receipt": "r"}, "'id'"),
        ({"op": "ack", "id": "m", "receipt": ""}, "'receipt'"),
        ({"op": "ack", "id": "m" * 65, "receipt": "r"}, "'id'"),
        ({"op": "ack", "items": []}, "'items'"),
        ({"op": "ack", "items": {"id": "m"}}, "'items'"),
        ({"op": "ack", "items": ["m"]}, "each item"),
        ({"op": "ack", "items": [{"id": "m", "receipt": "r"}] * (MAX_BATCH_ITEMS + 1)}, "'items'"),
        ({"op": "nack", "id": "m", "receipt": "r", "error": 5}, "'error'"),
        ({"op": "nack", "id": "m", "receipt": "r", "dead": "yes"}, "'dead'"),
        ({"op": "nack", "id": "m", "receipt": "r", "dead": 1}, "'dead'"),
        ({"op": "nack", "id": "m", "receipt": "r", "delay_ms": -5}, "'delay_ms'"),
        ({"op": "extend", "id": "m", "receipt": "r", "lease_ms": "1000"}, "'lease_ms'"),
        ({"op": "extend", "id": "m", "receipt": "r", "lease_ms": 10}, "'lease_ms'"),
        ({"op": "pull", "topic": "t", "max": 0}, "'max'"),
        ({"op": "pull", "topic": "t", "max": -1}, "'max'"),
        ({"op": "pull", "topic": "t", "max": LIMITS.max_prefetch + 1}, "'max'"),
        ({"op": "pull", "topic": "t", "max": "5"}, "'max'"),
        ({"op": "pull", "topic": "t", "max": 2.0}, "'max'"),
        ({"op": "pull", "topic": "t", "max": True}, "'max'"),
        ({"op": "pull", "topic": "t", "max": 1, "wait_ms": -1}, "'wait_ms'"),
        ({"op": "pull", "topic": "t", "max": 1, "wait_ms": LIMITS.max_pull_wait_ms + 1}, "'wait_ms'"),
        ({"op": "pull", "topic": "t", "max": 1, "wait_ms": "1s"}, "'wait_ms'"),
        ({"op": "pull", "topic": "t", "max": 1, "lease_ms": 99}, "'lease_ms'"),
        ({"op": "pull", "topic": "t", "max": 1, "lease_ms": LIMITS.max_lease_ms + 1}, "'lease_ms'"),
        ({"op": "pull", "topic": "a b", "max": 1}, "invalid topic"),
        ({"op": "pull", "topic": ["t"], "max": 1}, "invalid topic"),
        ({"op": "pull", "topic": "t", "group": None, "max": 1}, "invalid group"),
        ({"op": "pull", "topic": "t", "group": "{g}", "max": 1}, "invalid group"),
        ({"op": "status", "topic": "t", "id": 5}, "'id'"),
        ({"op": "status", "topic": "t", "id": ""}, "'id'"),
        ({"op": "status", "topic": "t", "id": "m" * 65}, "'id'"),
        ({"op": "status", "topic": "a:b", "id": "m"}, "invalid topic"),
    ],
)
def test_wrong_types_and_ranges(frame: dict[str, Any], match: str) -> None:
    frame["ref"] = 99
    err = refused(frame, match)
    assert type(err) in (ProtocolError, errors.InvalidNameError)
    assert err.code == "bad_request" and err.ref == 99  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "ref", [True, 1.5, [1], {"a": 1}, "x" * 129, 2**53 + 1, -(2**53) - 1, 10**30], ids=lambda r: repr(r)[:20]
)
def test_bad_ref(ref: Any) -> None:
    refused({"op": "ping", "ref": ref}, "'ref'")


@pytest.mark.parametrize(
    "name", ["a b", "{x}", "a:b", "", "a*", "a?", "-a", ".a", "_a", "a\n", "\na", "a\x00", "\u00e9", "x" * 129, "a/b"]
)
def test_invalid_topic_names(name: str) -> None:
    err = refused({"op": "publish", "ref": "n", "topic": name, "payload": 1}, "invalid topic name")
    assert isinstance(err, errors.InvalidNameError) and err.ref == "n"  # type: ignore[attr-defined]
    refused({"op": "subscribe", "topics": ["ok", name]}, "invalid topic name")
    refused({"op": "subscribe", "topic": "ok", "group": name}, "invalid group name")


@pytest.mark.parametrize("name", ["a", "A9", "orders.eu-1_x", "9", "x" * 128])
def test_valid_names(name: str) -> None:
    assert parse({"op": "subscribe", "topic": name, "group": name}) == Subscribe(None, (name,), name, None, None)


def test_oversized_payload() -> None:
    # Given a 100-byte payload limit
    limits = Limits(max_payload_bytes=100)
    ok = parse({"op": "publish", "topic": "t", "payload": "x" * 98}, limits)  # '"' + 98 + '"' = 100 bytes
    assert isinstance(ok, Publish)
    # When the payload is one byte over, Then PayloadTooLargeError (code payload_too_large) with the ref
    with pytest.raises(PayloadTooLargeError) as ei:
        parse({"op": "publish", "ref": "big", "topic": "t", "payload": "x" * 99}, limits)
    assert ei.value.code == "payload_too_large" and ei.value.ref == "big"  # type: ignore[attr-defined]


def test_payload_limit_counts_bytes_not_characters() -> None:
    # Given a payload of 60 two-byte characters (62 characters of JSON, 122 bytes) and a 100-byte limit
    limits = Limits(max_payload_bytes=100)
    # When parsed, Then it is too large
    with pytest.raises(PayloadTooLargeError):
        parse({"op": "publish", "topic": "t", "payload": "\u00e9" * 60}, limits)


def test_oversized_headers() -> None:
    limits = Limits(max_headers_bytes=20)
    with pytest.raises(PayloadTooLargeError, match="headers"):
        parse({"op": "publish", "topic": "t", "payload": 1, "headers": {"k": "v" * 20}}, limits)
    assert isinstance(parse({"op": "publish", "topic": "t", "payload": 1, "headers": {"k": "v" * 10}}, limits), Publish)


def test_deeply_nested_payload_is_a_protocol_error() -> None:
    # Given a payload nested deeper than the encoder allows (but still valid JSON)
    frame = '{"op":"publish","ref":"deep","topic":"t","payload":' + "[" * 600 + "]" * 600 + "}"
    # When parsed, Then it is refused as a ProtocolError carrying the ref, not an encoder crash
    assert refused(frame, "nested").ref == "deep"  # type: ignore[attr-defined]


def test_malformed_frame_has_no_ref() -> None:
    err = refused("{nope")
    assert getattr(err, "ref", None) is None


# ---- fuzz ---------------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=25,
)

FIELDS = [
    "op", "ref", "topic", "topics", "group", "payload", "headers", "idempotency_key", "delay_ms", "key", "prefetch",
    "lease_ms", "id", "receipt", "items", "error", "dead", "max_attempts", "backoff_base_ms", "max", "wait_ms",
]  # fmt: skip
field_values = json_values | st.sampled_from(["t", "orders", "default", "a b", "", "r-1"]) | st.integers(-5, 10**6)
frames = st.fixed_dictionaries({"op": st.sampled_from([*OPS, "nope"])}) | st.just({})
op_frames = st.builds(
    lambda base, extra: {**extra, **base},
    frames,
    st.dictionaries(st.sampled_from(FIELDS[1:]), field_values, max_size=8),
)


def check(text: str | bytes) -> None:
    try:
        got = parse_frame(text, Limits(max_payload_bytes=2_000, max_headers_bytes=200))
    except ProtocolError as e:
        assert e.code in ERROR_CODES
        ref = getattr(e, "ref", None)
        assert ref is None or isinstance(ref, str | int)
    else:
        assert isinstance(got, REQUEST_TYPES)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_fuzz_arbitrary_text(text: str) -> None:
    check(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_fuzz_arbitrary_json(value: Any) -> None:
    check(json.dumps(value))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op_frames)
def test_fuzz_frames_with_known_fields(frame: dict[str, Any]) -> None:
    check(json.dumps(frame))


@settings(max_examples=200, deadline=None)
@given(st.binary())
def test_fuzz_binary(data: bytes) -> None:
    check(data)


# ---- the fast path (publish of topic + payload, one-item ack) answers as the full path -------------------------

FAST_PUBLISH: dict[str, Any] = {"op": "publish", "topic": "orders", "payload": 1}
FAST_ACK: dict[str, Any] = {"op": "ack", "id": "m1", "receipt": "r1"}
FAST_FIELDS = ["ref", "topic", "payload", "key", "idempotency_key", "id", "receipt", "headers", "delay_ms", "items"]
fast_values = (
    json_values
    | st.sampled_from(["orders", "t", "a b", "", "x" * 64, "x" * 65, "k" * 200, "k" * 201, "r" * 129])
    | st.sampled_from([2**53, 2**53 + 1, -(2**53) - 1, 2**64, 10**30, 1e16, 1.5, True, 0])
)
fast_frames = st.builds(  # a valid frame of each shape with up to 3 fields changed, added or taken out
    lambda base, extra, drop: {k: v for k, v in {**base, **extra}.items() if k != drop},
    st.sampled_from([FAST_PUBLISH, FAST_ACK]),
    st.dictionaries(st.sampled_from(FAST_FIELDS), fast_values, max_size=3),
    st.sampled_from([None, "topic", "payload", "id", "receipt"]),
)


def outcome(call: Any) -> tuple[str, Any]:
    try:
        return "ok", call()
    except ProtocolError as e:
        return "error", (type(e), e.message, getattr(e, "ref", None))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fast_frames)
@example({**FAST_PUBLISH, "ref": 2**53 + 1})
@example({**FAST_PUBLISH, "ref": "r" * 129})
@example({**FAST_PUBLISH, "ref": 1.5})
@example({**FAST_PUBLISH, "ref": True})
@example({**FAST_PUBLISH, "payload": 10**30})
@example({**FAST_PUBLISH, "payload": [-(2**64)]})
@example({**FAST_PUBLISH, "key": "k" * 201})
@example({**FAST_PUBLISH, "key": ""})
@example({**FAST_PUBLISH, "idempotency_key": 7})
@example({**FAST_PUBLISH, "topic": "a b"})
@example({**FAST_PUBLISH, "headers": {}})
@example({**FAST_ACK, "id": "x" * 65})
@example({**FAST_ACK, "receipt": "x" * 65})
@example({**FAST_ACK, "receipt": ""})
@example({**FAST_ACK, "id": 5})
@example({**FAST_ACK, "ref": -(2**53) - 1})
@example({**FAST_ACK, "items": []})
def test_fast_path_answers_every_frame_as_the_full_path(frame: dict[str, Any]) -> None:
    # Given a publish or ack frame built from the fast path's fields, odd values among them (and "orders" and "t"
    # seen valid before, as names a broker serves again and again are)
    limits = Limits(max_payload_bytes=300)
    parse({"op": "publish", "topic": "orders", "payload": 1})
    parse({"op": "publish", "topic": "t", "payload": 1})
    text = json.dumps(frame)
    # When parsed (the fast path where it applies), Then the answer is the full path's: the same request, or the
    # same error with the same ref
    full = outcome(lambda: protocol._parse_decoded(text, orjson.loads(text), limits))
    assert outcome(lambda: parse_frame(text, limits)) == full


def test_fast_path_takes_the_common_frames() -> None:
    # Given the two frames a broker reads most, on a topic seen valid before
    parse({"op": "publish", "topic": "orders", "payload": 1})
    publish = {"op": "publish", "ref": 7, "topic": "orders", "payload": {"a": [1, 2.5, "x"]}, "key": "k1"}
    ack = {"op": "ack", "id": "m-1", "receipt": "r:1"}
    # When the fast path reads them, Then it gives what the full path gives (it is the one that answered them)
    assert protocol._publish_fast(orjson.loads(json.dumps(publish)), LIMITS) == parse(publish)
    assert protocol._ack_fast(orjson.loads(json.dumps(ack))) == parse(ack) == Ack(None, (AckRef("m-1", "r:1"),))
    # And a frame it is not sure of is left to the full path: a payload with a maybe-rounded integer, a new topic
    assert protocol._publish_fast(orjson.loads('{"op":"publish","topic":"orders","payload":[1e30]}'), LIMITS) is None
    assert protocol._publish_fast({"op": "publish", "topic": "never.seen.before", "payload": 1}, LIMITS) is None


# ---- replies ------------------------------------------------------------------------------------------------------


def delivery(**kw: Any) -> Delivery:
    d: dict[str, Any] = {
        "id": "m1",
        "topic": "t",
        "group": "g",
        "payload": '{"big":123456789012345678901234567890,"f":1.50,"u":"\u00e9"}',
        "headers": '{"h":"v"}',
        "attempt": 2,
        "receipt": "r-9",
        "published_at": 1_700_000_000_000,
        "lease_expires_at": 1_700_000_030_000,
    }
    d.update(kw)
    return Delivery(**d)


def test_message_embeds_payload_verbatim() -> None:
    # Given a delivery whose payload text has a big integer and a float written as 1.50
    d = delivery()
    # When the message frame is built
    text = protocol.message(d)
    # Then the payload text appears byte for byte, and the rest of the frame is as documented
    assert d.payload in text and '"headers":{"h":"v"}' in text
    frame = json.loads(text)
    assert frame == {
        "op": "message",
        "id": "m1",
        "topic": "t",
        "group": "g",
        "payload": {"big": 123456789012345678901234567890, "f": 1.5, "u": "\u00e9"},
        "headers": {"h": "v"},
        "attempt": 2,
        "receipt": "r-9",
        "published_at": 1_700_000_000_000,
        "lease_expires_at": 1_700_000_030_000,
    }
    assert "key" not in frame
    assert json.loads(protocol.message(delivery(key="k1")))["key"] == "k1"


def test_pulled_frame() -> None:
    # Given two deliveries, When the pull answer is built, Then it holds them as message objects, payload verbatim
    a, b = delivery(), delivery(id="m2", key="k")
    text = protocol.pulled("r", "t", "g", [protocol.message_bytes(a), protocol.message_bytes(b)])
    assert a.payload in text
    frame = json.loads(text)
    assert (frame["op"], frame["ref"], frame["topic"], frame["group"]) == ("pulled", "r", "t", "g")
    assert frame["items"] == [json.loads(protocol.message(a)), json.loads(protocol.message(b))]
    # And an empty answer (the wait ran out) has no items; without a ref there is no ref field
    assert json.loads(protocol.pulled(None, "t", "g", [])) == {"op": "pulled", "topic": "t", "group": "g", "items": []}


def test_published_frame() -> None:
    assert json.loads(protocol.published("r", "m1", False)) == {"op": "published", "id": "m1", "ref": "r"}
    assert json.loads(protocol.published(None, "m1", True)) == {"op": "published", "id": "m1", "duplicate": True}


def test_error_frame_shape() -> None:
    assert json.loads(protocol.error(None, "bad_request", "nope")) == {
        "op": "error",
        "code": "bad_request",
        "message": "nope",
    }
    assert json.loads(protocol.error(3, "unavailable", "down", retry_after_ms=500, msg_id="m1")) == {
        "op": "error",
        "code": "unavailable",
        "message": "down",
        "retry_after_ms": 500,
        "id": "m1",
        "ref": 3,
    }


def test_error_from_uses_the_exception_code_and_ref() -> None:
    # Given a protocol error raised while parsing a frame with a ref
    with pytest.raises(ProtocolError) as ei:
        parse_frame('{"op":"fly","ref":"abc"}', LIMITS)
    # When turned into an error frame, Then code, message and ref come from the exception
    frame = json.loads(protocol.error_from(ei.value))
    assert frame["code"] == "bad_request" and frame["ref"] == "abc" and "unknown op" in frame["message"]
    # And an explicit ref wins; retry_after_ms is carried
    exc = errors.UnavailableError("down", retry_after_ms=250)
    assert json.loads(protocol.error_from(exc, ref=5)) == {
        "op": "error",
        "code": "unavailable",
        "message": "down",
        "retry_after_ms": 250,
        "ref": 5,
    }


def test_reply_builder() -> None:
    assert orjson.loads(protocol.reply("pong", 1)) == {"op": "pong", "ref": 1}
    assert orjson.loads(protocol.reply("subscribed", None, topics=["t"])) == {"op": "subscribed", "topics": ["t"]}


def test_every_error_class_maps_to_a_known_code() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, BrokerError)]
    assert len(classes) >= 12
    assert {c.code for c in classes} <= ERROR_CODES


@pytest.mark.parametrize(
    ("ref", "msg_id", "duplicate"),
    [(7, "0190f3a2b4c51a2b3c4d00000001", False), (-(2**53), "abc", False), (0, "x\"y", False), (7, "a\u00e9", False),
     (7, "abc", True), ("r-1", "abc", False), (None, "abc", False), (7, "", False)],
)  # fmt: skip
def test_published_reply_is_the_json_of_its_fields(ref: Any, msg_id: str, duplicate: bool) -> None:
    # Given any ref, id and duplicate flag (the common reply is formatted without a dict), Then the reply is exactly
    # the JSON text of its fields
    want: dict[str, Any] = {"op": "published", "id": msg_id}
    if duplicate:
        want["duplicate"] = True
    if ref is not None:
        want["ref"] = ref
    got = protocol.published(ref, msg_id, duplicate)
    assert got == orjson.dumps(want).decode() and orjson.loads(got) == want
