"""Test helpers shared by ``tests/`` and ``mission_critical/``: throwaway redis-server processes, store builders and
the ``broker`` command line in a subprocess.

Every wait here is bounded in time; a helper that cannot do its job raises with what it saw (log tail, exit code).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import orjson

from broker.core.config import Settings
from broker.core.model import now_ms
from broker.runtime.resilience import Breaker
from broker.store import Clock, RedisStore

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 10.0
LOADING_TIMEOUT_S = 180.0  # a restart that answers -LOADING is reading its AOF: it may take this long in all
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int, timeout_s: float = 0.5) -> bool:
    """True when a Redis on ``port`` answers PING with PONG (raw RESP, no client library state involved)."""
    return _ping_reply(port, timeout_s).startswith(b"+PONG")


def _ping_reply(port: int, timeout_s: float = 0.5) -> bytes:
    """What a Redis on ``port`` answers PING (b"" when nothing answers): ``-LOADING`` while it loads its AOF."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64)
    except OSError:
        return b""


class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port, persisting to an AOF (fsync always) in a temp dir.

    ``stop()`` shuts down gracefully, ``kill()`` sends SIGKILL, ``start()`` brings it back on the same port and
    directory so the AOF is reloaded. Use as a context manager, or call ``close()``.
    """

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | Path | None = None,
        extra_args: Sequence[str] = (),
        unix_socket: bool = False,  # also listen on ``<dir>/redis.sock`` (mode 700): ``unix_url``
    ) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not on PATH")
        self.port = port or free_port()
        self._own_dir = data_dir is None
        self.dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="broker-redis-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logfile = self.dir / "redis.log"
        self.socket = self.dir / "redis.sock" if unix_socket else None
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def unix_url(self, db: int = 0) -> str:
        assert self.socket is not None, "RedisServer(unix_socket=True)"
        return f"unix://{self.socket}?db={db}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def start(self) -> None:
        if self.running:
            return
        args = [
            str(self.binary),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.logfile),
            *(["--unixsocket", str(self.socket), "--unixsocketperm", "700"] if self.socket is not None else []),
            *self.extra_args,
        ]  # fmt: skip
        self._out = open(self.dir / "redis.stdout", "ab")  # noqa: SIM115 - closed in _reap
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT)
        started = time.monotonic()
        deadline = started + START_TIMEOUT_S
        log_from = self.logfile.stat().st_size if self.logfile.exists() else 0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self._reap()
                out = (self.dir / "redis.stdout").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server on port {self.port} exited with {code}: {out}\n{self._log_tail()}")
            reply = _ping_reply(self.port)
            if reply.startswith(b"+PONG"):
                return
            if reply.startswith(b"-LOADING") or self._loading(log_from):  # alive, reading its AOF (tens of MB after
                # a long chaos run; while it loads it may not even answer: only its log says so)
                deadline = max(deadline, min(time.monotonic() + 1.0, started + LOADING_TIMEOUT_S))
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(
            f"redis-server on port {self.port} did not answer PING in {START_TIMEOUT_S}s\n{self._log_tail()}"
        )

    def _loading(self, log_from: int) -> bool:
        """This start's log says it is loading its data and not yet ready."""
        try:
            with self.logfile.open("rb") as f:
                f.seek(log_from)
                text = f.read().decode(errors="replace")
        except OSError:
            return False
        return "AOF loading" in text and "Ready to accept connections" not in text

    def _wait_exit(self, timeout_s: float) -> bool:
        assert self.proc is not None
        try:
            self.proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False

    def _reap(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        self.proc = None

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM: Redis flushes the AOF and exits); SIGKILL if it takes over STOP_TIMEOUT_S."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if not self._wait_exit(STOP_TIMEOUT_S):
                self.proc.kill()
                self._wait_exit(STOP_TIMEOUT_S)
        self._reap()

    def kill(self) -> None:
        """SIGKILL: no shutdown work at all (what survives is what the AOF already holds)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self._wait_exit(STOP_TIMEOUT_S)
        self._reap()

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the process hangs with its sockets open (a hung Redis, not a dead one: only timeouts notice)."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause()``: Redis answers again, including what was queued on its sockets meanwhile."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def cli(self, *args: str, timeout_s: float = 10.0) -> str:
        """Run ``redis-cli -p PORT ARGS...`` and return its stdout without its final newline (an empty last value
        of a reply, e.g. a hash field holding "", stays an empty last line)."""
        out = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *args],
            capture_output=True,
            timeout=timeout_s,
            check=True,
        )
        return out.stdout.decode(errors="replace").removesuffix("\n")

    def close(self) -> None:
        if self.running:
            self.resume()  # a stopped process ignores nothing but SIGKILL; resume so a later stop() can be graceful
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if self.running and self.proc is not None:
                os.kill(self.proc.pid, signal.SIGKILL)


class Cli:
    """``python -m broker ARGS`` in a subprocess: stdin is not a TTY, env names only this test's Redis."""

    def __init__(self, redis: RedisServer, env: dict[str, str] | None = None) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        self.env["BROKER_REDIS_URL"] = redis.url
        self.env.update(env or {})

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "broker", *args],
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )

    async def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(self.run, *args)

    async def json(self, *args: str) -> Any:
        p = await self(*args)
        assert p.returncode == 0, (args, p.returncode, p.stderr)
        return orjson.loads(p.stdout)


def make_breaker(settings: Settings, **overrides: Any) -> Breaker:
    b = settings.breakers
    kwargs: dict[str, Any] = {
        "fail_max": b.redis_fail_max,
        "reset_timeout_s": b.redis_reset_timeout_s,
        "success_threshold": b.redis_success_threshold,
        "call_timeout_s": b.redis_call_timeout_ms / 1000,
    }
    kwargs.update(overrides)
    return Breaker("redis", **kwargs)


class FakeClock:
    """A store clock (epoch ms) that moves only when the test steps it, so time-dependent store tests step time
    instead of sleeping on the wall clock. Starts at the wall clock's now (Redis TTLs keep real time)."""

    def __init__(self, start_ms: int | None = None) -> None:
        self.now = now_ms() if start_ms is None else start_ms

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: float) -> int:
        self.now += max(0, int(ms))
        return self.now


def make_store(
    client: Any, settings: Settings | None = None, node_id: str = "test-node", clock: Clock = now_ms
) -> RedisStore:
    """A ``RedisStore`` over ``client`` (redis.asyncio or fakeredis) behind a Redis breaker built from settings."""
    settings = settings or Settings()
    return RedisStore(client, settings, make_breaker(settings), node_id, clock=clock)


async def until(cond: Callable[[], object], what: str, timeout_s: float = 30.0) -> None:
    """Wait (bounded, polling every 50 ms) until ``cond()`` is true; fails naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
