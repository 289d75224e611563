"""Incident (seeds/003): a service crashed between buffering a message and starting the timer that would process
it; the message sat orphaned until someone noticed. Seeds/000: a processor kept running while its state was lost.

Guarantee: a confirmed publish is never lost, whatever happens to the broker process. Deliveries held by a broker
that dies come back (lease expiry, or at once through the orphan sweep of a restarted node). A message comes again
only after a failure: the kill, if it was leased in Redis when the broker died, or its lease that ran out.

Given a broker on a real redis-server (AOF, fsync always), one publisher and one consumer
When 10,000 messages are published and consumed while the broker is killed with SIGKILL mid-stream and restarted
Then every message the publisher saw confirmed is received and acked; no message comes again after its ack was
     confirmed; and every repeat of a message has one cause: the kill, once per message, if it was leased in Redis
     when the broker died and its delivery before was claimed by the killed broker (the repeat by the new one), or
     its lease that ran out (the repeat received at or after the lease deadline the broker sent with the delivery
     before). A loaded machine can hold a consumer's acks past a 2 s lease, and the guarantee allows that repeat;
     the consumer logs each delivery's receipt (which names its claim's time), lease deadline, arrival and ack
     confirmation, so the attribution is exact, not a guess. What was leased at the kill is bounded by what a broker
     may hold: the consumer's prefetch (deliveries it has not acked yet) plus the acks the broker had taken out of
     that credit but not yet applied (its ack coalescer: one flush in flight and one batch waiting, each at most
     ACK_BATCH_MAX). Counts are printed.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from dataclasses import dataclass

from broker.client.client import BrokerClient, Message
from broker.core.errors import StaleReceiptError
from tests.brokers import BrokerProcess
from tests.support import RedisServer

N = 10_000
PREFETCH = 100
ACK_BATCH_MAX = 1_000  # the broker's ack coalescer batch limit (broker/node/dispatch.py)
LEASED = "mq:{ledger}:g:posting:leased"
ENV = {
    "BROKER_DELIVERY_LEASE_MS": "2000",
    "BROKER_DELIVERY_SWEEP_INTERVAL_MS": "200",
    "BROKER_DELIVERY_POLL_INTERVAL_MS": "100",
}


@dataclass
class Delivery:
    """One delivery as the consumer saw it. The receipt is ``<claim time>.<seq>-<claim count>`` (claim.lua): the
    broker took ``claimed_ms`` (epoch ms) just before the claim ran, ``deadline_ms`` is the lease deadline it sent
    (``claimed_ms`` + the lease), ``received_ms`` when the consumer got it, ``acked_ms`` when the broker confirmed
    its ack (None: never confirmed; ``ack_error`` says why when the broker or the connection refused it)."""

    receipt: str
    deadline_ms: int
    received_ms: float
    acked_ms: float | None = None
    ack_error: str | None = None

    @property
    def claimed_ms(self) -> int:
        return int(self.receipt.split(".", 1)[0])

    @property
    def claim_no(self) -> int:
        return int(self.receipt.rsplit("-", 1)[1])


def _dead_broker_gone(redis: RedisServer) -> bool:
    """No client but this check's own is connected: Redis has run every command the killed broker had sent it
    (it runs what it read before it sees the connection end), so the leased set no longer changes."""
    clients = [c for c in redis.cli("CLIENT", "LIST").splitlines() if c.strip()]
    return len(clients) <= 1


def _causes(
    deliveries: dict[str, list[Delivery]], leased_at_kill: set[str], killed_ms: float
) -> tuple[collections.Counter[str], list[str]]:
    """Give each repeat (delivery k+1 of a message after delivery k, in claim order) its cause, or report it.
    Claim times are the brokers' wall clock; ``killed_ms`` was taken once the killed process was gone and before
    the restart, so a claim stamped before it was made by the killed broker and one after it by the new one.
    - After a confirmed ack of delivery k nothing may come again (a broker bug).
    - k claimed by the killed broker, k+1 by the new one: the kill, if the message was leased in Redis when the
      broker died; if it was not, only because k's lease had run out before the kill (deadline at or before it),
      which put the message back in the queue: anything else was either leased at the kill or settled.
    - Both by the same broker: k's lease ran out, so k+1 arrived at or after k's lease deadline (a sweep expires a
      lease only once its deadline has passed, and the claim that delivered k+1 ran after that).
    Every repeat needs one of these; their number is not bounded otherwise, because the guarantee allows a repeat
    for every lease that runs out, and on a loaded machine a delivery can reach the consumer after its lease did.
    """
    causes: collections.Counter[str] = collections.Counter()
    bad = []
    for m, ds in deliveries.items():
        ds.sort(key=lambda d: (d.claimed_ms, d.claim_no))
        for k, nxt in itertools.pairwise(ds):
            if k.acked_ms is not None:
                bad.append(f"{m}: delivered again after its ack was confirmed: {k} -> {nxt}")
            elif k.claimed_ms < killed_ms <= nxt.claimed_ms:
                if m in leased_at_kill:
                    causes["the kill"] += 1
                elif k.deadline_ms <= killed_ms:
                    causes["lease ran out before the kill"] += 1
                else:
                    bad.append(f"{m}: neither leased at the kill nor expired before it: {k} -> {nxt}")
            elif nxt.received_ms >= k.deadline_ms:
                causes["lease ran out"] += 1
            else:
                bad.append(f"{m}: delivered again before its lease ran out: {k} -> {nxt}")
    return causes, bad


async def test_no_confirmed_message_lost_when_broker_is_killed(redis: RedisServer) -> None:
    broker = BrokerProcess(redis.url, env=ENV).start()
    confirmed: set[str] = set()
    deliveries: dict[str, list[Delivery]] = collections.defaultdict(list)
    acking: set[asyncio.Task[None]] = set()
    try:
        async with BrokerClient(broker.url, reconnect_deadline_s=60) as consumer_client:
            sub = await consumer_client.subscribe("ledger", "posting", prefetch=PREFETCH)

            async def ack(m: Message, d: Delivery) -> None:
                try:
                    await m.ack(wait=True)  # confirmed: from now on the message must never come again
                except StaleReceiptError:  # its lease ran out, or the kill cut its connection: it comes back
                    d.ack_error = "stale"
                except Exception as e:  # the kill cut the reply: not confirmed, so it may come back
                    d.ack_error = type(e).__name__
                else:
                    d.acked_ms = time.time() * 1000

            async def consume() -> None:
                async for m in sub:
                    d = Delivery(m.receipt, m.lease_expires_at, time.time() * 1000)
                    deliveries[m.id].append(d)
                    t = asyncio.create_task(ack(m, d))  # acks overlap, as the broker's coalescer expects
                    acking.add(t)
                    t.add_done_callback(acking.discard)

            consumer = asyncio.create_task(consume())
            async with BrokerClient(broker.url, reconnect_deadline_s=60) as pub:
                window = asyncio.Semaphore(500)

                async def publish(i: int) -> None:
                    async with window:
                        res = await pub.publish("ledger", {"seq": i})
                        confirmed.add(res.id)

                tasks = [asyncio.create_task(publish(i)) for i in range(N)]
                # When: the broker dies mid-stream
                async with asyncio.timeout(120):
                    while len(confirmed) < N // 3:
                        await asyncio.sleep(0.01)
                broker.kill()
                killed_ms = time.time() * 1000  # after the process is gone: every claim it made is stamped before
                async with asyncio.timeout(60):  # until Redis has run all the killed broker sent: nothing else writes
                    while not _dead_broker_gone(redis):
                        await asyncio.sleep(0.05)
                leased_at_kill = set(redis.cli("ZRANGE", LEASED, "0", "-1").split())
                broker.start()  # same port: clients reconnect, resubscribe, retry unconfirmed publishes
                async with asyncio.timeout(180):
                    await asyncio.gather(*tasks)
            # Then: everything confirmed arrives (an ack the broker applied may lose its reply to the kill: it is
            # not confirmed, and the message rightly does not come again)
            async with asyncio.timeout(120):
                while not confirmed <= set(deliveries):
                    await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # a repeat that would still come (there must be none) has time to show
            consumer.cancel()
            for t in list(acking):
                t.cancel()
    finally:
        print(f"--- broker log tail ---\n{broker.log_tail(15)}")
        broker.close()

    missing = confirmed - set(deliveries)
    repeats = sum(len(ds) - 1 for ds in deliveries.values())
    causes, bad = _causes(deliveries, leased_at_kill, killed_ms)
    ack_errors = collections.Counter(d.ack_error for ds in deliveries.values() for d in ds if d.ack_error)
    late = sorted(d.received_ms - d.claimed_ms for ds in deliveries.values() for d in ds)  # claim -> consumer
    print(
        f"confirmed={len(confirmed)} received={len(deliveries)} repeats={repeats} causes={dict(causes)} "
        f"ack_errors={dict(ack_errors)} leased_at_kill={len(leased_at_kill)} "
        f"lease_ms={ENV['BROKER_DELIVERY_LEASE_MS']} "
        f"claim_to_consumer_ms p50={late[len(late) // 2]:.0f} max={late[-1]:.0f}"
    )
    assert not missing
    assert len(confirmed) == N  # every publish was eventually confirmed (idempotent retries)
    assert len(deliveries) == N  # and no publish retry stored a second copy
    assert not bad, f"{len(bad)} repeats without a cause the guarantee allows: {bad[:10]}"
    # What a broker may hold leased: the consumer's credit, plus the acks taken out of it but not yet applied.
    assert len(leased_at_kill) <= PREFETCH + 2 * ACK_BATCH_MAX
