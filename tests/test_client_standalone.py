"""The client stands alone: ``pip install redis-ws-broker`` (without the ``server`` extra) is enough to use it, and
the ``broker`` command installed that way says what is missing instead of ending in a traceback.

Given a Python in which the server's dependencies cannot be imported (a meta-path finder refuses them, as if they
were not installed), when the client is imported, then it imports and none of the server side is loaded; when the
``broker`` command runs, then it prints one line naming the extra and exits 3.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from broker.client import BrokerClient
from broker.client.client import log

SERVER_ONLY = ("redis", "structlog", "prometheus_client", "pybreaker", "fakeredis", "lupa", "uvloop", "hiredis")

BLOCKER = textwrap.dedent(
    f"""
    import sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {SERVER_ONLY!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, Refuse())
    """
)


def run_without_server_deps(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )


def test_the_blocker_blocks() -> None:
    done = run_without_server_deps("import redis")
    assert done.returncode == 1
    assert "ModuleNotFoundError: No module named 'redis'" in done.stderr


def test_the_client_imports_without_the_server_dependencies() -> None:
    done = run_without_server_deps(
        """
        import broker.client
        from broker.client import BrokerClient, Message, Published, Subscription, error_from_frame

        loaded = sorted(m for m in sys.modules if m == "broker" or m.startswith("broker."))
        print(",".join(loaded))
        """
    )
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.strip().split(","))
    assert loaded == {"broker", "broker.client", "broker.client.client", "broker.core", "broker.core.errors"}


def test_the_cli_without_the_server_extra_says_so() -> None:
    for argv in (["stats"], ["serve"], ["publish", "t", "1"], ["dlq", "list"]):
        done = run_without_server_deps(f"from broker.cli import main\nsys.exit(main({argv!r}))")
        assert done.returncode == 3, (argv, done.stderr)
        assert done.stderr == "the broker needs the server extra: pip install 'redis-ws-broker[server]'\n"
        assert done.stdout == ""


def test_the_client_logs_through_the_standard_library(caplog: pytest.LogCaptureFixture) -> None:
    """Events go to the stdlib logger ``broker.client``: the name and fields in the text, and on the record."""
    assert log.logger is logging.getLogger("broker.client")
    client = BrokerClient("ws://127.0.0.1:1/")
    with caplog.at_level(logging.INFO, logger="broker.client"):
        client._dispatch({"op": "paused", "topic": "t", "group": "g", "reason": "handler down"})
    [record] = caplog.records
    assert record.name == "broker.client"
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "delivery_paused topic='t' group='g' reason='handler down'"
    assert record.event == "delivery_paused"
    assert record.fields == {"topic": "t", "group": "g", "reason": "handler down"}
