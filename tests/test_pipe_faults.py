"""The script pipe's protocol path under faults (``broker/store/pipe.py``, ``pipe_wire.py``): a call that cannot be
sent fails alone (the rest of its batch runs, the breaker and the connection never see it, a half-open trial is not
held); an error reply redis-py treats as a connection error (LOADING, NOAUTH...) is an outage; close with a large
batch in flight aborts the socket; a reply nobody asked for is logged and counted; the "stays on streams" warning is
said once; NOSCRIPT re-runs go after the rest of their batch (the documented order)."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio.connection import Connection
from structlog.testing import capture_logs

from broker.core.config import Settings
from broker.core.errors import BrokerError, UnavailableError
from broker.core.model import PublishRequest
from broker.runtime import metrics
from broker.runtime.resilience import BreakerState
from broker.store import RedisStore, connect_redis, pipe_wire
from broker.store.connection import HiredisPackingConnection
from broker.store.pipe_wire import Replies, take_over

from .support import RedisServer, make_breaker

T = "faults-topic"


def settings(**redis: Any) -> Settings:
    return Settings().replace("redis", key_prefix=f"f{uuid.uuid4().hex[:10]}", **redis)


def store_on(url: str, s: Settings | None = None, **breaker: float) -> RedisStore:
    s = s or settings()
    return RedisStore(connect_redis(url, s), s, make_breaker(s, **breaker), "faults-node")


async def on_wire(store: RedisStore) -> None:
    """The pipe's first batch (the writer task connects, then hands the connection over)."""
    await store.ensure_group(T, "g")
    await store.publish_many([PublishRequest(T, '"first"', "{}", None)])
    assert store.scripts.pipe._wire is not None


@pytest.fixture
async def wired(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    store = store_on(redis_server.url, fail_max=1, reset_timeout_s=0.3, success_threshold=1, call_timeout_s=30.0)
    await on_wire(store)
    yield store
    await store.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def errors(kind: str) -> float:
    return metrics.REGISTRY.get_sample_value("broker_store_errors_total", {"op": "script_pipe", "kind": kind}) or 0.0


async def test_a_call_that_cannot_be_sent_fails_alone_behind_a_batch_in_flight(wired: RedisStore) -> None:
    pipe = wired.scripts.pipe
    echo = wired.redis.register_script("return ARGV[1]")
    await pipe.run([(echo, [], ["warm"])], "echo")
    wire = pipe._wire
    # Given a batch in flight, and queued behind it a good call, a call without keys and one that cannot be packed
    first = pipe.run([(echo, [], ["0"])], "echo")
    good = pipe.run([(echo, [], ["1"])], "echo")
    no_keys = pipe.run([(echo, None, ["2"])], "broken")  # type: ignore[list-item]
    unpackable = pipe.run([(echo, [], [object()])], "broken")
    # When they are answered
    got = await asyncio.wait_for(asyncio.gather(first, good, no_keys, unpackable, return_exceptions=True), 10)
    # Then the good calls ran; each bad one alone hears an internal error (not "unavailable")
    assert got[:2] == [["0"], ["1"]]
    for bad in got[2:]:
        assert isinstance(bad, BrokerError) and not isinstance(bad, UnavailableError), bad
        assert "internal error" in str(bad)
    # And the breaker saw no failure, the connection is kept
    assert wired.breaker.fail_counter == 0 and wired.breaker.state is BreakerState.CLOSED
    assert pipe._wire is wire and pipe._flight is None


async def test_a_bad_call_as_the_half_open_trial_does_not_hold_the_trial(wired: RedisStore) -> None:
    pipe = wired.scripts.pipe
    echo = wired.redis.register_script("return ARGV[1]")
    await pipe.run([(echo, [], ["warm"])], "echo")
    # Given the breaker opened, and its reset timeout passed (the next call is the trial)
    with pytest.raises(UnavailableError):
        await wired.gateway.call(lambda r: _lost(), "other")
    assert wired.breaker.state is BreakerState.OPEN
    await asyncio.sleep(0.4)
    # When the next call cannot be sent
    with pytest.raises(BrokerError, match="internal error"):
        await asyncio.wait_for(pipe.run([(echo, None, ["x"])], "broken"), 10)  # type: ignore[list-item]
    # Then the trial was not taken by it: a good call is the trial and closes the breaker
    assert await asyncio.wait_for(pipe.run([(echo, [], ["ok"])], "echo"), 10) == ["ok"]
    assert wired.breaker.state is BreakerState.CLOSED


async def _lost() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    raise RedisConnectionError("injected")


@pytest.mark.parametrize(
    "reply",
    [b"-LOADING Redis is loading the dataset in memory\r\n", b"*1\r\n-NOAUTH Authentication required.\r\n"],
    ids=["loading", "noauth-in-array"],
)
async def test_a_connection_error_reply_is_an_outage_not_a_value(redis_server: RedisServer, reply: bytes) -> None:
    store = store_on(redis_server.url, fail_max=5, call_timeout_s=30.0)
    try:
        await on_wire(store)
        pipe = store.scripts.pipe
        echo = store.redis.register_script("return ARGV[1]")
        await pipe.run([(echo, [], ["warm"])], "echo")
        # Given a batch in flight
        waiting = pipe.run([(echo, [], ["1"])], "echo")
        assert pipe._flight is not None and pipe._wire is not None
        # When its reply is one redis-py's parser raises as a connection error
        pipe._wire.data_received(reply)
        # Then the caller hears "unavailable", the breaker counts a failure, the connection is dropped
        with pytest.raises(UnavailableError):
            await asyncio.wait_for(waiting, 10)
        assert store.breaker.fail_counter == 1 and pipe._wire is None
        # And the next call reconnects
        assert await asyncio.wait_for(pipe.run([(echo, [], ["2"])], "echo"), 10) == ["2"]
    finally:
        await store.close()


async def test_a_reply_with_nothing_in_flight_is_logged_counted_and_drops_the_connection(wired: RedisStore) -> None:
    pipe = wired.scripts.pipe
    assert pipe._flight is None and pipe._wire is not None
    before = errors("unexpected_reply")
    with capture_logs() as logs:
        pipe._wire.data_received(b":1\r\n")
    assert [e["log_level"] for e in logs if e["event"] == "redis_pipe_unexpected_reply"] == ["error"]
    assert errors("unexpected_reply") == before + 1
    assert pipe._wire is None and wired.breaker.fail_counter == 0


async def test_close_with_a_large_batch_in_flight_aborts_the_socket(own_redis: RedisServer) -> None:
    s = settings(socket_timeout_ms=30_000)
    store = store_on(own_redis.url, s, call_timeout_s=60.0)
    assert own_redis.proc is not None
    handled: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, ctx: handled.append(ctx))
    try:
        await on_wire(store)
        pipe = store.scripts.pipe
        echo = store.redis.register_script("return #ARGV[1]")
        await pipe.run([(echo, [], ["warm"])], "echo")
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            # Given a batch in flight larger than the socket takes (Redis stopped: the transport buffers the rest)
            waiting = pipe.run([(echo, [], ["x" * (64 << 20)])], "echo")
            wire = pipe._wire
            assert wire is not None and wire.transport is not None
            transport = wire.transport
            assert transport.get_write_buffer_size() > 0
            # When the pipe closes
            await store.scripts.close()
            with pytest.raises(UnavailableError, match="closed"):
                await waiting
            # Then the socket was aborted: nothing of the batch is left to reach Redis after its caller was told
            assert transport.is_closing() and transport.get_write_buffer_size() == 0
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        assert store.breaker.fail_counter == 0
        assert handled == []
    finally:
        loop.set_exception_handler(None)
        await store.close()


