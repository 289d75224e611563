"""Settings: defaults < TOML file < BROKER_* environment < CLI overrides; anything unknown or ill-typed is an error."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.core.config import ConfigError, Settings, env_overrides, load_settings, setting_names, validate

REPO = Path(__file__).resolve().parent.parent
BROKER_TOML = REPO / "config" / "broker.toml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "broker.toml"
    p.write_text(text)
    return p


def test_defaults_load_and_validate() -> None:
    # Given no file and no environment, When settings load, Then they are the dataclass defaults
    s = load_settings(environ={})
    assert s == Settings()
    assert (s.delivery.lease_ms, s.retry.max_attempts, s.dlq.ttl_s, s.breakers.redis_fail_max) == (
        30_000,
        5,
        7 * 86_400,
        5,
    )
    assert "delivery.lease_ms" in setting_names() and len(setting_names()) == len(set(setting_names()))


def test_toml_file_overrides_defaults(tmp_path: Path) -> None:
    # Given a TOML file setting a few keys (an int written for a float field too)
    p = write(
        tmp_path,
        '[server]\nport = 9000\n[delivery]\nlease_ms = 5000\npublish_without_group = "reject"\n'
        "[retry]\nbackoff_multiplier = 3\njitter = 0.1\n",
    )
    # When loaded, Then those keys change and the rest keep their defaults
    s = load_settings(p, environ={})
    assert s.server.port == 9000 and s.delivery.lease_ms == 5000 and s.delivery.publish_without_group == "reject"
    assert s.retry.backoff_multiplier == 3.0 and isinstance(s.retry.backoff_multiplier, float)
    assert s.retry.jitter == 0.1
    assert s.server.host == Settings().server.host and s.retry.max_attempts == 5


def test_config_file_from_environment(tmp_path: Path) -> None:
    p = write(tmp_path, "[dlq]\nttl_s = 60\n")
    assert load_settings(environ={"BROKER_CONFIG": str(p)}).dlq.ttl_s == 60


def test_env_overrides_file(tmp_path: Path) -> None:
    # Given a file and environment variables naming the same keys
    p = write(tmp_path, '[redis]\nurl = "redis://file:6379/0"\n[delivery]\nlease_ms = 5000\n')
    env = {"BROKER_REDIS_URL": "redis://env:6379/1", "BROKER_DELIVERY_LEASE_MS": "7000", "PATH": "/bin"}
    # When loaded, Then the environment wins, with strings coerced to the field types
    s = load_settings(p, environ=env)
    assert s.redis.url == "redis://env:6379/1"
    assert s.delivery.lease_ms == 7000
    assert env_overrides(env) == {"redis": {"url": "redis://env:6379/1"}, "delivery": {"lease_ms": "7000"}}


def test_env_float_and_int_coercion() -> None:
    s = load_settings(environ={"BROKER_RETRY_JITTER": "0.05", "BROKER_BREAKERS_REDIS_RESET_TIMEOUT_S": "2"})
    assert s.retry.jitter == 0.05 and s.breakers.redis_reset_timeout_s == 2.0


def test_cli_overrides_win_over_env(tmp_path: Path) -> None:
    # Given the same key in file, environment and CLI
    p = write(tmp_path, "[server]\nport = 1111\n")
    env = {"BROKER_SERVER_PORT": "2222", "BROKER_REDIS_URL": "redis://env/0"}
    # When loaded, Then the CLI value wins for that key, and the environment still applies elsewhere
    s = load_settings(p, environ=env, cli={"server": {"port": 3333}})
    assert s.server.port == 3333 and s.redis.url == "redis://env/0"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[nope]\nx = 1\n", r"unknown section \[nope\]"),
        ("[server]\nprot = 1\n", "unknown setting server.prot"),
        ("lease_ms = 5\n", r"unknown section \[lease_ms\]"),
        ("server = 5\n", r"\[server\] must be a table"),
    ],
)
def test_unknown_keys_in_toml_are_errors(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_settings(write(tmp_path, text), environ={})


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("BROKER_REDIS_ULR", "unknown setting redis.ulr"),
        ("BROKER_NOPE", "unknown variable BROKER_NOPE"),
        ("BROKER_DELIVERYLEASE_MS", "unknown variable"),
    ],
)
def test_unknown_env_vars_are_errors(name: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_settings(environ={name: "1"})


def test_unrelated_env_vars_are_ignored() -> None:
    assert load_settings(environ={"HOME": "/root", "BROKERX": "1", "MY_BROKER_URL": "x"}) == Settings()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[server]\nport = "abc"\n', "server.port: expected int"),
        ("[server]\nport = 1.5\n", "server.port: expected int"),
        ("[server]\nport = true\n", "server.port: expected int"),
        ("[server]\nhost = 8765\n", "server.host: expected str"),
        ("[redis]\nurl = [1]\n", "redis.url: expected str"),
        ("[retry]\njitter = false\n", "retry.jitter: expected float"),
        ('[retry]\njitter = "x"\n', "retry.jitter: expected float"),
        # a number written as a string in TOML is a mistake, even when the text would parse (docs/config.md)
        ('[server]\nport = "8766"\n', "server.port: expected int"),
        ('[retry]\njitter = "0.2"\n', "retry.jitter: expected float"),
        ('[server]\nmetrics_enabled = "true"\n', "server.metrics_enabled: expected bool"),
        ('[[tokens]]\nname = "a"\nsha256 = "' + "0" * 64 + '"\nadmin = "yes"\n', r"tokens\[0\]\.admin: expected bool"),
    ],
)
def test_bad_types_are_errors(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_settings(write(tmp_path, text), environ={})


def test_env_text_is_parsed_where_toml_text_is_refused() -> None:
    # Given the environment, which only has strings
    # When a number arrives as text
    # Then it is parsed, as docs/config.md says (only the TOML file must carry real numbers)
    assert load_settings(environ={"BROKER_SERVER_PORT": "8766"}).server.port == 8766


def test_bad_env_type_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"delivery\.lease_ms: expected int"):
        load_settings(environ={"BROKER_DELIVERY_LEASE_MS": "30s"})


def test_broken_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_settings(write(tmp_path, "[server\n"), environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.toml", environ={})


@pytest.mark.parametrize(
    ("section", "values", "match"),
    [
        ("delivery", {"publish_without_group": "drop"}, "publish_without_group"),
        ("delivery", {"prefetch": 0}, "prefetch"),
        ("delivery", {"prefetch": 2_000}, "prefetch"),
        ("delivery", {"lease_ms": 50}, "lease_ms"),
        ("delivery", {"idempotency_ttl_s": 0}, "idempotency_ttl_s"),
        ("delivery", {"claim_batch": 0}, "claim_batch"),
        ("retry", {"max_attempts": 0}, "max_attempts"),
        ("retry", {"jitter": 1.0}, "jitter"),
        ("retry", {"jitter": -0.1}, "jitter"),
        ("retry", {"jitter": float("nan")}, "jitter"),
        ("retry", {"backoff_multiplier": 0.5}, "backoff_multiplier"),
        ("retry", {"backoff_multiplier": float("nan")}, "backoff_multiplier"),
        ("retry", {"backoff_base_ms": 0}, "backoff_base_ms"),
        ("retry", {"backoff_cap_ms": 10}, "backoff_cap_ms"),
        ("dlq", {"ttl_s": 0}, "dlq.ttl_s"),
        ("breakers", {"redis_fail_max": 0}, "redis_fail_max"),
        ("breakers", {"redis_reset_timeout_s": 0.0}, "redis_reset_timeout_s"),
        ("breakers", {"handler_success_threshold": 0}, "handler_success_threshold"),
        ("server", {"port": 70_000}, "server.port"),
        ("server", {"max_payload_bytes": 2_000_000}, "max_payload_bytes"),
        ("redis", {"key_prefix": ""}, "key_prefix"),
        ("redis", {"key_prefix": "a{b}"}, "key_prefix"),
        ("redis", {"socket_timeout_ms": 0}, "socket_timeout_ms"),
        ("log", {"format": "xml"}, "log.format"),
        ("log", {"level": "verbose"}, "log.level"),
    ],
)
def test_validate_rejects_bad_values(section: str, values: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        validate(Settings().replace(section, **values))


def test_validate_reports_every_problem_at_once() -> None:
    s = Settings().replace("retry", max_attempts=0, jitter=2.0)
    with pytest.raises(ConfigError, match=r"max_attempts.*jitter"):
        validate(s)


def test_validate_accepts_edge_values() -> None:
    s = (
        Settings()
        .replace("delivery", lease_ms=100, prefetch=1_000)
        .replace("retry", jitter=0.0, backoff_multiplier=1.0)
        .replace("redis", key_prefix="app:mq")
        .replace("log", level="DEBUG")
    )
    assert validate(s) is s


def test_env_is_validated_too() -> None:
    with pytest.raises(ConfigError, match="lease_ms"):
        load_settings(environ={"BROKER_DELIVERY_LEASE_MS": "10"})


@pytest.mark.skipif(not BROKER_TOML.is_file(), reason="config/broker.toml is not written yet (the lead adds it)")
def test_shipped_broker_toml_loads_and_lists_every_setting() -> None:
    # Given the shipped config file, When loaded without environment, Then it is valid and equals the defaults
    import tomllib

    # (except auth.mode, which the file sets to "open" explicitly: open mode must never be a silent default)
    shipped = load_settings(BROKER_TOML, environ={})
    assert shipped == Settings().replace("auth", mode="open") and Settings().auth.mode == "tokens"
    # And it spells out every setting, so the file documents them all
    data = tomllib.loads(BROKER_TOML.read_text())
    listed = {f"{section}.{key}" for section, values in data.items() for key in values}
    # handlers and tokens are arrays of tables, shown as commented examples in the file
    tables = ("handlers[]", "tokens[]")
    assert listed == {n for n in setting_names() if not n.startswith(tables)}
    assert all(f"# {n.split('.')[-1]} = " in BROKER_TOML.read_text() for n in setting_names() if n.startswith(tables))
