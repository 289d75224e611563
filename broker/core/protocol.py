"""Wire protocol: JSON text frames <-> typed requests and replies (pure: no I/O).

Any input either parses into one of the request types below or raises ``ProtocolError`` (or a subclass) carrying
the client's ``ref`` when one could be read. Nothing else escapes ``parse_frame``; a hypothesis test holds us to it.
The final frame reference is ``docs/protocol.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from broker.core.errors import BrokerError, PayloadTooLargeError, ProtocolError
from broker.core.model import DEFAULT_GROUP, AckItem, Delivery, PublishRequest, validate_name

Ref = str | int | None

MAX_REF_LEN = 128
MAX_ID_LEN = 64
MAX_ERROR_TEXT = 2_000
MAX_BATCH_ITEMS = 1_000
MAX_TOPICS_PER_SUBSCRIBE = 100


@dataclass(frozen=True, slots=True)
class Limits:
    max_payload_bytes: int = 262_144
    max_headers_bytes: int = 8_192
    max_prefetch: int = 1_000
    max_delay_ms: int = 7 * 86_400_000
    max_lease_ms: int = 3_600_000
    max_attempts_limit: int = 100  # bounds of a message's own retry policy
    backoff_base_min_ms: int = 10
    backoff_base_max_ms: int = 3_600_000
    max_pull_wait_ms: int = 60_000


# Publish, AckRef (the model's AckItem) and Ack are made per message: plain @dataclass(slots=True), not frozen (a
# frozen dataclass's __init__ costs ~4x: 1.4 vs 0.3 us). They are never mutated.
@dataclass(slots=True)
class Publish:
    ref: Ref
    topic: str
    payload: str  # JSON text
    headers: str  # JSON text
    idempotency_key: str | None
    delay_ms: int
    key: str | None
    max_attempts: int | None = None  # the message's own retry policy, within Limits
    backoff_base_ms: int | None = None

    def to_request(self) -> PublishRequest:
        return PublishRequest(
            self.topic,
            self.payload,
            self.headers,
            self.idempotency_key,
            self.delay_ms,
            self.key,
            self.max_attempts,
            self.backoff_base_ms,
        )


@dataclass(frozen=True, slots=True)
class Subscribe:
    ref: Ref
    topics: tuple[str, ...]
    group: str
    prefetch: int | None
    lease_ms: int | None
    batch: bool = False  # deliveries arrive as `messages` frames holding several messages


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    ref: Ref
    topics: tuple[str, ...]
    group: str


AckRef = AckItem  # one settled delivery of an ``ack`` frame: the model's own type, handed on as it is


@dataclass(slots=True)
class Ack:
    ref: Ref
    items: tuple[AckRef, ...]


@dataclass(frozen=True, slots=True)
class Nack:
    ref: Ref
    id: str
    receipt: str
    error: str
    delay_ms: int | None
    dead: bool


@dataclass(frozen=True, slots=True)
class Extend:
    ref: Ref
    id: str
    receipt: str
    lease_ms: int


@dataclass(frozen=True, slots=True)
class Ping:
    ref: Ref


@dataclass(frozen=True, slots=True)
class PublishBatch:
    """``publish`` with ``messages: [...]``: many messages, one frame, one ``published`` reply (throughput mode)."""

    ref: Ref
    items: tuple[Publish, ...]


@dataclass(frozen=True, slots=True)
class Pull:
    """Ask for up to ``max`` deliveries of (topic, group), waiting up to ``wait_ms`` for the first (0: no wait)."""

    ref: Ref
    topic: str
    group: str
    max: int
    wait_ms: int
    lease_ms: int | None


@dataclass(frozen=True, slots=True)
class Status:
    """Where message ``id`` of ``topic`` is now, per group (the rows of ``broker message ID``)."""

    ref: Ref
    topic: str
    id: str


Request = Publish | PublishBatch | Subscribe | Unsubscribe | Ack | Nack | Extend | Ping | Pull | Status

OPS = ("publish", "subscribe", "unsubscribe", "ack", "nack", "extend", "ping", "pull", "status")


# Topic and group names that passed ``validate_name`` (the same rule for both kinds): the hot frames repeat a few.
_GOOD_NAMES: set[str] = set()
_GOOD_NAMES_MAX = 10_000


class _Fields:
    """Typed field access over one decoded frame; every failure is a ProtocolError with the frame's ref."""

    __slots__ = ("d", "payload_raw", "ref")

    def __init__(self, d: dict[str, Any], ref: Ref, payload_raw: bytes | None = None) -> None:
        self.d = d
        self.ref = ref
        self.payload_raw = payload_raw  # d["payload"] encoded already (by ``_loads``), or None

    def fail(self, message: str, cls: type[ProtocolError] = ProtocolError) -> ProtocolError:
        err = cls(message)
        err.ref = self.ref  # type: ignore[attr-defined]
        return err

    def str_(self, name: str, *, required: bool = True, max_len: int = MAX_ID_LEN) -> str | None:
        v = self.d.get(name)
        if v is None:
            if required:
                raise self.fail(f"missing field '{name}'")
            return None
        if not isinstance(v, str) or not v:
            raise self.fail(f"field '{name}' must be a non-empty string")
        if len(v) > max_len:
            raise self.fail(f"field '{name}' is longer than {max_len} characters")
        return v

    def int_(self, name: str, lo: int, hi: int) -> int | None:
        v = self.d.get(name)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(f"field '{name}' must be an integer")
        if not lo <= v <= hi:
            raise self.fail(f"field '{name}' must be between {lo} and {hi}")
        return v

    def bool_(self, name: str) -> bool:
        v = self.d.get(name, False)
        if not isinstance(v, bool):
            raise self.fail(f"field '{name}' must be true or false")
        return v

    def name(self, kind: str, value: object) -> str:
        if type(value) is str and value in _GOOD_NAMES:  # a name seen valid before: no second regex match
            return value
        try:
            name = validate_name(kind, value)
        except ProtocolError as e:
            raise self.fail(e.message, type(e)) from None
        if len(_GOOD_NAMES) >= _GOOD_NAMES_MAX:
            _GOOD_NAMES.clear()  # bounded: a client inventing names cannot grow it
        _GOOD_NAMES.add(name)
        return name

    def topics(self) -> tuple[str, ...]:
        if "topics" in self.d:
            raw = self.d["topics"]
            if not isinstance(raw, list) or not raw or len(raw) > MAX_TOPICS_PER_SUBSCRIBE:
                raise self.fail(f"field 'topics' must be a list of 1 to {MAX_TOPICS_PER_SUBSCRIBE} names")
            return tuple(dict.fromkeys(self.name("topic", t) for t in raw))
        if "topic" not in self.d:
            raise self.fail("missing field 'topic' (or 'topics')")
        return (self.name("topic", self.d["topic"]),)


