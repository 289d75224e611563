"""Issue 7: a consumer that stops reading its socket must cost the broker its prefetch, not the whole stream.

Guarantee: credit (prefetch) bounds what the broker hands to a consumer, and the outbox high-water mark bounds what
it queues for one; a consumer that stalls holds at most `prefetch` leases, everything else stays in Redis, the
broker's memory stays flat while the stream goes on, and nothing is lost when the consumer reads again.

Given a broker and a consumer (group `slow`, prefetch 50, lease 300 s so no lease expires during the test) on a
      plain TCP socket with a 4 KiB receive buffer, driven by websockets' sans-I/O protocol: after its `subscribed`
      answer it stops reading entirely (the socket stays open)
When another connection publishes 100,000 messages with 256-byte payloads (publish_batch, 500 per frame, 4 frames
     in flight, every message confirmed), while the broker's RSS (/proc/<pid>/status VmRSS) is sampled every 50 ms
Then the broker's RSS never exceeds its baseline + RSS_BOUND_MB; Redis holds all 100,000 (ready + leased), exactly
     50 of them leased (the stuck consumer's prefetch); and when the stuck consumer reads again (acking what it holds
     and what follows) and a second consumer joins the group, all 100,000 are delivered and acked, each id once,
     leaving nothing in Redis.

RSS_BOUND_MB = 30. What the broker may legitimately hold at once is small: one connection's unconfirmed publishes
(here at most 4 frames x 500 in flight), one claim batch, and the stuck consumer's 50 deliveries; measured growth is
about 5 MB. A broker that buffered the stream for the stuck consumer instead would hold 100,000 `Delivery` objects
with their outbox and in-flight entries: 42 MB by tracemalloc for exactly that structure (more as RSS), before any
encoded frame bytes (another ~50 MB). 30 MB is 6x the measured growth (allocator and GC noise) and still fails a
broker that buffers the stream.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import orjson
import pytest
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from broker.client.client import BrokerClient, Subscription
from broker.core.errors import BrokerError, RateLimitedError
from tests.brokers import BrokerProcess
from tests.support import RedisServer

N = 100_000
BATCH = 500
IN_FLIGHT = 4  # publish_batch frames in flight
PAYLOAD = "x" * 254  # 256 bytes as JSON text
PREFETCH = 50
STUCK_LEASE_MS = 300_000
RSS_BOUND_MB = 30  # see the docstring
TOPIC, GROUP = "firehose", "slow"
KEY = f"mq:{{{TOPIC}}}:g:{GROUP}"
ENV = {"BROKER_DELIVERY_POLL_INTERVAL_MS": "50"}


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


class RawConsumer:
    """A WebSocket client on a plain non-blocking socket (websockets' sans-I/O protocol): it reads only when told.

    While nobody calls ``frames()`` nothing is read: the kernel's small receive buffer fills and the broker's
    writes back up, exactly as with a consumer process that hangs."""

    def __init__(self, url: str, rcvbuf: int = 4096) -> None:
        self.uri = parse_uri(url)
        self.proto = ClientProtocol(self.uri, max_size=None)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()

    async def open(self) -> None:
        await self.loop.sock_connect(self.sock, (self.uri.host, self.uri.port))
        self.proto.send_request(self.proto.connect())
        await self._flush()
        pending: list[dict[str, Any]] = []
        while self.proto.state is State.CONNECTING:
            pending += await self.frames()
        if self.proto.handshake_exc is not None:
            raise self.proto.handshake_exc
        assert not pending, pending

    async def _flush(self) -> None:
        data = b"".join(self.proto.data_to_send())
        if data:
            await self.loop.sock_sendall(self.sock, data)

    async def send(self, frame: dict[str, Any]) -> None:
        self.proto.send_text(orjson.dumps(frame))
        await self._flush()

    async def frames(self) -> list[dict[str, Any]]:
        """Read once from the socket: the text frames it completed (pongs and close replies are sent as well)."""
        chunk = await self.loop.sock_recv(self.sock, 256 * 1024)
        if chunk:
            self.proto.receive_data(chunk)
        else:
            self.proto.receive_eof()
        out = []
        for ev in self.proto.events_received():
            if isinstance(ev, Frame) and ev.opcode is Opcode.TEXT:
                out.append(orjson.loads(ev.data))
            elif isinstance(ev, Frame) and ev.opcode is Opcode.CLOSE:
                raise ConnectionError(f"broker closed the stuck consumer: {ev}")
            elif not isinstance(ev, Response | Frame):
                raise AssertionError(f"unexpected event {ev!r}")
        await self._flush()
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.mark.timeout(150)
async def test_stalled_consumer_costs_its_prefetch_not_the_stream(redis: RedisServer) -> None:
    t0 = time.monotonic()
    broker = BrokerProcess(redis.url, env=ENV).start()
    assert broker.proc is not None
    pid = broker.proc.pid
    try:
        async with asyncio.timeout(110):
            await _scenario(broker, redis, pid, t0)
        assert broker.proc.poll() is None
        log = broker.log_text()
        assert '"exception"' not in log and "Traceback" not in log, "broker log holds a traceback"
    finally:
        broker.close()
    print(f"total {time.monotonic() - t0:.1f}s")


async def _scenario(broker: BrokerProcess, redis: RedisServer, pid: int, t0: float) -> None:
    # Given a consumer that subscribes, reads its `subscribed` answer and then nothing more
    stuck = RawConsumer(broker.url)
    await stuck.open()
    await stuck.send(
        {"op": "subscribe", "ref": "sub", "topic": TOPIC, "group": GROUP, "prefetch": PREFETCH,
         "lease_ms": STUCK_LEASE_MS}
    )  # fmt: skip
    got: list[dict[str, Any]] = []
    while not any(f.get("ref") == "sub" for f in got):
        got += await stuck.frames()
    assert next(f for f in got if f.get("ref") == "sub")["op"] == "subscribed", got
    held_early = [f for f in got if f.get("op") == "message"]  # none yet: nothing was published
    await asyncio.sleep(0.5)
    baseline = rss_kb(pid)
    samples: list[int] = [baseline]
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            samples.append(rss_kb(pid))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    published: list[str] = []
    try:
        # When 100,000 messages are published on another connection, every one confirmed
        t_pub = time.monotonic()
        async with BrokerClient(broker.url) as pub:
            window = asyncio.Semaphore(IN_FLIGHT)

            async def batch(k: int) -> list[str]:
                msgs = [{"topic": TOPIC, "payload": PAYLOAD} for _ in range(BATCH)]
                async with window:
                    while True:
                        try:
                            results = await pub.publish_batch(msgs)
                            break
                        except RateLimitedError as e:  # server.publish_rate_per_s: wait as told, then again
                            await asyncio.sleep((e.retry_after_ms or 100) / 1000)
                errors = [r for r in results if isinstance(r, BrokerError)]
                assert not errors, f"batch {k}: {errors[:3]}"
                return [r.id for r in results if not isinstance(r, BrokerError)]

            for ids in await asyncio.gather(*(batch(k) for k in range(N // BATCH))):
                published += ids
            publish_s = time.monotonic() - t_pub
            # (and the stream keeps the stuck consumer stuck for a while longer: its RSS must stay flat)
            await asyncio.sleep(2.0)
            during = rss_kb(pid)
            ready = int(redis.cli("LLEN", f"{KEY}:ready"))
            leased = int(redis.cli("ZCARD", f"{KEY}:leased"))
            stuck_s = time.monotonic() - t_pub
    finally:
        stop.set()
        await sampler
    peak = max(samples)
    print(
        f"published {len(published)} in {publish_s:.1f}s ({len(published) / publish_s:.0f}/s); "
        f"RSS baseline={baseline / 1024:.1f} MB peak={peak / 1024:.1f} MB (+{(peak - baseline) / 1024:.1f}) "
        f"after={during / 1024:.1f} MB; samples={len(samples)}; ready={ready} leased={leased}; "
        f"stuck for {stuck_s:.1f}s"
    )
    # Then the broker's memory stayed within the bound, and Redis holds every message, 50 of them leased
    assert len(published) == N and len(set(published)) == N
    assert peak - baseline < RSS_BOUND_MB * 1024, f"RSS grew by {(peak - baseline) / 1024:.1f} MB"
    assert leased <= PREFETCH, f"the stuck consumer holds {leased} leases, prefetch is {PREFETCH}"
    assert leased == PREFETCH  # it was handed its prefetch, no more, no less
    assert ready + leased == N, f"ready={ready} leased={leased}: {N - ready - leased} missing"
    assert not held_early

    # When the stuck consumer reads again (acking everything it gets) and a second consumer joins the group
    delivered: dict[str, int] = {}
    split = {"stuck": 0, "second": 0}
    acked: set[str] = set()
    t_drain = time.monotonic()

    async def resume_stuck() -> None:
        n = 0
        while len(acked) < N:
            frames = await stuck.frames()
            msgs = [f for f in frames if f.get("op") == "message"]
            for f in frames:
                if f.get("op") == "error":
                    raise AssertionError(f"stuck consumer got {f}")
                if f.get("op") == "acked":
                    acked.update(f["ids"])
            if msgs:
                for m in msgs:
                    delivered[m["id"]] = delivered.get(m["id"], 0) + 1
                split["stuck"] += len(msgs)
                n += 1
                await stuck.send({"op": "ack", "ref": f"a{n}", "items": [{"id": m["id"], "receipt": m["receipt"]}
                                                                         for m in msgs]})  # fmt: skip

    async def second(sub: Subscription, client: BrokerClient) -> None:
        while len(acked) < N:
            msgs = [await sub.get()]
            while not sub.queue.empty() and len(msgs) < 500:
                msgs.append(sub.queue.get_nowait())
            for m in msgs:
                delivered[m.id] = delivered.get(m.id, 0) + 1
            split["second"] += len(msgs)
            reply = await client.request(
                {"op": "ack", "items": [{"id": m.id, "receipt": m.receipt} for m in msgs]}
            )  # ack with ref: answered with `acked` once Redis has them
            acked.update(reply["ids"])

    async with BrokerClient(broker.url) as other:
        sub = await other.subscribe(TOPIC, GROUP, prefetch=1000, batch=True)
        tasks = [asyncio.create_task(resume_stuck()), asyncio.create_task(second(sub, other))]
        try:
            async with asyncio.timeout(60):
                while len(acked) < N:
                    done = [t for t in tasks if t.done() and t.exception() is not None]
                    if done:
                        raise done[0].exception()  # type: ignore[misc]
                    await asyncio.sleep(0.05)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            stuck.close()
    drain_s = time.monotonic() - t_drain
    print(
        f"drained {len(acked)} in {drain_s:.1f}s; unique delivered={len(delivered)} {split}; "
        f"redelivered={sum(v - 1 for v in delivered.values())}; total {time.monotonic() - t0:.1f}s"
    )
    # Then all 100,000 were delivered and acked, each once, and Redis keeps nothing for them
    assert set(delivered) == set(published)
    assert acked == set(published)
    assert set(delivered.values()) == {1}
    assert redis.cli("LLEN", f"{KEY}:ready") == "0"
    assert redis.cli("ZCARD", f"{KEY}:leased") == "0"
    assert redis.cli("ZCARD", f"{KEY}:delayed") == "0"
