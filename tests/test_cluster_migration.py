"""A slot in the middle of a move (``SETSLOT MIGRATING`` / ``IMPORTING``, what ``redis-cli --cluster reshard`` sets
while it ``MIGRATE``s the keys): the topic's scripts refuse before any write, the refusal is sent again outside the
breaker (``migration.settle``) and, if the slot is still moving, answered ``unavailable``; once the slot is stable
the same calls run. The traffic run is ``mission_critical/test_reshard_under_traffic.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.exceptions import ClusterError, MovedError, TryAgainError

from broker.core.errors import BrokerError, UnavailableError
from broker.core.model import PublishRequest, PublishResult
from broker.runtime import metrics
from broker.store import RedisStore, connect_redis, migration
from broker.store.cluster import is_migrating
from broker.store.migration import settle
from broker.store.replication import Wait

from .cluster import RedisCluster
from .support import make_store


@pytest.fixture
async def cstore(redis_cluster: RedisCluster) -> AsyncIterator[RedisStore]:
    settings = redis_cluster.settings().replace("redis", key_prefix=f"m{uuid.uuid4().hex[:10]}")
    store = make_store(connect_redis(redis_cluster.url, settings), settings)
    yield store
    await store.close()


@pytest.fixture
def quick_settle(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(migration, "SETTLE_S", 0.3)
    yield


class Migrating:
    """The slot of ``key`` marked as moving from its master to another (no key moved); stable again on exit."""

    def __init__(self, cluster: RedisCluster, key: str) -> None:
        self.cluster = cluster
        self.slot = cluster.cli(cluster.ports[0], "CLUSTER", "KEYSLOT", key)
        self.src = cluster.port_of_slot_owner(key)
        self.dst = next(p for p in cluster.masters() if p != self.src)

    def __enter__(self) -> Migrating:
        c = self.cluster
        c.cli(self.dst, "CLUSTER", "SETSLOT", self.slot, "IMPORTING", c.cli(self.src, "CLUSTER", "MYID"))
        c.cli(self.src, "CLUSTER", "SETSLOT", self.slot, "MIGRATING", c.cli(self.dst, "CLUSTER", "MYID"))
        return self

    def __exit__(self, *exc: object) -> None:
        for port in (self.src, self.dst):
            self.cluster.cli(port, "CLUSTER", "SETSLOT", self.slot, "STABLE")


def moving_count(op: str) -> float:
    return float(metrics.slot_moving.labels(op)._value.get())


async def test_a_claim_on_a_migrating_slot_pops_nothing_and_runs_once_the_slot_is_stable(
    cstore: RedisStore, redis_cluster: RedisCluster, quick_settle: None
) -> None:
    # Given a topic with 4 messages, one of them leased (so the group's declared keys all exist on its master, and
    # Redis runs the claim script there instead of redirecting it)
    topic = f"mig{uuid.uuid4().hex[:8]}"
    await cstore.ensure_group(topic, "g")
    await cstore.publish_many([PublishRequest(topic, f'"{i}"') for i in range(4)])
    assert len(await cstore.claim(topic, "g", 1, 30_000, "c1")) == 1
    ready = cstore.keys(topic).group("g").ready
    before = moving_count("claim")
    with Migrating(redis_cluster, ready) as m:
        # When the slot is being moved and a claim comes
        # Then it is refused as unavailable (to retry), after being sent again for a while, and pops nothing
        # (unguarded, it popped an id and then failed at the id's delivery key, "non local key": an id lost)
        with pytest.raises(UnavailableError, match="moving"):
            await cstore.claim(topic, "g", 1, 30_000, "c1")
        assert redis_cluster.cli(m.src, "LLEN", ready) == "3"
        assert moving_count("claim") > before
        # And a publish is refused the same way, storing nothing
        (res,) = await cstore.publish_many([PublishRequest(topic, '"x"', idempotency_key="k1")])
        assert isinstance(res, UnavailableError), res
        # And the Redis breaker does not count it: a moving slot is not an outage
        assert cstore.breaker.state == "closed"
    # Then once the slot is stable the same calls run (the publish is not a duplicate: the refused one stored nothing)
    (res,) = await cstore.publish_many([PublishRequest(topic, '"x"', idempotency_key="k1")])
    assert isinstance(res, PublishResult) and not res.duplicate
    got = await cstore.claim(topic, "g", 10, 30_000, "c1")
    assert [d.payload for d in got] == ['"1"', '"2"', '"3"', '"x"']


def test_what_counts_as_a_slot_on_the_move() -> None:
    assert is_migrating(TryAgainError("slot moving"))
    assert is_migrating(ClusterError("TTL exhausted."))
    assert not is_migrating(MovedError("3999 127.0.0.1:6381"))  # moved: followed, not waited out
    assert not is_migrating(ClusterError("something else"))
    assert not is_migrating(BrokerError("x"))


async def test_settle_sends_again_only_the_refused_calls_with_the_wait_for_their_publishes(
    quick_settle: None,
) -> None:
    # Given 3 calls (the first 2 publishes a WAIT vouches for); the 2nd and 3rd refused once, then run
    sent: list[tuple[list[str], Wait | None]] = []

    async def send(calls: object, wait: Wait | None) -> list[object]:
        names = list(calls)  # type: ignore[call-overload]
        sent.append((names, wait))
        return [f"ran {c}" for c in names]

    replies: list[object] = ["ran a", TryAgainError("moving"), ClusterError("TTL exhausted.")]
    out = await settle(replies, ["a", "b", "c"], Wait(1, 100, 2), send, "publish")
    # Then only those two went again, with a WAIT vouching for the one publish among them
    assert out == ["ran a", "ran b", "ran c"]
    assert sent == [(["b", "c"], Wait(1, 100, 1))]


async def test_settle_gives_up_after_its_time_and_leaves_the_refusal(quick_settle: None) -> None:
    async def send(calls: object, wait: Wait | None) -> list[object]:
        return [TryAgainError("still moving") for _ in calls]  # type: ignore[attr-defined]

    out = await settle([TryAgainError("moving")], ["a"], None, send, "claim")
    assert is_migrating(out[0])