def _read_ref(d: dict[str, Any]) -> Ref:
    ref = d.get("ref")
    if ref is None:
        return None
    if isinstance(ref, bool) or not isinstance(ref, str | int):
        raise ProtocolError("field 'ref' must be a string or an integer")
    if isinstance(ref, str) and len(ref) > MAX_REF_LEN:
        raise ProtocolError(f"field 'ref' is longer than {MAX_REF_LEN} characters")
    if isinstance(ref, int) and not -(2**53) <= ref <= 2**53:
        raise ProtocolError("field 'ref' is out of range")
    return ref


# orjson reads integers outside [-2**63, 2**64) as floats, which would round them: a payload must arrive as sent.
# Such an integer always becomes a float of magnitude >= 2**63; only when the decoded frame holds one is the text
# re-read with exact integers (a genuine float that large re-reads to the same float). Cheaper than scanning the
# text for long digit runs, which cost more than the JSON parse itself. A payload, the bulk of a publish frame, is
# encoded (as a publish needs it anyway) instead of walked: orjson writes every float of magnitude >= 1e16 with an
# exponent, so only a payload whose text has ``e+`` (or that cannot be encoded) is walked. The decision is the same
# as walking the whole frame, and is made before anything in the frame is checked.
_HUGE = float(2**63)


def _has_huge_float(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, float) and not -_HUGE < v < _HUGE:
            return True
    return False


def _needs_exact(d: dict[str, Any]) -> bool:
    """Whether frame ``d`` holds a float that may be a rounded integer, a ``payload`` object or array aside."""
    for k, v in d.items():
        t = type(v)
        if t is float:
            if not -_HUGE < v < _HUGE:
                return True
        elif (t is dict or t is list) and k != "payload" and _has_huge_float(v):
            return True
    return False


def _loads_exact(data: str) -> Any:
    try:
        return json.loads(data)  # orjson already validated the text (no NaN/Infinity, depth <= 1024)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"malformed JSON: {e}") from None


def _loads(data: str) -> tuple[Any, bytes | None]:
    """The decoded frame, and its ``payload`` encoded when that was done on the way (else None)."""
    try:
        d = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"malformed JSON: {e}") from None
    return _settle(data, d)


