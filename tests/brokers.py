"""Real broker processes for integration and mission-critical tests: start, wait healthy, SIGTERM, SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from .support import free_port

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 20.0


class BrokerProcess:
    """``python -m broker serve`` on a free loopback port against ``redis_url``; env adds BROKER_* settings.

    ``redis_url=None``: embedded mode (no Redis URL at all: the broker manages its own redis-server, or falls back to
    fakeredis), run in ``cwd`` so its data folder lands there. The broker gets a process group of its own, so
    ``interrupt()`` can be a terminal's Ctrl-C (SIGINT to the whole group) without reaching the test runner.
    """

    def __init__(
        self,
        redis_url: str | None,
        env: dict[str, str] | None = None,
        port: int | None = None,
        config: Path | None = None,
        tls: ssl.SSLContext | None = None,  # the broker serves TLS: talk https/wss, trusting this context
        cwd: Path | None = None,
    ) -> None:
        self.cwd = cwd or ROOT
        self.tls = tls
        self.redis_url = redis_url
        self.config = config or ROOT / "config/broker.toml"
        self.port = port or free_port()
        self.extra_env = env or {}
        fd, name = tempfile.mkstemp(prefix="broker-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"wss://localhost:{self.port}/" if self.tls else f"ws://127.0.0.1:{self.port}/"

    @property
    def http(self) -> str:
        return f"https://localhost:{self.port}" if self.tls else f"http://127.0.0.1:{self.port}"

    def start(self) -> BrokerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        env.update({"BROKER_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"})
        if self.redis_url is not None:
            env["BROKER_REDIS_URL"] = self.redis_url
        else:  # the embedded Redis is recorded for operator commands: in the test's folder, not the user's home
            env["XDG_STATE_HOME"] = str(self.cwd / ".state")
        env.update(self.extra_env)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "broker", "--config", str(self.config), "serve",
                 "--port", str(self.port)],
                cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.get("/healthz")[0] == 200:
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"broker did not become healthy in {START_TIMEOUT_S}s:\n{self.log_tail()}")

    def get(self, path: str, timeout_s: float = 2.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.http + path, timeout=timeout_s, context=self.tls) as r:
                return int(r.status), bytes(r.read())
        except urllib.error.HTTPError as e:
            return int(e.code), bytes(e.read())
        except OSError:
            return 0, b""

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def terminate(self, timeout_s: float = 15.0) -> int:
        """SIGTERM and wait (graceful shutdown); returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def interrupt(self, timeout_s: float = 15.0) -> int:
        """Ctrl-C in the terminal: SIGINT to the broker's whole process group; wait and return the exit code."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        with contextlib.suppress(OSError):
            self.log_path.unlink()

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            print(f"--- broker log ({self.log_path}) ---\n{self.log_tail(80)}")
        self.close()
