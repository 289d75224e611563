"""In-process handlers, on a real broker process and redis-server: success acks, failure walks the retry path to
the DLQ with the exception text."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from broker.client.client import BrokerClient

from .brokers import BrokerProcess
from .support import RedisServer

ENV = {
    "BROKER_DELIVERY_SWEEP_INTERVAL_MS": "50",
    "BROKER_DELIVERY_POLL_INTERVAL_MS": "50",
    "BROKER_RETRY_BACKOFF_BASE_MS": "20",
    "BROKER_RETRY_MAX_ATTEMPTS": "3",
    "BROKER_BREAKERS_HANDLER_FAIL_MAX": "100",
}


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as r:
        yield r


def handler_config(tmp_path: Path, target: str, topic: str) -> Path:
    cfg = tmp_path / "broker.toml"
    cfg.write_text(
        f'[auth]\nmode = "open"\n[[handlers]]\ntopic = "{topic}"\ngroup = "h"\ntarget = "{target}"\ntimeout_ms = 2000\n'
    )
    return cfg


async def test_handler_success_acks(redis: RedisServer, tmp_path: Path) -> None:
    log = tmp_path / "handled.jsonl"
    cfg = handler_config(tmp_path, "tests.fixture_handlers:record", "invoices")
    with BrokerProcess(redis.url, env={**ENV, "HANDLER_LOG": str(log)}, config=cfg) as broker:
        async with BrokerClient(broker.url) as c:
            ids = {(await c.publish("invoices", {"n": i})).id for i in range(20)}
        async with asyncio.timeout(10):
            while not log.exists() or len(log.read_text().splitlines()) < 20:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert redis.cli("ZCARD", "mq:{invoices}:g:h:leased") == "0"
    handled = [orjson.loads(line) for line in log.read_text().splitlines()]
    assert {h["id"] for h in handled} == ids and len(handled) == 20


async def test_failing_handler_reaches_dlq_with_exception_text(redis: RedisServer, tmp_path: Path) -> None:
    cfg = handler_config(tmp_path, "tests.fixture_handlers:always_fails", "cards")
    with BrokerProcess(redis.url, env=ENV, config=cfg) as broker:
        async with BrokerClient(broker.url) as c:
            msg_id = (await c.publish("cards", 42)).id
        key = f"mq:{{cards}}:g:h:dead:{msg_id}"
        async with asyncio.timeout(10):
            while redis.cli("EXISTS", key) != "1":
                await asyncio.sleep(0.05)
    errors = orjson.loads(redis.cli("HGET", key, "errors"))
    assert [e["attempt"] for e in errors] == [1, 2, 3]
    assert all(e["error"] == "ValueError: card declined for order 42" for e in errors)
    assert all(e["consumer"] == "handler:tests.fixture_handlers:always_fails" for e in errors)
    assert redis.cli("HGET", key, "reason") == "max_attempts"


async def test_bad_handler_target_fails_startup(redis: RedisServer, tmp_path: Path) -> None:
    cfg = handler_config(tmp_path, "tests.fixture_handlers:nope", "x")
    b = BrokerProcess(redis.url, env=ENV, config=cfg)
    with pytest.raises(RuntimeError, match="cannot be loaded"):
        b.start()
    b.close()
