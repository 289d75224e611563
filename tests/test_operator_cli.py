"""The operator's first hour, as real ``broker`` processes: every mistake ends in one line that names what failed and
what to do, with its documented exit code and no traceback.

Given a real redis-server and real `broker` processes, run from temp folders (never the repository's)
When the usual mistakes are made: no token configured, open mode on a public address, a Redis URL without a scheme,
a wrong token, no broker running, invalid JSON, a consume that cannot end, operator commands run from elsewhere
Then each ends with its exit code (docs/operations.md) and a single line on stderr, and nothing was changed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from broker.cli.common import progress
from broker.client.client import BrokerClient
from broker.core.config import Settings
from broker.core.errors import ConfigError
from broker.node.app import check_auth
from broker.node.auth import token_hash
from tests.brokers import BrokerProcess
from tests.support import RedisServer, free_port

TOKEN = "s3cret-token"


def run(*args: str, cwd: Path, env: dict[str, str] | None = None, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """``broker ARGS`` in ``cwd`` with none of the caller's BROKER*/XDG settings, unless given in ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER", "XDG_STATE"))}
    base["XDG_STATE_HOME"] = str(cwd / ".state")  # never the real home's record of an embedded Redis
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "broker", *args], cwd=cwd, env=base, input=stdin, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def one_line(p: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """The run ended with ``code`` and exactly one stderr line holding every word (case-insensitive)."""
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    print(f"exit {p.returncode}: {p.stderr.strip()}")
    assert "Traceback" not in p.stderr + p.stdout
    assert p.returncode == code, p.stderr
    assert len(lines) == 1, lines
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


def test_serve_without_any_token_refuses_to_start_and_says_how_to_add_one(tmp_path: Path) -> None:
    """No config file, no [auth]: the default is tokens mode, and with no token the broker would refuse everyone."""
    with RedisServer() as redis:
        p = run("serve", "--port", str(free_port()), cwd=tmp_path, env={"BROKER_REDIS_URL": redis.url})
    one_line(p, 3, "configuration error", "no [[tokens]]", "broker token-hash", 'mode = "open"')


def test_open_mode_on_a_public_address_refuses_to_start(tmp_path: Path) -> None:
    env = {"BROKER_AUTH_MODE": "open", "BROKER_SERVER_HOST": "0.0.0.0", "BROKER_REDIS_URL": "redis://127.0.0.1:1/0"}
    p = run("serve", "--port", str(free_port()), cwd=tmp_path, env=env)
    one_line(p, 3, "configuration error", "'0.0.0.0'", "allow_open_remote")


def test_auth_checks_at_startup() -> None:
    open_ = Settings().replace("auth", mode="open")
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_auth(open_.replace("server", host=host))
    for host in ("0.0.0.0", "", "::", "10.1.2.3", "broker.example.com"):
        with pytest.raises(ConfigError):
            check_auth(open_.replace("server", host=host))
    check_auth(open_.replace("server", host="0.0.0.0").replace("auth", mode="open", allow_open_remote=True))
    with pytest.raises(ConfigError, match="no \\[\\[tokens\\]\\]"):
        check_auth(Settings())


@pytest.mark.parametrize("cmd", [["serve"], ["stats"], ["diagnose"]])
def test_redis_url_without_scheme_is_a_configuration_error(tmp_path: Path, cmd: list[str]) -> None:
    p = run(*cmd, "--redis-url", "localhost:6379", cwd=tmp_path, env={"BROKER_AUTH_MODE": "open"})
    one_line(p, 3, "configuration error", "redis://", "localhost:6379")


def test_no_broker_running_names_the_url(tmp_path: Path) -> None:
    url = f"ws://127.0.0.1:{free_port()}/"
    p = run("publish", "orders", '{"id": 1}', "--url", url, cwd=tmp_path)
    one_line(p, 4, url, "broker serve")
    p = run("consume", "orders", "--group", "g", "--count", "1", cwd=tmp_path, env={"BROKERCTL_URL": url})
    one_line(p, 4, url)
    p = run("publish", "orders", "{}", "--url", "localhost:8765", cwd=tmp_path)
    one_line(p, 2, "not a WebSocket URL", "ws://")


@pytest.fixture(scope="module")
def token_broker(tmp_path_factory: pytest.TempPathFactory) -> object:
    cfg = tmp_path_factory.mktemp("auth") / "broker.toml"
    cfg.write_text(f'[auth]\nmode = "tokens"\n\n[[tokens]]\nname = "ops"\nsha256 = "{token_hash(TOKEN)}"\n')
    with RedisServer() as redis, BrokerProcess(redis.url, config=cfg) as b:
        yield b


def test_refused_token_is_one_line_not_a_traceback(token_broker: BrokerProcess, tmp_path: Path) -> None:
    p = run("publish", "orders", "{}", "--url", token_broker.url, "--token", "wrong", cwd=tmp_path)
    one_line(p, 1, "unauthorized", token_broker.url, "401", "invalid token")
    p = run("consume", "orders", "--group", "g", "--url", token_broker.url, cwd=tmp_path)
    one_line(p, 1, "401", "missing token")
    # the token from the environment (BROKERCTL_TOKEN: not a BROKER_<SECTION>_<KEY> setting)
    env = {"BROKERCTL_URL": token_broker.url, "BROKERCTL_TOKEN": TOKEN}
    p = run("publish", "orders", '{"id": 1}', cwd=tmp_path, env=env)
    assert p.returncode == 0 and orjson.loads(p.stdout)["id"], p.stderr


def test_publish_refuses_invalid_json_and_sends_text_only_when_asked(broker: BrokerProcess, tmp_path: Path) -> None:
    env = {"BROKERCTL_URL": broker.url}
    p = run("publish", "orders", '{"id": 20', cwd=tmp_path, env=env)
    one_line(p, 2, "not JSON", "--text", "nothing published")
    p = run("publish", "orders", "-", "--lines", cwd=tmp_path, env=env, stdin='{"id": 1}\nnot json\n')
    one_line(p, 2, "line 2", "nothing published")
    p = run("publish", "orders", '{"id": 20', "--text", cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr
    p = run("consume", "orders", "--group", "default", "--count", "5", "--timeout", "2", cwd=tmp_path, env=env)
    assert [orjson.loads(line)["payload"] for line in p.stdout.splitlines()] == ['{"id": 20']  # one, the text
    one_line(p, 1, "got 1 of 5", "2 s", "--timeout")


def test_consume_needs_a_group_and_never_burns_attempts_to_look(tmp_path: Path) -> None:
    p = run("consume", "orders", cwd=tmp_path)
    one_line(p, 2, "--group", "durable", "broker peek")
    p = run("consume", "orders", "--group", "g", "--no-ack", cwd=tmp_path)
    one_line(p, 2, "--no-ack", "broker peek orders")


def test_version_and_did_you_mean(tmp_path: Path) -> None:
    p = run("--version", cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.startswith("broker "), p
    p = run("stats", "--jsn", cwd=tmp_path)
    assert p.returncode == 2 and "usage: broker stats" in p.stderr and "did you mean --json?" in p.stderr, p.stderr
    p = run("pubish", "x", cwd=tmp_path)
    assert p.returncode == 2 and "did you mean 'publish'?" in p.stderr, p.stderr
    p = run("dlq", "purge", "--yse", cwd=tmp_path)
    assert p.returncode == 2 and "usage: broker dlq purge" in p.stderr and "did you mean --yes?" in p.stderr


def test_operator_commands_find_the_embedded_redis_from_anywhere(tmp_path: Path) -> None:
    """A broker in embedded mode in one folder; `stats` from another folder finds its Redis (the user's record of
    the last embedded Redis), and once that broker stopped, says so with what to do instead of a dead port."""
    home, elsewhere = tmp_path / "app", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    state = {"XDG_STATE_HOME": str(tmp_path / "state")}
    with BrokerProcess(None, cwd=home, env=state) as b:
        if '"embedded_redis_started"' not in b.log_text():
            pytest.skip("no redis-server binary: the broker fell back to fakeredis")
        assert run("publish", "orders", '{"id": 1}', "--url", b.url, cwd=elsewhere).returncode == 0
        for folder in (home, elsewhere):
            p = run("stats", "--json", "--no-memory", cwd=folder, env=state)
            assert p.returncode == 0, p.stderr
            assert [(r["topic"], r["group"], r["ready"]) for r in orjson.loads(p.stdout)] == [("orders", "default", 1)]
        assert b.terminate() == 0  # an orderly stop: the embedded redis-server is stopped last
    for folder in (home, elsewhere):
        p = run("stats", cwd=folder, env=state)
        one_line(p, 4, "is not running", "broker serve", "--redis-url")
    p = run("stats", cwd=elsewhere, env={"XDG_STATE_HOME": str(tmp_path / "nothing")})
    one_line(p, 3, "no Redis to talk to", "--redis-url")


def test_serve_with_redis_unreachable_exits_4_without_a_traceback(tmp_path: Path) -> None:
    env = {"BROKER_AUTH_MODE": "open", "BROKER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
           "BROKER_REDIS_STARTUP_WAIT_S": "1"}  # it waits that long for Redis, then gives up
    p = run("serve", "--port", str(free_port()), cwd=tmp_path, env=env)
    print(p.stderr)
    assert p.returncode == 4 and "Traceback" not in p.stderr
    assert p.stderr.splitlines()[-1].startswith("error (unavailable): redis unreachable"), p.stderr


def test_progress_prints_its_final_line_once_with_rate(capsys: pytest.CaptureFixture[str]) -> None:
    """`import` reported the end twice (after its last batch, and once more when done): one final line."""
    show = progress("import")
    show(500, 1000)
    show(1000, 1000)
    show(1000, 1000)
    lines = capsys.readouterr().err.splitlines()
    print(lines)
    assert len([line for line in lines if "1,000/1,000" in line]) == 1
    assert re.search(r"100% [\d,]+/s in \d+s$", lines[-1]), lines


async def test_dead_letter_and_message_are_shown_for_people(
    broker: BrokerProcess, redis: RedisServer, tmp_path: Path
) -> None:
    """`dlq show` was JSON only and `message ID` printed epoch milliseconds: both read as text now, times in UTC with
    how long ago; `--json` keeps the numbers for scripts."""
    async with BrokerClient(broker.url) as c:
        sub = await c.subscribe("orders", "billing")
        pub = await c.publish("orders", {"n": 1})
        m = await sub.get(timeout=10)
        await m.nack("card declined", dead=True, wait=True)
    shown = run("dlq", "show", pub.id, "--redis-url", redis.url, cwd=tmp_path)
    print(shown.stdout)
    assert shown.returncode == 0, shown.stderr
    assert "reason:        rejected" in shown.stdout and "card declined" in shown.stdout
    assert re.search(r"died:\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ \(\d+s ago\)", shown.stdout), shown.stdout
    assert not re.search(r"\b1\d{12}\b", shown.stdout)  # no epoch milliseconds
    as_json = run("dlq", "show", pub.id, "--json", "--redis-url", redis.url, cwd=tmp_path)
    assert orjson.loads(as_json.stdout)["died_at"] > 1_600_000_000_000
    where = run("message", pub.id, "--redis-url", redis.url, cwd=tmp_path)
    print(where.stdout)
    assert where.returncode == 0 and "dead" in where.stdout and " ago)" in where.stdout, where
    assert not re.search(r"\b1\d{12}\b", where.stdout)
