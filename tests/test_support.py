"""The test helpers themselves: mission-critical tests rely on RedisServer restarting with its data."""

from __future__ import annotations

import socket

import pytest

from .support import RedisServer, free_port


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_redis_server_keeps_acknowledged_writes_across_kill_and_restart() -> None:
    # Given a throwaway server with a key written (appendfsync always)
    with RedisServer() as server:
        port, data_dir = server.port, server.dir
        assert server.cli("SET", "k", "v") == "OK"
        assert server.cli("CONFIG", "GET", "appendonly").splitlines() == ["appendonly", "yes"]
        # When it is killed with SIGKILL, Then it is down
        server.kill()
        assert not server.running
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        # When started again, Then it is on the same port and dir, with the key reloaded from the AOF
        server.start()
        assert (server.port, server.dir) == (port, data_dir)
        assert server.cli("GET", "k") == "v"
        # And a graceful stop and start keeps it too
        server.stop()
        server.start()
        assert server.cli("GET", "k") == "v"
        assert server.url == f"redis://127.0.0.1:{port}/0"
    # Then closing removes its directory
    assert not data_dir.exists()
