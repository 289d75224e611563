"""The argument parser of ``broker``: a mistake prints the usage of the sub-command it was made in (not the top
level's) and, for a misspelled flag or command, the closest known one ("did you mean --json?"). Exit code 2."""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from broker.cli.exits import EXIT_USAGE

_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)'")


class CliParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        hint = suggestion(message, self)
        print(f"{self.prog}: error: {message}{hint}", file=sys.stderr)
        sys.exit(EXIT_USAGE)

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """An unknown flag is reported by the sub-command that got it, with that sub-command's usage."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            chosen = getattr(ns, "_parser", None) or self
            chosen.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns


def suggestion(message: str, parser: argparse.ArgumentParser) -> str:
    """'; did you mean X?' for an unknown flag or an invalid sub-command choice, when one is close enough."""
    m = _INVALID_CHOICE.search(message)
    if m:
        choices = [c for a in parser._actions if a.choices for c in a.choices]
        close = difflib.get_close_matches(m.group(1), [str(c) for c in choices], n=1)
        return f"; did you mean {close[0]!r}?" if close else ""
    if message.startswith("unrecognized arguments:"):
        known = [o for a in parser._actions for o in a.option_strings]
        for word in message.split(":", 1)[1].split():
            flag = word.split("=", 1)[0]
            if flag.startswith("-") and flag != "-":
                close = difflib.get_close_matches(flag, known, n=1)
                if close:
                    return f"; did you mean {close[0]}?"
    return ""
