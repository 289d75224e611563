"""Redis clients: ``connect_redis`` (a real server), ``fake_client`` (the in-process last resort), the connection
class that packs commands with hiredis, and the persistence settings read once at startup and by ``diagnose``.

The packing connection: redis-py's sync client already packs with hiredis when it is installed; its asyncio client
packs in Python, which cost ~2 ms per publish batch of 100 messages (6 arguments each) in profiles. Falls back
silently to the stock class when hiredis is missing (the packer is an optimisation, not a behaviour).

With a socket timeout, redis-py writes each command inside ``asyncio.wait_for``, which (Python 3.11) wraps the write
in a new Task: two more event-loop turns per call, about a third of the client-side time of a one-message publish.
The same timeout as a scope (``asyncio.timeout``) costs no task, and a write that times out still drops the
connection and raises redis-py's ``TimeoutError`` as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, Connection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import DataError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.core.config import Settings
from broker.store.cluster import connect_cluster

try:
    import hiredis

    HAVE_HIREDIS = True
except ImportError:  # pragma: no cover - hiredis is a declared dependency
    HAVE_HIREDIS = False

Redis = aioredis.Redis
SAFE_EVICTION = {"noeviction"}
PERSISTENCE_SETTINGS = ("appendonly", "save", "maxmemory-policy")
# A message body is a hash (docs/keys.md) whose payload is usually longer than Redis's default
# hash-max-listpack-value (64 bytes): Redis then keeps it as a hashtable, about 250 bytes more per message (a 256-byte
# payload: 790 instead of 540 bytes per queued message, docs/performance.md "backlog"). The managed redis-server runs
# with this value, and a broker on a Redis with less says so at startup (``memory_hints``).
BODY_LISTPACK_VALUE = 4096
MEMORY_SETTINGS = ("hash-max-listpack-value",)


def connect_redis(url: str, settings: Settings) -> aioredis.Redis:
    """A client whose own retries are off: an outage must reach the breaker at once, not after 10 silent tries.
    With ``redis.cluster``, ``url`` is a seed node and the client is a cluster client (``cluster.py``)."""
    if settings.redis.cluster:
        return connect_cluster(url, settings)
    cls = connection_class(url)
    extra: dict[str, Any] = {"connection_class": cls} if cls is not None else {}
    return aioredis.Redis.from_url(
        url,
        **extra,
        decode_responses=True,
        socket_timeout=settings.redis.socket_timeout_ms / 1000,
        socket_connect_timeout=settings.redis.connect_timeout_ms / 1000,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
    )


def fake_client() -> aioredis.Redis:
    """In-process fakeredis, the last-resort embedded default when no redis-server binary exists. NOT durable."""
    import fakeredis

    client: aioredis.Redis = fakeredis.FakeAsyncRedis(decode_responses=True)
    return client


async def config_values(client: aioredis.Redis, names: Iterable[str]) -> dict[str, str]:
    """Each setting in ``names`` as CONFIG GET answers it (run it through the gateway)."""
    cfg: dict[Any, Any] = {}
    for name in names:
        cfg.update(await client.config_get(name))
    return {str(k): str(v) for k, v in cfg.items()}


def persistence_problems(cfg: dict[str, str]) -> list[str]:
    """Problems that can lose queued messages: no persistence, an eviction policy that may drop keys."""
    out: list[str] = []
    if cfg.get("appendonly") != "yes" and not cfg.get("save"):
        out.append("Redis has no persistence (appendonly no, no save points): a Redis restart loses every message")
    policy = cfg.get("maxmemory-policy", "noeviction")
    if policy not in SAFE_EVICTION:
        out.append(f"Redis maxmemory-policy is {policy!r}: under memory pressure it may evict queue keys")
    return out


def memory_hints(cfg: dict[str, str]) -> list[str]:
    """Settings that make every queued message cost more memory than it needs to (nothing is at risk)."""
    value = cfg.get("hash-max-listpack-value", "")
    if value.isdigit() and int(value) < 1024:
        return [
            f"Redis hash-max-listpack-value is {value}: a message body with a payload longer than that is kept as a "
            f"hashtable, about 250 bytes more per queued message; set it to {BODY_LISTPACK_VALUE}"
        ]
    return []


class HiredisPacking(AbstractConnection):
    """The packing and the timeout scope, for any transport: mixed into TCP and Unix socket connections below."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        timeout = self.socket_timeout
        if not timeout:
            return await super().send_packed_command(command, check_health)
        try:
            async with asyncio.timeout(timeout):
                await self.send_unbounded(command, check_health)
        except TimeoutError:
            await self.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None

    async def send_unbounded(self, command: Any, check_health: bool = True) -> None:
        """``send_packed_command`` with no deadline of its own, for a caller whose deadline covers the write (the
        script pipe's, over a write and its replies: one timer per batch instead of two). A write cut short still
        drops the connection (redis-py's path does, whatever interrupts it)."""
        timeout, self.socket_timeout = self.socket_timeout, None  # the stock path then writes without wait_for
        try:
            await super().send_packed_command(command, check_health)
        finally:
            self.socket_timeout = timeout

    def pack_command(self, *args: Any) -> list[bytes]:
        return [pack(args)]

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        return [b"".join([pack(tuple(cmd)) for cmd in commands])]


def pack(args: tuple[Any, ...]) -> bytes:
    """One command in RESP, the bytes redis-py's packer writes: a name of several words (``"CONFIG GET"``, as
    redis-py passes it) split into one argument each. A name of letters only (``"EVALSHA"``) has nothing to split
    and goes as it is: hiredis encodes a str as UTF-8, as the split's ``encode`` would."""
    first = args[0]
    if isinstance(first, str):
        if not first.isalpha():
            args = (*first.encode().split(), *args[1:])
    elif b" " in first:
        args = (*first.split(), *args[1:])
    try:
        packed: bytes = hiredis.pack_command(args)
    except TypeError as e:
        raise DataError(str(e)) from None
    return packed


async def send_under_deadline(conn: AbstractConnection, command: list[bytes]) -> None:
    """Write packed ``command`` (no health check) for a caller whose own ``asyncio.timeout`` covers the write. A
    connection without ``send_unbounded`` (redis-py's own: ``rediss://``, no hiredis) keeps its own timeout."""
    if isinstance(conn, HiredisPacking):
        await conn.send_unbounded(command, check_health=False)
    else:
        await conn.send_packed_command(command, check_health=False)


class HiredisPackingConnection(HiredisPacking, Connection):
    """``redis://``"""


class HiredisUnixConnection(HiredisPacking, UnixDomainSocketConnection):
    """``unix://``"""


def connection_class(url: str) -> type[AbstractConnection] | None:
    """The packing connection for ``url``'s transport; None: redis-py's own (``rediss://``, or no hiredis)."""
    if not HAVE_HIREDIS:
        return None
    if url.startswith("redis://"):
        return HiredisPackingConnection
    if url.startswith("unix://"):
        return HiredisUnixConnection
    return None
