"""``broker publish`` and ``broker consume``: the Python client on the command line, one JSON line per message."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncGenerator

import orjson

from broker.cli.exits import EXIT_FAILURE, EXIT_OK
from broker.client.client import BrokerClient, Message, Subscription


async def publish(args: argparse.Namespace) -> int:
    raw = sys.stdin.read() if args.data in (None, "-") else args.data
    lines = raw.splitlines() if args.lines else [raw]
    async with BrokerClient(args.url, args.token, reconnect=False) as c:
        for line in lines:
            if not line.strip() and args.lines:
                continue
            try:
                payload = orjson.loads(line)
            except orjson.JSONDecodeError:
                payload = line  # not JSON: publish it as a string
            res = await c.publish(
                args.topic,
                payload,
                idempotency_key=args.idempotency_key,
                delay_ms=args.delay_ms,
                key=args.key,
                max_attempts=args.max_attempts,
                backoff_base_ms=args.backoff_base_ms,
            )
            print(orjson.dumps({"id": res.id, "duplicate": res.duplicate}).decode())
    return EXIT_OK


async def consume(args: argparse.Namespace) -> int:
    got = 0
    if args.count is not None and args.count <= 0:
        return EXIT_OK
    async with BrokerClient(args.url, args.token) as c:
        if args.pull:
            batches = _pulled(c, args)
        else:
            sub = await c.subscribe(args.topic, args.group, prefetch=args.prefetch)
            batches = _pushed(sub, args.timeout)
        async with contextlib.aclosing(batches):
            async for batch in batches:
                for m in batch:
                    out = {"id": m.id, "topic": m.topic, "group": m.group, "attempt": m.attempt, "payload": m.payload}
                    print(orjson.dumps(out).decode(), flush=True)
                    if not args.no_ack:
                        await m.ack(wait=True)
                    got += 1
                if args.count is not None and got >= args.count:
                    break
    return EXIT_OK if args.count is None or got >= args.count else EXIT_FAILURE


async def _pushed(sub: Subscription, idle_s: float | None) -> AsyncGenerator[list[Message], None]:
    while True:
        try:
            yield [await sub.get(timeout=idle_s)]
        except TimeoutError:
            return


async def _pulled(c: BrokerClient, args: argparse.Namespace) -> AsyncGenerator[list[Message], None]:
    """One pull at a time, for what is still wanted (at most --prefetch); --timeout ends it at the first empty one."""
    wait_ms = int(args.timeout * 1000) if args.timeout is not None else 30_000
    got = 0
    while True:
        want = args.prefetch or 10
        if args.count is not None:
            want = min(want, args.count - got)
        batch = await c.pull(args.topic, args.group, max=want, wait_ms=wait_ms)
        if not batch and args.timeout is not None:
            return
        got += len(batch)
        yield batch
