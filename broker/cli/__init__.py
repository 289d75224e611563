"""The ``broker`` command: argument parsing and printing over the library code in ``broker.ops``, ``broker.node``
and ``broker.client``.

This module imports nothing but the standard library, so that ``broker`` installed without the server extra can
say what is missing instead of ending in a traceback."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from broker.cli.exits import EXIT_CONFIG

# The top-level modules of the `server` extra (pyproject.toml): the commands need them, the client does not.
SERVER_MODULES = frozenset({"redis", "pybreaker", "structlog", "prometheus_client", "fakeredis", "hiredis", "uvloop"})
NEEDS_SERVER_EXTRA = "the broker needs the server extra: pip install 'redis-ws-broker[server]'"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from broker.cli.command import main as run

        return run(argv)
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] not in SERVER_MODULES:
            raise
        print(NEEDS_SERVER_EXTRA, file=sys.stderr)
        return EXIT_CONFIG


__all__ = ["main"]
