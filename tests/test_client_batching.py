"""The bundled client merges concurrent publishes into batch frames (``BrokerClient(auto_batch=True)``, the default),
and every caller still gets its own answer. Against a real broker on a real redis-server.

Given a client and 50 publishes started together (one event-loop turn)
When they are awaited
Then each has its own id, the broker read far fewer publish frames than messages, and a consumer gets all 50 in
publish order; one invalid message among them fails only its own caller.
"""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.client import BrokerClient
from broker.core.errors import PayloadTooLargeError
from tests.brokers import BrokerProcess


def publish_frames(broker: BrokerProcess) -> float:
    status, body = broker.get("/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == "broker_frames_in_total" and s.labels.get("op") == "publish":
                return s.value
    return 0.0


async def test_concurrent_publishes_leave_as_batches_and_keep_their_answers(broker: BrokerProcess) -> None:
    async with BrokerClient(broker.url) as client:
        sub = await client.subscribe("batched", "g", prefetch=100)
        before = publish_frames(broker)
        results = await asyncio.gather(*[client.publish("batched", {"n": i}) for i in range(50)])
        frames = publish_frames(broker) - before
        assert len({r.id for r in results}) == 50
        assert frames <= 2, frames  # 50 messages, one frame (two if a flush split them)
        got = [await sub.get(timeout=10) for _ in range(50)]
        assert [m.payload["n"] for m in got] == list(range(50))  # publish order kept
        assert [m.id for m in got] == [r.id for r in results]
        for m in got:
            await m.ack()


async def test_one_invalid_message_fails_only_its_own_caller(broker: BrokerProcess) -> None:
    async with BrokerClient(broker.url) as client:
        too_big = "x" * 300_000  # over server.max_payload_bytes (256 KiB)
        results = await asyncio.gather(
            *[client.publish("batched2", {"n": i}) for i in range(5)],
            client.publish("batched2", too_big),
            *[client.publish("batched2", {"n": i}) for i in range(5, 10)],
            return_exceptions=True,
        )
        assert isinstance(results[5], PayloadTooLargeError), results[5]
        ok = [r for i, r in enumerate(results) if i != 5]
        assert all(not isinstance(r, BaseException) for r in ok), ok
        assert len({r.id for r in ok}) == 10  # type: ignore[union-attr]


async def test_a_lone_publish_is_sent_at_once(broker: BrokerProcess) -> None:
    async with BrokerClient(broker.url) as client:
        before = publish_frames(broker)
        await asyncio.wait_for(client.publish("alone", 1), 5)
        assert publish_frames(broker) - before == 1


async def test_a_payload_json_cannot_encode_fails_at_once_and_alone(broker: BrokerProcess) -> None:
    """An object orjson cannot encode (or an integer beyond 64 bits) is the caller's error: a TypeError at once for
    that publish, the others of the same turn still stored (it used to leave every publish of the turn pending)."""
    async with BrokerClient(broker.url) as client:
        async with asyncio.timeout(20):  # a safety bound: the bug was a wait without end
            results = await asyncio.gather(
                client.publish("encode", 1),
                client.publish("encode", {"x": object()}),
                client.publish("encode", 2**70),
                client.publish("encode", 3),
                return_exceptions=True,
            )
            assert [isinstance(r, TypeError) for r in results] == [False, True, True, False], results
            assert len({r.id for r in (results[0], results[3])}) == 2  # type: ignore[union-attr]
            with pytest.raises(TypeError):
                await client.publish("encode", {"alone": object()})
            with pytest.raises(TypeError):
                await client.publish_batch([{"topic": "encode", "payload": object()}])
