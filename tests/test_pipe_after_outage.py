"""The script pipe after an outage (``broker/store/pipe.py``): the connection it keeps between batches is dropped
while idle by an outage (here a cut of the path to Redis); once Redis answers again, its next batch must run.

It once did not: the pipe wrote on the connection it kept, which the outage had closed, so that batch failed
``unavailable`` ("Connection closed by server") and counted as a breaker failure: one publish, claim, ack or loop
step lost after every outage, and a half-open trial failed (the breaker opened again); a background loop that met
it was taken for failing for its whole backoff (the flaky
``test_readyz_is_503_with_reasons_while_redis_is_cut_and_200_after``). On the protocol path (branch ``cbpipe``) the
taken-over connection hears the peer's close in its protocol (``eof_received``/``connection_lost``) while idle and is
dropped at once, at no cost per batch: the next batch reconnects, as a pooled connection's checkout would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from redis.exceptions import ConnectionError as RedisConnectionError

from broker.core.model import PublishResult

from .proxy import TcpProxy
from .support import RedisServer
from .test_pipe import T, proxied_store, req


async def reachable(ping: Callable[[], Awaitable[object]], want: bool) -> None:
    """Bounded wait until a pooled ``PING`` answers (``want``) or fails (not ``want``)."""
    async with asyncio.timeout(10):
        while True:
            try:
                await ping()
                ok = True
            except (RedisConnectionError, OSError):
                ok = False
            if ok is want:
                return
            await asyncio.sleep(0.05)


async def test_the_first_batch_after_an_outage_runs(redis_server: RedisServer) -> None:
    with TcpProxy(redis_server.port) as proxy:
        store = proxied_store(proxy)
        try:
            await store.ensure_group(T, "g")
            # Given the pipe has its connection (a publish went through it), idle from now on
            (published,) = await store.publish_many([req('"a"')])
            assert isinstance(published, PublishResult)
            # When Redis is cut off, and back: a pooled call fails meanwhile, then works again
            proxy.cut()
            await reachable(store.redis.ping, want=False)
            proxy.restore()
            await reachable(store.redis.ping, want=True)
            # Then the pipe's first batch runs, and the breaker counted no failure
            got = await store.claim(T, "g", 1, 30_000, "c1")
            assert [d.payload for d in got] == ['"a"']
            assert store.breaker.fail_counter == 0
        finally:
            proxy.restore()
            await store.close()
