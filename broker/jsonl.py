"""JSON Lines input shared by the operator commands that read files (``dlq reprocess --from-file``, ``import``).

Pure: bytes in, (line number, value) out. A file is checked whole before anything acts on it, so a bad line is
reported by its number and nothing is changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson


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
