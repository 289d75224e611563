"""Settings: one frozen dataclass tree, merged in one order (pure: no I/O beyond reading the TOML file).

defaults < ``config/broker.toml`` (or ``--config FILE``) < ``BROKER_<SECTION>_<KEY>`` env < CLI overrides.
An unknown or misspelled key in any source is a ``ConfigError``, never ignored. Units are in field names.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, get_type_hints

from broker.core.errors import ConfigError


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8765
    max_frame_bytes: int = 1_048_576  # larger frames close the connection with 1009
    max_payload_bytes: int = 262_144  # payload JSON text; larger -> payload_too_large
    max_headers_bytes: int = 8_192
    max_unconfirmed_publishes: int = 10_000  # per connection; beyond it the reader waits (backpressure)
    outbox_high_water: int = 1_000  # frames queued to one client before deliveries to it pause
    shutdown_grace_ms: int = 5_000
    max_connections: int = 10_000  # in total on this node; beyond it the handshake gets HTTP 503
    max_connections_per_token: int = 1_000  # per token name (auth.mode = tokens); beyond it HTTP 429
    max_subscriptions_per_connection: int = 100  # (topic, group) pairs one connection may consume (push or pull)
    max_pulls_per_connection: int = 100  # pull requests one connection may have waiting at once
    publish_rate_per_s: float = 50_000.0  # per connection, token bucket; 0 = unlimited. Excess: rate_limited
    publish_burst: int = 100_000  # tokens a connection may save up
    max_bad_frames: int = 1_000  # invalid frames one connection may send; then it is closed with 1008
    handshake_timeout_s: float = 10.0  # opening handshake must complete within this
    tls_cert_file: str = ""  # PEM certificate (chain); with tls_key_file: serve wss:// and https:// only
    tls_key_file: str = ""
    metrics_enabled: bool = True  # false: every metric is a no-op and /metrics answers 404 (to measure their cost)
    idle_timeout_s: float = 0.0  # close a connection that sent nothing for this long (0: off; pings find dead peers)


@dataclass(frozen=True)
class RedisSettings:
    url: str = ""  # empty: embedded redis-server (or fakeredis when no binary exists)
    key_prefix: str = "mq"
    socket_timeout_ms: int = 2_000
    connect_timeout_ms: int = 1_000
    data_dir: str = ".data/redis"  # embedded mode only
    embedded_port: int = 0  # embedded mode only; 0 picks a free loopback port
    startup_wait_s: float = 30.0  # at start, how long to keep trying an unreachable Redis before giving up (exit 4)
    cluster: bool = False  # true: url is a seed node of a Redis Cluster (docs/scaling.md)
    replicas_to_ack: int = 0  # >= 1: a publish is confirmed only after WAIT saw this many replicas take it
    replicas_ack_timeout_ms: int = 1_000  # how long WAIT may wait for them; short of them: unavailable


@dataclass(frozen=True)
class DeliverySettings:
    lease_ms: int = 30_000
    prefetch: int = 10
    max_prefetch: int = 1_000
    claim_batch: int = 200  # most messages one claim script takes
    poll_interval_ms: int = 250  # idle re-check when no wake-up arrives (pub/sub is best effort)
    sweep_interval_ms: int = 500  # lease expiry + due-retry promotion
    publish_without_group: str = "default"  # "default": store for group `default`; "reject": not_found error
    # The dedup window: 10 min covers the client's reconnect-and-retry deadline (5 min) twice over (docs/config.md).
    idempotency_ttl_s: int = 600
    max_delay_ms: int = 7 * 86_400_000
    node_timeout_ms: int = 10_000  # a node without heartbeat this long is dead: its leases are swept at once
    strict_order_groups: tuple[str, ...] = ()  # "topic/group" entries: one in flight, a retry holds the head
    max_pull_wait_ms: int = 60_000  # longest wait_ms a pull may ask for


@dataclass(frozen=True)
class RetrySettings:
    max_attempts: int = 5
    backoff_base_ms: int = 1_000
    backoff_multiplier: float = 2.0
    backoff_cap_ms: int = 60_000
    jitter: float = 0.2  # +/- fraction of the computed delay
    # bounds on a message's own retry policy (publish fields max_attempts, backoff_base_ms)
    max_attempts_limit: int = 100
    backoff_base_min_ms: int = 10
    backoff_base_max_ms: int = 3_600_000


@dataclass(frozen=True)
class DlqSettings:
    ttl_s: int = 7 * 86_400
    prune_interval_s: int = 30  # how often expired dead letters are dropped from the indexes


@dataclass(frozen=True)
class RetentionSettings:
    # "recently acked" audit record per group (ZSET id -> acked_at): off at 0; else at most this many entries,
    # none older than acked_audit_ttl_s. Acked messages otherwise leave nothing behind in Redis.
    acked_audit_max: int = 0
    acked_audit_ttl_s: int = 3_600


@dataclass(frozen=True)
class AuthSettings:
    # "tokens": every connection needs a configured token, and `broker serve` refuses to start without one;
    # "open": no authentication (warned at every start; loopback only unless allow_open_remote)
    mode: str = "tokens"
    allow_open_remote: bool = False  # open mode on a non-loopback server.host: refused at startup unless true
    allowed_origins: tuple[str, ...] = ()  # browser Origin values allowed; empty: any (non-browser clients send none)
    tokens_file: str = ""  # TOML file of [[tokens]] tables (e.g. a mounted secret), added to those in the config


@dataclass(frozen=True)
class TokenSettings:
    """One credential, stored as the SHA-256 hex of the token (``broker token-hash``), never the token itself."""

    name: str = ""
    sha256: str = ""
    publish: tuple[str, ...] = ("*",)  # topic patterns (fnmatch: `orders.*`) this token may publish to
    subscribe: tuple[str, ...] = ("*",)  # topic patterns it may subscribe to
    admin: bool = False  # the web console at /console and its API (docs/console.md); others get 403 there
    expires: str = ""  # ISO 8601 date or time (UTC if no zone); empty: never. After it, the token is refused


@dataclass(frozen=True)
class HandlerSettings:
    """One in-process consumer: ``target`` is ``package.module:function``, an ``async def f(message)``."""

    topic: str = ""
    group: str = "default"
    target: str = ""
    timeout_ms: int = 30_000
    concurrency: int = 10


@dataclass(frozen=True)
class BreakerSettings:
    redis_fail_max: int = 5
    redis_reset_timeout_s: float = 60.0
    redis_success_threshold: int = 3
    redis_call_timeout_ms: int = 3_000
    handler_fail_max: int = 3
    handler_reset_timeout_s: float = 30.0
    handler_success_threshold: int = 2


@dataclass(frozen=True)
class LoopSettings:
    """Supervision of the node's background loops (broker/supervisor.py)."""

    fail_threshold: int = 3  # consecutive failed steps before a loop makes /readyz 503
    backoff_cap_s: float = 10.0  # longest wait before a failed loop tries again (exponential with jitter below it)
    stall_timeout_s: float = 10.0  # a loop silent for max(this, 5 x its interval) past its planned wait is stalled


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "auto"  # auto (JSON unless a TTY) | json | console


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    retry: RetrySettings = field(default_factory=RetrySettings)
    dlq: DlqSettings = field(default_factory=DlqSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    breakers: BreakerSettings = field(default_factory=BreakerSettings)
    loops: LoopSettings = field(default_factory=LoopSettings)
    log: LogSettings = field(default_factory=LogSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    handlers: tuple[HandlerSettings, ...] = ()  # [[handlers]] tables in TOML (not settable from the environment)
    tokens: tuple[TokenSettings, ...] = ()  # [[tokens]] tables in TOML (not settable from the environment)

    def replace(self, section: str, **values: Any) -> Settings:
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **values)})