class _Streams(asyncio.Protocol):
    def __init__(self) -> None:
        self.paused = 0

    def pause_writing(self) -> None:
        self.paused += 1


class _Transport:
    def __init__(self) -> None:
        self.protocol: asyncio.BaseProtocol | None = None

    def is_closing(self) -> bool:
        return False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol


def test_give_back_hands_a_paused_write_state_to_redis_pys_protocol() -> None:
    # Given the transport paused writing while ours was its protocol
    proto = Replies(Connection(), lambda _: None, lambda _: None)
    streams, transport = _Streams(), _Transport()
    proto._streams, proto.transport, proto.attached = streams, transport, True  # type: ignore[assignment]
    proto.pause_writing()
    # When it goes back to redis-py's protocol
    proto.give_back()
    # Then that protocol is paused too (asyncio's resume_writing, when the buffer drains, finds it so)
    assert transport.protocol is streams and streams.paused == 1


def test_a_connection_without_its_stream_pair_is_warned_about_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipe_wire, "_said_streams", False, raising=False)
    conn = HiredisPackingConnection()  # not connected: no stream pair, as a redis-py without one
    with capture_logs() as logs:
        assert take_over(conn, lambda _: None, lambda _: None) is None
        assert take_over(conn, lambda _: None, lambda _: None) is None
        assert take_over(HiredisPackingConnection(), lambda _: None, lambda _: None) is None
    assert [e["event"] for e in logs].count("redis_pipe_stays_on_streams") == 1


async def test_noscript_reruns_go_after_the_rest_of_their_batch(wired: RedisStore) -> None:
    # The module's "Order" paragraph: a call answered NOSCRIPT runs again after the calls behind it in its batch
    pipe = wired.scripts.pipe
    key = f"{wired.settings.redis.key_prefix}order"
    unknown = wired.redis.register_script("redis.call('RPUSH', KEYS[1], 'first') return 1")
    known = wired.redis.register_script("redis.call('RPUSH', KEYS[1], 'second') return 2")
    await wired.redis.script_flush()
    await wired.redis.script_load(known.script)
    assert await asyncio.wait_for(pipe.run([(unknown, [key], []), (known, [key], [])], "order"), 10) == [1, 2]
    assert await wired.redis.lrange(key, 0, -1) == ["second", "first"]
