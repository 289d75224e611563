"""The export file format (broker/core/records.py), pure: encode/parse round trip, the JSON Schema in docs/schema,
and every malformed input refused with the number of the line that breaks the rule (nothing is half-read)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from broker.core.records import (
    DeadRecord,
    ExportFile,
    Header,
    IdempotencyRecord,
    LineError,
    MessageRecord,
    Pending,
    TopicRecord,
    encode,
    parse,
)

SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "docs/schema/export-record.json").read_text())
ID = "01a208ad1f34a2e0dd7200000001"
ID2 = "01a208ad1f34a2e0dd7200000002"


def sample() -> ExportFile:
    f = ExportFile(Header("mq", "1", 1_718_000_000_000))
    f.topics.append(TopicRecord("orders", ("billing", "default")))
    f.messages.append(
        MessageRecord(
            "orders",
            ID,
            {"payload": '{"n":1}', "headers": "{}", "published_at": "1718000000000", "key": "k", "max_attempts": "3"},
            {
                "billing": Pending("leased", 0, leased_until=1_718_000_030_000, delivery={"attempts": "1"}),
                "default": Pending("delayed", 3, due=1_718_000_005_000),
            },
        )
    )
    f.messages.append(
        MessageRecord(
            "orders", ID2, {"payload": "2", "headers": "{}", "published_at": "1"}, {"default": Pending("waiting", 4)}
        )
    )
    fields = {
        "id": ID,
        "topic": "orders",
        "group": "billing",
        "payload": "1",
        "errors": "[]",
        "reason": "rejected",
        "died_at": "1718000000000",
    }
    f.dead.append(DeadRecord("orders", "billing", ID, 1_718_000_000_000, 600, fields))
    f.dead.append(DeadRecord("orders", "default", ID, 1_718_000_000_000, None, {**fields, "group": "default"}))
    f.idempotency.append(IdempotencyRecord("orders", "order-1", ID, 86_000))
    return f


def lines() -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in encode(sample()).splitlines()]


def refused(rows: list[Any], raw: bytes | None = None) -> LineError:
    data = raw if raw is not None else b"\n".join(orjson.dumps(r) for r in rows) + b"\n"
    with pytest.raises(LineError) as e:
        parse(data)
    return e.value


def test_round_trip_keeps_every_field() -> None:
    f = sample()
    back = parse(encode(f))
    assert back == f
    assert back.messages[0].body["max_attempts"] == "3"  # a field this version does not know travels unchanged


def test_every_line_matches_the_documented_schema() -> None:
    Draft202012Validator.check_schema(SCHEMA)
    v = Draft202012Validator(SCHEMA)
    rows = lines()
    assert [r.get("type", "header") for r in rows] == [
        "header",
        "topic",
        "message",
        "message",
        "dead",
        "dead",
        "idempotency",
        "end",
    ]
    for r in rows:
        assert list(v.iter_errors(r)) == [], r
    bad = [
        {**rows[0], "version": 2},
        {**rows[2], "body": {**rows[2]["body"], "refs": "2"}},
        {**rows[2], "groups": {"billing": {"state": "delayed", "position": 0}}},
        {**rows[4], "fields": {"payload": "1"}},
        {"type": "end", "counts": {"topic": 1}},
    ]
    for r in bad:
        assert list(v.iter_errors(r)), r


def test_blank_lines_are_ignored() -> None:
    assert parse(encode(sample()).replace(b"\n", b"\n\n")) == sample()


@pytest.mark.parametrize(
    ("line", "change", "message"),
    [
        (1, lambda r: {**r, "format": "something-else"}, "not a `broker export` file"),
        (1, lambda r: {**r, "version": 2}, "format version 2 is not supported"),
        (1, lambda r: {k: v for k, v in r.items() if k != "exported_at"}, "'exported_at' must be an integer"),
        (2, lambda r: {**r, "topic": "bad topic"}, "invalid topic name"),
        (2, lambda r: {**r, "groups": "billing"}, "'groups' must be a list"),
        (3, lambda r: {k: v for k, v in r.items() if k != "id"}, "'id' must be a non-empty string"),
        (3, lambda r: {**r, "id": "x{y}"}, "is not a message id"),
        (3, lambda r: {**r, "body": {"headers": "{}", "published_at": "1"}}, "body lacks 'payload'"),
        (3, lambda r: {**r, "body": {**r["body"], "refs": "2"}}, "must not carry 'refs'"),
        (3, lambda r: {**r, "body": {**r["body"], "published_at": 1}}, "'body' must be an object of strings"),
        (3, lambda r: {**r, "groups": {}}, "'groups' must be a non-empty object"),
        (3, lambda r: {**r, "groups": {"billing": {"state": "lost", "position": 0}}}, "'state' must be one of"),
        (3, lambda r: {**r, "groups": {"billing": {"state": "delayed", "position": 0}}}, "'due' must be an integer"),
        (3, lambda r: {**r, "groups": {"billing": {"state": "ready", "position": -1}}}, "'position' must be >= 0"),
        (3, lambda r: {**r, "groups": {"audit": {"state": "ready", "position": 0}}}, "group 'audit' is not among"),
        (3, lambda r: {**r, "topic": "other"}, "topic 'other' has no topic record"),
        (5, lambda r: {**r, "fields": {**r["fields"], "group": "default"}}, "differs from the record's"),
        (5, lambda r: {k: v for k, v in r.items() if k != "died_at"}, "'died_at' must be an integer"),
        (5, lambda r: {**r, "fields": {"payload": "1"}}, "fields lack 'errors'"),
        (7, lambda r: {**r, "key": ""}, "'key' must be a non-empty string"),
        (7, lambda r: {**r, "type": "idem"}, "unknown record type 'idem'"),
        (7, lambda r: [r], "a record must be a JSON object"),
        (8, lambda r: {**r, "counts": {**r["counts"], "message": 3}}, "do not match the records read"),
    ],
)
def test_a_malformed_record_is_refused_with_its_line(line: int, change: Any, message: str) -> None:
    rows: list[Any] = lines()
    rows[line - 1] = change(rows[line - 1])
    e = refused(rows)
    assert e.line == line and message in e.message, (e.line, e.message)


def test_file_level_mistakes_name_their_line() -> None:
    rows: list[Any] = lines()
    # not JSON
    data = encode(sample()).splitlines()
    data[2] = data[2][:-5]
    e = refused([], b"\n".join(data))
    assert (e.line, e.message.startswith("not JSON")) == (3, True)
    # duplicates
    e = refused([*rows[:3], rows[2], *rows[3:]])
    assert e.line == 4 and "appears twice (first on line 3)" in e.message
    # cut short: no end record (the line after the last one is named)
    e = refused(rows[:-1])
    assert e.line == 8 and "no end record" in e.message
    # something after the end record
    e = refused([*rows, rows[1]])
    assert e.line == 9 and "nothing may follow the end record" in e.message
    # no header first
    e = refused(rows[1:])
    assert e.line == 1 and "not a `broker export` file" in e.message
    # empty
    e = refused([], b"\n\n")
    assert e.line == 1 and "empty file" in e.message
