"""Prometheus metrics (prometheus-client), in the broker's own registry. Served at /metrics."""

from __future__ import annotations

import asyncio
import math
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

# No `<name>_created` series (one per counter and histogram label set, 62 on a fresh node): they carry only the time a
# series first appeared, which Prometheus does not need, and doubled what an operator scrolls through.
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)


class Tally:
    """A count bumped on a per-frame path: a plain int (``n += 1``, no lock, no label check), added to its
    prometheus counter whenever the registry is read (``/metrics`` or ``REGISTRY.collect()``), so every read sees
    every count made before it. Made with ``tally``."""

    __slots__ = ("n", "target")

    def __init__(self, target: Any) -> None:
        self.n = 0
        self.target = target


_tallies: list[Tally] = []


class _AddTallies:
    """Registered first, so it runs before the counters are read: moves what the tallies hold into them. It serves
    no series of its own."""

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        for t in _tallies:
            n = t.n
            if n:
                t.n = 0
                t.target.inc(n)
        return []


REGISTRY.register(_AddTallies())


class TallyHistogram:
    """A histogram observed on a per-message path: its bucket counts and sum are plain numbers (``observe`` is a
    bisect and two additions: no lock, no walk of the buckets, ~0.35 against prometheus' 1.2 us), served by its own
    collector with the same series as a prometheus ``Histogram`` of the same name and buckets (``_bucket{le}``,
    ``_count``, ``_sum``)."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = (*sorted(buckets), math.inf)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket whose bound is >= value, as prometheus
        self.sum += value

    def describe(self) -> list[Any]:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> list[Any]:
        buckets = []
        total = 0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            total += n
            buckets.append((floatToGoString(bound), total))  # type: ignore[no-untyped-call]
        return [HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self.sum)]

connections = Gauge("broker_open_connections", "Open WebSocket connections", registry=REGISTRY)
connections_total = Counter(
    "broker_connections_total", "WebSocket connections by outcome", ["outcome"], registry=REGISTRY
)
console_requests = Counter(
    "broker_console_requests_total", "Web console requests by outcome (answered, refused, failed)", ["outcome"],
    registry=REGISTRY,
)  # fmt: skip
frames_out = Counter("broker_frames_out_total", "Frames written to clients", registry=REGISTRY)
queue_depth = Gauge(
    "broker_queue_depth", "Messages per topic, group and state (refreshed every few seconds)",
    ["topic", "group", "state"], registry=REGISTRY,
)  # fmt: skip
publish_to_ack = TallyHistogram(  # observed once per ack
    "broker_publish_to_ack_seconds",
    "From publish (stored) to the consumer's ack reaching this broker",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
    registry=REGISTRY,
)
frames_in = Counter("broker_frames_in_total", "Frames received by op", ["op"], registry=REGISTRY)
frame_errors = Counter("broker_frame_errors_total", "Error frames sent, by code", ["code"], registry=REGISTRY)
published = Counter("broker_published_total", "Messages confirmed to publishers", ["topic"], registry=REGISTRY)
publish_failed = Counter("broker_publish_failed_total", "Publishes answered with an error", ["code"], registry=REGISTRY)
delivered = Counter("broker_delivered_total", "Deliveries sent to consumers", ["topic", "group"], registry=REGISTRY)
acked = Counter("broker_acked_total", "Deliveries acked", ["topic", "group"], registry=REGISTRY)
stale = Counter("broker_stale_receipts_total", "Acks/nacks/extends refused as stale", ["op"], registry=REGISTRY)
nacked = Counter(
    "broker_nacked_total", "Deliveries nacked, by outcome", ["topic", "group", "outcome"], registry=REGISTRY
)
pulls = Counter("broker_pulls_total", "Pull requests answered, by outcome", ["outcome"], registry=REGISTRY)
released = Counter(
    "broker_released_total", "Claimed deliveries given back unsent", ["topic", "group"], registry=REGISTRY
)
requeued = Counter(
    "broker_requeued_total", "Deliveries requeued because their consumer left", ["topic", "group"], registry=REGISTRY
)
lease_expired = Counter(
    "broker_lease_expired_total", "Leases that expired, by outcome", ["topic", "group", "outcome"], registry=REGISTRY
)
promoted = Counter(
    "broker_promoted_total", "Due retries/delayed messages promoted", ["topic", "group"], registry=REGISTRY
)
orphans = Counter("broker_queue_entries_without_body_total", "Queue ids whose body was missing", registry=REGISTRY)
store_errors = Counter("broker_store_errors_total", "Redis operations that failed", ["op", "kind"], registry=REGISTRY)
slot_moving = Counter(
    "broker_store_slot_moving_total",
    "Script calls a Redis Cluster refused because their slot was moving (resharding); each is sent again",
    ["op"],
    registry=REGISTRY,
)
loop_errors = Counter("broker_loop_errors_total", "Background loop failures", ["loop"], registry=REGISTRY)
loop_restarts = Counter(
    "broker_loop_restarts_total", "Background loop tasks restarted after ending unexpectedly", ["loop"],
    registry=REGISTRY,
)  # fmt: skip
loops_unhealthy = Gauge(
    "broker_loops_unhealthy", "Background loops failing or stalled (they make /readyz 503)", ["loop"],
    registry=REGISTRY,
)  # fmt: skip
asyncio_tasks = Gauge(
    "broker_asyncio_tasks", "asyncio tasks alive in this process (counted when /metrics is read)", registry=REGISTRY
)


def _count_tasks() -> float:
    """Read on the event loop (``/metrics`` is served there); a leak of tasks shows as a slope (bench/soak.py)."""
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # no running loop (rendered outside the broker's loop)
        return 0.0


asyncio_tasks.set_function(_count_tasks)
task_errors = Counter(
    "broker_task_errors_total", "Fire-and-forget tasks that ended with an exception", registry=REGISTRY
)
breaker_state = Gauge(
    "broker_breaker_state", "Breaker state (0 closed, 1 half-open, 2 open)", ["breaker"], registry=REGISTRY
)
breaker_transitions = Counter(
    "broker_breaker_transitions_total", "Breaker state changes", ["breaker", "to"], registry=REGISTRY
)
redis_latency = Histogram(
    "broker_redis_call_seconds",
    "Latency of one Redis round trip (script or pipeline)",
    ["op"],
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)


_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: Counter | Gauge | Histogram, *labels: str) -> Any:
    """``metric.labels(*labels)``, cached: the lookup costs more than the increment on per-frame paths."""
    if not enabled:
        return _Noop()
    key = (id(metric), labels)
    c = _children.get(key)
    if c is None:
        c = _children[key] = metric.labels(*labels)
    return c


_tally_of: dict[tuple[int, tuple[str, ...]], Tally] = {}


def tally(metric: Counter, *labels: str) -> Tally:
    """A ``Tally`` for ``metric`` (with ``labels``), one per label set."""
    key = (id(metric), labels)
    t = _tally_of.get(key)
    if t is None:
        t = _tally_of[key] = Tally(child(metric, *labels) if labels else metric)
        _tallies.append(t)
    return t


def render() -> bytes:
    return generate_latest(REGISTRY)


class _Noop:
    """Stands in for every metric when metrics are disabled (server.metrics_enabled = false)."""

    def labels(self, *args: Any, **kwargs: Any) -> _Noop:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


enabled = True


def disable() -> None:
    """Make every metric a no-op (for measuring what metrics cost; /metrics then answers 404)."""
    global enabled
    enabled = False
    noop = _Noop()
    module = globals()
    for name, value in list(module.items()):
        if isinstance(value, Counter | Gauge | Histogram):
            module[name] = noop
    _children.clear()
    for t in _tallies:
        t.target = noop
