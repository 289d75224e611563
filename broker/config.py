"""Settings: one frozen dataclass tree, merged in one order (pure: no I/O beyond reading the TOML file).

defaults < ``config/broker.toml`` (or ``--config FILE``) < ``BROKER_<SECTION>_<KEY>`` env < CLI overrides.
An unknown or misspelled key in any source is a ``ConfigError``, never ignored. Units are in field names.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from .errors import ConfigError


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


@dataclass(frozen=True)
class RedisSettings:
    url: str = ""  # empty: embedded redis-server (or fakeredis when no binary exists)
    key_prefix: str = "mq"
    socket_timeout_ms: int = 2_000
    connect_timeout_ms: int = 1_000
    data_dir: str = ".data/redis"  # embedded mode only
    embedded_port: int = 0  # embedded mode only; 0 picks a free loopback port


@dataclass(frozen=True)
class DeliverySettings:
    lease_ms: int = 30_000
    prefetch: int = 10
    max_prefetch: int = 1_000
    claim_batch: int = 200  # most messages one claim script takes
    poll_interval_ms: int = 250  # idle re-check when no wake-up arrives (pub/sub is best effort)
    sweep_interval_ms: int = 500  # lease expiry + due-retry promotion
    publish_without_group: str = "default"  # "default": store for group `default`; "reject": not_found error
    idempotency_ttl_s: int = 86_400
    max_delay_ms: int = 7 * 86_400_000


@dataclass(frozen=True)
class RetrySettings:
    max_attempts: int = 5
    backoff_base_ms: int = 1_000
    backoff_multiplier: float = 2.0
    backoff_cap_ms: int = 60_000
    jitter: float = 0.2  # +/- fraction of the computed delay


@dataclass(frozen=True)
class DlqSettings:
    ttl_s: int = 7 * 86_400


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
    breakers: BreakerSettings = field(default_factory=BreakerSettings)
    log: LogSettings = field(default_factory=LogSettings)

    def replace(self, section: str, **values: Any) -> Settings:
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **values)})


SECTIONS: dict[str, type[Any]] = get_type_hints(Settings)


def setting_names() -> list[str]:
    """Every ``section.key``, in declaration order (docs/config.md lists exactly these)."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _coerce(where: str, kind: type[Any], value: Any) -> Any:
    try:
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
        if kind is str:
            if not isinstance(value, str | int | float):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}") from None
    raise ConfigError(f"{where}: unsupported type {kind}")


def _apply(settings: Settings, overrides: Mapping[str, Mapping[str, Any]], source: str) -> Settings:
    for section, values in overrides.items():
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
            coerced[key] = _coerce(f"{source}: {section}.{key}", hints[key], value)
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


def validate(settings: Settings) -> Settings:
    d, r = settings.delivery, settings.retry
    problems = []
    if d.publish_without_group not in ("default", "reject"):
        problems.append("delivery.publish_without_group must be 'default' or 'reject'")
    if not 1 <= d.prefetch <= d.max_prefetch:
        problems.append("delivery.prefetch must be between 1 and delivery.max_prefetch")
    if d.lease_ms < 100:
        problems.append("delivery.lease_ms must be >= 100")
    if r.max_attempts < 1:
        problems.append("retry.max_attempts must be >= 1")
    if not 0 <= r.jitter < 1:
        problems.append("retry.jitter must be in [0, 1)")
    if r.backoff_multiplier < 1:
        problems.append("retry.backoff_multiplier must be >= 1")
    if settings.log.format not in ("auto", "json", "console"):
        problems.append("log.format must be auto, json or console")
    if settings.server.max_payload_bytes > settings.server.max_frame_bytes:
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
        settings = _apply(settings, data, str(p))
    settings = _apply(settings, env_overrides(environ), "environment")
    if cli:
        settings = _apply(settings, cli, "command line")
    return validate(settings)
