"""``broker publish`` and ``broker consume``: the Python client on the command line, one JSON line per message."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI

from broker.cli.common import UsageError, store
from broker.cli.exits import EXIT_FAILURE, EXIT_OK
from broker.client.client import BrokerClient, Message, Subscription
from broker.core.errors import UnavailableError
from broker.ops.queues import Queues, depth_of
from broker.store import RedisStore


@contextlib.asynccontextmanager
async def connected(args: argparse.Namespace, *, reconnect: bool) -> AsyncIterator[BrokerClient]:
    """A client on ``--url``; a broker that cannot be reached is one line naming the URL and what to check."""
    try:
        client = BrokerClient(args.url, args.token, reconnect=reconnect)
        await client.connect()
    except InvalidURI:
        raise UsageError(f"--url {args.url!r} is not a WebSocket URL (ws://HOST:PORT/ or wss://...)") from None
    except InvalidStatus as e:  # 401 is the client's UnauthorizedError; this is a full node (503/429) or not a broker
        raise UnavailableError(
            f"the broker at {args.url} refused the connection: HTTP {e.response.status_code} "
            f"{e.response.body.decode(errors='replace').strip()[:200] if e.response.body else ''}".rstrip()
        ) from None
    except InvalidHandshake as e:
        raise UnavailableError(f"the server at {args.url} did not answer as a broker ({e})") from None
    except (OSError, TimeoutError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise UnavailableError(
            f"cannot reach the broker at {args.url}: {why}; is `broker serve` running there? (--url, BROKERCTL_URL)"
        ) from None
    try:
        yield client
    finally:
        await client.close()


def _payloads(args: argparse.Namespace) -> list[Any]:
    """What to publish, checked whole before anything is sent: JSON (each line with --lines), or --text strings."""
    raw = sys.stdin.read() if args.data in (None, "-") else args.data
    lines = [line for line in raw.splitlines() if line.strip()] if args.lines else [raw]
    if args.text:
        return lines
    out = []
    for n, line in enumerate(lines, 1):
        try:
            out.append(orjson.loads(line))
        except orjson.JSONDecodeError as e:
            where = f"line {n}: " if args.lines else ""
            raise UsageError(
                f"{where}the payload is not JSON ({e}); quote a JSON string ('\"text\"') or pass --text to send "
                "it as a plain string; nothing published"
            ) from None
    return out


async def publish(args: argparse.Namespace) -> int:
    payloads = _payloads(args)
    async with connected(args, reconnect=False) as c:
        for payload in payloads:
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
    if args.no_ack:
        raise UsageError(
            "--no-ack is gone (each look counted as a delivery attempt): to look without consuming, use "
            f"`broker peek {args.topic} --group GROUP`"
        )
    if args.ephemeral:
        if args.group:
            raise UsageError("--ephemeral makes a group of its own: give --group or --ephemeral, not both")
        args.group = f"ephemeral-{os.urandom(4).hex()}"
        async with store(args) as s:  # found (and reachable) before anything is consumed: the group must go after
            await s.topics()
            print(f"consuming {args.topic} as group {args.group}, deleted when this command ends", file=sys.stderr)
            try:
                return await _consume(args)
            finally:
                await _drop_group(s, args)
    if not args.group:
        raise UsageError(
            f"give --group NAME (a group is durable: it keeps every later message of {args.topic!r} until consumed), "
            f"or --ephemeral for a group deleted at the end; `broker peek` looks without consuming"
        )
    return await _consume(args)


async def _drop_group(s: RedisStore, args: argparse.Namespace) -> None:
    """Delete the ephemeral group; a delivery its consumer still held when it closed is given back by the broker
    shortly after, so a second pass removes what came back (bounded: a few tries)."""
    try:
        q = Queues(s)
        for _ in range(10):
            await q.purge(args.topic, args.group, whole_group=True)
            await asyncio.sleep(0.2)
            if not any((await depth_of(s, args.topic, args.group)).values()):
                return
    except Exception as e:
        print(f"could not delete group {args.topic}/{args.group} ({e}): `broker group delete {args.topic} "
              f"{args.group} --yes` does it", file=sys.stderr)  # fmt: skip


async def _consume(args: argparse.Namespace) -> int:
    got = 0
    if args.count is not None and args.count <= 0:
        return EXIT_OK
    async with connected(args, reconnect=True) as c:
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
    if args.count is not None and got < args.count:
        idle = f": none came for {args.timeout:g} s (--timeout)" if args.timeout is not None else ""
        print(f"got {got} of {args.count} message(s) from {args.topic}/{args.group}{idle}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


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
