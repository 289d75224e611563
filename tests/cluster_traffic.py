"""Consumers for the cluster guarantee tests (``mission_critical/test_cluster_nodes.py``,
``test_reshard_under_traffic.py``): competing consumers in each group, round robin over the broker nodes, every one
subscribed to every topic, counting deliveries per (group, message id) and the ids each payload's ``seq`` was
stored under (a retry that stored a copy shows there)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Sequence

from broker.client.client import BrokerClient, Message
from broker.core.errors import BrokerError

# Broker settings for traffic on a cluster in a test: short leases and timers (redelivery and sweeps within a test's
# time), Redis timeouts well below the breaker's so a killed master is noticed at once.
BROKER_ENV = {
    "BROKER_REDIS_CLUSTER": "true",
    "BROKER_DELIVERY_LEASE_MS": "3000",
    "BROKER_DELIVERY_SWEEP_INTERVAL_MS": "200",
    "BROKER_DELIVERY_POLL_INTERVAL_MS": "100",
    "BROKER_REDIS_SOCKET_TIMEOUT_MS": "2000",
    "BROKER_REDIS_CONNECT_TIMEOUT_MS": "500",
}


class Consumers:
    """``async with Consumers(urls, topics, groups, per_group) as c``: ``per_group`` consumers in each group, the
    n-th on ``urls[n % len(urls)]``. An ack that fails is counted (``ack_errors``): the message comes again after its
    lease and is acked then."""

    def __init__(self, urls: list[str], topics: Sequence[str], groups: Sequence[str], per_group: int) -> None:
        self.urls, self.topics, self.groups, self.per_group = urls, list(topics), list(groups), per_group
        self.got: dict[str, collections.Counter[str]] = {g: collections.Counter() for g in groups}
        self.ids_of_seq: dict[int, set[str]] = collections.defaultdict(set)
        self.ack_errors = 0
        self.stack = contextlib.AsyncExitStack()
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Consumers:
        n = 0
        for group in self.groups:
            for _ in range(self.per_group):
                url = self.urls[n % len(self.urls)]
                n += 1
                client = await self.stack.enter_async_context(BrokerClient(url, reconnect_deadline_s=120))
                sub = await client.subscribe(self.topics, group, prefetch=50)
                self.tasks.append(asyncio.create_task(self._consume(group, sub)))
        return self

    async def _consume(self, group: str, sub: object) -> None:
        async for m in sub:  # type: ignore[attr-defined]
            assert isinstance(m, Message)
            self.got[group][m.id] += 1
            self.ids_of_seq[int(m.payload["seq"])].add(m.id)
            try:
                await m.ack()
            except BrokerError:
                self.ack_errors += 1

    def have_all(self, ids: set[str]) -> bool:
        return all(ids <= set(c) for c in self.got.values())

    async def __aexit__(self, *exc: object) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.stack.aclose()
