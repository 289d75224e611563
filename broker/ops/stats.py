"""What ``broker stats`` shows, as data: depths, consumers and the oldest ready message per (topic, group), the live
nodes (readiness, breakers, unhealthy loops), the memory per topic, and per-second rates from two snapshots."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from broker.store import RedisStore
from broker.store.memory import topic_memory

RATED = ("published", "delivered", "acked", "nacked")  # totals since each node started, summed over live nodes

Row = dict[str, Any]
PairKey = tuple[str, str]  # (topic, group)


@dataclass(frozen=True)
class Stats:
    """One snapshot. ``groups``: a row per (topic, group) with ``topic``, ``group``, ``ready``, ``leased``,
    ``delayed``, ``dead``, ``consumers``, ``oldest_ready_age_s`` (None when nothing is ready), the counters of
    ``RATED`` and, when memory was read, ``topic_keys``, ``topic_memory_bytes``, ``topic_memory_estimated``.
    ``nodes``: a row per live node with ``node``, ``ready``, ``breakers``, ``reasons``, ``loops``,
    ``masters_down`` (cluster masters whose breaker is not closed: state and topics affected), ``heartbeat_age_s``.
    ``topics``: the memory per topic (empty unless asked for). ``broken``: topics whose group set could not be read;
    they are left out of ``groups`` (``broker diagnose`` says why)."""

    groups: list[Row]
    nodes: list[Row]
    topics: list[Row]
    broken: list[str] = field(default_factory=list)


async def collect(store: RedisStore, topic: str | None = None, *, memory: bool = False) -> Stats:
    """A snapshot of every topic, or of ``topic`` only; ``memory`` adds the memory per topic (a SCAN)."""
    broken: list[str] = []
    topics = [t for t in await store.topics() if not topic or t == topic]
    mem_rows: list[Row] = []
    if memory:
        mem_rows = [m.to_json() for m in await topic_memory(store, topics)]
    # one script call per topic, in one pipeline: a refresh's Redis round trips do not grow with the groups
    groups = await store.group_stats(topics, broken)
    nodes = await store.node_status()
    consumers, counts = _node_totals(nodes)
    now = time.time() * 1000
    rows = [
        {
            "topic": d.topic, "group": d.group, "ready": d.ready, "leased": d.leased, "delayed": d.delayed,
            "dead": d.dead, "consumers": consumers.get(f"{d.topic}/{d.group}", 0),
            "oldest_ready_age_s": round((now - o) / 1000, 1) if o else None,
            "published": counts.get(d.topic, {}).get("published", 0),
            **{w: counts.get(f"{d.topic}/{d.group}", {}).get(w, 0) for w in ("delivered", "acked", "nacked")},
        }
        for d, o in groups
    ]  # fmt: skip
    by_topic = {m["topic"]: m for m in mem_rows}
    for r in rows:  # the topic's memory on each of its rows (bodies and idempotency keys are shared by its groups)
        m = by_topic.get(r["topic"])
        if m is not None:
            r.update(topic_keys=m["keys"], topic_memory_bytes=m["memory_bytes"], topic_memory_estimated=m["estimated"])
    node_rows = _node_rows(nodes, now)
    return Stats(rows, node_rows, mem_rows, broken)


async def node_rows(store: RedisStore) -> list[Row]:
    """The rows of ``Stats.nodes`` alone: what ``broker stats`` still shows when a Redis Cluster master does not
    answer (the node registry may live on another master), e.g. which masters' breakers are open, per node."""
    return _node_rows(await store.node_status(), time.time() * 1000)


def _node_rows(nodes: list[dict[str, str]], now: float) -> list[Row]:
    return [
        {
            "node": n["node"], "ready": n.get("ready") == "1", "breakers": orjson.loads(n.get("breakers", "{}")),
            "reasons": orjson.loads(n.get("reasons", "[]")), "loops": orjson.loads(n.get("loops", "{}")),
            "masters_down": orjson.loads(n.get("masters_down", "{}")),
            "heartbeat_age_s": round((now - int(n.get("heartbeat", "0"))) / 1000, 1),
        }
        for n in nodes
    ]  # fmt: skip


def _node_totals(nodes: list[dict[str, str]]) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Consumers per "topic/group" and counters per "topic" or "topic/group", summed over the live nodes."""
    consumers: dict[str, int] = {}
    counts: dict[str, dict[str, int]] = {}
    for n in nodes:
        for pair, count in orjson.loads(n.get("consumers", "{}")).items():
            consumers[pair] = consumers.get(pair, 0) + int(count)
        for key, values in orjson.loads(n.get("counts", "{}")).items():
            for what, v in values.items():
                counts.setdefault(key, {})[what] = counts.get(key, {}).get(what, 0) + int(v)
    return consumers, counts


def by_pair(rows: list[Row]) -> dict[PairKey, Row]:
    """The rows of one snapshot by (topic, group), copied: the earlier snapshot that ``add_rates`` compares with."""
    return {(r["topic"], r["group"]): dict(r) for r in rows}


def add_rates(rows: list[Row], before: Mapping[PairKey, Row], dt_s: float) -> None:
    """Add ``<counter>_per_s`` for each counter of ``RATED`` to ``rows``, from an earlier snapshot taken ``dt_s``
    seconds before; None for a (topic, group) the earlier one did not have. A counter that went down (a node
    restarted) counts as no change."""
    for r in rows:
        prev = before.get((r["topic"], r["group"]))
        for w in RATED:
            r[f"{w}_per_s"] = round(max(0, r[w] - prev[w]) / dt_s, 1) if prev else None
