"""The embedded default: a managed local ``redis-server`` child with append-only persistence in a data folder.

Used only when no Redis URL is configured. When no binary exists the caller falls back to in-process fakeredis
(non-durable) and says so loudly.

The broker talks to it through a Unix socket in the data folder (``redis.sock``, mode 700: only this user): both
spend less CPU per call than over loopback TCP (the store alone, one call at a time: Redis -13 %, the broker's Python
-11 %; docs/performance.md, session 4). It also listens on a loopback TCP port, which is what the ``url`` file and the
user's record name, so operator commands (``broker stats``, ``dlq``, ``diagnose``) reach it as before. A data folder
whose socket path would not fit in ``sun_path`` (107 bytes) gets no socket: the broker uses TCP and logs why.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from pathlib import Path
from urllib.parse import quote

import structlog

from broker.store.connection import BODY_LISTPACK_VALUE

log = structlog.get_logger("broker.embedded")

SOCKET_NAME = "redis.sock"
MAX_SOCKET_PATH_BYTES = 107  # sun_path is 108 bytes on Linux, its last one the terminating NUL


def socket_path_fits(path: Path) -> bool:
    """Whether a Unix socket can be bound at ``path`` (redis-server 7.0 exits at start with a longer one: "unix socket
    path too long")."""
    return len(os.fsencode(path)) <= MAX_SOCKET_PATH_BYTES


class _ExitedAtStart(RuntimeError):
    def __init__(self, message: str, tail: str) -> None:
        super().__init__(message)
        self.tail = tail


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def last_record_path() -> Path:
    """Where the last embedded Redis started by this user is recorded (its URL, then its data folder), so operator
    commands run from another folder find it: ``$XDG_STATE_HOME/redis-ws-broker/embedded`` (``~/.local/state``)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "redis-ws-broker" / "embedded"


def record_last(url: str, data_dir: Path) -> None:
    try:
        path = last_record_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{url}\n{data_dir}\n")
    except OSError as e:  # a convenience for operator commands: never a reason not to start
        log.warning("embedded_record_failed", path=str(last_record_path()), error=str(e))


class EmbeddedRedis:
    def __init__(self, data_dir: str, port: int = 0) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        path = self.data_dir / SOCKET_NAME
        self.socket: Path | None = path if socket_path_fits(path) else None
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def binary() -> str | None:
        return shutil.which("redis-server")

    @property
    def url(self) -> str:
        """The URL the broker connects through: its Unix socket, or TCP when the socket's path is too long."""
        return f"unix://{quote(str(self.socket))}?db=0" if self.socket is not None else self.tcp_url

    @property
    def tcp_url(self) -> str:
        """Its loopback TCP address, recorded for operator commands (``broker.ops.connect.find_redis``)."""
        return f"redis://127.0.0.1:{self.port}/0"

    async def _accepts(self) -> bool:
        """Both of its listeners accept a connection: TCP first (the port is new to this start, so that is this
        process), then the socket, which Redis binds right after the port (unlinking a stale file first)."""
        try:
            _, w = await asyncio.open_connection("127.0.0.1", self.port)
            w.close()
            if self.socket is not None:
                _, w = await asyncio.open_unix_connection(self.socket)
                w.close()
        except OSError:
            return False
        return True

    async def start(self, timeout_s: float = 15.0) -> None:
        binary = self.binary()
        if binary is None:
            raise FileNotFoundError("redis-server")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--maxmemory-policy", "noeviction", "--protected-mode", "yes",
            "--hash-max-listpack-value", str(BODY_LISTPACK_VALUE),
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        if self.socket is not None:
            args += ["--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        else:
            log.warning(
                "embedded_redis_socket_path_too_long",
                path=str(self.data_dir / SOCKET_NAME),
                path_bytes=len(os.fsencode(self.data_dir / SOCKET_NAME)),
                limit_bytes=MAX_SOCKET_PATH_BYTES,
                note="the broker connects over loopback TCP instead; a shorter redis.data_dir gets the Unix socket",
            )
        try:
            await self._run(args, timeout_s)
        except _ExitedAtStart as e:
            if self.socket is None:
                raise RuntimeError(str(e)) from None
            # (a data folder on a file system that cannot hold a socket, a directory where the socket goes): the
            # broker still starts, over loopback TCP, and says why
            log.warning(
                "embedded_redis_socket_failed",
                path=str(self.socket),
                redis_log=e.tail,
                note="the broker connects over loopback TCP instead",
            )
            self.socket = None
            await self._run(args[: args.index("--unixsocket")], timeout_s)

    async def _run(self, args: list[str], timeout_s: float) -> None:
        # A session of its own: Ctrl-C in the terminal sends SIGINT to the whole foreground process group, and Redis
        # must outlive the broker's orderly shutdown (which still needs it), then be stopped last by stop().
        self.proc = subprocess.Popen(  # noqa: ASYNC220
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if self.proc.poll() is not None:
                err = ""
                if self.proc.stderr is not None:
                    err = self.proc.stderr.read().decode()
                    self.proc.stderr.close()
                tail = err[-500:] or self._log_tail()  # it logs to its logfile, so its stderr is mostly empty
                raise _ExitedAtStart(f"embedded redis-server exited with {self.proc.returncode}: {tail}", tail)
            if await self._accepts():
                (self.data_dir / "url").write_text(self.tcp_url + "\n")  # lets `broker stats` find it
                record_last(self.tcp_url, self.data_dir)  # ... and from any other folder
                log.info(
                    "embedded_redis_started",
                    port=self.port,
                    socket=str(self.socket) if self.socket is not None else None,
                    data_dir=str(self.data_dir),
                    appendonly=True,
                )
                return
            await asyncio.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded redis-server did not listen on {self.port} within {timeout_s}s")

    def _log_tail(self, lines: int = 3) -> str:
        try:
            text = (self.data_dir / "redis.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # SIGTERM: redis flushes the AOF and exits
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.error("embedded_redis_kill", port=self.port, note="did not stop on SIGTERM in time")
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:  # read only when it failed to start; the pipe is ours to close
            self.proc.stderr.close()
        log.info("embedded_redis_stopped", port=self.port)
