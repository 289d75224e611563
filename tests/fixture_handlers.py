"""In-process handlers used by tests: broker subprocesses load them through [[handlers]] target = "tests...".

They report through files named by environment variables, so the test process can see what ran inside the broker."""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from broker.node.handlers import HandlerMessage


def _record(msg: HandlerMessage) -> None:
    with Path(os.environ["HANDLER_LOG"]).open("ab") as f:
        f.write(orjson.dumps({"id": msg.id, "payload": msg.payload, "attempt": msg.attempt}) + b"\n")


async def record(msg: HandlerMessage) -> None:
    _record(msg)


async def always_fails(msg: HandlerMessage) -> None:
    raise ValueError(f"card declined for order {msg.payload}")


async def flaky(msg: HandlerMessage) -> None:
    """Fails while the outage file exists (a downstream service that is down), then works."""
    if Path(os.environ["HANDLER_OUTAGE"]).exists():
        raise ConnectionRefusedError("downstream service unavailable")
    _record(msg)
