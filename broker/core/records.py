"""The ``broker export`` file (docs/export.md, docs/schema/export-record.json): records, encoding, validation.

Pure: no I/O. One JSON object per line: a header, then ``topic``, ``message``, ``dead`` and ``idempotency`` records,
then an ``end`` record with the counts (a file without it was cut short). Hash fields travel verbatim, as the
strings Redis holds, so a field this version does not know (a per-message policy field, say) is carried unchanged.
``parse`` checks the whole file and raises ``LineError`` naming the first bad line; nothing is half-read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from broker.core.errors import InvalidNameError
from broker.core.model import validate_name

FORMAT = "redis-ws-broker-export"
VERSION = 1
STATES = ("ready", "leased", "delayed", "waiting")
KINDS = ("topic", "message", "dead", "idempotency")
_ID = re.compile(r"[0-9A-Za-z._-]{1,128}")


@dataclass(frozen=True, slots=True)
class Header:
    prefix: str  # redis.key_prefix of the Redis it came from
    key_schema: str  # key schema version of that Redis (docs/keys.md)
    exported_at: int  # epoch ms; remaining TTLs count from here


@dataclass(frozen=True, slots=True)
class TopicRecord:
    topic: str
    groups: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Pending:
    """A message not yet acked by one group, where it was at export time."""

    state: str  # one of STATES
    position: int  # order within the group's pending messages (leased, ready, delayed, then waiting by key)
    due: int | None = None  # delayed: when it becomes ready (epoch ms)
    leased_until: int | None = None  # leased: the lease deadline (informational: it comes back ready)
    delivery: Mapping[str, str] = field(default_factory=dict)  # the group's delivery hash verbatim ({}: none)


@dataclass(frozen=True, slots=True)
class MessageRecord:
    topic: str
    id: str
    body: Mapping[str, str]  # the body hash verbatim, without ``refs`` (recomputed on import)
    groups: Mapping[str, Pending]


@dataclass(frozen=True, slots=True)
class DeadRecord:
    topic: str
    group: str
    id: str
    died_at: int  # epoch ms (the dead-letter index score)
    ttl_s: int | None  # remaining Redis TTL at export (None: the hash had none)
    fields: Mapping[str, str]  # the dead-letter hash verbatim


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    topic: str
    key: str
    id: str
    ttl_s: int | None


Record = TopicRecord | MessageRecord | DeadRecord | IdempotencyRecord


@dataclass
class ExportFile:
    header: Header
    topics: list[TopicRecord] = field(default_factory=list)
    messages: list[MessageRecord] = field(default_factory=list)
    dead: list[DeadRecord] = field(default_factory=list)
    idempotency: list[IdempotencyRecord] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "topic": len(self.topics),
            "message": len(self.messages),
            "dead": len(self.dead),
            "idempotency": len(self.idempotency),
        }


# ---- encoding ----------------------------------------------------------------------------------------------------


def _pending_json(p: Pending) -> dict[str, Any]:
    out: dict[str, Any] = {"state": p.state, "position": p.position}
    if p.due is not None:
        out["due"] = p.due
    if p.leased_until is not None:
        out["leased_until"] = p.leased_until
    out["delivery"] = dict(p.delivery)
    return out


def record_json(r: Record) -> dict[str, Any]:
    if isinstance(r, TopicRecord):
        return {"type": "topic", "topic": r.topic, "groups": list(r.groups)}
    if isinstance(r, MessageRecord):
        groups = {g: _pending_json(p) for g, p in r.groups.items()}
        return {"type": "message", "topic": r.topic, "id": r.id, "body": dict(r.body), "groups": groups}
    if isinstance(r, DeadRecord):
        return {"type": "dead", "topic": r.topic, "group": r.group, "id": r.id, "died_at": r.died_at,
                "ttl_s": r.ttl_s, "fields": dict(r.fields)}  # fmt: skip
    return {"type": "idempotency", "topic": r.topic, "key": r.key, "id": r.id, "ttl_s": r.ttl_s}


def encode(f: ExportFile) -> bytes:
    h = f.header
    head = {"format": FORMAT, "version": VERSION, "prefix": h.prefix, "key_schema": h.key_schema,
            "exported_at": h.exported_at}  # fmt: skip
    records: list[Record] = [*f.topics, *f.messages, *f.dead, *f.idempotency]
    lines = [orjson.dumps(head), *(orjson.dumps(record_json(r)) for r in records)]
    lines.append(orjson.dumps({"type": "end", "counts": f.counts()}))
    return b"\n".join(lines) + b"\n"


# ---- validation --------------------------------------------------------------------------------------------------


class _Obj:
    """Typed access to one record's fields; every miss is a ``LineError`` naming the line and the field."""

    def __init__(self, line: int, obj: Any, what: str) -> None:
        if not isinstance(obj, dict):
            raise LineError(line, f"{what} must be a JSON object")
        self.line, self.obj, self.what = line, obj, what

    def fail(self, message: str) -> LineError:
        return LineError(self.line, f"{self.what}: {message}")

    def text(self, name: str) -> str:
        v = self.obj.get(name)
        if not isinstance(v, str) or not v:
            raise self.fail(f"'{name}' must be a non-empty string")
        return v

    def integer(self, name: str) -> int:
        v = self.obj.get(name)
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.fail(f"'{name}' must be an integer")
        return v

    def maybe_integer(self, name: str) -> int | None:
        return None if self.obj.get(name) is None else self.integer(name)

    def name(self, kind: str, name: str) -> str:
        try:
            return validate_name(kind, self.obj.get(name))
        except InvalidNameError as e:
            raise self.fail(e.message) from None

    def msg_id(self, name: str = "id") -> str:
        v = self.text(name)
        if not _ID.fullmatch(v):
            raise self.fail(f"'{name}' {v!r} is not a message id (1-128 of letters, digits, '.', '_', '-')")
        return v

    def strmap(self, name: str, optional: bool = False) -> dict[str, str]:
        v = self.obj.get(name)
        if v is None and optional:
            return {}
        if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
            raise self.fail(f"'{name}' must be an object of strings (hash fields as Redis holds them)")
        return dict(v)


