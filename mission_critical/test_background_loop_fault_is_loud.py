"""Incident (the "never stop silently" issue): a background loop that fails at every step looks like a healthy node.
The sweep is what expires leases, promotes due retries and recovers the leases of dead nodes; if it raises on every
pass, messages stop coming back, yet `/healthz` and `/readyz` stay green and nobody is told.

Guarantee: a background loop that keeps failing is loud, and one damaged key does not stop the work on everything
else. The sweep skips the unreadable topic and sweeps every other one at its normal pace; each failed pass is
counted, logged with its traceback (the first, then every 20th: it repeats every interval), and after
`loops.fail_threshold` failures in a row `/readyz` is 503 naming the loop and its error, and the node's status in
Redis (what `broker stats` shows) lists it. When the fault is gone the loop recovers by itself: `loop_recovered` is
logged and `/readyz` is 200 again.

Given a broker (sweep every 100 ms, fail threshold 3, backoff cap 1 s) on a real redis-server
When a damaged key appears in Redis: a topic in the `mq:topics` registry whose `groups` key is a string (not a set),
     so every sweep pass gets WRONGTYPE from Redis while listing the topics' groups
Then `loop_failed` (loop `sweep`, with a traceback naming WRONGTYPE) is logged at failures 1, 20, 40...,
     `loop_unhealthy` once; `broker_loop_errors_total{loop="sweep"}` counts every failure and
     `broker_loops_unhealthy{loop="sweep"}` is 1; `/readyz` is 503 with `loop sweep failing: … WRONGTYPE …`;
     the node's status hash names the loop; and delivery on other topics goes on meanwhile, lease expiry
     included (an unacked delivery comes back as attempt 2)
When the damaged key is removed
Then `loop_recovered` (loop `sweep`, was `failing`) is logged and `/readyz` returns to 200 with no reasons.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson

from broker.client.client import BrokerClient
from tests.brokers import BrokerProcess
from tests.support import RedisServer

ENV = {
    "BROKER_DELIVERY_SWEEP_INTERVAL_MS": "100",
    "BROKER_DELIVERY_POLL_INTERVAL_MS": "50",
    "BROKER_LOOPS_FAIL_THRESHOLD": "3",
    "BROKER_LOOPS_BACKOFF_CAP_S": "1",
}
POISONED = "poisoned"


def log_events(broker: BrokerProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in map(orjson.loads, broker.log_text().splitlines()) if e.get("event") == name]


def readyz(broker: BrokerProcess) -> tuple[int, dict[str, Any]]:
    status, body = broker.get("/readyz")
    return status, (orjson.loads(body) if body else {})


def metric(broker: BrokerProcess, name: str, labels: str) -> float:
    status, body = broker.get("/metrics")
    assert status == 200
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", body.decode(), re.M)
    return float(m.group(1)) if m else 0.0


async def test_a_failing_sweep_is_loud_and_recovers(redis: RedisServer) -> None:
    with BrokerProcess(redis.url, env=ENV) as broker:
        node = readyz(broker)[1]["node"]
        assert readyz(broker)[0] == 200

        # When: a damaged registry entry appears (a string where the topic's groups set belongs)
        redis.cli("SET", f"mq:{{{POISONED}}}:groups", "not a set")
        redis.cli("SADD", "mq:topics", POISONED)

        # Then: the failures are logged with their traceback, again and again (the loop keeps going), bounded
        async with asyncio.timeout(30):
            while len([e for e in log_events(broker, "loop_failed") if e["loop"] == "sweep"]) < 3:
                await asyncio.sleep(0.05)
        sweep_failed = [e for e in log_events(broker, "loop_failed") if e["loop"] == "sweep"]
        assert [e["failures"] for e in sweep_failed][:3] == [1, 20, 40], broker.log_tail()
        assert all(e["level"] == "error" and "WRONGTYPE" in e["exception"] for e in sweep_failed)
        assert "Traceback" in sweep_failed[0]["exception"] and "sweep_once" in sweep_failed[0]["exception"]
        (unhealthy,) = [e for e in log_events(broker, "loop_unhealthy") if e["loop"] == "sweep"]
        assert unhealthy["failures"] == 3 and "WRONGTYPE" in unhealthy["error"]
        assert log_events(broker, "redis_error_reply"), "the store reports the error reply too"

        # And: /readyz is 503 and names the loop and the error
        async with asyncio.timeout(30):
            while readyz(broker)[0] != 503:
                await asyncio.sleep(0.05)
        status, body = readyz(broker)
        sweep_reasons = [r for r in body["reasons"] if r.startswith("loop sweep failing:")]
        assert status == 503 and body["ready"] is False and len(sweep_reasons) == 1, body
        assert "WRONGTYPE" in sweep_reasons[0] and "consecutive failures" in sweep_reasons[0]

        # And: the metrics count it
        assert metric(broker, "broker_loop_errors_total", 'loop="sweep"') >= 40
        assert metric(broker, "broker_loops_unhealthy", 'loop="sweep"') == 1

        # And: the node's status record (read by `broker stats --nodes`) names the unhealthy loop
        async with asyncio.timeout(30):
            while "sweep" not in orjson.loads(redis.cli("HGET", f"mq:node:{node}", "loops") or "{}"):
                await asyncio.sleep(0.1)
        assert redis.cli("HGET", f"mq:node:{node}", "ready") == "0"

        # And: the node still delivers on other topics while its sweep fails, and still sweeps them: a delivery
        # whose 300 ms lease runs out unacked comes back as attempt 2
        async with BrokerClient(broker.url) as c:
            sub = await c.subscribe("orders", "billing", lease_ms=300)
            published = await c.publish("orders", {"n": 1})
            m = await sub.get(timeout=10)
            assert (m.id, m.attempt) == (published.id, 1)
            again = await sub.get(timeout=20)
            assert (again.id, again.attempt) == (published.id, 2)
            await again.ack(wait=True)
        assert readyz(broker)[0] == 503  # still failing on the damaged topic meanwhile

        # When: the damaged key is removed
        redis.cli("SREM", "mq:topics", POISONED)
        redis.cli("DEL", f"mq:{{{POISONED}}}:groups")

        # Then: the loop recovers by itself, says so, and the node is ready again
        async with asyncio.timeout(30):
            while readyz(broker)[0] != 200:
                await asyncio.sleep(0.05)
        assert readyz(broker)[1]["reasons"] == []
        recovered = [e for e in log_events(broker, "loop_recovered") if e["loop"] == "sweep"]
        assert recovered and recovered[-1]["was"] == "failing", broker.log_tail()
        assert recovered[-1]["after_failures"] >= 3
        assert metric(broker, "broker_loops_unhealthy", 'loop="sweep"') == 0
        failures_at_recovery = len([e for e in log_events(broker, "loop_failed") if e["loop"] == "sweep"])
        await asyncio.sleep(0.5)  # five sweep intervals: no new failure after the recovery
        assert len([e for e in log_events(broker, "loop_failed") if e["loop"] == "sweep"]) == failures_at_recovery
