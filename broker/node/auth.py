"""Authentication and per-topic permissions (pure: no I/O).

A connection is authenticated once, in the WebSocket handshake: ``Authorization: Bearer <token>`` or, for browsers
that cannot set headers, ``?token=<token>``. Tokens are configured as SHA-256 hashes; the token itself is never
stored or logged. Each token carries publish/subscribe topic patterns (``fnmatch``: ``orders.*``).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from urllib.parse import parse_qs, urlsplit

from broker.core.config import AuthSettings, TokenSettings


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    name: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    admin: bool = False
    expires_at: float | None = None  # epoch seconds

    # topic -> (may publish, may subscribe): every publish checks its topic, and pattern matching costs more than
    # the rest of the permission path. Bounded: cleared when it reaches _CACHE_MAX topics.
    _cache: dict[str, tuple[bool, bool]] = field(default_factory=dict, init=False, compare=False, repr=False)

    def _allowed(self, topic: str) -> tuple[bool, bool]:
        got = self._cache.get(topic)
        if got is None:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            got = self._cache[topic] = (
                any(fnmatchcase(topic, p) for p in self.publish),
                any(fnmatchcase(topic, p) for p in self.subscribe),
            )
        return got

    def may_publish(self, topic: str) -> bool:
        return self._allowed(topic)[0]

    def may_subscribe(self, topic: str) -> bool:
        return self._allowed(topic)[1]


_CACHE_MAX = 10_000


ANONYMOUS = Principal("anonymous", ("*",), ("*",), admin=False)


@dataclass(frozen=True)
class Refusal:
    status: int  # HTTP status of the refused handshake
    reason: str  # for the log and the response body; never contains the token


class Authenticator:
    def __init__(self, auth: AuthSettings, tokens: tuple[TokenSettings, ...]) -> None:
        self.open = auth.mode == "open"
        self.origins = frozenset(auth.allowed_origins)
        self.by_hash = {
            t.sha256: Principal(t.name, t.publish, t.subscribe, t.admin, _epoch(t.expires) if t.expires else None)
            for t in tokens
        }

    def check(
        self, path: str, authorization: str | None, origin: str | None, now: float | None = None
    ) -> Principal | Refusal:
        if self.origins and origin is not None and origin not in self.origins:
            return Refusal(403, f"origin {origin!r} is not allowed")
        if self.open:
            return ANONYMOUS
        token = None
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                return Refusal(401, "Authorization header must be 'Bearer <token>'")
            token = value.strip()
        else:
            values = parse_qs(urlsplit(path).query).get("token")
            token = values[0] if values else None
        if not token:
            return Refusal(401, "missing token (Authorization: Bearer <token>, or ?token=)")
        principal = self.by_hash.get(token_hash(token))
        if principal is None:
            return Refusal(401, "invalid token")
        if principal.expires_at is not None and (now if now is not None else time.time()) >= principal.expires_at:
            return Refusal(401, f"token {principal.name!r} expired")
        return principal


def _epoch(iso: str) -> float:
    dt = datetime.fromisoformat(iso)
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