def _header(line: int, obj: Any) -> Header:
    o = _Obj(line, obj, "header")
    if o.obj.get("format") != FORMAT:
        raise o.fail(f"not a `broker export` file (format must be {FORMAT!r})")
    if o.obj.get("version") != VERSION:
        raise o.fail(f"format version {o.obj.get('version')!r} is not supported (this broker reads {VERSION})")
    return Header(o.text("prefix"), o.text("key_schema"), o.integer("exported_at"))


def _pending(o: _Obj, group: str, raw: Any) -> Pending:
    p = _Obj(o.line, raw, f"{o.what}, group {group}")
    state = p.obj.get("state")
    if state not in STATES:
        raise p.fail(f"'state' must be one of {', '.join(STATES)}")
    position = p.integer("position")
    if position < 0:
        raise p.fail("'position' must be >= 0")
    due = p.integer("due") if state == "delayed" else p.maybe_integer("due")
    return Pending(state, position, due, p.maybe_integer("leased_until"), p.strmap("delivery", optional=True))


def _message(o: _Obj) -> MessageRecord:
    topic, msg_id = o.name("topic", "topic"), o.msg_id()
    body = o.strmap("body")
    for required in ("payload", "headers", "published_at"):
        if required not in body:
            raise o.fail(f"body lacks '{required}'")
    if "refs" in body:
        raise o.fail("body must not carry 'refs' (recomputed on import)")
    groups = o.obj.get("groups")
    if not isinstance(groups, dict) or not groups:
        raise o.fail("'groups' must be a non-empty object: group -> pending state")
    pending = {}
    for g, raw in groups.items():
        try:
            validate_name("group", g)
        except InvalidNameError as e:
            raise o.fail(e.message) from None
        pending[g] = _pending(o, g, raw)
    return MessageRecord(topic, msg_id, body, pending)


def _dead(o: _Obj) -> DeadRecord:
    topic, group, msg_id = o.name("topic", "topic"), o.name("group", "group"), o.msg_id()
    died_at = o.integer("died_at")
    fields = o.strmap("fields")
    for required in ("payload", "errors", "reason", "died_at"):
        if required not in fields:
            raise o.fail(f"fields lack '{required}'")
    for name, want in (("id", msg_id), ("topic", topic), ("group", group)):
        if fields.get(name, want) != want:
            raise o.fail(f"fields.{name} {fields[name]!r} differs from the record's {want!r}")
    return DeadRecord(topic, group, msg_id, died_at, o.maybe_integer("ttl_s"), fields)


