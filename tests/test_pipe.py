"""The store's pipelined script connection (``broker/store/pipe.py``): concurrent script calls share one write and
one breaker call, replies go to the right caller in order, NOSCRIPT is loaded and retried, and a Redis that drops or
hangs fails every waiter with ``unavailable`` (never a hang)."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker.core.config import Settings
from broker.core.errors import BrokerError, UnavailableError
from broker.core.model import AckItem, PublishRequest, PublishResult
from broker.runtime.resilience import BreakerState
from broker.store import RedisStore, connect_redis

from .conftest import StoreFactory
from .proxy import TcpProxy
from .support import RedisServer, make_breaker

T = "pipe-topic"


def req(payload: str) -> PublishRequest:
    return PublishRequest(T, payload, "{}", None)


async def test_concurrent_calls_share_batches_and_get_their_own_replies(store_factory: StoreFactory) -> None:
    # Given 200 claims' worth of messages in 20 groups
    store = await store_factory()
    groups = [f"g{i}" for i in range(20)]
    for g in groups:
        await store.ensure_group(T, g)
    (published,) = [await store.publish_many([req(f'"{i}"') for i in range(10)])]
    assert all(isinstance(p, PublishResult) for p in published)
    before = store.scripts.pipe.batches

    # When 20 claims (one per group) are made at once
    claims = await asyncio.gather(*(store.claim(T, g, 10, 30_000, f"c-{g}") for g in groups))

    # Then each caller got its own group's 10 messages in publish order, and they went in far fewer batches
    for g, got in zip(groups, claims, strict=True):
        assert [d.payload for d in got] == [f'"{i}"' for i in range(10)], g
        assert all(d.group == g for d in got)
    batches = store.scripts.pipe.batches - before
    assert 1 <= batches <= 2, batches  # the first call goes alone, everything queued meanwhile in the next


async def test_an_error_reply_fails_only_its_caller(store_factory: StoreFactory) -> None:
    # Given a group whose ready list is damaged (a string: WRONGTYPE), and a healthy one
    store = await store_factory()
    await store.ensure_group(T, "ok")
    await store.ensure_group(T, "bad")
    await store.publish_many([req('"x"')])
    bad = store.keys(T).group("bad").ready
    await store.redis.delete(bad)
    await store.redis.set(bad, "damage")
    # When both are claimed in the same batch
    good, broken = await asyncio.gather(
        store.claim(T, "ok", 10, 30_000, "c1"), store.claim(T, "bad", 10, 30_000, "c2"), return_exceptions=True
    )
    # Then the damaged one fails with the translated error reply; the other is served
    assert isinstance(broken, BrokerError) and not isinstance(broken, UnavailableError), broken
    assert "WRONGTYPE" in str(broken)
    assert isinstance(good, list) and [d.payload for d in good] == ['"x"']
    assert store.breaker.state is BreakerState.CLOSED and store.breaker.fail_counter == 0


async def test_noscript_in_a_batch_is_loaded_and_retried_once(store_factory: StoreFactory) -> None:
    store = await store_factory()
    await store.ensure_group(T, "g")
    await store.publish_many([req('"a"'), req('"b"')])
    # Given Redis forgot every script
    await store.redis.script_flush()
    # When two calls of two scripts go in one batch
    got, (res,) = await asyncio.gather(store.claim(T, "g", 1, 30_000, "c1"), store.publish_many([req('"c"')]))
    # Then both ran, exactly once
    assert [d.payload for d in got] == ['"a"']
    assert isinstance(res, PublishResult)
    more = await store.claim(T, "g", 10, 30_000, "c1")
    assert [d.payload for d in more] == ['"b"', '"c"']
    assert await store.ack_many(T, "g", [AckItem(d.id, d.receipt) for d in [*got, *more]]) == [1, 1, 1]


async def test_a_cancelled_caller_is_never_sent(store_factory: StoreFactory) -> None:
    store = await store_factory()
    await store.ensure_group(T, "g")
    await store.publish_many([req('"a"')])
    # Given a claim queued behind a batch in flight, whose caller gives up before it is taken
    first = asyncio.ensure_future(store.publish_many([req('"b"')]))
    await asyncio.sleep(0)  # the publish batch is being written
    gone = asyncio.ensure_future(store.claim(T, "g", 10, 30_000, "c1"))
    await asyncio.sleep(0)
    gone.cancel()
    await first
    with pytest.raises(asyncio.CancelledError):
        await gone
    # Then nothing was claimed for it: both messages are still ready
    got = await store.claim(T, "g", 10, 30_000, "c2")
    assert [d.payload for d in got] == ['"a"', '"b"']


def proxied_store(proxy: TcpProxy, **breaker: float) -> RedisStore:
    settings = Settings().replace("redis", socket_timeout_ms=500, key_prefix=f"pipe{time.monotonic_ns()}")
    return RedisStore(connect_redis(proxy.url, settings), settings, make_breaker(settings, **breaker), "pipe-node")


async def test_a_dropped_connection_fails_every_waiter_and_the_next_batch_reconnects(
    redis_server: RedisServer,
) -> None:
    with TcpProxy(redis_server.port) as proxy:
        store = proxied_store(proxy)
        try:
            await store.ensure_group(T, "g")
            await store.publish_many([req('"a"')])
            # Given Redis stops answering (bytes taken, nothing sent back)
            proxy.hang()
            t = time.monotonic()
            # When several callers wait on the pipe, and then the connection is dropped under them
            waiters = [asyncio.ensure_future(store.claim(T, "g", 1, 30_000, f"c{i}")) for i in range(5)]
            await asyncio.sleep(0.1)
            proxy.restore()  # drops the hung streams (a reset)
            res = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 10)
            # Then every waiter is answered unavailable, within the socket timeout and not after a hang
            for r in res:
                assert isinstance(r, UnavailableError | list), r
            assert any(isinstance(r, UnavailableError) for r in res)
            assert time.monotonic() - t < 5
            # And the next call reconnects and works; the lost claims are given back, nothing is lost
            await store.reconcile_claims()
            got = await store.claim(T, "g", 10, 30_000, "c9")
            delivered = [d for r in res if isinstance(r, list) for d in r]
            assert len(got) + len(delivered) == 1
        finally:
            proxy.restore()
            await store.close()


async def test_a_hung_redis_times_out_each_batch_and_opens_the_breaker(redis_server: RedisServer) -> None:
    with TcpProxy(redis_server.port) as proxy:
        store = proxied_store(proxy, fail_max=2, call_timeout_s=1.0)
        try:
            await store.ensure_group(T, "g")
            # Given a Redis that takes bytes and never answers
            proxy.hang()
            # When claims keep coming
            t = time.monotonic()
            for _ in range(2):
                with pytest.raises(UnavailableError):
                    await asyncio.wait_for(store.claim(T, "g", 1, 30_000, "c1"), 10)
            # Then each batch timed out (socket timeout 0.5 s), the breaker counted one failure per batch and opened
            assert time.monotonic() - t < 8
            assert store.breaker.state is BreakerState.OPEN
            t = time.monotonic()
            with pytest.raises(UnavailableError, match="breaker open"):
                await store.claim(T, "g", 1, 30_000, "c1")
            assert time.monotonic() - t < 1  # refused at once, not sent
        finally:
            proxy.restore()
            await store.close()


async def test_close_answers_whatever_waits(store_factory: StoreFactory) -> None:
    store = await store_factory()
    await store.ensure_group(T, "g")
    await store.scripts.close()
    with pytest.raises(UnavailableError, match="closed"):
        await store.claim(T, "g", 1, 30_000, "c1")


# ---- riders: acks nobody waits on share the next write ------------------------------------------------------------


async def _leased(store: RedisStore, n: int) -> list[AckItem]:
    await store.ensure_group(T, "g")
    await store.publish_many([req(f'"{i}"') for i in range(n)])
    return [AckItem(d.id, d.receipt) for d in await store.claim(T, "g", n, 30_000, "c1")]


async def test_a_riding_ack_waits_for_the_next_write_and_shares_it(store_factory: StoreFactory) -> None:
    store = await store_factory()
    (item,) = await _leased(store, 1)
    pipe = store.scripts.pipe
    pipe._ride_s = 3600.0
    before = pipe.batches
    # Given an ack that rides, queued while nothing else is
    ack = asyncio.ensure_future(store.ack_many(T, "g", [item], ride=True))
    for _ in range(20):
        await asyncio.sleep(0)
    # Then it is not sent on its own
    assert not ack.done()
    assert pipe.batches == before
    # When a call that does not ride comes (a publish)
    (published,) = await store.publish_many([req('"next"')])
    # Then both went in one write, and the ack ran
    assert await ack == [1]
    assert isinstance(published, PublishResult)
    assert pipe.batches == before + 1
    got = await store.claim(T, "g", 10, 30_000, "c2")
    assert [d.payload for d in got] == ['"next"']  # the acked message is gone, not redelivered


async def test_a_lone_rider_goes_on_its_timer(store_factory: StoreFactory) -> None:
    store = await store_factory()
    items = await _leased(store, 2)
    # Given acks that ride and nothing else to ride with: they go alone (after RIDE_S, a few ms)
    res = await asyncio.wait_for(store.ack_many(T, "g", items, ride=True), 30)
    assert res == [1, 1]
    assert await store.claim(T, "g", 10, 30_000, "c2") == []


async def test_send_riders_sends_them_at_once(store_factory: StoreFactory) -> None:
    store = await store_factory()
    (item,) = await _leased(store, 1)
    store.scripts.pipe._ride_s = 3600.0
    ack = asyncio.ensure_future(store.ack_many(T, "g", [item], ride=True))
    await asyncio.sleep(0)
    # When someone waits on one of them (an ack frame with a ref, node/dispatch.py)
    store.send_riders()
    # Then they go now (no company, no timer)
    assert await asyncio.wait_for(ack, 30) == [1]


async def test_close_answers_a_waiting_rider(store_factory: StoreFactory) -> None:
    store = await store_factory()
    (item,) = await _leased(store, 1)
    store.scripts.pipe._ride_s = 3600.0
    ack = asyncio.ensure_future(store.ack_many(T, "g", [item], ride=True))
    await asyncio.sleep(0)
    await store.scripts.close()
    with pytest.raises(UnavailableError, match="closed"):
        await ack
