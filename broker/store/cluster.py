"""Redis Cluster (``redis.cluster = true``): the client, and the few places where the store must know it runs on one.

The client is redis-py's asyncio ``RedisCluster`` with the single client's policy: its own retries are off
(``Retry(NoBackoff(), 0)``), so an unreachable master reaches the breaker at once instead of after silent tries.
``MOVED`` and ``ASK`` are not retries of a failed call but redirections the client follows (bounded by its request
TTL), so a slot that moved (resharding, a failover) costs one more hop, not an error; script pipelines follow
``MOVED`` themselves and wait out ``ASK`` (``eval_pass``, ``MIGRATING_GUARD``, ``migration.py``).

It is handed around typed as the single client (``redis.asyncio.Redis``): the store calls only commands both clients
share, and the cluster-only forms (a command on one node, a node's slot) are in this module. The store's tests run on
a real 3-master cluster too (``tests/test_cluster.py``), which is what keeps that true.

Routing: every key of one topic carries the hash tag ``{<topic>}`` (``keys.py``), so a topic lives in one slot, on
one master. A script call is routed by its first key, and every key it declares or builds is in that slot
(docs/keys.md, docs/scaling.md). Scripts are loaded on the master that answered ``NOSCRIPT`` (a promoted replica
starts with an empty script cache), not on every master: one unreachable master must not fail a call to another.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MovedError,
    RedisClusterException,
    RedisClusterUnreachableError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)

from broker.core.config import Settings
from broker.store.replication import Wait

# Errors of a cluster that is (for a moment) not serving a slot: outages for the breaker, like a lost connection.
# CLUSTERDOWN / MASTERDOWN (a failover in progress), a slot no node covers, no node reachable at all. Not TRYAGAIN:
# that is one slot on the move (resharding), which the masters serve (``is_migrating``; docs/scaling.md).
CLUSTER_OUTAGES: tuple[type[BaseException], ...] = (
    ClusterDownError,
    SlotNotCoveredError,
    RedisClusterUnreachableError,
)
# Any other client-side cluster error (keys of one call in two slots, a command with no key to route by) is a bug.
CLUSTER_BUGS = RedisClusterException


_PUBLISH = "redis.call('PUBLISH', "

# Prepended to every script on a cluster: a script whose slot is on the move refuses before its first command. While
# a slot migrates, a script on the source master fails at the first key it builds at run time that is not (or no
# longer) there (Redis: "non local key"), and on the target at the first multi-key command with a key not yet there,
# both after the script's earlier writes, which stay: half a publish, ids popped from a ready list and never leased.
# The probe touches two keys of the slot that never exist: a normal slot answers 0; the migrating source redirects
# (ASK) and the importing target refuses (TRYAGAIN: several keys, not all there), which ``redis.pcall`` hands back
# as an error instead of failing the script. The call then did nothing and says TRYAGAIN (``is_migrating``): sent
# again a little later (``migration.settle``) until the move ends (SETSLOT NODE: MOVED, the client follows). Every
# call of the store declares its topic's key first (KEYS[1]); a suffix keeps its hash tag, so its slot.
MIGRATING_GUARD = """\
do
  local moving = redis.pcall('EXISTS', KEYS[1] .. '|moving:0', KEYS[1] .. '|moving:1')
  if type(moving) == 'table' and moving.err then
    return redis.error_reply('TRYAGAIN the slot of ' .. KEYS[1] .. ' is moving (resharding); the call did not run')
  end
