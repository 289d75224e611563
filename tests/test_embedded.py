"""The managed redis-server (``broker/node/embedded.py``): its broker reaches it through a Unix socket in its data
folder (mode 700), operator commands through its loopback port (the URL it records), and a data folder too deep for
a socket's path (107 bytes) falls back to TCP with a warning (redis-server would refuse to start with it)."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from broker.core.config import Settings
from broker.node.embedded import MAX_SOCKET_PATH_BYTES, EmbeddedRedis, last_record_path
from broker.store import connect_redis

from .brokers import BrokerProcess

pytestmark = pytest.mark.skipif(EmbeddedRedis.binary() is None, reason="no redis-server binary")


@asynccontextmanager
async def running(data_dir: Path) -> AsyncIterator[EmbeddedRedis]:
    """A managed redis-server in ``data_dir`` for the body of the block, stopped after it."""
    embedded = EmbeddedRedis(str(data_dir))
    await embedded.start()
    try:
        yield embedded
    finally:
        embedded.stop()


async def test_the_broker_link_is_a_unix_socket_and_operators_get_the_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    with capture_logs() as logs:
        async with running(tmp_path / "redis") as embedded:
            # Then the broker's URL is the socket in the data folder, only its user may connect
            sock = tmp_path / "redis" / "redis.sock"
            assert embedded.url == f"unix://{sock}?db=0"
            assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o700
            assert [e["socket"] for e in logs if e["event"] == "embedded_redis_started"] == [str(sock)]
            # And operator commands find its TCP port (the folder's url file and the user's record)
            assert (tmp_path / "redis" / "url").read_text().strip() == embedded.tcp_url
            assert last_record_path().read_text().split("\n")[0] == embedded.tcp_url
            # And a client on the broker's URL is a Unix socket client of that Redis
            r = connect_redis(embedded.url, Settings())
            tcp = aioredis.from_url(embedded.tcp_url, decode_responses=True)
            try:
                await r.set("k", "v")
                assert await tcp.get("k") == "v"
                assert [c["flags"] for c in await tcp.client_list() if c["cmd"] == "set"] == ["U"]
            finally:
                await r.aclose()
                await tcp.aclose()


async def test_a_data_folder_whose_path_a_url_would_misread_still_gets_its_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    async with running(tmp_path / "my data%20?#x" / "redis") as embedded:  # a space, an escape, a query, a fragment
        r = connect_redis(embedded.url, Settings())
        try:
            assert await r.ping()
            assert r.connection_pool.connection_kwargs["path"] == str(embedded.socket)
        finally:
            await r.aclose()


async def test_a_data_folder_too_deep_for_a_socket_falls_back_to_tcp_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    deep = tmp_path / ("d" * (MAX_SOCKET_PATH_BYTES - len(str(tmp_path)))) / "redis"
    with capture_logs() as logs:
        async with running(deep) as embedded:
            # Then no socket: the broker's URL is the TCP one, and a warning names the path, its length and the limit
            assert embedded.url == embedded.tcp_url and not (deep / "redis.sock").exists()
            (warning,) = [e for e in logs if e["event"] == "embedded_redis_socket_path_too_long"]
            assert warning["log_level"] == "warning" and warning["path"] == str(deep / "redis.sock")
            assert warning["path_bytes"] > MAX_SOCKET_PATH_BYTES == warning["limit_bytes"]
            r = aioredis.from_url(embedded.url)
            try:
                assert await r.ping()
            finally:
                await r.aclose()


def test_an_embedded_broker_connects_through_the_socket(tmp_path: Path) -> None:
    with BrokerProcess(None, cwd=tmp_path) as b:
        # Then its startup names the socket as its Redis
        (started,) = [orjson.loads(line) for line in b.log_text().splitlines() if '"broker_started"' in line]
        sock = tmp_path / ".data" / "redis" / "redis.sock"
        assert started["embedded_redis"] == f"unix://{sock}?db=0"
        # And every connection of the broker to it is a Unix socket client (seen from the recorded TCP port)
        r = redis.Redis.from_url((tmp_path / ".data" / "redis" / "url").read_text().strip(), decode_responses=True)
        try:
            me = r.client_id()
            others = [c for c in r.client_list() if int(c["id"]) != me]
        finally:
            r.close()
        assert others and all("U" in c["flags"] for c in others), others
        # (Ctrl-C: an orderly stop also stops its redis-server, which the context's kill -9 would leave running)
        assert b.interrupt() == 0, b.log_tail()
    assert not sock.exists(), "the embedded redis-server outlived its broker"


async def test_a_socket_that_cannot_be_bound_falls_back_to_tcp_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a data folder where the socket cannot be made (a directory in its place; on a mount without sockets
    # redis-server fails the same way: it logs the bind error and exits at start)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    (tmp_path / "redis" / "redis.sock" / "x").mkdir(parents=True)
    with capture_logs() as logs:
        async with running(tmp_path / "redis") as embedded:
            # Then it runs over TCP, and a warning names the socket and quotes Redis's own reason
            assert embedded.url == embedded.tcp_url
            (warning,) = [e for e in logs if e["event"] == "embedded_redis_socket_failed"]
            assert warning["log_level"] == "warning" and warning["path"] == str(tmp_path / "redis" / "redis.sock")
            assert "unix socket" in warning["redis_log"].lower(), warning
            r = aioredis.from_url(embedded.url)
            try:
                assert await r.ping()
            finally:
                await r.aclose()
