"""Helpers for the web console's tests: HTTP calls to ``/console/api`` with a token, and dead letters made by a
real consumer."""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from broker.client.client import BrokerClient, Subscription
from broker.node.auth import token_hash

from .brokers import BrokerProcess
from .support import RedisServer

ADMIN = "admin-token-for-console-tests"
APP = "app-token-without-admin"
ALLOWED = "https://ops.example.com"
FAST = {"BROKER_DELIVERY_SWEEP_INTERVAL_MS": "50", "BROKER_DELIVERY_POLL_INTERVAL_MS": "50"}


def console_config(path: Path) -> Path:
    """A broker config with an admin token ("ops": ``ADMIN``), a token without admin ("app": ``APP``) and one
    allowed browser origin besides the broker's own."""
    path.write_text(f"""
[auth]
mode = "tokens"
allowed_origins = ["{ALLOWED}"]

[[tokens]]
name = "ops"
sha256 = "{token_hash(ADMIN)}"
admin = true

[[tokens]]
name = "app"
sha256 = "{token_hash(APP)}"
""")
    return path


def call(
    broker: BrokerProcess,
    path: str,
    token: str | None = None,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    query: dict[str, str] | None = None,
    **params: str | int | float,
) -> tuple[int, Any]:
    """One console call; the body as JSON when it is JSON, else bytes. Parameters: ``params`` and ``query``."""
    qs = urllib.parse.urlencode({**(query or {}), **{k: str(v) for k, v in params.items()}})
    req = urllib.request.Request(f"{broker.http}/console/api/{path}{'?' + qs if qs else ''}", method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, ctype, body = int(r.status), r.headers.get("Content-Type", ""), bytes(r.read())
    except urllib.error.HTTPError as e:
        status, ctype, body = int(e.code), e.headers.get("Content-Type", ""), bytes(e.read())
    return status, orjson.loads(body) if ctype.startswith("application/json") else body


def wait_job(broker: BrokerProcess, token: str | None, job_id: str, timeout_s: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, job = call(broker, f"jobs/{job_id}", token)
        assert status == 200, job
        if job["state"] != "running":
            return dict(job)
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still running after {timeout_s}s")


async def reject(client: BrokerClient, sub: Subscription, topic: str, payload: Any, error: str) -> str:
    """Publish one message and nack it with dead=True (straight to the DLQ); returns its id."""
    pub = await client.publish(topic, payload)
    m = await sub.get(timeout=10)
    assert m.id == pub.id
    await m.nack(error, dead=True, wait=True)
    return pub.id


@contextmanager
def console_broker(folder: Path) -> Iterator[tuple[BrokerProcess, RedisServer]]:
    """A redis-server and a broker with ``console_config`` in ``folder`` (fast sweeps), for a test module."""
    cfg = console_config(folder / "broker.toml")
    with RedisServer() as redis, BrokerProcess(redis.url, env=FAST, config=cfg) as b:
        yield b, redis
