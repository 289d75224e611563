"""The script pipe's protocol path (``broker/store/pipe.py``, ``pipe_wire.py``): after its first batch the pipe reads
its connection in a protocol callback; replies split anywhere are put together, error replies stay in place, NOSCRIPT
is loaded and retried, a hung Redis (SIGSTOP) or a reset fails the batch in flight on its deadline as one breaker
failure, the breaker refuses, admits a trial and closes through it, and the connection is set up as redis-py's
(AUTH, SELECT) from the URL."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import InvalidResponse, NoScriptError, ResponseError

from broker.core.config import Settings
from broker.core.errors import BrokerError, UnavailableError
from broker.core.model import AckItem, PublishRequest, PublishResult
from broker.runtime.resilience import BreakerState
from broker.store import RedisStore, connect_redis
from broker.store.pipe_wire import Replies

from .proxy import TcpProxy
from .support import RedisServer, make_breaker

T = "wire-topic"


def req(payload: str) -> PublishRequest:
    return PublishRequest(T, payload, "{}", None)


# ---- the protocol alone ---------------------------------------------------------------------------------------

STREAM = (
    b"*3\r\n:1\r\n$5\r\nhello\r\n-WRONGTYPE Operation against a key\r\n"  # an array with an error reply inside
    b"-NOSCRIPT No matching script. Please use EVAL.\r\n"
    b">2\r\n$10\r\ninvalidate\r\n*0\r\n"  # a RESP3 push: not a reply
    b"$8\r\nZo\xc3\xab \xe2\x9c\x93\r\n"  # UTF-8 text
    b"_\r\n"  # RESP3 null
    b":42\r\n"
)


def replies_of(chunks: list[bytes]) -> tuple[list[Any], list[Exception]]:
    got: list[Any] = []
    lost: list[Exception] = []
    proto = Replies(Connection(decode_responses=True), got.append, lost.append)
    proto.attached = True
    for c in chunks:
        proto.data_received(c)
    return got, lost


def check(got: list[Any]) -> None:
    assert len(got) == 5, got
    first, noscript, text, null, n = got
    assert first[:2] == [1, "hello"] and isinstance(first[2], ResponseError) and "WRONGTYPE" in str(first[2])
    assert isinstance(noscript, NoScriptError)  # redis-py's class for the code, as its own parser makes it
    assert text == "Zoë ✓" and null is None and n == 42


def test_a_reply_split_at_any_byte_is_handed_over_once_complete() -> None:
    for cut in range(1, len(STREAM)):
        got, lost = replies_of([STREAM[:cut], STREAM[cut:]])
        check(got)
        assert lost == []
    got, lost = replies_of([bytes([b]) for b in STREAM])  # one byte per data_received
    check(got)
    assert lost == []


def test_garbage_ends_the_connection_once_and_nothing_after_it_is_a_reply() -> None:
    got, lost = replies_of([b":1\r\n", b"?garbage\r\n", b":2\r\n"])
    assert got == [1]
    assert len(lost) == 1 and isinstance(lost[0], InvalidResponse)


# ---- the pipe on a real redis-server ----------------------------------------------------------------------------


def settings(**redis: Any) -> Settings:
    return Settings().replace("redis", key_prefix=f"w{uuid.uuid4().hex[:10]}", **redis)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone (it is stopped, or gets a password)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
async def wired(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    s = settings()
    store = RedisStore(connect_redis(redis_server.url, s), s, make_breaker(s), "wire-node")
    await store.ensure_group(T, "g")
    await store.publish_many([req('"first"')])  # the first batch: the writer task connects, then hands over
    assert store.scripts.pipe._wire is not None
    yield store
    await store.close()


async def test_after_the_first_batch_calls_are_written_at_once_and_answered_without_a_task(
    wired: RedisStore,
) -> None:
    pipe = wired.scripts.pipe
    script = wired.redis.register_script("return ARGV[1]")
    before = pipe.batches
    # When a call is made: it is written in the call itself (no writer task), and is in flight
    first = pipe.run([(script, [], ["a"])], "echo")
    assert pipe._flight is not None and pipe._task is None
    # And calls made while it is in flight wait for its reply, then go together in the next write, in order
    more = [pipe.run([(script, [], [f"b{i}"]), (script, [], [f"c{i}"])], "echo") for i in range(3)]
    assert await first == ["a"]  # (a script Redis did not know: NOSCRIPT, loaded and sent again, same batch)
    assert await asyncio.gather(*more) == [[f"b{i}", f"c{i}"] for i in range(3)]
    assert pipe.batches - before == 2
    assert pipe._task is None and pipe._wire is not None


async def test_error_replies_stay_in_place_and_count_as_an_answer(wired: RedisStore) -> None:
    pipe = wired.scripts.pipe
    ok = wired.redis.register_script("return ARGV[1]")
    bad = wired.redis.register_script("return redis.error_reply('WRONGTYPE damaged ' .. ARGV[1])")
    await pipe.run([(ok, [], ["warm"]), (bad, [], ["warm"])], "echo")  # both scripts loaded
    # When a batch holds an error reply between two answers
    got = await pipe.run([(ok, [], ["1"]), (bad, [], ["2"]), (ok, [], ["3"])], "echo")
    # Then it is a value in its place, and the breaker saw a success
    assert got[0] == "1" and got[2] == "3"
    assert isinstance(got[1], ResponseError) and "damaged 2" in str(got[1])
    assert wired.breaker.fail_counter == 0 and pipe._wire is not None
    # And through the store, as before: the caller of the bad call alone hears a translated error
    with pytest.raises(BrokerError, match="damaged"):
        await wired.scripts.run([(bad, [], ["x"])], "echo")


async def test_noscript_on_the_protocol_path_loads_and_runs_each_call_once(wired: RedisStore) -> None:
    pipe = wired.scripts.pipe
    # Given Redis forgot every script, while the pipe is on its protocol path
    await wired.redis.script_flush()
    before = pipe.batches
    # When a claim and a publish go in one batch
    first = asyncio.ensure_future(wired.publish_many([req('"n"')]))
    await asyncio.sleep(0)
    got, (res,) = await asyncio.gather(wired.claim(T, "g", 10, 30_000, "c1"), first)
    # Then both ran exactly once (loaded, sent again within their batch): nothing duplicated, nothing lost
    assert isinstance(res, PublishResult)
    rest = await wired.claim(T, "g", 10, 30_000, "c1")
    assert sorted(d.payload for d in [*got, *rest]) == ['"first"', '"n"']
    assert pipe._wire is not None and pipe.batches - before >= 1
    assert wired.breaker.fail_counter == 0


async def test_an_idle_connection_closed_by_redis_is_reopened_without_a_breaker_failure(wired: RedisStore) -> None:
    pipe = wired.scripts.pipe
    conn = pipe._conn
    assert conn is not None
    # Given Redis closes the pipe's connection while nothing is in flight
    (cid,) = [c["id"] for c in await wired.redis.client_list() if c["cmd"] == "evalsha"]
    await wired.redis.client_kill_filter(_id=cid)
    for _ in range(100):
        if pipe._wire is None:
            break
        await asyncio.sleep(0.01)
    assert pipe._wire is None
    # When the next call comes: it reconnects (through the writer task) and goes back to the protocol path
    (d,) = await wired.claim(T, "g", 10, 30_000, "c1")
    assert d.payload == '"first"'
    assert pipe._wire is not None and pipe._conn is not None
    assert wired.breaker.fail_counter == 0


def proxied(proxy: TcpProxy, **breaker: float) -> RedisStore:
    s = settings(socket_timeout_ms=500)
    return RedisStore(connect_redis(proxy.url, s), s, make_breaker(s, **breaker), "wire-node")


async def test_a_reset_mid_batch_fails_the_batch_in_flight_as_one_failure(redis_server: RedisServer) -> None:
    with TcpProxy(redis_server.port) as proxy:
        store = proxied(proxy, fail_max=5, call_timeout_s=30.0)
        try:
            await store.ensure_group(T, "g")
            await store.publish_many([req('"a"')])
            pipe = store.scripts.pipe
            assert pipe._wire is not None
            # Given a batch in flight that Redis does not answer, and calls queued behind it
            proxy.hang()
            first = asyncio.ensure_future(store.claim(T, "g", 1, 30_000, "c0"))
            await asyncio.sleep(0)
            while pipe._flight is None:
                await asyncio.sleep(0.01)
            # When the connection is reset under it
            proxy.restore()
            # Then the batch in flight is answered unavailable (unreachable), counted once by the breaker
            with pytest.raises(UnavailableError, match="unreachable"):
                await asyncio.wait_for(first, 10)
            assert store.breaker.fail_counter == 1 and pipe._wire is None
            # And the next call reconnects; the lost claim's delivery is given back, nothing is lost
            await store.reconcile_claims()
            (d,) = await store.claim(T, "g", 10, 30_000, "c9")
            assert d.payload == '"a"'
            assert pipe._wire is not None
        finally:
            proxy.restore()
            await store.close()


async def test_a_stopped_redis_fails_each_batch_on_its_deadline(own_redis: RedisServer) -> None:
    s = settings(socket_timeout_ms=400)
    store = RedisStore(connect_redis(own_redis.url, s), s, make_breaker(s, fail_max=10, call_timeout_s=30.0), "n")
    assert own_redis.proc is not None
    pid = own_redis.proc.pid
    try:
        await store.ensure_group(T, "g")
        await store.publish_many([req('"a"')])
        pipe = store.scripts.pipe
        assert pipe._wire is not None
        # Given Redis is stopped (SIGSTOP: the socket stays open, nothing answers)
        os.kill(pid, signal.SIGSTOP)
        try:
            # When a call is made, and another behind it
            t = time.monotonic()
            first = asyncio.ensure_future(store.claim(T, "g", 1, 30_000, "c1"))
            await asyncio.sleep(0)
            second = asyncio.ensure_future(store.claim(T, "g", 1, 30_000, "c2"))
            # Then each fails unavailable (the first on its deadline, the second's reconnect in its own),
            # never a hang, each one failure of the breaker
            with pytest.raises(UnavailableError):
                await asyncio.wait_for(first, 10)
            with pytest.raises(UnavailableError):
                await asyncio.wait_for(second, 10)
            assert time.monotonic() - t < 8
            assert store.breaker.fail_counter == 2
            assert pipe._wire is None
        finally:
            os.kill(pid, signal.SIGCONT)
        # And once Redis runs again the next call works on a new connection (the old one's late replies are gone
        # with it); the first claim's delivery (it ran when Redis resumed) is given back by reconciliation
        await store.reconcile_claims()
        got = await store.claim(T, "g", 10, 30_000, "c3")
        assert [d.payload for d in got] in (['"a"'], [])
        assert pipe._wire is not None
    finally:
        await store.close()


async def test_the_breaker_refuses_admits_a_trial_and_closes_through_the_protocol_path(
    redis_server: RedisServer,
) -> None:
    with TcpProxy(redis_server.port) as proxy:
        store = proxied(proxy, fail_max=1, reset_timeout_s=0.3, success_threshold=1, call_timeout_s=30.0)
        pipe = store.scripts.pipe
        try:
            await store.ensure_group(T, "g")
            await store.publish_many([req('"a"')])
            assert pipe._wire is not None
            # Given the breaker opened by another call's failure (the pipe's connection is still up)
            with pytest.raises(UnavailableError):
                await store.gateway.call(lambda r: _lost(), "other")
            assert store.breaker.state is BreakerState.OPEN
            # When a call comes: refused at once, not written
            before = pipe.batches
            with pytest.raises(UnavailableError, match="breaker open") as refused:
                await store.claim(T, "g", 1, 30_000, "c1")
            assert refused.value.retry_after_ms is not None and refused.value.retry_after_ms > 0
            assert pipe.batches == before and pipe._flight is None and pipe._wire is not None
            # When the reset timeout has passed: the next batch is the one trial, and a failure of it reopens
            await asyncio.sleep(0.4)
            proxy.hang()
            trial = asyncio.ensure_future(store.claim(T, "g", 1, 30_000, "c1"))
            await asyncio.sleep(0)
            assert store.breaker.state is BreakerState.HALF_OPEN
            with pytest.raises(UnavailableError, match="breaker open"):  # no second call during the trial
                await store.gateway.call(lambda r: r.ping(), "ping")
            with pytest.raises(UnavailableError, match="unreachable"):
                await asyncio.wait_for(trial, 10)
            assert store.breaker.state is BreakerState.OPEN
            proxy.restore()
            # And a trial that is answered closes it (the first batch after a drop reconnects in the writer task
            # under Gateway.call; the one after it is on the protocol path again)
            await asyncio.sleep(0.4)
            (d,) = await store.claim(T, "g", 1, 30_000, "c2")
            assert store.breaker.state is BreakerState.CLOSED
            await store.ack_many(T, "g", [AckItem(d.id, d.receipt)])
            assert pipe._wire is not None
            # And on the protocol path too: opened, then its trial is a batch written by begin() and closes it
            with pytest.raises(UnavailableError):
                await store.gateway.call(lambda r: _lost(), "other")
            await asyncio.sleep(0.4)
            assert store.breaker.state is BreakerState.OPEN
            await store.publish_many([req('"b"')])
            assert store.breaker.state is BreakerState.CLOSED and pipe._wire is not None
        finally:
            proxy.restore()
            await store.close()


async def _lost() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    raise RedisConnectionError("injected")


async def test_close_with_a_batch_in_flight_answers_it_and_counts_nothing(own_redis: RedisServer) -> None:
    s = settings(socket_timeout_ms=30_000)
    store = RedisStore(connect_redis(own_redis.url, s), s, make_breaker(s, call_timeout_s=60.0), "n")
    assert own_redis.proc is not None
    await store.ensure_group(T, "g")
    await store.publish_many([req('"a"')])
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        waiting = asyncio.ensure_future(store.claim(T, "g", 1, 30_000, "c1"))
        await asyncio.sleep(0)
        assert store.scripts.pipe._flight is not None
        await store.scripts.close()
        with pytest.raises(UnavailableError, match="closed"):
            await waiting
        assert store.breaker.fail_counter == 0 and store.breaker.state is BreakerState.CLOSED
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
        await store.close()


async def test_password_and_database_come_from_the_url_as_for_redis_py(own_redis: RedisServer) -> None:
    admin = aioredis.from_url(own_redis.url, decode_responses=True)
    await admin.config_set("requirepass", "s3cret")
    await admin.aclose()
    url = f"redis://:s3cret@127.0.0.1:{own_redis.port}/5"
    s = settings()
    store = RedisStore(connect_redis(url, s), s, make_breaker(s), "n")
    db5 = aioredis.from_url(url, decode_responses=True)
    try:
        # When messages go through the pipe, on the protocol path
        await store.ensure_group(T, "g")
        await store.publish_many([req('"a"')])
        await store.publish_many([req('"b"')])
        assert store.scripts.pipe._wire is not None
        got = await store.claim(T, "g", 10, 30_000, "c1")
        # Then it authenticated and wrote database 5, as every other connection of the client
        assert [d.payload for d in got] == ['"a"', '"b"']
        assert await db5.exists(store.keys(T).groups) == 1
        clients = [c for c in await db5.client_list() if c["cmd"] == "evalsha"]
        assert clients and all(c["db"] == "5" and c["user"] == "default" and c["resp"] == "3" for c in clients)
    finally:
        await db5.aclose()
        await store.close()


async def test_the_pipe_adds_no_connection_to_redis(redis_server: RedisServer) -> None:
    s = settings()
    store = RedisStore(connect_redis(redis_server.url, s), s, make_breaker(s), "n")
    try:
        await store.ensure_group(T, "g")
        for i in range(5):
            await store.publish_many([req(f'"{i}"')])
        pool = store.redis.connection_pool
        # the pipe's connection is one of the client's pool, checked out (none beyond the pool's own)
        assert store.scripts.pipe._conn is not None
        assert store.scripts.pipe._conn in pool._in_use_connections  # type: ignore[attr-defined]
    finally:
        await store.close()


def test_on_uvloop_the_broker_loop_the_protocol_path_serves_and_fails_the_same(redis_server: RedisServer) -> None:
    # The broker runs on uvloop (cli/command.py), whose transports are not asyncio's: the take-over and its
    # callbacks hold there too (answers, a reset mid-batch, reconnection)
    import uvloop

    async def main() -> None:
        with TcpProxy(redis_server.port) as proxy:
            store = proxied(proxy, fail_max=5, call_timeout_s=30.0)
            pipe = store.scripts.pipe
            try:
                await store.ensure_group(T, "g")
                await store.publish_many([req('"a"')])
                await store.publish_many([req('"b"')])
                assert pipe._wire is not None and pipe._task is None
                (d,) = await store.claim(T, "g", 1, 30_000, "c1")
                assert d.payload == '"a"'
                proxy.hang()
                lost = asyncio.ensure_future(store.claim(T, "g", 1, 30_000, "c2"))
                while pipe._flight is None:
                    await asyncio.sleep(0.01)
                proxy.restore()
                with pytest.raises(UnavailableError):
                    await asyncio.wait_for(lost, 10)
                assert store.breaker.fail_counter == 1
                await store.reconcile_claims()
                got = await store.claim(T, "g", 10, 30_000, "c3")
                assert [x.payload for x in got] == ['"b"']
                assert pipe._wire is not None
            finally:
                proxy.restore()
                await store.close()

    uvloop.run(main())