TABLE_ARRAYS = ("handlers", "tokens")
SECTIONS: dict[str, type[Any]] = {k: v for k, v in get_type_hints(Settings).items() if k not in TABLE_ARRAYS}


def setting_names() -> list[str]:
    """Every ``section.key``, in declaration order (docs/config.md lists exactly these), then ``handlers[].key``."""
    names = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    names += [f"handlers[].{f.name}" for f in dataclasses.fields(HandlerSettings)]
    return names + [f"tokens[].{f.name}" for f in dataclasses.fields(TokenSettings)]


def _coerce(where: str, kind: type[Any], value: Any, *, text: bool = True) -> Any:
    """``value`` as ``kind``. ``text``: the source only has strings (environment, flags), so ``"8765"`` is parsed;
    from a typed source (TOML) a string where a number or boolean belongs is a mistake and refused."""
    try:
        if not text and isinstance(value, str) and kind in (int, float, bool):
            raise ValueError(value)
        if kind is bool and not isinstance(value, bool) and not isinstance(value, str):
            raise ValueError(value)
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if typing.get_origin(kind) is tuple:
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
                raise ValueError(value)
            return tuple(i.strip() for i in items if i.strip())
        if kind is str:
            if not isinstance(value, str):  # `host = 8765` in TOML is a mistake, not a string
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}") from None
    raise ConfigError(f"{where}: unsupported type {kind}")


