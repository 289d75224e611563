"""The coalescer (one Redis round trip for concurrent requests) and the connection's one-write-per-burst output."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from websockets.protocol import State
from websockets.server import ServerProtocol

from broker.node.server import BrokerConnection
from broker.runtime import metrics
from broker.runtime.batching import Coalescer


class Recorder:
    """A flush that answers each request with its double, or a ValueError for negative ones; it records batches."""

    def __init__(self, fail_whole: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.fail_whole = fail_whole
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, reqs: Sequence[int]) -> list[int | BaseException]:
        self.batches.append(list(reqs))
        await self.gate.wait()
        if self.fail_whole:
            raise ConnectionError("redis down")
        return [ValueError(f"bad {r}") if r < 0 else 2 * r for r in reqs]


async def test_requests_made_while_a_flush_runs_form_the_next_batch_in_order() -> None:
    # Given a coalescer whose first flush is held open
    flush = Recorder()
    co: Coalescer[int, int] = Coalescer(flush, max_batch=3)
    flush.gate.clear()
    first = co.submit(1)
    await asyncio.sleep(0)
    # When 4 more requests arrive meanwhile, and the flush is released
    rest = [co.submit(i) for i in (2, 3, 4, 5)]
    flush.gate.set()
    # Then each waiter gets its own answer, and batches keep submission order within max_batch
    assert await asyncio.gather(first, *rest) == [2, 4, 6, 8, 10]
    assert flush.batches == [[1], [2, 3, 4], [5]]


async def test_submit_many_has_one_waiter_with_each_result_or_error_in_place() -> None:
    # Given requests where one fails on its own (the flush answers an exception in its place)
    flush = Recorder()
    co: Coalescer[int, int] = Coalescer(flush, max_batch=2)
    single = co.submit(7)
    # When they are submitted as one group spanning several batches
    many = co.submit_many([1, -2, 3])
    # Then the group's waiter gets every result in order, the failure as a value; the single one is unaffected
    res = await many
    assert res[0] == 2 and res[2] == 6
    assert isinstance(res[1], ValueError) and str(res[1]) == "bad -2"
    assert await single == 14
    # And an empty group is answered at once
    assert await co.submit_many([]) == []


async def test_a_failed_flush_reaches_every_waiter_single_and_grouped() -> None:
    # Given a flush that fails as a whole (Redis unreachable)
    co: Coalescer[int, int] = Coalescer(Recorder(fail_whole=True), max_batch=10)
    single = co.submit(1)
    many = co.submit_many([2, 3])
    # Then nobody waits forever and nobody gets a result: the single waiter raises, the group holds the error
    with pytest.raises(ConnectionError):
        await single
    assert [type(r) for r in await many] == [ConnectionError, ConnectionError]


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.eof = 0

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof += 1


def open_connection() -> tuple[BrokerConnection, FakeTransport]:
    protocol = ServerProtocol()
    protocol.state = State.OPEN  # past the handshake: frames may be sent
    conn = BrokerConnection(protocol, server=None)  # type: ignore[arg-type]
    transport = FakeTransport()
    conn.transport = transport  # type: ignore[assignment]
    return conn, transport


async def test_a_burst_of_frames_leaves_in_one_socket_write() -> None:
    # Given three frames queued on the connection (as the session's writer does within one send_context)
    conn, transport = open_connection()
    for text in ("a", "bb", "ccc"):
        conn.protocol.send_text(text.encode())
    # When the connection sends its data
    conn.send_data()
    # Then one write carries all three frames, byte for byte what websockets serialized, in order
    (data,) = transport.writes
    assert data == b"\x81\x01a" + b"\x81\x02bb" + b"\x81\x03ccc"
    # And nothing is left to send
    conn.send_data()
    assert len(transport.writes) == 1


async def test_end_of_stream_after_frames_still_half_closes_after_writing_them() -> None:
    # Given a close frame queued and the protocol's end-of-stream marker behind it (what closing produces)
    conn, transport = open_connection()
    conn.protocol.send_text(b"last")
    conn.protocol.send_close(1000, "bye")
    conn.protocol.send_eof()
    # When sent, Then the frames go first, in one write, and the half-close follows
    conn.send_data()
    assert len(transport.writes) == 1 and transport.writes[0].startswith(b"\x81\x04last\x88")
    assert transport.eof == 1


async def test_a_flush_cancelled_at_shutdown_answers_everything_still_waiting() -> None:
    # Given a flush in flight and more requests queued behind it, single and grouped
    flush = Recorder()
    flush.gate.clear()
    co: Coalescer[int, int] = Coalescer(flush, max_batch=1)
    first = co.submit(1)
    await asyncio.sleep(0)
    queued = co.submit(2)
    many = co.submit_many([3, 4])
    # When the coalescer's task is cancelled (shutdown) mid-flush
    assert co._task is not None
    co._task.cancel()
    await asyncio.sleep(0.01)
    # Then no waiter is left hanging: each holds the cancellation, the group holds it in place of every result
    for fut in (first, queued):
        assert fut.done() and isinstance(fut.exception(), asyncio.CancelledError)
    assert many.done() and all(isinstance(r, asyncio.CancelledError) for r in many.result())
    assert len(co) == 0


async def test_one_flusher_task_serves_flush_after_flush_and_drain_ends_it() -> None:
    # Given a coalescer that has flushed one request (the low-rate case: every request travels alone)
    flush = Recorder()
    co: Coalescer[int, int] = Coalescer(flush, max_batch=10)
    assert await co.submit(1) == 2
    flusher = co._task
    tasks = len(asyncio.all_tasks())
    # When more requests come one at a time, single and grouped
    for i in range(2, 6):
        assert await co.submit(i) == 2 * i
        got = await co.submit_many([i, -i])
        assert got[0] == 2 * i and isinstance(got[1], ValueError)
    # Then the same flusher task served them all, each request in a flush of its own (no added wait, no new task)
    assert co._task is flusher and flusher is not None and not flusher.done()
    assert len(asyncio.all_tasks()) == tasks
    assert flush.batches[:3] == [[1], [2], [2, -2]]
    # When the coalescer is drained (shutdown), Then the parked flusher ends
    assert await co.drain(1.0)
    await asyncio.sleep(0)
    assert flusher.done() and not flusher.cancelled() and co._task is None
    # And a request after the drain is still flushed and answered (a new flusher, which ends when idle)
    assert await co.submit(7) == 14
    await asyncio.sleep(0)
    assert co._task is None


async def test_a_request_submitted_while_drain_wakes_the_flusher_is_not_stranded() -> None:
    # Given a parked flusher
    flush = Recorder()
    co: Coalescer[int, int] = Coalescer(flush, max_batch=10)
    assert await co.submit(1) == 2
    # When drain ends it and, in the same loop turn, a request comes
    assert await co.drain(1.0)
    late = co.submit(8)
    # Then the request is flushed and answered all the same
    assert await asyncio.wait_for(late, 1.0) == 16


async def test_submit_call_answers_through_the_function_and_a_failing_one_spoils_nothing() -> None:
    # Given requests answered through functions (one of which raises: a bug in the caller), and one through a future
    flush = Recorder()
    co: Coalescer[int, int] = Coalescer(flush, max_batch=10)
    got: list[tuple[str, int | BaseException]] = []

    def boom(arg: str, res: int | BaseException) -> None:
        raise RuntimeError("bug")

    errors_before = metrics.task_errors._value.get()
    co.submit_call(1, lambda arg, res: got.append((arg, res)), "a")
    co.submit_call(2, boom, "b")
    co.submit_call(-3, lambda arg, res: got.append((arg, res)), "c")
    fut = co.submit(4)
    # When they are flushed together, Then each function is called once with its result or its error in place,
    # the raising one is counted as a task error, and the others (and the future) are answered all the same
    assert await fut == 8
    assert got[0] == ("a", 2) and got[1][0] == "c" and isinstance(got[1][1], ValueError) and len(got) == 2
    assert flush.batches == [[1, 2, -3, 4]]
    assert metrics.task_errors._value.get() == errors_before + 1
    # And at shutdown a request still waiting is answered through its function too (fail_all)
    flush.gate.clear()
    co.submit_call(5, lambda arg, res: got.append((arg, res)), "d")
    await asyncio.sleep(0)
    assert co.fail_all(ConnectionError("cut")) == 1
    assert got[2][0] == "d" and isinstance(got[2][1], ConnectionError)
    flush.gate.set()
    await asyncio.sleep(0.01)
    assert len(got) == 3  # the late result of the cut flush is not delivered a second time


async def test_submit_many_call_answers_a_group_once_through_the_function() -> None:
    # Given a group of requests answered through a function (the session's ack frame), spanning two batches
    flush = Recorder()
    co: Coalescer[int, int] = Coalescer(flush, max_batch=2)
    got: list[tuple[str, list[int | BaseException]]] = []
    co.submit_call(9, lambda arg, res: None, "x")
    co.submit_many_call([1, -2, 3], lambda arg, res: got.append((arg, res)), "frame")
    # When they are flushed, Then the function is called once, with every result in order, the failure in place
    assert await co.submit(5) == 10
    ((arg, res),) = got
    assert arg == "frame" and res[0] == 2 and res[2] == 6
    assert isinstance(res[1], ValueError)
    assert flush.batches == [[9, 1], [-2, 3], [5]]


async def test_submit_many_call_hears_a_failed_flush_and_a_shutdown() -> None:
    # Given a flush that fails as a whole, Then the group's function gets the error in place of every result
    co: Coalescer[int, int] = Coalescer(Recorder(fail_whole=True), max_batch=10)
    got: list[list[int | BaseException]] = []
    co.submit_many_call([1, 2], lambda arg, res: got.append(res), None)
    with pytest.raises(ConnectionError):
        await co.submit(3)
    assert [[type(r) for r in res] for res in got] == [[ConnectionError, ConnectionError]]
    # Given a group still waiting when the coalescer is failed (shutdown), Then it is answered once, then never again
    held = Recorder()
    held.gate.clear()
    co2: Coalescer[int, int] = Coalescer(held, max_batch=10)
    got.clear()
    co2.submit_many_call([4, 5], lambda arg, res: got.append(list(res)), None)
    await asyncio.sleep(0)
    assert co2.fail_all(RuntimeError("stopping")) == 2
    held.gate.set()
    await asyncio.sleep(0.01)
    assert [[type(r) for r in res] for res in got] == [[RuntimeError, RuntimeError]]