def _idempotency(o: _Obj) -> IdempotencyRecord:
    return IdempotencyRecord(o.name("topic", "topic"), o.text("key"), o.msg_id(), o.maybe_integer("ttl_s"))


class _Checker:
    """Cross-record rules: unique records, every topic and group declared by a ``topic`` record."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, ...], int] = {}
        self.uses: list[tuple[int, str, str | None]] = []  # (line, topic, group) to check at the end

    def once(self, line: int, key: tuple[str, ...], what: str) -> None:
        if key in self.seen:
            raise LineError(line, f"{what} appears twice (first on line {self.seen[key]})")
        self.seen[key] = line

    def finish(self, topics: list[TopicRecord]) -> None:
        groups = {t.topic: set(t.groups) for t in topics}
        for line, topic, group in self.uses:
            if topic not in groups:
                raise LineError(line, f"topic {topic!r} has no topic record")
            if group is not None and group not in groups[topic]:
                raise LineError(line, f"group {group!r} is not among topic {topic!r}'s groups in its topic record")


def parse(data: bytes) -> ExportFile:
    """The whole file, checked: header first, known record types, required fields, no duplicates, the end record
    last with matching counts. ``LineError`` names the first line that breaks a rule."""
    rows: Iterable[tuple[int, Any]] = parse_lines(data)
    out: ExportFile | None = None
    check = _Checker()
    end_line = 0
    last = 0
    for n, obj in rows:
        last = n
        if out is None:
            out = ExportFile(_header(n, obj))
            continue
        if end_line:
            raise LineError(n, f"nothing may follow the end record (line {end_line})")
        if not isinstance(obj, dict):
            raise LineError(n, "a record must be a JSON object with a 'type'")
        kind = obj.get("type")
        o = _Obj(n, obj, f"{kind} record")
        if kind == "topic":
            topic = o.name("topic", "topic")
            raw_groups = o.obj.get("groups")
            if not isinstance(raw_groups, list):
                raise o.fail("'groups' must be a list of group names")
            for g in raw_groups:
                try:
                    validate_name("group", g)
                except InvalidNameError as e:
                    raise o.fail(e.message) from None
            check.once(n, ("topic", topic), f"topic {topic!r}")
            out.topics.append(TopicRecord(topic, tuple(raw_groups)))
        elif kind == "message":
            m = _message(o)
            check.once(n, ("message", m.topic, m.id), f"message {m.id} of topic {m.topic!r}")
            check.uses += [(n, m.topic, g) for g in m.groups]
            out.messages.append(m)
        elif kind == "dead":
            d = _dead(o)
            check.once(n, ("dead", d.topic, d.group, d.id), f"dead letter {d.id} of {d.topic}/{d.group}")
            check.uses.append((n, d.topic, d.group))
            out.dead.append(d)
        elif kind == "idempotency":
            i = _idempotency(o)
            check.once(n, ("idem", i.topic, i.key), f"idempotency key {i.key!r} of topic {i.topic!r}")
            check.uses.append((n, i.topic, None))
            out.idempotency.append(i)
        elif kind == "end":
            counts = o.obj.get("counts")
            if counts != out.counts():
                raise o.fail(f"counts {counts!r} do not match the records read {out.counts()!r}")
            end_line = n
        else:
            raise LineError(n, f"unknown record type {kind!r} (expected one of {', '.join((*KINDS, 'end'))})")
    if out is None:
        raise LineError(1, "empty file: expected a header line")
    if not end_line:
        raise LineError(last + 1, "no end record: the file was cut short (every export ends with one)")
    check.finish(out.topics)
    return out


# JSON Lines input shared by the operator commands that read files (`dlq reprocess --from-file`, `import`): a file is
# checked whole before anything acts on it, so a bad line is reported by its number and nothing is changed.


class LineError(ValueError):
    """Line ``line`` (1-based) of a JSON Lines file is not what the reader expects."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


def parse_lines(data: bytes) -> Iterator[tuple[int, Any]]:
    """Each non-blank line parsed as JSON, with its 1-based number; ``LineError`` at the first that is not JSON."""
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise LineError(n, f"not JSON ({e})") from None
