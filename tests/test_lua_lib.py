"""lua_lib.with_lib: a script gets the library definitions it names, and the ones those name, and no others."""

from __future__ import annotations

import re
from importlib import resources

from broker.store.lua_lib import definitions, with_lib
from broker.store.scripts import load_script

LIB = resources.files("broker.store").joinpath("scripts/_lib.lua").read_text()


def defined(text: str) -> list[str]:
    return re.findall(r"^local (?:function )?([A-Za-z_]\w*)", text, flags=re.M)


def test_the_library_splits_into_its_top_level_definitions_in_order() -> None:
    names = [n for n, _ in definitions(LIB)]
    assert names == defined(LIB)
    assert "".join(body for _, body in definitions(LIB)) == LIB[LIB.index("local function key(") :]


def test_a_script_gets_what_it_names_and_what_that_names_in_the_librarys_order() -> None:
    # dead_letter names key, BODY_FIELDS, put_dead_letter (which names call_chunked), key_done (make_live) and
    # release_body
    text = with_lib(LIB, "return dead_letter(q, 't', 'id', 'r', 0)")
    got = defined(text)
    want = ["key", "call_chunked", "release_body", "make_live", "key_done", "BODY_FIELDS", "put_dead_letter",
            "dead_letter"]  # fmt: skip
    assert got == [n for n in defined(LIB) if n in want]


def test_a_name_in_a_comment_or_as_a_field_brings_nothing() -> None:
    text = with_lib(LIB, "-- unhold() would be called here\nlocal x = q.held_fields\nreturn key(ARGV[1], 'a')")
    assert defined(text) == ["key", "x"]


def test_the_claim_script_carries_only_its_helpers() -> None:
    text = load_script("claim")
    assert defined(text.split("\n-- claim.lua:")[0]) == ["key", "call_chunked"]
