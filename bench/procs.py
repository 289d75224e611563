"""Child processes of a bench run: a throwaway redis-server, the broker and the relay.

Each one listens on a free loopback port, logs to a file in the run's temporary directory, is waited for with a
bound (a failed start raises ``SetupError`` with the last lines of its log) and is stopped by its own pid
(SIGTERM, then SIGKILL after a grace period). ``stop_all`` runs at exit as a last resort.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import SetupError

# The broker's managed redis-server runs with this (compact message bodies); the bench imports nothing from broker,
# so tests/test_memory_hints.py holds it equal to broker.store.connection.BODY_LISTPACK_VALUE.
HASH_LISTPACK_VALUE = 4096

LOOPBACK = "127.0.0.1"
TRANSPORTS = ("unix", "tcp")  # how the broker (and the raw Redis baseline) reach their redis-server; unix first:
# the default, as the broker's managed redis-server is reached by ``make run``
SUN_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path, less its NUL)
REPO_ROOT = Path(__file__).resolve().parent.parent

_STARTED: list[Proc] = []


def free_port() -> int:
    """A port the kernel just handed out on loopback (closed again, so a tiny race remains; starts retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class Proc:
    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            try:
                self.popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    cwd=REPO_ROOT,
                    start_new_session=True,  # a Ctrl-C in the terminal reaches only us; we stop the children
                )
            except OSError as e:
                raise SetupError(f"cannot start {self.name} ({shlex.join(self.argv)}): {e}") from None
        _STARTED.append(self)

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8_192))
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        tail = text.splitlines()[-lines:]
        return "\n".join("    " + line for line in tail) if tail else "    (log is empty)"

    def died_message(self) -> str:
        return (
            f"{self.name} exited with code {self.returncode()} (command: {shlex.join(self.argv)}); "
            f"last lines of {self.log_path}:\n{self.log_tail()}"
        )

    async def stop(self, grace: float = 5.0) -> None:
        p = self.popen
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(p.wait, grace)
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=2)

    def stop_now(self) -> None:
        p = self.popen
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
        try:
            p.wait(timeout=3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=2)


@atexit.register
def stop_all() -> None:
    for proc in reversed(_STARTED):
        proc.stop_now()


