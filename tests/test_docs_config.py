"""docs/config.md stays true: its settings table names exactly ``setting_names()``, with the real types, defaults and
environment variables, and config/broker.toml (which documents the defaults) loads to exactly ``Settings()``."""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from pathlib import Path
from typing import Any, get_type_hints

import pytest

from broker.core.config import SECTIONS, HandlerSettings, Settings, TokenSettings, load_settings, setting_names

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "config.md"
BROKER_TOML = REPO / "config" / "broker.toml"

_ROW = re.compile(r"^\|\s*`(?P<name>[a-z_]+(?:\[\])?\.[a-z_0-9]+)`\s*\|(?P<rest>.*)\|\s*$")


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    type: str
    default: str
    env: str
    meaning: str


def table() -> dict[str, Row]:
    rows: dict[str, Row] = {}
    for line in DOC.read_text().splitlines():
        m = _ROW.match(line)
        if not m:
            continue
        cells = [c.strip() for c in m["rest"].split("|")]
        assert len(cells) == 4, f"expected 5 columns in {line!r}"
        assert m["name"] not in rows, f"{m['name']} is documented twice"
        rows[m["name"]] = Row(m["name"], *cells)
    return rows


ROWS = table()


def actual(name: str) -> tuple[Any, Any]:
    """(default value, type annotation) of ``section.key`` or ``handlers[].key``."""
    section, key = name.split(".")
    if section == "handlers[]":
        return getattr(HandlerSettings(), key), get_type_hints(HandlerSettings)[key]
    if section == "tokens[]":
        return getattr(TokenSettings(), key), get_type_hints(TokenSettings)[key]
    return getattr(getattr(Settings(), section), key), get_type_hints(SECTIONS[section])[key]


def type_word(kind: Any) -> str:
    if typing.get_origin(kind) is tuple:
        return f"list of {type_word(typing.get_args(kind)[0])}"
    return str(kind.__name__)


def parse_default(cell: str) -> Any:
    m = re.fullmatch(r"`(.*)`", cell)
    assert m, f"default {cell!r} must be one TOML literal in backticks"
    value = tomllib.loads(f"v = {m[1]}")["v"]
    return tuple(value) if isinstance(value, list) else value


def test_table_names_every_setting_and_nothing_else() -> None:
    documented, real = set(ROWS), set(setting_names())
    assert not real - documented, f"settings missing from docs/config.md: {sorted(real - documented)}"
    assert not documented - real, f"docs/config.md documents settings that do not exist: {sorted(documented - real)}"


@pytest.mark.parametrize("name", setting_names())
def test_documented_default_type_and_env_var_are_real(name: str) -> None:
    row = ROWS.get(name)
    assert row is not None, f"{name} is not in docs/config.md"
    default, kind = actual(name)
    documented = parse_default(row.default)
    assert documented == default and type(documented) is type(default), (
        f"{name}: docs say {row.default}, Settings() has {default!r}"
    )
    assert row.type == type_word(kind)
    section, key = name.split(".")
    if section in ("handlers[]", "tokens[]"):
        assert row.env.startswith("—"), f"{name} cannot be set from the environment"
    else:
        var = f"BROKER_{section}_{key}".upper()
        assert row.env.split(" ")[0] == f"`{var}`"
        assert getattr(getattr(load_settings(environ={var: _env_text(default)}), section), key) == default
    assert row.meaning, f"{name} has no meaning"


def _env_text(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def test_config_file_documents_exactly_the_defaults() -> None:
    # but auth.mode: the file sets "open" explicitly (open mode is never a silent default)
    assert load_settings(str(BROKER_TOML), environ={}) == Settings().replace("auth", mode="open")


def test_config_file_lists_every_section_key() -> None:
    # config/broker.toml says it lists every key; the handlers array is shown commented out (no handler by default)
    data = tomllib.loads(BROKER_TOML.read_text())
    listed = {f"{s}.{k}" for s, table in data.items() for k in table}
    assert listed == {n for n in setting_names() if not n.startswith(("handlers[].", "tokens[]."))}
