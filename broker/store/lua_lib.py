"""A script's text with the part of ``scripts/_lib.lua`` it uses.

Redis runs a script's whole text on every call: each ``local function`` of the library makes a closure and each
table constant a table, whether the script calls them or not. The full library cost about 1.9 µs of Redis CPU per
call (``EVALSHA`` of the library and ``return 1``: 2.6 µs against 0.7), and at a low rate every message is two or
three calls. So a script gets the library's definitions it names, and the ones those name, in the library's order.

A definition is a top-level line ``local function NAME`` or ``local NAME =`` and the lines up to the next one; a
name counts as used where it appears as a word outside a comment (``--`` to the end of the line; no string of the
scripts holds ``--``). A name missed would fail every call of the script (``attempt to call a nil value``), which
every script's tests would show."""

from __future__ import annotations

import re

_DEF = re.compile(r"^local (?:function )?([A-Za-z_]\w*)", re.M)


def definitions(lib: str) -> list[tuple[str, str]]:
    """The library's top-level definitions in order: (name, text). The text before the first is left out (the
    library's header comment)."""
    starts = list(_DEF.finditer(lib))
    return [
        (m.group(1), lib[m.start() : starts[i + 1].start() if i + 1 < len(starts) else len(lib)])
        for i, m in enumerate(starts)
    ]


_COMMENT = re.compile(r"--[^\n]*")


def _uses(code: str, name: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(name)}\b", code) is not None


def with_lib(lib: str, script: str) -> str:
    """``script`` preceded by the definitions of ``lib`` it needs (transitively), in the library's order."""
    defs = definitions(lib)
    needed: set[str] = set()
    pending = [script]
    while pending:
        code = _COMMENT.sub("", pending.pop())
        for name, body in defs:
            if name not in needed and _uses(code, name):
                needed.add(name)
                pending.append(body)
    return "".join(body for name, body in defs if name in needed) + "\n" + script
