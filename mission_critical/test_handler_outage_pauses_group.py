"""Incident (seeds/001): when a downstream service failed, every message burned its retries and was abandoned as
FAILED; the "fix" needed a DLQ. A DLQ alone would have filled up with good messages during an outage.

Guarantee: an in-process handler runs behind a circuit breaker per group. When it trips, delivery for that group
pauses; the messages stay queued with their attempt count untouched; nothing reaches the DLQ; when the downstream
recovers, the breaker half-opens, closes, and the group drains by itself.

Given an in-process handler whose downstream is down, and 60 messages published to its group
When the handler fails past its breaker threshold and stays down for a while
Then the breaker opens, the group pauses, the DLQ stays empty, at most fail_max messages lost an attempt,
     and after the downstream comes back every message is handled.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from broker.client.client import BrokerClient
from tests.brokers import BrokerProcess
from tests.support import RedisServer

ENV = {
    "BROKER_DELIVERY_SWEEP_INTERVAL_MS": "50",
    "BROKER_DELIVERY_POLL_INTERVAL_MS": "50",
    "BROKER_RETRY_BACKOFF_BASE_MS": "20",
    "BROKER_RETRY_MAX_ATTEMPTS": "3",  # small on purpose: without the breaker, the outage would dead-letter all
    "BROKER_BREAKERS_HANDLER_FAIL_MAX": "3",
    "BROKER_BREAKERS_HANDLER_RESET_TIMEOUT_S": "1",
    "BROKER_BREAKERS_HANDLER_SUCCESS_THRESHOLD": "2",
}
N = 60


async def test_handler_outage_pauses_group_and_fills_no_dlq(redis: RedisServer, tmp_path: Path) -> None:
    outage, log = tmp_path / "outage", tmp_path / "handled.jsonl"
    outage.touch()  # downstream is down
    cfg = tmp_path / "broker.toml"
    cfg.write_text(
        '[auth]\nmode = "open"\n[[handlers]]\ntopic = "mail"\ngroup = "sender"\n'
        'target = "tests.fixture_handlers:flaky"\nconcurrency = 5\ntimeout_ms = 1000\n'
    )
    env = {**ENV, "HANDLER_OUTAGE": str(outage), "HANDLER_LOG": str(log)}
    with BrokerProcess(redis.url, env=env, config=cfg) as broker:
        async with BrokerClient(broker.url) as c:
            ids = {(await c.publish("mail", {"n": i})).id for i in range(N)}
        # When: the outage lasts several breaker cycles
        await asyncio.sleep(4.0)
        # Then: the breaker opened and the group paused, with nothing dead-lettered
        text = broker.log_text()
        assert '"breaker":"handler:mail/sender"' in text and '"new":"open"' in text
        assert '"delivery_paused"' in text
        assert redis.cli("ZCARD", "mq:{mail}:g:sender:dead") == "0"
        # and most messages were never even tried (attempt count untouched)
        waiting = int(redis.cli("LLEN", "mq:{mail}:g:sender:ready")) + int(
            redis.cli("ZCARD", "mq:{mail}:g:sender:delayed")
        )
        assert waiting >= N - 10, waiting
        # When: the downstream comes back
        outage.unlink()
        async with asyncio.timeout(30):
            while not log.exists() or len({orjson.loads(x)["id"] for x in log.read_text().splitlines()}) < N:
                await asyncio.sleep(0.1)
        # Then: everything was handled, nothing dead-lettered, and the breaker closed again
        assert {orjson.loads(x)["id"] for x in log.read_text().splitlines()} == ids
        assert redis.cli("ZCARD", "mq:{mail}:g:sender:dead") == "0"
        assert '"new":"closed"' in broker.log_text()
        _, metrics = broker.get("/metrics")
        assert b'broker_breaker_state{breaker="handler:mail/sender"} 0.0' in metrics
