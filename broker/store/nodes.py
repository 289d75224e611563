"""Broker nodes in Redis: heartbeats and status hashes (the node registry the orphan sweep and ``broker stats``
read), and the wake-up listener (Pub/Sub notes of the scripts that make messages claimable)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Collection, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from broker.core.config import Settings
from broker.core.errors import UnavailableError
from broker.store.cluster import is_cluster
from broker.store.gateway import OUTAGES, Gateway
from broker.store.keys import listener_channel, listeners_channel, node_key, nodes_key
from broker.store.sharded_wakes import listen_sharded


class Nodes:
    def __init__(
        self, gateway: Gateway, settings: Settings, prefix: str, node_id: str, clock: Callable[[], int]
    ) -> None:
        self.gateway = gateway
        self.settings = settings
        self.prefix = prefix
        self.node_id = node_id
        self.clock = clock

    async def heartbeat(self, status: dict[str, str] | None = None) -> None:
        """Record that this node is alive (ZSET used by the orphan sweep) and, with ``status``, what it is doing
        (a HASH that expires by itself when the node stops: read by ``broker stats``)."""
        now = self.clock()

        def build(p: Pipeline) -> None:
            p.zadd(nodes_key(self.prefix), {self.node_id: now})
            if status is not None:
                key = node_key(self.prefix, self.node_id)
                p.hset(key, mapping=cast(Any, status))
                p.hset(key, "heartbeat", str(now))
                p.expire(key, max(5, self.settings.delivery.node_timeout_ms * 3 // 1000))

        await self.gateway.pipeline(build, "heartbeat")

    async def heartbeats(self) -> dict[str, int]:
        """Every registered node's last heartbeat (epoch ms), dead ones included."""
        rows = await self.gateway.call(lambda r: r.zrange(nodes_key(self.prefix), 0, -1, withscores=True), "nodes")
        return {str(row[0]): int(row[1]) for row in rows}

    async def node_status(self) -> list[dict[str, str]]:
        """Every live node's status hash (see ``heartbeat``)."""

        async def go(r: aioredis.Redis) -> list[dict[str, str]]:
            nodes = [str(n) for n in await r.zrange(nodes_key(self.prefix), 0, -1)]
            async with r.pipeline(transaction=False) as p:
                for n in nodes:
                    p.hgetall(node_key(self.prefix, n))
                rows = await p.execute()
            return [{"node": n, **row} for n, row in zip(nodes, rows, strict=True) if row]

        return await self.gateway.call(go, "node_status")

    async def dead_nodes(self, timeout_ms: int) -> list[str]:
        """Nodes whose last heartbeat is older than ``timeout_ms`` (never this node)."""
        cutoff = self.clock() - timeout_ms

        async def go(r: aioredis.Redis) -> list[str]:
            return [str(n) for n in await r.zrangebyscore(nodes_key(self.prefix), "-inf", cutoff)]

        return [n for n in await self.gateway.call(go, "dead_nodes") if n != self.node_id]

    async def forget_nodes(self, nodes: Sequence[str]) -> None:
        if nodes:
            await self.gateway.call(lambda r: r.zrem(nodes_key(self.prefix), *nodes), "forget_nodes")

    async def listen_wakes(
        self,
        on_topic: Callable[[str], None],
        beat: Callable[[], None],
        should_run: Callable[[], bool],
        on_subscribed: Callable[[], None] | None = None,
        on_due: Callable[[str], None] | None = None,
        topics: Callable[[], Collection[str]] = frozenset,
    ) -> None:
        """Wake-up notes of every topic (Pub/Sub ``<prefix>:{<topic>}:wake``, published by the scripts that make
        messages claimable), so this node claims at once what another node published, promoted or unblocked,
        rather than at its next poll. Notes this node's own publishes sent are skipped (it woke itself already).
        Runs until ``should_run()`` is false; a lost connection raises ``UnavailableError`` (the caller's loop
        restarts it). ``on_subscribed`` is called once the subscription stands: notes sent before it were missed.
        ``on_due(topic)`` gets the notes ``due:<node id>`` of other nodes: messages of the topic went to delayed
        sets (their due times are for this node's timers to read).
        Not behind the breaker:
        a listener waits by design, and its waits are not calls that succeed or fail.
        On a Redis Cluster: sharded Pub/Sub on the channels of ``topics()`` (``sharded_wakes.py``)."""
        if is_cluster(self.gateway.client):
            await listen_sharded(self.gateway.client, self.prefix, self.node_id, topics, on_topic, beat, should_run,
                                 on_subscribed, on_due)  # fmt: skip
            return
        pattern = f"{self.prefix}:{{*}}:wake"
        head, tail = len(self.prefix) + 2, -len("}:wake")
        own_due = f"due:{self.node_id}"
        pubsub = self.gateway.client.pubsub(ignore_subscribe_messages=True)
        try:
            # First the two channels that count this node as a listener (publish.lua sends its note only when another
            # node's listener is counted), in one SUBSCRIBE (Redis runs it whole: never counted as this node without
            # being counted as a listener). Then, on the same connection, the pattern: whenever a note could reach
            # this listener, it is counted.
            await pubsub.subscribe(listeners_channel(self.prefix), listener_channel(self.prefix, self.node_id))
            await pubsub.psubscribe(pattern)
            if on_subscribed is not None:
                on_subscribed()
            conn = pubsub.connection
            assert conn is not None  # psubscribe connected it
            # The replies are read off the connection directly, within one deadline a second (where the loop beats
            # and checks should_run), not through get_message: its per-call path (health check, retry wrapper, a
            # timer per call) ran once or twice per note, and at a low rate every message sends one (this node's own
            # publishes included, which are skipped). A lost connection raises: the caller's loop subscribes again.
            while should_run():
                beat()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        while True:
                            # math.inf: no timer of redis-py's own per read (the deadline above covers them)
                            reply = await conn.read_response(
                                timeout=math.inf, disconnect_on_error=False, push_request=True
                            )
                            if reply is None:  # a client that answers "nothing" (fakeredis, disconnected): lost
                                raise RedisConnectionError("wake-up listener: the connection answers nothing")
                            if not isinstance(reply, list) or len(reply) != 4 or reply[0] != "pmessage":
                                continue  # the subscription's confirmation
                            data = reply[3]
                            if data == self.node_id or data == own_due:
                                continue
                            topic = str(reply[2])[head:tail]
                            if isinstance(data, str) and data.startswith("due:"):
                                if on_due is not None:
                                    on_due(topic)
                                continue
                            on_topic(topic)
        except OUTAGES as e:
            raise UnavailableError(f"redis unreachable (wake-up listener): {e}", retry_after_ms=1_000) from None
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()
