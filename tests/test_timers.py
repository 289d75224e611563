"""Timers instead of polling (docs/design.md, "Timers"): the scripts tell when a group's next work is due, the node
arms one timer per group there, and a due retry is delivered within milliseconds instead of at the next sweep.

Store level (fakeredis and a real redis-server): a nack reports when its retry is due, a sweep step reports the heads
of the delayed and lease sets, and a due retry goes to the head of the ready list (a delayed publish to the tail).
Broker level (real redis-server and broker processes, the sweep interval set to 10 s so that only a timer can explain
a fast delivery): a retry with a 50 ms backoff and an expired 300 ms lease come back well before the sweep could
have moved them, and an idle consumer costs no script call.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import websockets

from broker.core.config import Settings
from broker.core.model import NackItem, PublishRequest
from broker.node.dispatch import TIMER_GAP_MS, Consumer, Dispatch, GroupDispatcher
from broker.store import Swept

from .brokers import BrokerProcess
from .conftest import StoreFactory
from .support import FakeClock, RedisServer

T = "timers"
NO_JITTER = {"backoff_multiplier": 1.0, "backoff_cap_ms": 60_000, "jitter": 0.0}


def _settings(base_ms: int) -> Settings:
    return Settings().replace("retry", backoff_base_ms=base_ms, **NO_JITTER)


# ---- store ----------------------------------------------------------------------------------------------------


async def test_a_nacked_retry_is_reported_with_its_due_time(store_factory: StoreFactory) -> None:
    # Given a claimed message and a backoff of exactly 200 ms
    clock = FakeClock()
    store = await store_factory(_settings(200), clock)
    await store.ensure_group(T, "g")
    await store.publish_many([PublishRequest(T, '"a"')])
    (d,) = await store.claim(T, "g", 1, 30_000, "c1")
    # When it is nacked (backoff), the reply says when the retry is due
    reply = await store.nack_due(T, "g", [(NackItem(d.id, d.receipt, "boom"), 1, "c1")])
    assert [o.value for o in reply.outcomes] == ["retry"]
    assert reply.due == clock() + 200
    # A sweep step before that moves nothing and reports the same head
    (early,) = await store.sweep_due([(T, "g")])
    assert (early.promoted, early.next_due) == (0, clock() + 200)
    # At the due time it is promoted, and nothing else waits
    clock.advance(200)
    (due,) = await store.sweep_due([(T, "g")])
    assert (due.promoted, due.next_due) == (1, None)


async def test_a_sweep_step_reports_the_earliest_lease_deadline(store_factory: StoreFactory) -> None:
    clock = FakeClock()
    store = await store_factory(_settings(1000), clock)
    await store.ensure_group(T, "g")
    await store.publish_many([PublishRequest(T, '"a"'), PublishRequest(T, '"b"')])
    await store.claim(T, "g", 1, 5_000, "c1")
    await store.claim(T, "g", 1, 2_000, "c2")
    (s,) = await store.sweep_due([(T, "g")])
    assert s.next_due == clock() + 2_000  # the earlier of the two deadlines
    # When the earlier lease expires, it is retried (backoff 1 s), and the next due work is the other lease
    clock.advance(2_000)
    (s,) = await store.sweep_due([(T, "g")])
    assert (s.retried, s.next_due) == (1, clock() + 1_000)
    # When the other lease expires too, the first retry is promoted and the second one is the next due work
    clock.advance(5_000)
    (s,) = await store.sweep_due([(T, "g")])
    assert (s.retried, s.promoted) == (1, 1)
    assert s.next_due == clock() + 1_000
    clock.advance(1_000)
    (s,) = await store.sweep_due([(T, "g")])
    assert (s.promoted, s.next_due) == (1, None)


async def test_a_due_retry_goes_to_the_head_of_the_queue_and_a_delayed_publish_to_the_tail(
    store_factory: StoreFactory,
) -> None:
    clock = FakeClock()
    store = await store_factory(_settings(100), clock)
    await store.ensure_group(T, "g")
    # Given a retry and a delayed publish, both due in 100 ms, and a backlog published meanwhile
    (r,) = await store.publish_many([PublishRequest(T, '"retry"')])
    (d,) = await store.claim(T, "g", 1, 30_000, "c1")
    await store.nack_many(T, "g", [(NackItem(d.id, d.receipt, "boom"), 1, "c1")])
    (late,) = await store.publish_many([PublishRequest(T, '"delayed"', delay_ms=100)])
    backlog = await store.publish_many([PublishRequest(T, f'"b{i}"') for i in range(3)])
    # When they are due and promoted
    clock.advance(100)
    (s,) = await store.sweep_due([(T, "g")])
    assert s.promoted == 2
    # Then the retry is claimed first (it waited its backoff, not the backlog), the delayed message last
    got = await store.claim(T, "g", 10, 30_000, "c1")
    assert [x.id for x in got] == [r.id, *(b.id for b in backlog), late.id]
    assert got[0].attempt == 2


# ---- real broker ----------------------------------------------------------------------------------------------

SLOW_SWEEP = {"BROKER_DELIVERY_SWEEP_INTERVAL_MS": "10000", "BROKER_AUTH_MODE": "open"}


@pytest.fixture(scope="module")
def redis_timers() -> Iterator[RedisServer]:
    with RedisServer() as r:
        yield r


async def _recv(ws: Any, op: str, timeout_s: float = 10.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        while True:
            frame = json.loads(await ws.recv())
            if frame.get("op") == op:
                return dict(frame)


async def test_a_50ms_retry_arrives_long_before_the_sweep_interval(redis_timers: RedisServer) -> None:
    with BrokerProcess(redis_timers.url, env=SLOW_SWEEP) as broker:
        async with websockets.connect(broker.url) as ws:
            await ws.send(json.dumps({"op": "subscribe", "ref": 1, "topic": "t50", "group": "g", "prefetch": 1}))
            await _recv(ws, "subscribed")
            await ws.send(json.dumps({"op": "publish", "ref": 2, "topic": "t50", "payload": 1, "backoff_base_ms": 50}))
            first = await _recv(ws, "message")
            await ws.send(json.dumps({"op": "nack", "ref": 3, "id": first["id"], "receipt": first["receipt"]}))
            nacked_at = time.monotonic()
            again = await _recv(ws, "message")
            took_ms = (time.monotonic() - nacked_at) * 1000
    print(f"retry with backoff_base_ms=50 (±20 % jitter) delivered again {took_ms:.1f} ms after the nack")
    assert again["id"] == first["id"] and again["attempt"] == 2
    # At most 60 ms of backoff; the sweep (every 10 s) cannot have moved it this soon: a timer did
    assert took_ms < 2_000


async def test_an_expired_lease_is_redelivered_long_before_the_sweep_interval(redis_timers: RedisServer) -> None:
    with BrokerProcess(redis_timers.url, env={**SLOW_SWEEP, "BROKER_RETRY_BACKOFF_BASE_MS": "10"}) as broker:
        async with websockets.connect(broker.url) as ws:
            sub = {"op": "subscribe", "ref": 1, "topic": "tl", "group": "g", "prefetch": 1, "lease_ms": 300}
            await ws.send(json.dumps(sub))
            await _recv(ws, "subscribed")
            await ws.send(json.dumps({"op": "publish", "ref": 2, "topic": "tl", "payload": 1}))
            first = await _recv(ws, "message")
            got_at = time.monotonic()
            again = await _recv(ws, "message")  # never acked: the lease runs out
            took_ms = (time.monotonic() - got_at) * 1000
    print(f"lease of 300 ms: redelivered {took_ms:.1f} ms after the first delivery")
    assert again["id"] == first["id"] and again["attempt"] == 2
    assert took_ms < 3_000


def _script_calls(redis: RedisServer) -> int:
    for line in redis.cli("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_evalsha:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


async def test_an_idle_consumer_costs_no_script_call() -> None:
    # A Redis of its own (nothing left due by other tests), the sweep at its default interval (500 ms): the group has
    # a timer and nothing due, so neither its delivery loop nor the sweep calls a script
    with RedisServer() as redis, BrokerProcess(redis.url, env={"BROKER_AUTH_MODE": "open"}) as broker:
        async with websockets.connect(broker.url) as ws:
            await ws.send(json.dumps({"op": "subscribe", "ref": 1, "topic": "tidle", "group": "g"}))
            await _recv(ws, "subscribed")
            await asyncio.sleep(1.5)  # the first claim, the listener's catch-up claim, the first sweep
            before = _script_calls(redis)
            await asyncio.sleep(2.0)
            calls = _script_calls(redis) - before
    print(f"script calls in 2 s with one idle consumer: {calls}")
    assert calls == 0


async def test_a_delayed_publish_through_another_node_is_delivered_at_its_due_time(redis_timers: RedisServer) -> None:
    # Given two nodes sweeping every 10 s: the consumer on B, the publisher on A (no consumer of the group there)
    with BrokerProcess(redis_timers.url, env=SLOW_SWEEP) as b, BrokerProcess(redis_timers.url, env=SLOW_SWEEP) as a:
        async with websockets.connect(b.url) as consumer, websockets.connect(a.url) as publisher:
            await consumer.send(json.dumps({"op": "subscribe", "ref": 1, "topic": "tx", "group": "g"}))
            await _recv(consumer, "subscribed")
            # Timed from before the send: the due time is set when the broker takes the publish, which on a loaded
            # machine can be long before the test reads `published`.
            sent_at = time.monotonic()
            await publisher.send(json.dumps({"op": "publish", "ref": 2, "topic": "tx", "payload": 1, "delay_ms": 300}))
            await _recv(publisher, "published")
            got = await _recv(consumer, "message", timeout_s=15)
            took_ms = (time.monotonic() - sent_at) * 1000
    print(f"delay_ms=300 published through node A, delivered by node B after {took_ms:.1f} ms")
    assert got["attempt"] == 1
    # B's timer was told by A's note (due:<A>) and moved it at its due time (never before it: 5 ms for millisecond
    # rounding and the event loop's clock resolution); neither sweep ran in between
    assert 295 <= took_ms < 3_000


async def test_a_message_that_failed_twice_queues_at_the_tail(store_factory: StoreFactory) -> None:
    # A message failing again is poison or its downstream is down: it must not take every turn at the head
    clock = FakeClock()
    store = await store_factory(_settings(100), clock)
    await store.ensure_group(T, "g")
    (m,) = await store.publish_many([PublishRequest(T, '"m"')])
    for attempt in (1, 2):
        (d,) = await store.claim(T, "g", 1, 30_000, "c1")
        assert (d.id, d.attempt) == (m.id, attempt)
        await store.nack_many(T, "g", [(NackItem(d.id, d.receipt, "down"), attempt, "c1")])
        if attempt == 1:
            clock.advance(100)
            await store.sweep_due([(T, "g")])  # its first retry: at the head, claimed again at once
    backlog = await store.publish_many([PublishRequest(T, f'"b{i}"') for i in range(2)])
    clock.advance(100)
    (s,) = await store.sweep_due([(T, "g")])
    assert s.promoted == 1
    got = await store.claim(T, "g", 10, 30_000, "c1")
    assert [x.id for x in got] == [*(b.id for b in backlog), m.id]


# ---- node: the timer's gap ------------------------------------------------------------------------------------


class _SweepLog:
    """A store whose every sweep step promotes one message and reports another one due at once (a retry set under
    load: due times a few milliseconds apart), recording the dispatch clock at each step."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.steps: list[int] = []

    async def sweep_due(self, pairs: list[tuple[str, str]]) -> list[Swept]:
        self.steps.append(self.clock())
        return [Swept(0, 0, 1, self.clock())]

    def is_strict(self, topic: str, group: str) -> bool:
        return False


