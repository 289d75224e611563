"""docs/logging.md stays true: its two event tables list exactly the log events in ``broker/``, each with the
level(s) it is logged at, the module(s) that log it and its fields. The broker logs with structlog; the client with
the standard library, through an adapter called the same way (``log.warning("broker_error", code=...)``).

The source side is read with ``ast``: every ``log.<level>("event", key=...)`` and ``self.log.<level>(...)`` call
(``self.log`` being ``log.bind(...)``, whose keys count as fields). Events logged by ``broker/client/client.py`` run
in the application's process and belong to the "Client library events" table; all others to "Broker events".
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BROKER = REPO / "broker"
DOC = REPO / "docs" / "logging.md"

LEVELS = {
    "debug": "debug",
    "info": "info",
    "msg": "info",
    "warning": "warning",
    "warn": "warning",
    "error": "error",
    "exception": "error",  # structlog logs exception() at error, with the traceback as `exception`
    "critical": "critical",
    "fatal": "critical",
}
LOGGERS = {"log", "self.log"}
CLIENT_MODULES = {"client/client"}
SECTIONS = {"## Broker events": "broker", "## Client library events": "client"}

# Event names that are not string literals, with what they can expand to. Keep this empty: a literal name is what
# an operator greps for. (broker/client/client.py logs f"delivery_{op}" for op in ("paused", "resumed").)
DYNAMIC = {"f'delivery_{op}'": ("delivery_paused", "delivery_resumed")}

_ROW = re.compile(r"^\|\s*`(?P<event>[a-z][a-z0-9_]*)`\s*\|(?P<rest>.*)\|\s*$")
_TICKED = re.compile(r"`([^`]+)`")
_PAREN = re.compile(r"\([^)]*\)")


@dataclasses.dataclass
class Event:
    levels: set[str] = dataclasses.field(default_factory=set)
    sources: set[str] = dataclasses.field(default_factory=set)
    fields: set[str] = dataclasses.field(default_factory=set)


def _module(path: Path) -> str:
    return path.relative_to(BROKER).with_suffix("").as_posix()


def source_events() -> dict[str, dict[str, Event]]:
    """{"broker" | "client": {event: Event}} from the broker package's source."""
    out: dict[str, dict[str, Event]] = {"broker": {}, "client": {}}
    for path in sorted(BROKER.rglob("*.py")):
        module = _module(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        bound: set[str] = set()  # keys of `self.log = log.bind(...)` in this module
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["self.log"]:
                call = node.value
                assert isinstance(call, ast.Call) and ast.unparse(call.func) == "log.bind", ast.unparse(node)
                bound |= {kw.arg for kw in call.keywords if kw.arg}
            if isinstance(node, ast.Assign) and "get_logger" in ast.unparse(node.value):
                names = [ast.unparse(t) for t in node.targets]
                assert names == ["log"], f"{path}: name structlog loggers `log` so this test finds them ({names})"
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            receiver, method = ast.unparse(node.func.value), node.func.attr
            if receiver not in LOGGERS or method not in LEVELS:
                continue
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            assert node.args, f"{where}: a log call without an event name"
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names: tuple[str, ...] = (first.value,)
            else:
                text = ast.unparse(first)
                assert text in DYNAMIC, f"{where}: event name {text} is not a literal; list its expansions in DYNAMIC"
                names = DYNAMIC[text]
            assert all(kw.arg for kw in node.keywords), f"{where}: **kwargs hide the fields of a log event"
            fields = {kw.arg for kw in node.keywords if kw.arg}
            if "exc_info" in fields:  # rendered as the formatted traceback, `exception`
                fields = (fields - {"exc_info"}) | {"exception"}
            if receiver == "self.log":
                fields |= bound
            if method == "exception":
                fields.add("exception")
            side = "client" if module in CLIENT_MODULES else "broker"
            for name in names:
                ev = out[side].setdefault(name, Event())
                ev.levels.add(LEVELS[method])
                ev.sources.add(module)
                ev.fields |= fields
    return out


def documented_events() -> dict[str, dict[str, Event]]:
    """The same shape, from the two tables of docs/logging.md (Event | Level | Source | When | Fields)."""
    out: dict[str, dict[str, Event]] = {"broker": {}, "client": {}}
    side: str | None = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            side = SECTIONS.get(line.strip())
            continue
        m = _ROW.match(line)
        if side is None or not m:
            continue
        cells = [c.strip() for c in m["rest"].split("|")]
        assert len(cells) == 4, f"expected 5 columns in {line!r}"
        level, source, _when, fields = cells
        assert m["event"] not in out[side], f"{m['event']} is documented twice in the {side} table"
        out[side][m["event"]] = Event(
            levels={x.strip() for x in level.split(",")},
            sources=set(_TICKED.findall(source)),
            fields=set(_TICKED.findall(_PAREN.sub("", fields))),  # "(...)" explains a field, names none
        )
    return out


SOURCE = source_events()
DOCUMENTED = documented_events()


def test_the_source_has_events() -> None:
    assert len(SOURCE["broker"]) >= 30, sorted(SOURCE["broker"])
    assert {"connection_opened", "connection_closed", "connection_refused"} <= set(SOURCE["broker"])
    assert SOURCE["client"], "broker/client/client.py logs events too"


def test_every_event_is_documented_and_every_documented_event_exists() -> None:
    for side in ("broker", "client"):
        src, doc = set(SOURCE[side]), set(DOCUMENTED[side])
        assert src - doc == set(), f"{side} events logged but not in docs/logging.md: {sorted(src - doc)}"
        assert doc - src == set(), f"{side} events in docs/logging.md that nothing logs: {sorted(doc - src)}"


def test_levels_sources_and_fields_match() -> None:
    problems = []
    for side in ("broker", "client"):
        for name, ev in SOURCE[side].items():
            doc = DOCUMENTED[side].get(name)
            if doc is None:
                continue  # reported by the test above
            for what in ("levels", "sources", "fields"):
                want, got = getattr(ev, what), getattr(doc, what)
                if want != got:
                    problems.append(f"{side} {name}: {what} in source {sorted(want)}, documented {sorted(got)}")
    assert not problems, "\n".join(problems)


def test_connection_events_carry_conn_id() -> None:
    """The convention docs/logging.md states: every event about an accepted connection carries `conn_id`."""
    in_session = {name for name, ev in SOURCE["broker"].items() if "node/session" in ev.sources}
    per_connection = in_session | {"connection_opened"}
    assert {"connection_opened", "connection_closed", "subscribed"} <= per_connection
    for name in per_connection:
        assert "conn_id" in SOURCE["broker"][name].fields, name
    assert "conn_id" not in SOURCE["broker"]["connection_refused"].fields  # refused before an id exists
    assert {"peer", "path", "reason"} <= SOURCE["broker"]["connection_refused"].fields
