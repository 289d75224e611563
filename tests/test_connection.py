"""The store's Redis connections (``broker/store/connection.py``): the hiredis packer writes exactly the bytes
redis-py's own packer writes, for any argument, and a ``unix://`` URL gets the packing connection too (a broker next
to its Redis, the embedded one included, talks to it through a Unix socket: less CPU per call on both sides)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import DataError

from broker.core.config import Settings
from broker.core.model import AckItem, PublishRequest, PublishResult
from broker.store import connect_redis
from broker.store.connection import HiredisPackingConnection, HiredisUnixConnection
from broker.store.messages import AckOutcome

from .support import RedisServer, make_store

SHA = "0123456789abcdef0123456789abcdef01234567"
COMMANDS: list[tuple[Any, ...]] = [
    # a publish's EVALSHA as the script pipe builds it: str, int, float, non-ASCII text, bytes, an empty argument
    ("EVALSHA", SHA, 1, "{t}:groups", "b:{t}", 1765130000000, 604800000, 0.5, '{"név": "Zoë ✓"}', b"\x00\xffraw", ""),
    ("EVALSHA", SHA.encode(), 0),
    ("CONFIG GET", "hash-max-listpack-value"),  # a name of two words, as redis-py passes it
    (b"CLIENT SETNAME", "pipe"),
    (b"GET", "k"),
    ("SCRIPT", "LOAD", "return 1"),
    ("GEORADIUS_RO", "k", 1.25, -3, 1e20),  # not letters only: the split path
    ("ÉCHO", "x"),  # letters, not ASCII: hiredis's UTF-8 is the encode's
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: str(c[0]))
def test_the_packer_writes_redis_pys_bytes(cmd: tuple[Any, ...]) -> None:
    # Given redis-py's own packer (pure Python) and ours (hiredis)
    stock, ours = Connection(), HiredisPackingConnection()
    # Then one command, and several in one write, come out byte for byte the same
    assert b"".join(ours.pack_command(*cmd)) == b"".join(stock.pack_command(*cmd))
    assert b"".join(ours.pack_commands([cmd, cmd])) == b"".join(stock.pack_commands([cmd, cmd]))


def test_an_argument_redis_cannot_take_is_a_data_error_as_in_redis_py() -> None:
    for bad in (None, True, {"a": 1}):
        with pytest.raises(DataError):
            Connection().pack_command("SET", "k", bad)
        with pytest.raises(DataError):
            HiredisPackingConnection().pack_command("SET", "k", bad)


def test_each_transport_gets_its_packing_connection() -> None:
    settings = Settings()
    for url, cls in (
        ("redis://127.0.0.1:6379/0", HiredisPackingConnection),
        ("unix:///tmp/redis.sock?db=0", HiredisUnixConnection),
    ):
        client = connect_redis(url, settings)
        assert client.connection_pool.connection_class is cls, url
    assert issubclass(HiredisUnixConnection, UnixDomainSocketConnection)


async def test_a_store_on_a_unix_socket_publishes_claims_and_acks() -> None:
    with RedisServer(unix_socket=True) as server:
        # Given a store whose redis.url is the server's socket, database 3
        settings = Settings().replace("redis", key_prefix=f"t{uuid.uuid4().hex[:8]}")
        store = make_store(connect_redis(server.unix_url(db=3), settings), settings)
        tcp = aioredis.from_url(server.url.replace("/0", "/3"), decode_responses=True)
        try:
            # When a message goes the whole way through it
            await store.ensure_group("orders", "g")
            (published,) = await store.publish_many([PublishRequest("orders", '{"n": "ü"}', "{}", None)])
            (d,) = await store.claim("orders", "g", 10, 30_000, "c1")
            (outcome,) = await store.ack_many("orders", "g", [AckItem(d.id, d.receipt)])
            # Then it was stored, delivered and acked, in database 3
            assert isinstance(published, PublishResult) and d.id == published.id and d.payload == '{"n": "ü"}'
            assert outcome is AckOutcome.ACKED
            assert await tcp.exists(store.keys("orders").groups) == 1
            # And the store's connections are Unix socket clients (flag U), through the packing connection
            clients = [c for c in await tcp.client_list() if c["db"] == "3" and c["cmd"] != "client|list"]
            assert clients and all("U" in c["flags"] for c in clients), clients
            assert store.redis.connection_pool.connection_class is HiredisUnixConnection
        finally:
            await tcp.aclose()
            await store.close()
