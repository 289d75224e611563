"""The wake-up listener on a Redis Cluster: sharded Pub/Sub (``SSUBSCRIBE``), one channel per topic this node
consumes.

On a cluster the scripts send their notes with ``SPUBLISH`` (``cluster.sharded``), which only the shard owning the
topic's slot carries, and sharded Pub/Sub has no patterns: the listener subscribes to each topic it has delivery
loops for (``topics()``, read again every pass), through redis-py's ``ClusterPubSub``, which keeps one connection per
master it needs.

Following the cluster: notes sent while a channel was not subscribed are lost, so

- a topic newly subscribed is woken once (its loops claim: anything published before the subscription stood);
- when a subscribed channel's slot has a new owner in the client's slot map (a failover, a resharding: the store's
  own calls see ``MOVED`` or a lost connection and refresh the map), the listener drops its subscriptions,
  subscribes again on the new owners and calls ``on_subscribed`` (every loop claims once), as after a restart;
- a lost connection to every master raises ``UnavailableError`` (the supervisor restarts the listener); one master
  lost among several is redis-py's to ride out (it keeps polling the others), and the owner change above follows.

Meanwhile the sweep and the groups' timers run as always (the safety net for retries and leases).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import ClusterPubSub
from redis.exceptions import RedisError

from broker.core.errors import UnavailableError
from broker.store.cluster import node_of, ready
from broker.store.gateway import OUTAGES
from broker.store.keys import TopicKeys

log = structlog.get_logger("broker.store")
POLL_S = 0.25  # how long one read waits; also how soon a new topic is subscribed


async def listen_sharded(
    client: aioredis.Redis,
    prefix: str,
    node_id: str,
    topics: Callable[[], Collection[str]],
    on_topic: Callable[[str], None],
    beat: Callable[[], None],
    should_run: Callable[[], bool],
    on_subscribed: Callable[[], None] | None = None,
    on_due: Callable[[str], None] | None = None,
) -> None:
    """``Nodes.listen_wakes`` on a cluster (same callbacks, plus ``topics``: the topics to listen to)."""
    own_due = f"due:{node_id}"
    failures = 0  # lost connections in a row without a subscription standing in between

    def subscribed() -> None:
        nonlocal failures
        failures = 0
        if on_subscribed is not None:
            on_subscribed()

    rc = await ready(client)
    while should_run():
        pubsub = rc.pubsub()
        try:
            await _listen_once(pubsub, client, prefix, node_id, own_due, topics, on_topic, beat, should_run,
                               subscribed, on_due)  # fmt: skip
        except OUTAGES as e:
            # A master closes its subscribers' connections when it turns replica (failover): subscribe again at
            # once, on the slot map as it is now; twice in a row without success is an outage (the supervisor's)
            failures += 1
            if failures > 1:
                raise UnavailableError(f"redis unreachable (wake-up listener): {e}", retry_after_ms=1_000) from None
            log.warning("wake_listener_resubscribing", error=str(e))
            await asyncio.sleep(POLL_S)
        finally:
            with contextlib.suppress(RedisError, *OUTAGES):
                await pubsub.aclose()


async def _listen_once(
    pubsub: ClusterPubSub,
    client: aioredis.Redis,
    prefix: str,
    node_id: str,
    own_due: str,
    topics: Callable[[], Collection[str]],
    on_topic: Callable[[str], None],
    beat: Callable[[], None],
    should_run: Callable[[], bool],
    on_subscribed: Callable[[], None] | None,
    on_due: Callable[[str], None] | None,
) -> None:
    """One subscription: returns when a channel's owner changed (the caller subscribes again), or when stopped."""
    channels: dict[str, str] = {}  # channel -> topic
    owners: dict[str, str] = {}  # channel -> the master it was subscribed on

    async def follow(wanted: Collection[str]) -> list[str]:
        """Subscribe to the topics newly wanted, drop those no longer wanted; the new ones' topics."""
        want = {TopicKeys(prefix, t).wake: t for t in wanted}
        new = [c for c in want if c not in channels]
        gone = [c for c in channels if c not in want]
        if gone:
            await pubsub.sunsubscribe(*gone)
            for c in gone:
                channels.pop(c)
                owners.pop(c)
        if new:
            await pubsub.ssubscribe(*new)
            for c in new:
                channels[c] = want[c]
                owners[c] = node_of(client, c).name
        return [want[c] for c in new]

    await follow(topics())
    if on_subscribed is not None:
        on_subscribed()
    while should_run():
        beat()
        for topic in await follow(topics()):
            on_topic(topic)  # notes sent before this subscription stood were missed: claim once
        moved = [c for c, owner in owners.items() if node_of(client, c).name != owner]
        if moved:
            log.warning("wake_channels_moved", channels=len(moved), example=moved[0])
            return
        if not channels:
            await asyncio.sleep(POLL_S)
            continue
        msg = await pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=POLL_S)
        if msg is None or msg.get("type") != "smessage":
            continue
        data = msg.get("data")
        if data in (node_id, own_due):
            continue
        found = channels.get(str(msg["channel"]))
        if found is None:
            continue
        topic = found
        if isinstance(data, str) and data.startswith("due:"):
            if on_due is not None:
                on_due(topic)
            continue
        on_topic(topic)
