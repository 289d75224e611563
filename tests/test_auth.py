"""Authentication, per-topic permissions and the origin check, on a real broker process and redis-server.

A refused connection is logged (with its reason, never the token) before anything else happens on it, and counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from broker.client.client import BrokerClient
from broker.core.errors import ForbiddenError
from broker.node.auth import token_hash

from .brokers import BrokerProcess
from .support import RedisServer

ADMIN, BILLING = "s3cret-admin-token", "billing-token-123"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerProcess, RedisServer]]:
    cfg: Path = tmp_path_factory.mktemp("auth") / "broker.toml"
    cfg.write_text(f"""
[server]
max_connections_per_token = 2

[auth]
mode = "tokens"
allowed_origins = ["https://app.example.com"]

[[tokens]]
name = "ops"
sha256 = "{token_hash(ADMIN)}"

[[tokens]]
name = "old"
sha256 = "{token_hash("expired-token")}"
expires = "2020-01-01T00:00:00"

[[tokens]]
name = "billing"
sha256 = "{token_hash(BILLING)}"
publish = ["orders.*"]
subscribe = ["orders.*", "invoices"]
""")
    with RedisServer() as redis, BrokerProcess(redis.url, config=cfg) as b:
        yield b, redis


async def refused(url: str, **kw: object) -> int:
    with pytest.raises(InvalidStatus) as e:
        async with websockets.connect(url, **kw):  # type: ignore[arg-type]
            pass
    return int(e.value.response.status_code)


async def test_missing_and_wrong_tokens_are_refused_and_logged(broker: tuple[BrokerProcess, RedisServer]) -> None:
    b, _ = broker
    # Given no token, a wrong token, a malformed header: the handshake is refused with 401
    assert await refused(b.url) == 401
    assert await refused(b.url, additional_headers={"Authorization": "Bearer nope"}) == 401
    assert await refused(b.url, additional_headers={"Authorization": "Basic abc"}) == 401
    assert await refused(b.url + "?token=nope") == 401
    assert await refused(b.url, additional_headers={"Authorization": "Bearer expired-token"}) == 401
    # Then each refusal is logged with its reason (and never the token) and counted
    await asyncio.sleep(0.2)
    log = b.log_text()
    assert '"reason":"missing token' in log and '"reason":"invalid token"' in log
    assert "token 'old' expired" in log
    assert "nope" not in log.replace('"reason":"invalid token"', "")
    _, metrics = b.get("/metrics")
    assert b'broker_connections_total{outcome="refused_auth"} 5.0' in metrics


async def test_header_and_query_tokens_are_accepted(broker: tuple[BrokerProcess, RedisServer]) -> None:
    b, _ = broker
    async with BrokerClient(b.url, ADMIN) as c:
        await c.ping()
    async with websockets.connect(b.url + f"?token={BILLING}") as ws:  # browsers cannot set headers
        await ws.send('{"op":"ping","ref":1}')
        assert orjson.loads(await asyncio.wait_for(ws.recv(), 5)) == {"op": "pong", "ref": 1}
    assert '"principal":"billing"' in b.log_text()


async def test_permissions_both_ways(broker: tuple[BrokerProcess, RedisServer]) -> None:
    b, redis = broker
    async with BrokerClient(b.url, BILLING) as c:
        # Allowed: publish orders.*, subscribe orders.* and invoices
        await c.subscribe("invoices")
        assert (await c.publish("orders.eu", 1, retry=False)).id
        # Forbidden both ways, and nothing is stored or created
        with pytest.raises(ForbiddenError):
            await c.publish("payroll", 1, retry=False)
        with pytest.raises(ForbiddenError):
            await c.subscribe("payroll")
        with pytest.raises(ForbiddenError):  # a batch with one forbidden topic is refused whole
            await c.publish_batch([{"topic": "orders.eu", "payload": 2}, {"topic": "hr", "payload": 3}], retry=False)
    assert redis.cli("KEYS", "mq:{payroll}:*") == "" and redis.cli("KEYS", "mq:{hr}:*") == ""
    assert redis.cli("LLEN", "mq:{orders.eu}:g:default:ready") == "1"


async def test_origin_check(broker: tuple[BrokerProcess, RedisServer]) -> None:
    b, _ = broker
    headers = {"Authorization": f"Bearer {ADMIN}"}
    assert await refused(b.url, additional_headers=headers, origin="https://evil.example") == 403  # type: ignore[arg-type]
    async with websockets.connect(b.url, additional_headers=headers, origin="https://app.example.com"):  # type: ignore[arg-type]
        pass
    assert "is not allowed" in b.log_text()


def test_tokens_file_adds_tokens(tmp_path: Path) -> None:
    from broker.core.config import ConfigError, load_settings

    f = tmp_path / "secret.toml"
    f.write_text(f'[[tokens]]\nname = "from-file"\nsha256 = "{token_hash("t")}"\n')
    s = load_settings(environ={"BROKER_AUTH_TOKENS_FILE": str(f)})
    assert [t.name for t in s.tokens] == ["from-file"]
    f.write_text("[server]\nport = 1\n")
    with pytest.raises(ConfigError, match="only \\[\\[tokens\\]\\]"):
        load_settings(environ={"BROKER_AUTH_TOKENS_FILE": str(f)})


async def test_connections_per_token_cap(broker: tuple[BrokerProcess, RedisServer]) -> None:
    b, _ = broker
    headers = {"Authorization": f"Bearer {BILLING}"}
    # Given two open connections for one token (its cap), When a third comes, Then it is refused with 429
    async with (
        websockets.connect(b.url, additional_headers=headers),
        websockets.connect(b.url, additional_headers=headers),
    ):
        assert await refused(b.url, additional_headers=headers) == 429
        async with BrokerClient(b.url, ADMIN) as other:  # another token is not affected
            await other.ping()
    # And once one closes, the token may connect again
    async with websockets.connect(b.url, additional_headers=headers):
        pass
    assert "max_connections_per_token (2)" in b.log_text()