class _Outlet:
    def send_delivery(self, consumer: Consumer, delivery: Any) -> None:
        pass

    def congested(self) -> bool:
        return False

    def holds(self, msg_id: str, receipt: str) -> bool:
        return False


async def test_a_groups_timer_fires_again_only_after_the_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a group whose sweep steps keep finding work due at once, on a dispatch with a stepped clock
    clock = FakeClock()
    store = _SweepLog(clock)
    dispatch = Dispatch(store, Settings(), clock=clock)  # type: ignore[arg-type]
    gd = dispatch.dispatchers[(T, "g")] = GroupDispatcher(dispatch, T, "g")
    gd.consumers.append(Consumer(_Outlet(), "c1", T, "g", prefetch=10, lease_ms=30_000))
    loop = asyncio.get_running_loop()
    delays: list[float] = []
    call_later = loop.call_later

    def record(delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        delays.append(delay)
        return call_later(delay, callback, *args)

    monkeypatch.setattr(loop, "call_later", record)
    try:
        # When its timer is armed for now, fires, and its step reports the next work due now as well
        gd.arm(clock())
        async with asyncio.timeout(10):
            while len(delays) < 2:
                await asyncio.sleep(0)  # (no call_later of its own)
        # Then the first fire comes at once, the next only TIMER_GAP_MS after the step began (the clock stood still)
        assert delays[:2] == [0.001, TIMER_GAP_MS / 1000] and store.steps == [clock()]
    finally:
        gd.stop_timer()