end
"""


def sharded(text: str) -> str:
    """A script's text for a cluster: ``MIGRATING_GUARD`` first, and its wake-up notes go out with ``SPUBLISH``
    (sharded Pub/Sub: only the shard that owns the topic's slot carries them; a plain ``PUBLISH`` is broadcast to
    every node of the cluster). Every ``PUBLISH`` of the scripts is written ``redis.call('PUBLISH', `` (a test holds
    them to it). A single Redis runs the scripts as written: the guard costs it nothing."""
    return MIGRATING_GUARD + text.replace(_PUBLISH, "redis.call('SPUBLISH', ")


def is_migrating(reply: object) -> bool:
    """A call that did not run because its slot is on the move: the guard's (or Redis's) ``TRYAGAIN``, an ``ASK`` not
    followed (a pass with ``WAIT``, ``eval_pass``), or redis-py giving up following a slot that kept answering ASK /
    TRYAGAIN (``TTL exhausted``)."""
    if isinstance(reply, AskError):  # ASK: the slot is migrating (MOVED, a subclass: it has moved, follow it)
        return not isinstance(reply, MovedError)
    return isinstance(reply, TryAgainError) or (isinstance(reply, ClusterError) and "TTL exhausted" in str(reply))


def connect_cluster(url: str, settings: Settings) -> aioredis.Redis:
    """A cluster client seeded by ``url`` (it discovers the other nodes), retries off like ``connect_redis``."""
    client = RedisCluster.from_url(
        url,
        decode_responses=True,
        socket_timeout=settings.redis.socket_timeout_ms / 1000,
        socket_connect_timeout=settings.redis.connect_timeout_ms / 1000,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        require_full_coverage=True,
    )
    return cast(aioredis.Redis, client)


def is_cluster(client: object) -> bool:
    return isinstance(client, RedisCluster)


def as_cluster(client: object) -> RedisCluster:
    assert isinstance(client, RedisCluster), "a cluster operation on a single Redis"
    return client


def masters(client: aioredis.Redis) -> list[ClusterNode]:
    """Every master the client knows (after ``initialize``; the store's first call initializes it)."""
    return list(as_cluster(client).get_primaries())


def node_of(client: aioredis.Redis, key: str) -> ClusterNode:
    """The master that holds ``key``'s slot (for a topic: any of its keys, e.g. ``TopicKeys.groups``)."""
    return _owner(as_cluster(client), key)


async def ready(client: aioredis.Redis) -> RedisCluster:
    """The cluster client, initialized: a new client learns the slot map on its first command, and the routing
    done here (which master holds a key) needs it before that."""
    rc = as_cluster(client)
    await rc.initialize()  # a no-op once done
    return rc


def _owner(rc: RedisCluster, key: str) -> ClusterNode:
    node = rc.get_node_from_key(key)
    if node is None:
        raise SlotNotCoveredError(f"no master serves the slot of {key!r}")
    return node


async def load_script_where(client: aioredis.Redis, text: str, keys: Sequence[str]) -> None:
    """``SCRIPT LOAD`` on the master of ``keys[0]``'s slot only (the one that answered NOSCRIPT)."""
    rc = await ready(client)
    await rc.execute_command("SCRIPT LOAD", text, target_nodes=_owner(rc, keys[0]))


async def scan_targets(client: aioredis.Redis, key: str | None = None) -> list[ClusterNode | None]:
    """Where a SCAN must go: the one server of a single Redis (``None``); on a cluster the master of ``key``'s slot
    (a topic's keys live there) or, without ``key``, every master."""
    if not is_cluster(client):
        return [None]
    rc = await ready(client)
    return [_owner(rc, key)] if key is not None else list(rc.get_primaries())


async def scan_page(
    client: aioredis.Redis, target: ClusterNode | None, cursor: int, match: str, count: int
) -> tuple[int, list[str]]:
    """One ``SCAN`` page on ``target`` (see ``scan_targets``): the next cursor (0: done) and the names."""
    if target is None:
        nxt, names = await client.scan(cursor, match=match, count=count)
        return int(nxt), [str(k) for k in names]
    rc = as_cluster(client)
    cursors, names = await rc.execute_command("SCAN", cursor, "MATCH", match, "COUNT", count, target_nodes=target)
    return int(cursors[target.name]), [str(k) for k in names]  # the cluster client keys cursors by node


async def scan_slot_of(client: aioredis.Redis, key: str, match: str, count: int = 1000) -> AsyncIterator[str]:
    """``SCAN MATCH`` over the one node that holds ``key``'s slot (a topic's keys), on a cluster; the whole server
    on a single Redis. Scanning every master for one topic would cost N times the work and fail when any master is
    unreachable, although the topic lives on one."""
    (target,) = await scan_targets(client, key)
    cursor = 0
    while True:
        cursor, names = await scan_page(client, target, cursor, match, count)
        for name in names:
            yield name
        if cursor == 0:
            return


async def on_each_master(client: aioredis.Redis, *command: Any) -> dict[str, Any]:
    """One command on every master, its answer per master (``host:port``). A master that cannot be reached raises:
    a caller asking every master wants every answer, not a partial one shown as whole."""
    rc = await ready(client)
    out: dict[str, Any] = {}
    for node in rc.get_primaries():
        out[node.name] = await rc.execute_command(*command, target_nodes=node)
    return out


async def eval_pass(
    client: aioredis.Redis, calls: Sequence[tuple[str, list[str], list[Any]]], wait: Wait | None
) -> tuple[list[Any], list[int | None]]:
    """One round of script calls (sha, keys, args) in a cluster pipeline: redis-py sends each master its calls in
    one write on one connection, the masters in parallel. Returns the replies in order (error replies as values)
    and, per call, its master's ``WAIT`` count (None without ``wait``, or when that ``WAIT`` vouches for nothing).

    Redirections are *not* followed by redis-py here. With ``wait``, a ``WAIT`` goes to each master the first
    ``wait.calls`` calls were sent to, after them on the same connection: a redirected call would run on another
    connection, which that ``WAIT`` does not cover (a false confirm), and the old master may even be a replica by now
    (``WAIT`` is an error there). Without, following an ``ASK`` cannot help a script (the importing master refuses
    it too, ``MIGRATING_GUARD``), and redis-py would send each such call alone, again and again for half a second
    (its TRYAGAIN loop), one after the other: a pass with many calls of a moving slot would outlast the breaker's
    call timeout. Such a call did not run: it comes back as its ``MovedError`` / ``AskError``; the
    slot map is patched for a MOVED and the caller sends it again at once (``scripts._eval_direct``), an ASK waits
    for the move to end (``migration.settle``)."""
    rc = await ready(client)
    owners = [_owner(rc, keys[0]) for _, keys, _ in calls]
    waited: dict[str, ClusterNode] = {}
    if wait is not None:
        waited = {n.name: n for n in owners[: wait.calls]}
    async with rc.pipeline(transaction=False) as p:
        for sha, keys, args in calls:
            p.evalsha(sha, len(keys), *keys, *args)
        for node in waited.values():
            p.execute_command(*wait.command, target_nodes=node)  # type: ignore[union-attr]
        res: list[Any] = list(await p.execute(raise_on_error=False, allow_redirections=False))
    replies, acks = res[: len(calls)], dict(zip(waited, res[len(calls) :], strict=True))
    for got in acks.values():
        # the master's connection failed after the writes: nothing is vouched for, and the writes' fate is unknown
        if isinstance(got, Exception) and (not isinstance(got, ResponseError) or isinstance(got, CLUSTER_OUTAGES)):
            raise got
    for r in replies:
        if isinstance(r, MovedError):
            await rc.nodes_manager.move_slot(r)  # the next pass goes to the slot's new master
    counts: list[int | None] = []
    for node in owners:
        got = acks.get(node.name)  # an error reply (e.g. a master demoted meanwhile) vouches for nothing
        counts.append(got if isinstance(got, int) else None)
    return replies, counts


async def config_of_each_master(client: aioredis.Redis, names: Sequence[str]) -> dict[str, dict[str, str]]:
    """``CONFIG GET`` of each setting in ``names`` on every master: {master: {setting: value}}."""
    out: dict[str, dict[str, str]] = {}
    for name in names:
        for master, cfg in (await on_each_master(client, "CONFIG", "GET", name)).items():
            out.setdefault(master, {}).update({str(k): str(v) for k, v in dict(cfg).items()})
    return out
