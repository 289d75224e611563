"""Incident (issue 17, as a new operator met it): Ctrl-C on `make run` reached the embedded redis-server too (same
process group), so the broker's orderly shutdown found no Redis: tracebacks, the breaker opened, the consumers'
in-flight messages could not be handed back and, after the restart, had burned attempts and reached the DLQ.
Seeds/001: failures that quietly consume a message's retries.

Guarantee: with no Redis URL configured, `broker serve` runs a managed redis-server with an append-only file in its
data folder; Ctrl-C is the same orderly shutdown as SIGTERM, the embedded Redis is stopped last, and deliveries a
consumer still held are handed back without counting an attempt (the broker left, the consumer did not fail). With
no redis-server binary at all the broker still serves, on in-process fakeredis, saying NOT DURABLE loudly.

Given `broker serve` in a fresh folder with no Redis URL, a consumer holding 5 unacked deliveries of 10
When the terminal sends SIGINT to the broker's process group, and the broker is started again in the same folder
Then it exits 0 after `shutdown_complete`, nothing was requeued with an attempt counted, and after the restart all 10
messages are delivered at attempt 1 from the AOF, with an empty DLQ.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import orjson

from broker.client import BrokerClient
from tests.brokers import BrokerProcess

TOPIC = "orders"
GROUP = "workers"


def events(broker: BrokerProcess) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in broker.log_text().splitlines() if line.startswith("{")]


async def test_ctrl_c_with_deliveries_in_flight_burns_no_attempt(tmp_path: Path) -> None:
    broker = BrokerProcess(None, cwd=tmp_path).start()
    try:
        started = next(e for e in events(broker) if e["event"] == "broker_started")
        assert started["embedded_redis"] and started["durable"] is True, started
        assert (tmp_path / ".data" / "redis" / "appendonlydir").is_dir()  # the AOF lives in the data folder
        async with BrokerClient(broker.url) as client:
            sub = await client.subscribe(TOPIC, GROUP, prefetch=5)
            ids = [(await client.publish(TOPIC, {"n": i})).id for i in range(10)]
            held = [await sub.get(timeout=10) for _ in range(5)]  # Given: 5 delivered, none acked
            assert {m.attempt for m in held} == {1}
            # When: Ctrl-C
            code = await asyncio.to_thread(broker.interrupt)
        assert code == 0, broker.log_tail()
        names = [e["event"] for e in events(broker)]
        assert names[-1] == "shutdown_complete" or "shutdown_complete" in names, names[-10:]
        assert "requeue_failed" not in names and "Traceback" not in broker.log_text()
        assert "embedded_redis_stopped" in names
        assert names.index("embedded_redis_stopped") > names.index("shutdown_started")

        # Then: after a restart in the same folder, every message comes at its first attempt
        broker.start()
        async with BrokerClient(broker.url) as client:
            sub = await client.subscribe(TOPIC, GROUP, prefetch=20)
            got = {}
            async with asyncio.timeout(20):
                while len(got) < 10:
                    m = await sub.get()
                    got[m.id] = m.attempt
                    await m.ack(wait=True)
        assert set(got) == set(ids)
        assert set(got.values()) == {1}, got  # no attempt burned by the shutdown
        async with BrokerClient(broker.url) as client:
            for msg_id in ids:
                assert await client.message_status(msg_id, TOPIC) == []  # acked by its group, nothing left
        assert broker.terminate() == 0
    finally:
        broker.close()


async def test_without_a_redis_server_binary_it_serves_on_fakeredis_and_says_not_durable(tmp_path: Path) -> None:
    # Given a PATH where no redis-server exists (only the Python that runs the broker)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python3")
    broker = BrokerProcess(None, cwd=tmp_path, env={"PATH": str(bin_dir)}).start()
    try:
        # Then it says so loudly, at critical level, and still works end to end
        fallback = [e for e in events(broker) if e["event"] == "redis_nondurable_fallback"]
        assert fallback and fallback[0]["level"] == "critical", fallback
        assert "NOT" in str(fallback[0]["message"]).upper() and "DURABLE" in str(fallback[0]["message"]).upper()
        started = next(e for e in events(broker) if e["event"] == "broker_started")
        assert started["durable"] is False and started["embedded_redis"] is None
        async with BrokerClient(broker.url) as client:
            sub = await client.subscribe(TOPIC, GROUP)
            published = await client.publish(TOPIC, "hello")
            m = await sub.get(timeout=10)
            assert (m.id, m.payload) == (published.id, "hello")
            await m.ack(wait=True)
        assert not (tmp_path / ".data" / "redis" / "appendonlydir").exists()
        assert broker.terminate() == 0
    finally:
        broker.close()
