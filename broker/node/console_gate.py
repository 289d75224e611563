"""The door to the web console at ``/console``: who may use it, what the mounted console gets of a request and what
it answers. Pure: no I/O.

The console itself (its pages and JSON API, built on the operator library ``broker/ops``) is a layer above the node
(``broker/console``); the node knows it only as the ``ConsoleHandler`` injected at start (``Broker(console=...)``).
Rules, checked here before the console sees a request:

- The page files (``/console/``, its script and style) are public code, like ``/client/``: GET, no token.
- The API (``/console/api/...``) needs a token whose ``admin`` permission is true, sent as ``Authorization: Bearer``;
  a ``?token=`` in its URL is refused (URLs end up in logs and browser history). Other tokens get 403. In open mode
  (no tokens at all) only a caller on this machine that names this machine in ``Host`` is let in (local
  development; the page says so); a ``Host`` naming any other machine is refused (DNS rebinding).
- The configured origin rules apply as to WebSocket handshakes (``auth.allowed_origins``); the broker's own origin
  (its console page) is always allowed. A mutating call (POST) must come from the broker's own origin (or an
  allowed one) whenever the browser names one, even when no origin list is configured: a page elsewhere cannot
  make an operator's browser reprocess or purge.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qsl, urlsplit

from broker.node.auth import ANONYMOUS, Authenticator, Principal, Refusal
from broker.store import RedisStore

PREFIX = "/console"
API = "/console/api/"


@dataclass(frozen=True)
class ConsoleRequest:
    method: str  # GET or POST
    path: str  # without the query string, e.g. "/console/api/overview"
    query: dict[str, str]  # the last value of each parameter
    principal: Principal  # who asked (ANONYMOUS for the page files and in open mode)
    local_dev: bool  # open mode, asked from this machine: no token needed (the page says so)


@dataclass(frozen=True)
class ConsoleAnswer:
    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


class ConsoleHandler(Protocol):
    """What the node calls for every ``/console`` request that passed the gate, and at shutdown."""

    async def __call__(self, req: ConsoleRequest) -> ConsoleAnswer: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class ConsoleContext:
    """What a console gets of the node that mounts it."""

    store: RedisStore
    node_id: str
    readiness: Callable[[], tuple[bool, list[str]]]
    auth_mode: str


ConsoleMount = Callable[[ConsoleContext], ConsoleHandler]


def is_loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    """``Host`` without its port: ``127.0.0.1:8765`` -> ``127.0.0.1``, ``[::1]:80`` -> ``::1``."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def names_this_machine(host_header: str | None) -> bool:
    name = _host_name(host_header or "")
    return name == "localhost" or is_loopback_address(name)


def same_origin(origin: str, host_header: str | None) -> bool:
    """``Origin`` names the broker itself (scheme and the ``Host`` the browser used)."""
    u = urlsplit(origin)
    return u.scheme in ("http", "https") and bool(host_header) and u.netloc == host_header


def split_target(target: str) -> tuple[str, dict[str, str]]:
    path, _, query = target.partition("?")
    return path, dict(parse_qsl(query, keep_blank_values=True))


@dataclass(frozen=True)
class Gate:
    auth: Authenticator
    open_mode: bool

    def admit(
        self,
        method: str,
        target: str,
        headers: dict[str, str],  # lower-case names: authorization, origin, host
        peer_host: str,
    ) -> ConsoleRequest | Refusal:
        path, query = split_target(target)
        if not path.startswith(API):
            if method != "GET":
                return Refusal(405, f"{method} is not allowed on {path}")
            return ConsoleRequest(method, path, query, ANONYMOUS, self.open_mode)
        if method not in ("GET", "POST"):
            return Refusal(405, f"{method} is not allowed on {path}")
        if "token" in query:
            return Refusal(400, "the console takes its token in the Authorization header, never in the URL")
        origin = headers.get("origin")
        ours = origin is not None and same_origin(origin, headers.get("host"))
        # the configured origin rules (the console's own page, served from here, is never foreign), and the token (or
        # open mode), as for a WebSocket handshake; the query is not passed on: no token is ever read from its URL
        verdict = self.auth.check(path, headers.get("authorization"), None if ours else origin)
        if isinstance(verdict, Refusal):
            return verdict
        if method == "POST" and not (origin is None or ours or origin in self.auth.origins):
            return Refusal(403, f"origin {origin!r} may not change anything here (not this broker's origin)")
        if self.open_mode:
            if not (is_loopback_address(peer_host) and names_this_machine(headers.get("host"))):
                return Refusal(
                    403, "the console needs an admin token; in open mode (no tokens) it serves this machine only"
                )
            return ConsoleRequest(method, path, query, verdict, True)
        if not verdict.admin:
            return Refusal(403, f"token {verdict.name!r} has no admin permission (tokens[].admin = true)")
        return ConsoleRequest(method, path, query, verdict, False)