def _settle(data: str, d: Any) -> tuple[Any, bytes | None]:
    """``_loads`` after the parse: frame ``d`` re-read with exact integers when it may hold a rounded one."""
    if type(d) is not dict:
        return (_loads_exact(data) if _has_huge_float(d) else d), None
    raw: bytes | None = None
    payload = d.get("payload")
    if type(payload) is dict or type(payload) is list:
        try:
            raw = orjson.dumps(payload)
        except orjson.JSONEncodeError:
            raw = None  # too deep: the publish says so (after the exact re-read, if one is due)
        if (raw is None or b"e+" in raw) and _has_huge_float(payload):
            return _loads_exact(data), None
    if _needs_exact(d):
        return _loads_exact(data), None
    return d, raw


def _dumps(value: Any, what: str) -> bytes:
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as e:
        if "Integer exceeds 64-bit range" in str(e):
            try:
                return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
            except (ValueError, RecursionError):
                pass
        raise ProtocolError(f"{what} cannot be encoded (nested too deeply?): {e}") from None


def parse_frame(data: str | bytes, limits: Limits) -> Request:
    if type(data) is str:
        try:
            d = _orjson_loads(data)
        except orjson.JSONDecodeError as e:
            raise ProtocolError(f"malformed JSON: {e}") from None
        if type(d) is dict:
            op = d.get("op")
            fast = _publish_fast(d, limits) if op == "publish" else _ack_fast(d) if op == "ack" else None
            if fast is not None:
                return fast
        return _parse_decoded(data, d, limits)
    if isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError("binary frames are not supported: send JSON text frames")
    return _parse_decoded(data, _orjson_loads_checked(data), limits)


def _orjson_loads_checked(data: str) -> Any:
    try:
        return _orjson_loads(data)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"malformed JSON: {e}") from None


# ---- the fast path: the hot frames' common shapes -----------------------------------------------------------
#
# A publish of topic + payload (ref, key, idempotency_key optional) and a one-item ack (id, receipt, ref optional)
# are most of what a broker reads. For them, ``_publish_fast`` / ``_ack_fast`` check only what such a frame can get
# wrong, on the decoded dict, without the ``_Fields`` walk; anything they are not sure of (another field, a type or
# length out of line, a topic not seen valid yet, a payload whose text has ``e+``, i.e. maybe a rounded integer)
# returns None and the frame takes the full path below, which answers it (or its error) as it always has. So the fast
# path never raises and never accepts what the full path refuses: tests/test_protocol.py compares the two on
# generated frames.

_PUBLISH_FAST_KEYS = frozenset(("op", "ref", "topic", "payload", "key", "idempotency_key"))
_ACK_FAST_KEYS = frozenset(("op", "ref", "id", "receipt"))
_orjson_loads = orjson.loads
_orjson_dumps = orjson.dumps
_NO = object()


def _fast_ref(d: dict[str, Any]) -> Ref | object:
    """The frame's ref when it is a plain valid one (None: absent or null), else ``_NO``."""
    ref = d.get("ref")
    if ref is None:
        return None
    t = type(ref)
    if t is int:
        return ref if -(2**53) <= ref <= 2**53 else _NO
    if t is str:
        return ref if len(ref) <= MAX_REF_LEN else _NO
    return _NO


def _publish_fast(d: dict[str, Any], limits: Limits) -> Publish | None:
    if not d.keys() <= _PUBLISH_FAST_KEYS:
        return None
    topic = d.get("topic")
    if type(topic) is not str or topic not in _GOOD_NAMES:
        return None
    payload = d.get("payload", _NO)
    if payload is _NO:
        return None
    try:
        raw = _orjson_dumps(payload)
    except orjson.JSONEncodeError:
        return None
    if b"e+" in raw or len(raw) > limits.max_payload_bytes:
        return None
    ref = _fast_ref(d)
    if ref is _NO:
        return None
    key = d.get("key")
    if key is not None and (type(key) is not str or not 0 < len(key) <= 200):
        return None
    idem = d.get("idempotency_key")
    if idem is not None and (type(idem) is not str or not 0 < len(idem) <= 200):
        return None
    return Publish(ref, topic, raw.decode(), "{}", idem, 0, key)  # type: ignore[arg-type]


def _ack_fast(d: dict[str, Any]) -> Ack | None:
    if not d.keys() <= _ACK_FAST_KEYS:
        return None
    msg_id = d.get("id")
    receipt = d.get("receipt")
    if type(msg_id) is not str or type(receipt) is not str:
        return None
    if not (0 < len(msg_id) <= MAX_ID_LEN and 0 < len(receipt) <= MAX_ID_LEN):
        return None
    ref = _fast_ref(d)
    if ref is _NO:
        return None
    return Ack(ref, (AckRef(msg_id, receipt),))  # type: ignore[arg-type]


