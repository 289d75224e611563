"""Baseline: the same-frames relay, a bare ``websockets`` server speaking the broker's frames with no storage.

    python -m bench.relay --port 9000

It answers the frames the benchmark's client sends the way the broker does, and keeps nothing:

- ``subscribe`` -> ``subscribed``; the connection becomes a consumer of (topic, group) with ``prefetch`` credit;
- ``publish`` -> ``published`` (with the publish's ``ref``) at once, and the payload goes out as one ``message``
  frame (``id``, ``topic``, ``group``, ``payload``, ``attempt`` 1, ``receipt``) to one consumer of every group of
  the topic (round robin inside a group); with no credit left it waits in that group's queue, in memory;
- ``ack`` (single or ``items``) returns credit; answered ``acked`` only when it carries a ``ref``;
- ``ping`` -> ``pong``; anything else -> ``error`` ``bad_request`` (no nacks: there is nothing to redeliver from).

So a message costs the same four frames as through the broker (publish, published, message, ack), parsed and
encoded with orjson like the broker does, and the same client code drives both: the ratio isolates what the
broker's storage and bookkeeping add on top of the WebSocket and JSON work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal
import sys
from collections import deque
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

dumps, loads = orjson.dumps, orjson.loads


class Consumer:
    __slots__ = ("credit", "group", "topic", "ws")

    def __init__(self, ws: ServerConnection, topic: str, group: str, prefetch: int) -> None:
        self.ws = ws
        self.topic = topic
        self.group = group
        self.credit = prefetch


class Group:
    __slots__ = ("backlog", "consumers", "turn")

    def __init__(self) -> None:
        self.consumers: list[Consumer] = []
        self.backlog: deque[tuple[str, Any, int]] = deque()  # (id, payload, attempt) waiting for credit
        self.turn = 0


class Relay:
    def __init__(self) -> None:
        self.topics: dict[str, dict[str, Group]] = {}
        self.ids = itertools.count(1)
        self.forwarded = 0
        self.published = 0

    def group(self, topic: str, name: str) -> Group:
        groups = self.topics.setdefault(topic, {})
        g = groups.get(name)
        if g is None:
            g = groups[name] = Group()
        return g

    async def handler(self, ws: ServerConnection) -> None:
        mine: dict[tuple[str, str], Consumer] = {}  # (topic, group) -> this connection's consumer
        send = ws.send
        recv = ws.recv
        try:
            while True:
                d = loads(await recv(decode=False))  # bytes: no UTF-8 decode before orjson
                op = d.get("op")
                if op == "publish":
                    await self.publish(ws, d)
                elif op == "ack":
                    items = d.get("items") or (d,)
                    await self.settle(mine, len(items))
                    if d.get("ref") is not None:
                        await send(dumps({"op": "acked", "ref": d["ref"], "ids": [i.get("id") for i in items]}))
                elif op == "subscribe":
                    topic, group = d.get("topic"), d.get("group") or "default"
                    c = Consumer(ws, topic, group, int(d.get("prefetch") or 10))
                    mine[(topic, group)] = c
                    g = self.group(topic, group)
                    g.consumers.append(c)
                    reply = {"op": "subscribed", "ref": d.get("ref"), "topics": [topic], "group": group}
                    await send(dumps({**reply, "prefetch": c.credit, "lease_ms": 30_000}))
                    await self.drain(g)
                elif op == "ping":
                    await send(dumps({"op": "pong", "ref": d.get("ref")}))
                else:
                    await send(dumps({"op": "error", "code": "bad_request", "message": f"relay: no op {op!r}"}))
        except ConnectionClosed:
            pass
        finally:
            for c in mine.values():
                left = self.topics.get(c.topic, {}).get(c.group)
                if left is not None and c in left.consumers:
                    left.consumers.remove(c)

    async def publish(self, ws: ServerConnection, d: dict[str, Any]) -> None:
        topic = d.get("topic")
        msg_id = f"{next(self.ids):028x}"
        self.published += 1
        await ws.send(dumps({"op": "published", "ref": d.get("ref"), "id": msg_id}))
        groups = self.topics.get(topic)  # type: ignore[arg-type]
        if not groups:
            return  # nobody subscribed: dropped (the relay keeps nothing)
        payload = d.get("payload")
        for g in groups.values():
            g.backlog.append((msg_id, payload, 1))
            await self.drain(g)

    async def drain(self, g: Group) -> None:
        """Send what the group holds to consumers with credit, round robin."""
        while g.backlog and g.consumers:
            n = len(g.consumers)
            for k in range(n):
                c = g.consumers[(g.turn + k) % n]
                if c.credit > 0:
                    g.turn = (g.turn + k + 1) % n
                    break
            else:
                return  # nobody has credit: the backlog waits for acks
            msg_id, payload, attempt = g.backlog.popleft()
            c.credit -= 1
            frame = {
                "op": "message",
                "id": msg_id,
                "topic": c.topic,
                "group": c.group,
                "payload": payload,
                "attempt": attempt,
                "receipt": f"r{attempt}",
            }
            try:
                await c.ws.send(dumps(frame))
                self.forwarded += 1
            except ConnectionClosed:
                g.backlog.appendleft((msg_id, payload, attempt))
                with contextlib.suppress(ValueError):
                    g.consumers.remove(c)

    async def settle(self, mine: dict[tuple[str, str], Consumer], n: int) -> None:
        """Acks name no group; like the broker, credit goes back to the subscription (the first one here)."""
        for c in mine.values():
            c.credit += n
            await self.drain(self.group(c.topic, c.group))
            return


async def run(host: str, port: int) -> None:
    relay = Relay()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(
        relay.handler, host, port, compression=None, ping_interval=None, max_size=4 * 1_048_576, close_timeout=2
    ):
        print(f"same-frames relay listening on ws://{host}:{port}", flush=True)
        await stop.wait()
    print(f"relay stopped: published={relay.published} forwarded={relay.forwarded}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1", help="loopback address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("relay: only loopback addresses are allowed", file=sys.stderr)
        return 2
    asyncio.run(run(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
