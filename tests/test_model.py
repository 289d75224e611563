"""The delivery state table is data: walk it against the Lua scripts so the two cannot drift."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.core.errors import InvalidNameError
from broker.core.model import TRANSITIONS, State, new_message_id, validate_name

SCRIPTS = Path(__file__).resolve().parent.parent / "broker" / "store" / "scripts"


def test_every_transition_names_existing_scripts_and_every_script_is_a_transition() -> None:
    named = {s for scripts in TRANSITIONS.values() for s in scripts}
    on_disk = {p.stem for p in SCRIPTS.glob("*.lua") if not p.stem.startswith("_")}
    assert named == on_disk


@pytest.mark.parametrize(("edge", "scripts"), list(TRANSITIONS.items()))
def test_each_script_header_names_its_transition(
    edge: tuple[State | None, State | None], scripts: tuple[str, ...]
) -> None:
    for name in scripts:
        lines = (SCRIPTS / f"{name}.lua").read_text().splitlines()
        assert lines[0].startswith(f"-- {name}.lua: transition"), lines[0]
        header = " ".join(line for line in lines if line.startswith("--"))
        for state in edge:
            if state is not None and state is not State.ACKED:
                assert state.name in header or state.value in header.lower(), (name, state, header)


def test_state_table_reaches_every_state() -> None:
    reached = {to for (_, to) in TRANSITIONS}
    assert set(State) <= reached | {None}


def test_message_ids_are_unique_and_sortable() -> None:
    ids = [new_message_id(1_000 + i // 10) for i in range(1000)]
    assert len(set(ids)) == 1000 and ids == sorted(ids)


@pytest.mark.parametrize("bad", ["", "a b", "{x}", "a:b", "*", "-lead", "x" * 129, "t\n", 5, None])
def test_invalid_names_are_refused(bad: object) -> None:
    with pytest.raises(InvalidNameError):
        validate_name("topic", bad)
