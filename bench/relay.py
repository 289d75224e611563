"""Baseline: a bare ``websockets`` relay with no storage, no parsing and no confirmations.

    python -m bench.relay --port 9000

A client connecting to ``/sub`` becomes the consumer (the latest one wins; it first gets ``{"op":"ready"}``).
Every frame a client sends to ``/pub`` is forwarded as-is (undecoded bytes, same text/binary kind) to the consumer;
with no consumer connected it is dropped and counted. The publisher never gets a reply. This is the ceiling for
"one Python WebSocket hop" on this machine, with the same client code and settings the broker is driven with.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed


class Relay:
    def __init__(self) -> None:
        self.consumer: ServerConnection | None = None
        self.forwarded = 0
        self.dropped = 0

    async def handler(self, ws: ServerConnection) -> None:
        path = ws.request.path if ws.request is not None else ""
        if path == "/sub":
            await self._consumer(ws)
        elif path == "/pub":
            await self._publisher(ws)
        else:
            await ws.close(1008, "connect to /pub or /sub")

    async def _consumer(self, ws: ServerConnection) -> None:
        self.consumer = ws
        try:
            await ws.send('{"op":"ready"}')
            await ws.wait_closed()
        finally:
            if self.consumer is ws:
                self.consumer = None

    async def _publisher(self, ws: ServerConnection) -> None:
        recv = ws.recv
        with contextlib.suppress(ConnectionClosed):
            while True:
                frame = await recv(decode=False)  # bytes: no UTF-8 decode/encode round trip
                consumer = self.consumer
                if consumer is None:
                    self.dropped += 1
                    continue
                try:
                    await consumer.send(frame, text=True)  # awaits only when the consumer's buffer is full
                    self.forwarded += 1
                except ConnectionClosed:
                    self.dropped += 1


async def run(host: str, port: int) -> None:
    relay = Relay()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(
        relay.handler, host, port, compression=None, ping_interval=None, max_size=4 * 1_048_576, close_timeout=2
    ):
        print(f"relay listening on ws://{host}:{port} (/pub -> /sub)", flush=True)
        await stop.wait()
    print(f"relay stopped: forwarded={relay.forwarded} dropped={relay.dropped}", flush=True)


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