# ---- the full path ------------------------------------------------------------------------------------------


def _parse_decoded(data: str, decoded: Any, limits: Limits) -> Request:
    """Every frame the fast path did not take: ``decoded`` is ``data`` as orjson read it."""
    d, payload_raw = _settle(data, decoded)
    if not isinstance(d, dict):
        raise ProtocolError("a frame must be a JSON object")
    ref = _read_ref(d)
    f = _Fields(d, ref, payload_raw)
    op = d.get("op")
    if op == "publish":
        return _publish_any(f, limits)
    if op == "ack":
        return _ack(f)
    if op == "nack":
        err = d.get("error", "")
        if not isinstance(err, str):
            raise f.fail("field 'error' must be a string")
        return Nack(
            ref,
            _s(f, "id"),
            _s(f, "receipt"),
            err[:MAX_ERROR_TEXT],
            f.int_("delay_ms", 0, limits.max_delay_ms),
            f.bool_("dead"),
        )
    if op == "extend":
        lease = f.int_("lease_ms", 100, limits.max_lease_ms)
        if lease is None:
            raise f.fail("missing field 'lease_ms'")
        return Extend(ref, _s(f, "id"), _s(f, "receipt"), lease)
    if op == "subscribe":
        group = f.name("group", d.get("group", DEFAULT_GROUP))
        return Subscribe(
            ref,
            f.topics(),
            group,
            f.int_("prefetch", 1, limits.max_prefetch),
            f.int_("lease_ms", 100, limits.max_lease_ms),
            f.bool_("batch"),
        )
    if op == "unsubscribe":
        return Unsubscribe(ref, f.topics(), f.name("group", d.get("group", DEFAULT_GROUP)))
    if op == "ping":
        return Ping(ref)
    if op == "pull":
        return _pull(f, limits)
    if op == "status":
        return Status(ref, _topic(f), _s(f, "id"))
    if op is None:
        raise f.fail("missing field 'op'")
    raise f.fail(f"unknown op {str(op)[:40]!r} (known: {', '.join(OPS)})")


def _s(f: _Fields, name: str) -> str:
    v = f.str_(name)
    assert v is not None
    return v


def _publish_any(f: _Fields, limits: Limits) -> Publish | PublishBatch:
    if "messages" not in f.d:
        return _publish(f, limits)
    raw = f.d["messages"]
    if not isinstance(raw, list) or not raw or len(raw) > MAX_BATCH_ITEMS:
        raise f.fail(f"field 'messages' must be a list of 1 to {MAX_BATCH_ITEMS} message objects")
    for key in ("topic", "payload"):
        if key in f.d:
            raise f.fail(f"a batch publish carries '{key}' inside each of 'messages', not beside them")
    items = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise f.fail(f"messages[{i}] must be an object")
        try:
            items.append(_publish(_Fields(m, f.ref), limits))
        except ProtocolError as e:  # the whole frame is refused: a batch is stored all or nothing is promised
            raise f.fail(f"messages[{i}]: {e.message}", type(e)) from None
    return PublishBatch(f.ref, tuple(items))


def _publish(f: _Fields, limits: Limits) -> Publish:
    d = f.d
    topic = f.name("topic", d.get("topic"))
    if "payload" not in d:
        raise f.fail("missing field 'payload'")
    raw = f.payload_raw
    if raw is None:
        try:
            raw = _dumps(d["payload"], "payload")
        except ProtocolError as e:
            raise f.fail(e.message) from None
    if len(raw) > limits.max_payload_bytes:
        raise f.fail(f"payload is {len(raw)} bytes, limit {limits.max_payload_bytes}", PayloadTooLargeError)
    payload = raw.decode()
    headers_raw = d.get("headers")
    if headers_raw is None:
        headers = "{}"
    else:
        if not isinstance(headers_raw, dict) or not all(isinstance(v, str) for v in headers_raw.values()):
            raise f.fail("field 'headers' must be an object of string values")
        raw = orjson.dumps(headers_raw)
        if len(raw) > limits.max_headers_bytes:
            raise f.fail(f"headers are {len(raw)} bytes, limit {limits.max_headers_bytes}", PayloadTooLargeError)
        headers = raw.decode()
    idem = f.str_("idempotency_key", required=False, max_len=200)
    key = f.str_("key", required=False, max_len=200)
    delay = f.int_("delay_ms", 0, limits.max_delay_ms) or 0
    max_attempts = f.int_("max_attempts", 1, limits.max_attempts_limit)
    backoff_base = f.int_("backoff_base_ms", limits.backoff_base_min_ms, limits.backoff_base_max_ms)
    return Publish(f.ref, topic, payload, headers, idem, delay, key, max_attempts, backoff_base)


