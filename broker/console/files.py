"""The console's page files (``broker/console/static``, package data of the wheel) served at ``/console/``.

Only the names below are served (an allowlist: no path from a request reaches the file system); read once, at
start, answered with ``Cache-Control: no-cache`` (the node adds it: a new page right after an upgrade). The page
carries a Content-Security-Policy that allows nothing but this origin: no CDN, no inline script, no framing (a page
elsewhere cannot overlay the purge button)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from broker.node.console_gate import ConsoleAnswer

HOME = Path(__file__).resolve().parent / "static"
INDEX = "index.html"
TYPES = {
    INDEX: "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "chart.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class PageFiles:
    def __init__(self, home: Path = HOME) -> None:
        self.files: dict[str, bytes] = {}
        for name in TYPES:
            with contextlib.suppress(OSError):  # not installed with the package: answered 404 like an unknown name
                self.files[name] = (home / name).read_bytes()

    def answer(self, name: str) -> ConsoleAnswer | None:
        """The file (``""``: the page), or None when no such file is served."""
        name = name or INDEX
        body = self.files.get(name)
        if body is None:
            return None
        headers = [("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer")]
        if name == INDEX:
            headers.append(("Content-Security-Policy", CSP))
        return ConsoleAnswer(200, body, TYPES[name], tuple(headers))
