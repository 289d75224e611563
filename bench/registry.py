"""The scenario registry and the types every scenario shares.

A scenario is an ``async def fn(ctx: Context) -> ScenarioResult`` registered under a name with ``@scenario``.
``SCENARIOS`` maps name -> ``Scenario`` (the function plus what it needs); the runner in ``bench.cli`` starts only
the processes the selected scenarios need (``needs``), runs them in order and prints one table. Adding S4 or S5 is
one decorated function in ``bench/scenarios.py``; a ratio or a pass/fail line is one ``Target`` in ``TARGETS``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Need = Literal["broker", "relay", "nats", "rawredis", "rabbitmq"]
#: Who a scenario measures: the broker, or one of the baselines it is compared with.
System = Literal["broker", "relay", "rawredis", "nats", "rabbitmq"]
#: The load shape a scenario shares with its peers on the other systems ("" = none).
Shape = Literal["s1", "s2", "s3", ""]
Status = Literal["ok", "fail", "error", "skipped"]


@dataclass(frozen=True)
class Sizes:
    """Every knob a scenario reads. ``Sizes()`` is the full run from the issue; ``Sizes.quick()`` is a smoke run."""

    messages: int = 50_000  # S1 and its peers on the baselines
    payload_bytes: int = 256  # size of the payload's JSON text
    window: int = 1_000  # most unconfirmed single-message publishes in flight
    prefetch: int = 100
    ack_batch: int = 1  # 1: one ack frame per delivery (like NATS's per-message acks); > 1: batched ack frames
    ack_interval_s: float = 0.005  # a partial ack batch is flushed after at most this long
    confirm_acks: bool = False  # acks carry a ref and "done" means the broker answered the last one; without,
    # "done" means the answer to a ping sent after the last ack (the broker has read every ack frame)
    fanout_messages: int = 5_000  # S2
    fanout_groups: int = 8
    latency_rate: int = 1_000  # S3, messages per second
    latency_seconds: float = 10.0
    dead_letters: int = 100_000  # reprocess: dead letters created, then reprocessed
    backlog_messages: int = 1_000_000  # backlog: published with no consumer, then drained
    retry_backoff_base_ms: int = 50  # s4: the publish frame's own backoff_base_ms
    sample_interval_s: float = 0.25  # backlog: how often the broker's RSS and Redis's memory are read
    warmup_messages: int = 1_000  # untimed run through the same path before each timed one (0: none)
    settle_s: float = 0.3  # after the timed part: keep listening this long to catch late duplicates
    run_timeout_s: float = 180.0  # hard limit for one timed run of one scenario
    stall_timeout_s: float = 15.0  # no publish confirmation for this long with a full window: abort
    connect_timeout_s: float = 10.0

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            messages=5_000,
            fanout_messages=1_000,
            latency_seconds=2.0,
            dead_letters=10_000,
            backlog_messages=20_000,
            warmup_messages=200,
            settle_s=0.1,
            run_timeout_s=60.0,
        )

    @property
    def backlog_phase_s(self) -> float:
        """The deadline of each backlog phase (fill, drain): run_timeout_s, or longer for a deep backlog (room for
        2,000 msg/s)."""
        return max(self.run_timeout_s, self.backlog_messages / 2_000)

    def with_overrides(self, **values: Any) -> Sizes:
        return replace(self, **{k: v for k, v in values.items() if v is not None})


@dataclass
class Metric:
    key: str  # e.g. "throughput", "p99"
    value: float
    unit: str  # e.g. "msg/s", "ms"
    higher_is_better: bool = True
    samples: list[float] = field(default_factory=list)  # one per repeat when --repeat > 1


@dataclass
class ScenarioResult:
    name: str
    status: Status = "ok"
    metrics: list[Metric] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # anything else worth keeping in the JSON
    problems: list[str] = field(default_factory=list)  # correctness problems (missing, duplicated, errors)
    note: str = ""  # skipped/error reason

    def metric(self, key: str) -> Metric | None:
        return next((m for m in self.metrics if m.key == key), None)

    def add(self, key: str, value: float, unit: str, *, higher_is_better: bool = True) -> None:
        self.metrics.append(Metric(key, value, unit, higher_is_better))

    def problem(self, text: str) -> None:
        self.problems.append(text)
        if self.status == "ok":
            self.status = "fail"


@dataclass
class Context:
    sizes: Sizes
    broker_url: str = ""  # ws://127.0.0.1:P (set when a selected scenario needs the broker)
    redis_url: str = ""  # the broker's redis-server (set with broker_url): memory readings, the dlq CLI
    broker_env: dict[str, str] = field(default_factory=dict)  # --broker-env: the broker's extra settings
    broker_cmd: list[str] = field(default_factory=list)  # how the broker was started (the dlq CLI uses its python)
    relay_url: str = ""  # ws://127.0.0.1:P
    raw_redis_url: str = ""  # the raw Redis lists baseline's own redis-server
    nats_url: str = "nats://127.0.0.1:4222"
    nats_storage: str = "file"
    nats_consumer: str = "push"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    #: system -> role ("server", "redis") -> pids of the processes whose CPU is that system's server CPU.
    #: Started processes are filled in by the runner; system services (NATS, RabbitMQ) are found by name.
    pids: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    log: Callable[[str], None] = print


ScenarioFn = Callable[[Context], Awaitable[ScenarioResult]]


@dataclass(frozen=True)
class Scenario:
    name: str
    fn: ScenarioFn
    needs: tuple[Need, ...]
    title: str  # one line for --list and the README
    default: bool = True  # part of a run without --scenario
    system: System = "broker"
    shape: Shape = ""
    #: The runner's outer bound for one run of it (default: two timed runs, warm-up and timed, of run_timeout_s).
    bound: Callable[[Sizes], float] | None = None


SCENARIOS: dict[str, Scenario] = {}


def scenario(
    name: str,
    *,
    needs: Sequence[Need] = (),
    title: str,
    default: bool = True,
    system: System = "broker",
    shape: Shape = "",
    bound: Callable[[Sizes], float] | None = None,
) -> Callable[[ScenarioFn], ScenarioFn]:
    def register(fn: ScenarioFn) -> ScenarioFn:
        if name in SCENARIOS:
            raise ValueError(f"scenario {name!r} registered twice")
        SCENARIOS[name] = Scenario(name, fn, tuple(needs), title, default, system, shape, bound)
        return fn

    return register


def peer(shape: Shape, system: System) -> str:
    """The scenario that runs ``shape`` on ``system``: ``s2`` on the broker, ``nats-s2`` on NATS, and the S1 shape
    under the bare system name (``relay``, ``rawredis``... as the baselines were always called)."""
    if system == "broker":
        return shape
    name = "redis" if system == "rawredis" else system
    return name if shape == "s1" else f"{name}-{shape}"


@dataclass(frozen=True)
class Target:
    """A goal from the issue. ``against`` is another scenario (a ratio target) or ``None`` (an absolute bound:
    ``max_value`` for lower-is-better metrics, ``min_value`` for higher-is-better ones)."""

    scenario: str
    metric: str
    against: str | None = None
    min_ratio: float | None = None
    max_value: float | None = None
    min_value: float | None = None

    @property
    def text(self) -> str:
        if self.against is not None:
            return f">= {self.min_ratio:g}x {self.against}"
        if self.min_value is not None:
            return f">= {self.min_value:,g}"
        return f"<= {self.max_value:g}"

    def met_by(self, value: float) -> bool:
        """An absolute bound (ratio targets are judged by the caller, which knows both scenarios)."""
        if self.min_value is not None and value < self.min_value:
            return False
        return not (self.max_value is not None and value > self.max_value)


#: CPU metrics every load scenario reports: the servers' CPU seconds over the timed part / messages, in µs.
CPU_SERVER, CPU_REDIS, CPU_TOTAL = "cpu_server", "cpu_redis", "cpu_total"
#: ... and the bench's own process (every client of a scenario runs in it, on one core): µs per message, and how
#: busy it was over the timed part (% of one core; near 100 the clients, not the server, set the rate).
CPU_CLIENT, CLIENT_BUSY = "cpu_client", "client_busy"

TARGETS: tuple[Target, ...] = (
    # issue 14
    Target("s1", "throughput", against="nats", min_ratio=1.5),
    Target("s1", "throughput", against="relay", min_ratio=0.6),
    Target("s2", "deliveries", against="nats-s2", min_ratio=1.5),
    Target("s3", "p50", max_value=0.4),
    Target("s3", "p99", max_value=1.0),
    Target("s1", CPU_TOTAL, max_value=35),
    Target("s1", CPU_REDIS, max_value=12),
    Target("s3", CPU_TOTAL, max_value=150),
    Target("s4", "retry_p99", max_value=20),
    Target("s4", "throughput", against="s1", min_ratio=0.9),
    Target("keyed", "throughput", against="s1", min_ratio=0.9),
    Target("backlog", "redis_bytes_per_msg", max_value=600),
    Target("backlog", "rss_fill_max", max_value=150),
    Target("backlog", "rss_drain_max", max_value=150),
    # issue 4
    Target("reprocess", "throughput", min_value=20_000),
)

#: Ratio columns of the table: (column title, system compared with); the peer has the same shape (``peer``).
RATIO_COLUMNS: tuple[tuple[str, System], ...] = (("vs relay", "relay"), ("vs NATS", "nats"))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def combine(runs: Sequence[ScenarioResult]) -> ScenarioResult:
    """Fold repeated runs of one scenario: each metric becomes the median of its runs (all runs kept in samples)."""
    if len(runs) == 1:
        only = runs[0]
        for m in only.metrics:
            m.samples = [m.value]
        return only
    first = runs[0]
    out = ScenarioResult(first.name)
    worst = {"ok": 0, "skipped": 1, "fail": 2, "error": 3}
    out.status = max((r.status for r in runs), key=lambda s: worst[s])
    out.note = "; ".join(dict.fromkeys(r.note for r in runs if r.note))
    for r in runs:
        out.problems.extend(r.problems)
    for m in first.metrics:
        values = [x.value for r in runs if (x := r.metric(m.key)) is not None and not math.isnan(x.value)]
        value = statistics.median(values) if values else math.nan
        out.metrics.append(Metric(m.key, value, m.unit, m.higher_is_better, values))
    out.extra = {"runs": [r.extra for r in runs]}
    return out
