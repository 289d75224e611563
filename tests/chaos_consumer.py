"""A consumer process for chaos tests (``python -m tests.chaos_consumer URL TOPIC GROUP PREFETCH WORK_MS``): it
subscribes with the bundled client (reconnecting), works on each message for WORK_MS (several at a time) and writes
one line per event to stdout, flushed at once so a ``kill -9`` loses none: ``r <id> <mono> <receipt>
<lease deadline, epoch ms> <epoch ms>`` when a delivery arrives (before anything else is done with it), ``a <id>
<mono> <receipt> <epoch ms>`` when the broker confirmed its ack, ``f <id> <mono> <receipt> <epoch ms> <error class>``
when the ack failed (refused as stale, or Redis unavailable: the broker redelivers it). ``<mono>`` is
``time.monotonic()`` (one clock for every process of the machine), epoch ms the wall clock the brokers stamp claims
and leases with (a receipt starts with its claim's time). When the process dies, what it
may have held is its ``r`` without ``a`` or ``f``: the deliveries the broker counts as unacked for it (at most its
prefetch), plus acks the broker had taken but not yet confirmed (those it still applies)."""

from __future__ import annotations

import asyncio
import sys
import time

from broker.client.client import BrokerClient, Message
from broker.core.errors import UnavailableError


async def main(url: str, topic: str, group: str, prefetch: int, work_ms: int) -> None:
    out = sys.stdout
    working: set[asyncio.Task[None]] = set()

    async def handle(m: Message) -> None:
        await asyncio.sleep(work_ms / 1000)  # the work: up to ``prefetch`` messages at a time
        try:
            await m.ack(wait=True)
        except Exception as e:  # stale: its connection died, so it comes back
            out.write(f"f {m.id} {time.monotonic():.3f} {m.receipt} {time.time() * 1000:.0f} {type(e).__name__}\n")
        else:
            out.write(f"a {m.id} {time.monotonic():.3f} {m.receipt} {time.time() * 1000:.0f}\n")
        out.flush()

    async with BrokerClient(url, reconnect_deadline_s=600) as c:
        for _ in range(600):  # a consumer started during a Redis outage subscribes once Redis answers again
            try:
                sub = await c.subscribe(topic, group, prefetch=prefetch)
                break
            except UnavailableError:
                await asyncio.sleep(0.2)
        else:
            raise SystemExit("could not subscribe in 120 s")
        out.write("ready\n")
        out.flush()
        async for m in sub:
            out.write(f"r {m.id} {time.monotonic():.3f} {m.receipt} {m.lease_expires_at} {time.time() * 1000:.0f}\n")
            out.flush()
            t = asyncio.create_task(handle(m))
            working.add(t)
            t.add_done_callback(working.discard)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