async def _tcp_exchange(port: int, request: bytes, timeout_s: float) -> bytes:
    """Connect to loopback:port, send ``request``, return the first chunk of the answer ('' on any failure)."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            try:
                writer.write(request)
                await writer.drain()
                return await reader.read(256)
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return b""


async def http_status(port: int, path: str, timeout_s: float = 1.0) -> int | None:
    req = f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nConnection: close\r\n\r\n".encode()
    head = await _tcp_exchange(port, req, timeout_s)
    parts = head.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None


async def _healthz_ok(port: int) -> bool:
    return await http_status(port, "/healthz") == 200


async def _wait_ready(proc: Proc, check: Callable[[], Awaitable[bool]], what: str, timeout_s: float) -> None:
    """Poll ``check`` every 100 ms until it passes; fail early if the process exits, and after ``timeout``."""
    end = time.monotonic() + timeout_s
    while True:
        if not proc.running():
            raise SetupError(proc.died_message())
        if await check():
            return
        if time.monotonic() >= end:
            raise SetupError(
                f"{proc.name} did not become ready within {timeout_s:g}s (waited for {what}); "
                f"last lines of {proc.log_path}:\n{proc.log_tail()}"
            )
        await asyncio.sleep(0.1)


async def redis_ping(port: int) -> bool:
    return (await _tcp_exchange(port, b"PING\r\n", 0.5)).startswith(b"+PONG")


async def tcp_open(port: int) -> bool:
    try:
        async with asyncio.timeout(0.5):
            _, writer = await asyncio.open_connection(LOOPBACK, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return True


def _redis_version(exe: str) -> str:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return next((w.split("=", 1)[1] for w in out if w.startswith("v=")), "?")


@dataclass
class RedisServer:
    proc: Proc
    port: int
    description: str
    socket: Path | None = None  # its Unix socket (mode 700), when the path fits in sun_path

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def url_for(self, transport: str) -> str:
        """The URL of ``transport`` ("tcp" or "unix"); ``SetupError`` when it has no socket."""
        if transport == "tcp":
            return self.url
        if self.socket is None:
            raise SetupError(f"the redis-server on port {self.port} has no Unix socket (its path is too long)")
        return f"unix://{self.socket}?db=0"


async def start_redis(workdir: Path, fsync: str, timeout_s: float = 10.0) -> RedisServer:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SetupError("redis-server not found on PATH (install it, e.g. apt-get install redis-server)")
    ver = await asyncio.to_thread(_redis_version, exe)
    data = workdir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    sock: Path | None = data / "redis.sock"
    if len(os.fsencode(sock)) > SUN_PATH_MAX:
        sock = None
    last: SetupError | None = None
    for _ in range(3):  # free_port() can race with another process; try a new port if the bind fails
        port = free_port()
        argv = [
            exe,
            "--port", str(port),
            "--bind", LOOPBACK,
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", fsync,
            "--hash-max-listpack-value", str(HASH_LISTPACK_VALUE),  # as the broker's managed redis-server
            "--dir", str(data),
            "--logfile", "",
            *(["--unixsocket", str(sock), "--unixsocketperm", "700"] if sock is not None else []),
        ]  # fmt: skip
        proc = Proc("redis-server", argv, workdir / f"redis-{port}.log")
        proc.start()
        try:
            await _wait_ready(proc, functools.partial(redis_ping, port), f"PING on {LOOPBACK}:{port}", timeout_s)
        except SetupError as e:
            last = e
            await proc.stop()
            continue
        desc = (
            f'redis-server {ver} on {LOOPBACK}:{port}: RDB snapshots off (--save ""), '
            f"AOF on (--appendonly yes --appendfsync {fsync}), hash-max-listpack-value {HASH_LISTPACK_VALUE} (as the "
            f"broker's managed redis-server), data in {data}, Unix socket {sock or 'none (path too long)'}"
        )
        return RedisServer(proc, port, desc, sock)
    assert last is not None
    raise last


@dataclass
class BrokerServer:
    proc: Proc
    port: int
    argv: list[str]

    @property
    def ws_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}"


def broker_argv(template: str, port: int) -> list[str]:
    """``--broker-cmd`` is split like a shell line; ``{python}`` and ``{port}`` are substituted."""
    return [part.format(python=sys.executable, port=port) for part in shlex.split(template)]


DEFAULT_BROKER_CMD = "{python} -m broker serve --port {port}"


async def start_broker(
    workdir: Path, redis_url: str, *, cmd: str, log_level: str, timeout_s: float, env_extra: dict[str, str]
) -> BrokerServer:
    port = free_port()
    argv = broker_argv(cmd, port)
    env = dict(os.environ)
    env["BROKER_REDIS_URL"] = redis_url
    env["BROKER_SERVER_HOST"] = LOOPBACK
    if log_level:
        env["BROKER_LOG_LEVEL"] = log_level
    env.update(env_extra)
    proc = Proc("broker", argv, workdir / f"broker-{port}.log", env)
    proc.start()
    try:
        await _wait_ready(
            proc, functools.partial(_healthz_ok, port), f"GET http://{LOOPBACK}:{port}/healthz -> 200", timeout_s
        )
    except SetupError:
        await proc.stop()
        raise
    return BrokerServer(proc, port, argv)


@dataclass
class RelayServer:
    proc: Proc
    port: int

    @property
    def ws_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}"


async def start_relay(workdir: Path, timeout_s: float = 10.0) -> RelayServer:
    port = free_port()
    argv = [sys.executable, "-m", "bench.relay", "--host", LOOPBACK, "--port", str(port)]
    proc = Proc("relay", argv, workdir / f"relay-{port}.log")
    proc.start()
    try:
        await _wait_ready(proc, functools.partial(tcp_open, port), f"TCP connect to {LOOPBACK}:{port}", timeout_s)
    except SetupError:
        await proc.stop()
        raise
    return RelayServer(proc, port)
