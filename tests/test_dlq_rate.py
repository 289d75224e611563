"""`broker dlq reprocess --rate N` (``broker.ops.dlq.reprocess`` with a rate): an operator replaying a DLQ into a
service that just recovered must not flood it. The pacing is measured, not mocked: on a real redis-server.

Given 150 dead letters
When they are reprocessed at 50 per second
Then it takes 3 s within 10 % (never faster: the rate is a limit), and every letter is back in its queue.
"""

from __future__ import annotations

import time

import pytest

from broker.core.model import NackItem, PublishRequest
from broker.ops.dlq import Filter, reprocess, select
from broker.store.dead_letters import DeadLetters

from .conftest import StoreFactory

N = 150
RATE = 50.0


@pytest.fixture
def backend() -> str:
    return "real"


async def test_reprocess_keeps_to_its_rate(store_factory: StoreFactory) -> None:
    store = await store_factory()
    await store.ensure_group("orders", "g")
    await store.publish_many([PublishRequest("orders", f'{{"n":{i}}}') for i in range(N)])
    got = await store.claim("orders", "g", N, 30_000, "w")
    await store.nack_many("orders", "g", [(NackItem(d.id, d.receipt, "bad", dead=True), d.attempt, "w") for d in got])
    letters = await select(store, Filter(topic="orders"))
    assert len(letters) == N

    started = time.monotonic()
    moved, missing = await reprocess(store, letters, RATE)
    took = time.monotonic() - started

    assert (moved, missing) == (N, [])
    assert N / RATE <= took <= N / RATE * 1.1, took
    assert await DeadLetters(store).ids("orders", "g") == []
    assert len(await store.claim("orders", "g", N, 30_000, "w")) == N