def _topic(f: _Fields) -> str:
    if f.d.get("topic") is None:
        raise f.fail("missing field 'topic'")
    return f.name("topic", f.d["topic"])


def _pull(f: _Fields, limits: Limits) -> Pull:
    n = f.int_("max", 1, limits.max_prefetch)
    if n is None:
        raise f.fail("missing field 'max'")
    return Pull(
        f.ref,
        _topic(f),
        f.name("group", f.d.get("group", DEFAULT_GROUP)),
        n,
        f.int_("wait_ms", 0, limits.max_pull_wait_ms) or 0,
        f.int_("lease_ms", 100, limits.max_lease_ms),
    )


def _ack(f: _Fields) -> Ack:
    items = f.d.get("items")
    if items is None:
        return Ack(f.ref, (AckRef(_s(f, "id"), _s(f, "receipt")),))
    if not isinstance(items, list) or not items or len(items) > MAX_BATCH_ITEMS:
        raise f.fail(f"field 'items' must be a list of 1 to {MAX_BATCH_ITEMS} {{id, receipt}} objects")
    out = []
    for it in items:
        if not isinstance(it, dict):
            raise f.fail("each item must be an object {id, receipt}")
        sub = _Fields(it, f.ref)
        out.append(AckRef(_s(sub, "id"), _s(sub, "receipt")))
    return Ack(f.ref, tuple(out))


# ---- replies (broker -> client) -------------------------------------------------------------------------------


def _dump(d: dict[str, Any]) -> str:
    return orjson.dumps(d).decode()


def _with_ref(d: dict[str, Any], ref: Ref) -> dict[str, Any]:
    if ref is not None:
        d["ref"] = ref
    return d


def published(ref: Ref, msg_id: str, duplicate: bool) -> str:
    if type(ref) is int and not duplicate and msg_id.isalnum():  # the common reply (a broker's ids are hex), as
        return f'{{"op":"published","id":"{msg_id}","ref":{ref}}}'  # orjson would write it, without the dict
    d: dict[str, Any] = {"op": "published", "id": msg_id}
    if duplicate:
        d["duplicate"] = True
    return _dump(_with_ref(d, ref))


def error(ref: Ref, code: str, message: str, *, retry_after_ms: int | None = None, msg_id: str | None = None) -> str:
    d: dict[str, Any] = {"op": "error", "code": code, "message": message}
    if retry_after_ms is not None:
        d["retry_after_ms"] = retry_after_ms
    if msg_id is not None:
        d["id"] = msg_id
    return _dump(_with_ref(d, ref))


def error_fields(exc: BrokerError) -> dict[str, Any]:
    d: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.retry_after_ms is not None:
        d["retry_after_ms"] = exc.retry_after_ms
    return d


def error_from(exc: BrokerError, ref: Ref = None, msg_id: str | None = None) -> str:
    ref = ref if ref is not None else getattr(exc, "ref", None)
    return error(ref, exc.code, exc.message, retry_after_ms=exc.retry_after_ms, msg_id=msg_id)


def reply(op: str, ref: Ref, **fields: Any) -> str:
    return _dump(_with_ref({"op": op, **fields}, ref))


def message(d: Delivery) -> str:
    return message_bytes(d).decode()


def messages_bytes(parts: list[bytes]) -> bytes:
    """A ``messages`` frame from ``message_bytes`` outputs (each item is a full message object, ``op`` included)."""
    return b'{"op":"messages","items":[' + b",".join(parts) + b"]}"


def pulled(ref: Ref, topic: str, group: str, parts: list[bytes]) -> str:
    """The answer to a ``pull``: ``items`` are ``message_bytes`` outputs (possibly none: the wait ran out)."""
    head = orjson.dumps(_with_ref({"op": "pulled", "topic": topic, "group": group}, ref))
    return (head[:-1] + b',"items":[' + b",".join(parts) + b"]}").decode()


def message_bytes(d: Delivery) -> bytes:
    """The delivery frame as UTF-8 (the hot path: no str round trip). Payload and headers are embedded verbatim."""
    frame: dict[str, Any] = {
        "op": "message",
        "id": d.id,
        "topic": d.topic,
        "group": d.group,
        "payload": orjson.Fragment(d.payload),
        "headers": orjson.Fragment(d.headers),
        "attempt": d.attempt,
        "receipt": d.receipt,
        "published_at": d.published_at,
        "lease_expires_at": d.lease_expires_at,
    }
    if d.key is not None:
        frame["key"] = d.key
    return orjson.dumps(frame)