_T = typing.TypeVar("_T")


def _tables(raw: Any, source: str, name: str, cls: type[_T]) -> list[_T]:
    """An array of tables (``[[name]]``), each checked against ``cls``: unknown keys are errors."""
    if not isinstance(raw, list) or not all(isinstance(t, Mapping) for t in raw):
        raise ConfigError(f"{source}: {name} must be an array of tables ([[{name}]])")
    hints = get_type_hints(cls)
    out = []
    for i, table in enumerate(raw):
        for key in table:
            if key not in hints:
                raise ConfigError(f"{source}: unknown setting {name}[{i}].{key} (known: {', '.join(hints)})")
        out.append(cls(**{k: _coerce(f"{source}: {name}[{i}].{k}", hints[k], v, text=False) for k, v in table.items()}))
    return out


def _handlers(raw: Any, source: str) -> tuple[HandlerSettings, ...]:
    out = _tables(raw, source, "handlers", HandlerSettings)
    for i, h in enumerate(out):
        if not h.topic or ":" not in h.target:
            raise ConfigError(f"{source}: handlers[{i}] needs topic and target = 'package.module:function'")
    return tuple(out)


def _as_dict(t: TokenSettings) -> dict[str, Any]:
    return {f.name: list(v) if isinstance(v := getattr(t, f.name), tuple) else v for f in dataclasses.fields(t)}


def _tokens(raw: Any, source: str) -> tuple[TokenSettings, ...]:
    out = _tables(raw, source, "tokens", TokenSettings)
    for i, t in enumerate(out):
        if not t.name or len(t.sha256) != 64 or any(c not in "0123456789abcdef" for c in t.sha256):
            raise ConfigError(f"{source}: tokens[{i}] needs a name and sha256 = 64 lowercase hex (broker token-hash)")
    for i, t in enumerate(out):
        if t.expires:
            try:
                datetime.fromisoformat(t.expires)
            except ValueError:
                raise ConfigError(f"{source}: tokens[{i}].expires must be an ISO 8601 date/time") from None
    if len({t.sha256 for t in out}) != len(out):
        raise ConfigError(f"{source}: two [[tokens]] have the same sha256")
    return tuple(out)


def _apply(settings: Settings, overrides: Mapping[str, Mapping[str, Any]], source: str, *, text: bool) -> Settings:
    for section, values in overrides.items():
        if section == "handlers":
            settings = dataclasses.replace(settings, handlers=_handlers(values, source))
            continue
        if section == "tokens":
            settings = dataclasses.replace(settings, tokens=_tokens(values, source))
            continue
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: [{section}] must be a table")
        cls = SECTIONS[section]
        hints = get_type_hints(cls)
        coerced = {}
        for key, value in values.items():
            if key not in hints:
                known = ", ".join(hints)
                raise ConfigError(f"{source}: unknown setting {section}.{key} (known: {known})")
            coerced[key] = _coerce(f"{source}: {section}.{key}", hints[key], value, text=text)
        settings = settings.replace(section, **coerced)
    return settings


def env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """``BROKER_REDIS_URL`` -> redis.url. Unknown ``BROKER_*`` names are an error (typos must not pass)."""
    out: dict[str, dict[str, str]] = {}
    ignored = {"BROKER_CONFIG"}
    for name, value in environ.items():
        if not name.startswith("BROKER_") or name in ignored:
            continue
        rest = name[len("BROKER_") :].lower()
        for section in SECTIONS:
            if rest.startswith(section + "_"):
                out.setdefault(section, {})[rest[len(section) + 1 :]] = value
                break
        else:
            raise ConfigError(f"environment: unknown variable {name} (expected BROKER_<SECTION>_<KEY>)")
    return out


REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_KEY_PREFIX_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:")


def validate(settings: Settings) -> Settings:
    """Reject values that would misbehave at run time rather than at startup (all problems in one error)."""
    sv, rd, d, r, b = settings.server, settings.redis, settings.delivery, settings.retry, settings.breakers
    problems = []

    def at_least(name: str, value: float, low: float) -> None:
        if not value >= low:  # "not >=" also catches NaN
            problems.append(f"{name} must be >= {low}")

    if not 0 <= sv.port <= 65_535:
        problems.append("server.port must be between 0 and 65535")
    if not 0 <= rd.embedded_port <= 65_535:
        problems.append("redis.embedded_port must be between 0 and 65535")
    for name, value, low in (
        ("server.max_frame_bytes", sv.max_frame_bytes, 1),
        ("server.max_payload_bytes", sv.max_payload_bytes, 1),
        ("server.max_headers_bytes", sv.max_headers_bytes, 2),
        ("server.max_unconfirmed_publishes", sv.max_unconfirmed_publishes, 1),
        ("server.outbox_high_water", sv.outbox_high_water, 1),
        ("server.shutdown_grace_ms", sv.shutdown_grace_ms, 0),
        ("server.max_connections", sv.max_connections, 1),
        ("server.max_connections_per_token", sv.max_connections_per_token, 1),
        ("server.max_subscriptions_per_connection", sv.max_subscriptions_per_connection, 1),
        ("server.max_pulls_per_connection", sv.max_pulls_per_connection, 1),
        ("server.publish_rate_per_s", sv.publish_rate_per_s, 0),
        ("server.publish_burst", sv.publish_burst, 1_000),  # >= the largest batch, or a batch could never pass
        ("server.max_bad_frames", sv.max_bad_frames, 1),
        ("server.handshake_timeout_s", sv.handshake_timeout_s, 0.1),
        ("server.idle_timeout_s", sv.idle_timeout_s, 0),
        ("redis.socket_timeout_ms", rd.socket_timeout_ms, 1),
        ("redis.connect_timeout_ms", rd.connect_timeout_ms, 1),
        ("redis.startup_wait_s", rd.startup_wait_s, 0),
        ("redis.replicas_to_ack", rd.replicas_to_ack, 0),
        ("redis.replicas_ack_timeout_ms", rd.replicas_ack_timeout_ms, 1),
        ("delivery.lease_ms", d.lease_ms, 100),
        ("delivery.claim_batch", d.claim_batch, 1),
        ("delivery.poll_interval_ms", d.poll_interval_ms, 1),
        ("delivery.sweep_interval_ms", d.sweep_interval_ms, 1),
        # SET EX 0 is an error inside the publish script (after some writes); EXPIRE 0 deletes a dead letter at once
        ("delivery.idempotency_ttl_s", d.idempotency_ttl_s, 1),
        ("delivery.max_delay_ms", d.max_delay_ms, 0),
        ("delivery.max_pull_wait_ms", d.max_pull_wait_ms, 0),
        ("retry.max_attempts", r.max_attempts, 1),
        ("retry.backoff_base_ms", r.backoff_base_ms, 1),
        ("retry.backoff_multiplier", r.backoff_multiplier, 1),
        ("dlq.ttl_s", settings.dlq.ttl_s, 1),
        ("retention.acked_audit_max", settings.retention.acked_audit_max, 0),
        ("retention.acked_audit_ttl_s", settings.retention.acked_audit_ttl_s, 1),
        ("breakers.redis_fail_max", b.redis_fail_max, 1),
        ("breakers.redis_success_threshold", b.redis_success_threshold, 1),
        ("breakers.redis_call_timeout_ms", b.redis_call_timeout_ms, 1),
        ("breakers.handler_fail_max", b.handler_fail_max, 1),
        ("breakers.handler_success_threshold", b.handler_success_threshold, 1),
        ("loops.fail_threshold", settings.loops.fail_threshold, 1),
        ("loops.stall_timeout_s", settings.loops.stall_timeout_s, 1),
    ):
        at_least(name, value, low)
    for name, fvalue in (
        ("breakers.redis_reset_timeout_s", b.redis_reset_timeout_s),
        ("breakers.handler_reset_timeout_s", b.handler_reset_timeout_s),
        ("loops.backoff_cap_s", settings.loops.backoff_cap_s),
    ):
        if not fvalue > 0:
            problems.append(f"{name} must be > 0")
    if not rd.key_prefix or not set(rd.key_prefix) <= _KEY_PREFIX_CHARS:
        problems.append("redis.key_prefix must be non-empty: letters, digits, '.', '_', '-' or ':' (no braces)")
    for entry in d.strict_order_groups:
        if entry.count("/") != 1:
            problems.append(f"delivery.strict_order_groups entry {entry!r} must be 'topic/group'")
    if not d.node_timeout_ms >= 1000:
        problems.append("delivery.node_timeout_ms must be >= 1000")
    if not settings.dlq.prune_interval_s >= 1:
        problems.append("dlq.prune_interval_s must be >= 1")
    if bool(sv.tls_cert_file) != bool(sv.tls_key_file):
        problems.append("server.tls_cert_file and server.tls_key_file go together")
    if rd.url and not rd.url.startswith(REDIS_URL_SCHEMES):
        problems.append(f"redis.url must start with {', '.join(REDIS_URL_SCHEMES)} (got {rd.url!r})")
    if rd.replicas_to_ack and rd.replicas_ack_timeout_ms >= rd.socket_timeout_ms:
        problems.append("redis.replicas_ack_timeout_ms must be below redis.socket_timeout_ms (WAIT blocks that long)")
    if rd.cluster and not rd.url.startswith(("redis://", "rediss://")):
        problems.append("redis.cluster needs redis.url: a seed node of the cluster (redis:// or rediss://)")
    if settings.auth.mode not in ("tokens", "open"):
        problems.append("auth.mode must be 'tokens' or 'open'")
    if d.publish_without_group not in ("default", "reject"):
        problems.append("delivery.publish_without_group must be 'default' or 'reject'")
    if not 1 <= d.prefetch <= d.max_prefetch:
        problems.append("delivery.prefetch must be between 1 and delivery.max_prefetch")
    if r.backoff_cap_ms < r.backoff_base_ms:
        problems.append("retry.backoff_cap_ms must be >= retry.backoff_base_ms")
    if not 1 <= r.max_attempts <= r.max_attempts_limit:
        problems.append("retry.max_attempts must be between 1 and retry.max_attempts_limit")
    if not 1 <= r.backoff_base_min_ms <= r.backoff_base_ms <= r.backoff_base_max_ms:
        problems.append("retry.backoff_base_ms must lie within retry.backoff_base_min_ms (>= 1)..backoff_base_max_ms")
    if not 0 <= r.jitter < 1:
        problems.append("retry.jitter must be in [0, 1)")
    if settings.log.level.lower() not in LOG_LEVELS:
        problems.append(f"log.level must be one of {', '.join(LOG_LEVELS)}")
    if settings.log.format not in ("auto", "json", "console"):
        problems.append("log.format must be auto, json or console")
    if sv.max_payload_bytes > sv.max_frame_bytes:
        problems.append("server.max_payload_bytes must not exceed server.max_frame_bytes")
    if problems:
        raise ConfigError("; ".join(problems))
    return settings


def load_settings(
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    cli: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    environ = os.environ if environ is None else environ
    settings = Settings()
    path = config_file or environ.get("BROKER_CONFIG")
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: {e}") from None
        settings = _apply(settings, data, str(p), text=False)
    settings = _apply(settings, env_overrides(environ), "environment", text=True)
    if cli:
        settings = _apply(settings, cli, "command line", text=True)
    if settings.auth.tokens_file:
        p = Path(settings.auth.tokens_file)
        try:
            extra = tomllib.loads(p.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"auth.tokens_file {p}: {e}") from None
        unknown = set(extra) - {"tokens"}
        if unknown:
            raise ConfigError(f"auth.tokens_file {p}: only [[tokens]] tables belong there, not {sorted(unknown)}")
        settings = dataclasses.replace(
            settings, tokens=_tokens([*map(_as_dict, settings.tokens), *extra.get("tokens", [])], str(p))
        )
    return validate(settings)
