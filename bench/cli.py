"""``python -m bench``: start what the selected scenarios need, run them, print a table, optionally write JSON.

Exit status: 0 every selected scenario ran and checked out (missed targets too, unless --check-targets);
1 a scenario failed (error, missing/duplicated messages) or, with --check-targets, a target was missed;
2 bad arguments or a process (redis-server, broker, relay) could not be started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from . import BenchError, SetupError
from . import backlog as _backlog  # noqa: F401  (registers backlog)
from . import baselines as _baselines  # noqa: F401  (registers nats, nats-s2, nats-s3)
from . import batchmode as _batchmode  # noqa: F401  (registers s1b)
from . import keyed as _keyed  # noqa: F401  (registers keyed)
from . import rabbitmq as _rabbitmq  # noqa: F401  (registers rabbitmq, rabbitmq-s2, rabbitmq-s3)
from . import rawredis as _rawredis  # noqa: F401  (registers redis, redis-s2, redis-s3)
from . import retry as _retry  # noqa: F401  (registers s4, reprocess)
from . import scenarios as _scenarios  # noqa: F401  (registers s1, s2, s3, relay, relay-s2, relay-s3)
from .procs import (
    DEFAULT_BROKER_CMD,
    TRANSPORTS,
    BrokerServer,
    RedisServer,
    RelayServer,
    start_broker,
    start_redis,
    start_relay,
)
from .registry import (
    CLIENT_BUSY,
    CPU_CLIENT,
    CPU_REDIS,
    CPU_SERVER,
    CPU_TOTAL,
    RATIO_COLUMNS,
    SCENARIOS,
    TARGETS,
    Context,
    Need,
    ScenarioResult,
    Sizes,
    Target,
    combine,
    peer,
)

#: Peers of one shape run next to each other, so the ratios of a shape come from neighbouring minutes.
DEFAULT_ORDER = (
    *("relay", "redis", "nats", "rabbitmq", "s1", "s1b"),
    *("relay-s2", "redis-s2", "nats-s2", "rabbitmq-s2", "s2"),
    *("relay-s3", "redis-s3", "nats-s3", "rabbitmq-s3", "s3"),
    *("s4", "keyed", "backlog", "reprocess"),
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Broker benchmarks (S1 throughput, S2 fan-out, S3 latency, S4 retries, backlog, DLQ reprocess)"
        " with same-frames relay, raw Redis lists, NATS JetStream and RabbitMQ baselines.",
        epilog="Scenarios: "
        + "; ".join(f"{s.name}{'' if s.default else ' (opt-in)'}" for s in SCENARIOS.values())
        + ". See bench/README.md.",
    )
    ap.add_argument(
        "--scenario",
        default="",
        help=f"comma-separated scenario names (default: {','.join(DEFAULT_ORDER)}; 'all' = every registered one)",
    )
    ap.add_argument("--list", action="store_true", help="list the registered scenarios and exit")
    ap.add_argument(
        "--quick", action="store_true", help="smoke-run sizes (5,000 msgs, 1,000 fan-out, 2 s latency, 20,000 backlog)"
    )
    ap.add_argument("--json", metavar="PATH", help="write every number (and each repeat's raw values) here")
    ap.add_argument("--repeat", type=int, default=1, help="run the scenario list N times (interleaved); median")
    ap.add_argument("--check-targets", action="store_true", help="exit 1 when a target from the issue is missed")
    size = ap.add_argument_group("sizes (override the full/--quick defaults)")
    size.add_argument("--messages", type=int, help="S1 message count (every system), also S1b, S4, keyed")
    size.add_argument("--payload-bytes", type=int, help="payload JSON size in bytes (default 256)")
    size.add_argument("--window", type=int, help="most unconfirmed publishes (default 1000)")
    size.add_argument("--prefetch", type=int, help="consumer prefetch (default 100)")
    size.add_argument("--ack-batch", type=int, help="ack items per frame in S1/S2 (default 1: one frame per message)")
    size.add_argument("--fanout-messages", type=int, help="S2 message count (default 5000)")
    size.add_argument("--latency-seconds", type=float, help="S3 duration (default 10)")
    size.add_argument("--latency-rate", type=int, help="S3 messages per second (default 1000)")
    size.add_argument("--dead-letters", type=int, help="reprocess: dead letters to create (default 100000)")
    size.add_argument("--backlog-messages", type=int, help="backlog: messages published with no consumer (1000000)")
    size.add_argument("--warmup", type=int, dest="warmup_messages", help="untimed warm-up messages per run")
    size.add_argument("--run-timeout", type=float, dest="run_timeout_s", help="hard limit per timed run, s")
    size.add_argument(
        "--ack-confirm",
        action="store_true",
        help="send acks with a ref (end time = last ack answered, not the pong to a ping after the last ack)",
    )
    proc = ap.add_argument_group("processes")
    proc.add_argument(
        "--broker-cmd",
        default=DEFAULT_BROKER_CMD,
        help="broker command line; {python} and {port} are substituted (default: %(default)s)",
    )
    proc.add_argument(
        "--broker-log-level", default="warning", help="sets BROKER_LOG_LEVEL for the broker ('' leaves it alone)"
    )
    proc.add_argument(
        "--broker-env",
        metavar="NAME=VALUE",
        type=_env_pair,
        action="append",
        default=[],
        help="extra environment for the broker, e.g. BROKER_DELIVERY_CLAIM_BATCH=500 (repeatable)",
    )
    proc.add_argument(
        "--broker-token",
        default="",
        help="connect to the broker with this token (?token=), for a broker run with auth.mode = tokens",
    )
    proc.add_argument("--startup-timeout", type=float, default=30.0, help="seconds to wait for /healthz")
    proc.add_argument(
        "--redis-fsync",
        choices=("everysec", "always", "no"),
        default="everysec",
        help="appendfsync of the throwaway redis-server (AOF is always on, RDB off)",
    )
    proc.add_argument(
        "--redis-transport",
        choices=TRANSPORTS,
        default=TRANSPORTS[0],
        help="how the broker and the raw Redis baseline reach their redis-server: its Unix socket (the default, as "
        "`make run`'s broker reaches its managed one) or loopback TCP (default: %(default)s)",
    )
    proc.add_argument("--keep-logs", action="store_true", help="keep the temporary directory with all process logs")
    nats = ap.add_argument_group("NATS baseline")
    nats.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    nats.add_argument("--nats-storage", choices=("file", "memory"), default="file")
    nats.add_argument("--nats-consumer", choices=("push", "pull"), default="push")
    amqp = ap.add_argument_group("RabbitMQ baseline")
    amqp.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    return ap


def select(spec: str) -> list[str]:
    if not spec:
        return [n for n in DEFAULT_ORDER if n in SCENARIOS and SCENARIOS[n].default] + [
            n for n, s in SCENARIOS.items() if s.default and n not in DEFAULT_ORDER
        ]
    if spec.strip().lower() == "all":
        return list(SCENARIOS)
    names = [p.strip().lower() for p in spec.split(",") if p.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)} (known: {', '.join(SCENARIOS)})")
    return list(dict.fromkeys(names))


@dataclass
class Resources:
    args: argparse.Namespace
    workdir: Path
    redis: RedisServer | None = None
    broker: BrokerServer | None = None
    relay: RelayServer | None = None
    raw_redis: RedisServer | None = None  # the raw Redis lists baseline's own redis-server
    setup: dict[str, Any] = field(default_factory=dict)

    def pids(self) -> dict[str, dict[str, list[int]]]:
        """system -> role -> pids of the processes this run started (for the servers' CPU per message)."""
        out: dict[str, dict[str, list[int]]] = {}
        if self.broker is not None and self.redis is not None and self.broker.proc.pid and self.redis.proc.pid:
            out["broker"] = {"server": [self.broker.proc.pid], "redis": [self.redis.proc.pid]}
        if self.relay is not None and self.relay.proc.pid:
            out["relay"] = {"server": [self.relay.proc.pid]}
        if self.raw_redis is not None and self.raw_redis.proc.pid:
            out["rawredis"] = {"redis": [self.raw_redis.proc.pid]}
        return out

    async def start(self, needs: set[Need]) -> None:
        a = self.args
        if "broker" in needs:
            log(f"starting redis-server (AOF appendfsync={a.redis_fsync}, RDB off) ...")
            self.redis = await start_redis(self.workdir, a.redis_fsync)
            log(self.redis.description)
            self.setup["redis"] = self.redis.description
            url = self.redis.url_for(a.redis_transport)
            log(f"starting broker: {a.broker_cmd} (BROKER_REDIS_URL={url}) ...")
            self.broker = await start_broker(
                self.workdir,
                url,
                cmd=a.broker_cmd,
                log_level=a.broker_log_level,
                timeout_s=a.startup_timeout,
                env_extra=dict(a.broker_env),
            )
            log(f"broker up on {self.broker.ws_url} (pid {self.broker.proc.pid})")
            self.setup["broker"] = {
                "url": self.broker.ws_url,
                "argv": self.broker.argv,
                "redis_url": url,
                "log_level": a.broker_log_level,
                "extra_env": dict(a.broker_env),
            }
        if "rawredis" in needs:
            log(f"starting the raw Redis baseline's redis-server (AOF appendfsync={a.redis_fsync}, RDB off) ...")
            self.raw_redis = await start_redis(self.workdir / "raw", a.redis_fsync)
            self.setup["rawredis"] = f"{self.raw_redis.description}; the bench connects over {a.redis_transport}"
        if "relay" in needs:
            self.relay = await start_relay(self.workdir)
            log(f"relay up on {self.relay.ws_url} (pid {self.relay.proc.pid})")
            self.setup["relay"] = {"url": self.relay.ws_url, "argv": self.relay.proc.argv}
        if "nats" in needs:
            self.setup["nats"] = {"url": a.nats_url, "storage": a.nats_storage, "consumer": a.nats_consumer}
        if "rabbitmq" in needs:
            self.setup["rabbitmq"] = {"url": a.amqp_url}

    def check_alive(self, needs: tuple[Need, ...]) -> None:
        for need, server in (("broker", self.broker), ("relay", self.relay), ("rawredis", self.raw_redis)):
            if need in needs and server is not None and not server.proc.running():
                raise SetupError(server.proc.died_message())
        if "broker" in needs and self.redis is not None and not self.redis.proc.running():
            raise SetupError(self.redis.proc.died_message())

    async def close(self) -> None:
        for server in (self.broker, self.relay, self.redis, self.raw_redis):
            if server is not None:
                with contextlib.suppress(Exception):
                    await server.proc.stop()


async def run_scenario(name: str, ctx: Context, res: Resources) -> ScenarioResult:
    sc = SCENARIOS[name]
    try:
        res.check_alive(sc.needs)
    except SetupError as e:
        return ScenarioResult(name, status="error", note=str(e))
    # Each timed run and each warm-up has its own deadline; this outer bound only catches a hang outside them.
    bound = sc.bound(ctx.sizes) if sc.bound is not None else 2 * ctx.sizes.run_timeout_s
    hard = bound + 4 * ctx.sizes.connect_timeout_s + 30
    try:
        async with asyncio.timeout(hard):
            return await sc.fn(ctx)
    except TimeoutError:
        return ScenarioResult(name, status="error", note=f"hard timeout after {hard:g}s")
    except BenchError as e:
        died = res_died(res, sc.needs)
        return ScenarioResult(name, status="error", note=f"{e}\n  and {died}" if died else str(e))
    except Exception as e:
        traceback.print_exc()
        return ScenarioResult(name, status="error", note=f"unexpected {e!r}")


def res_died(res: Resources, needs: tuple[Need, ...]) -> str:
    try:
        res.check_alive(needs)
    except SetupError as e:
        return str(e)
    return ""


# ---- output -------------------------------------------------------------------------------------------------


def fmt_value(value: float, unit: str) -> str:
    if math.isnan(value):
        return "-"
    if unit == "ms":
        return f"{value:,.3f}"
    if unit.startswith("us/"):
        return f"{value:,.1f}"
    if unit in ("cmd/msg", "call/msg"):
        return f"{value:,.2f}"
    return f"{value:,.0f}"


def ratio(results: dict[str, ScenarioResult], scenario: str, metric: str, against: str) -> float | None:
    a, b = results.get(scenario), results.get(against)
    if a is None or b is None or a.status in ("error", "skipped") or b.status in ("error", "skipped"):
        return None
    ma, mb = a.metric(metric), b.metric(metric)
    if ma is None or mb is None or not mb.value or math.isnan(ma.value) or math.isnan(mb.value):
        return None
    return ma.value / mb.value


def target_label(t: Target) -> str:
    return f"{t.metric} {t.text}"


def evaluate(results: dict[str, ScenarioResult]) -> list[dict[str, Any]]:
    out = []
    for t in TARGETS:
        r = results.get(t.scenario)
        if r is None:
            continue
        entry: dict[str, Any] = {"scenario": t.scenario, "metric": t.metric, "target": t.text}
        if t.against is not None:
            value = ratio(results, t.scenario, t.metric, t.against)
            entry["against"] = t.against
            entry["ratio"] = value
            ok = None if value is None else value >= (t.min_ratio or 0)
        else:
            m = r.metric(t.metric) if r.status not in ("error", "skipped") else None
            value = None if m is None or math.isnan(m.value) else m.value
            entry["value"] = value
            ok = None if value is None else t.met_by(value)
        entry["met"] = ok
        out.append(entry)
    return out


#: Metrics that have a column of their own; any other metric is listed under the table.
RATE_KEYS = ("throughput", "deliveries", "fill")
LATENCY_KEYS = (("p50", "p99"), ("retry_p50", "retry_p99"))
COLUMN_KEYS = {
    *RATE_KEYS,
    "p50",
    "p99",
    "max",
    "retry_p50",
    "retry_p99",
    CPU_SERVER,
    CPU_REDIS,
    CPU_TOTAL,
    CPU_CLIENT,
    CLIENT_BUSY,
}


def _cell(r: ScenarioResult, key: str) -> str:
    m = r.metric(key)
    return fmt_value(m.value, m.unit) if m is not None else ""


def render_table(results: dict[str, ScenarioResult], evaluations: list[dict[str, Any]]) -> str:
    """One row per scenario: its rate, p50/p99 (S4: the retry's due -> delivered delay), the servers' CPU per
    message (server process, Redis, sum), the clients' CPU per message and how busy their process was (% of one
    core), ratios to the same shape on the relay and on NATS, targets, checks."""
    head = [
        "scenario",
        "rate",
        "unit",
        "p50 ms",
        "p99 ms",
        "cpu server",
        "cpu redis",
        "cpu sum",
        "cpu unit",
        "cpu client",
        "client busy",
    ]
    head += [c for c, _ in RATIO_COLUMNS] + ["vs S1", "targets", "checks"]
    rows: list[list[str]] = []
    more: list[str] = []
    for name, r in results.items():
        sc = SCENARIOS.get(name)
        rate = next((m for k in RATE_KEYS if (m := r.metric(k)) is not None), None)
        lat = next((pair for pair in LATENCY_KEYS if r.metric(pair[0]) is not None), LATENCY_KEYS[0])
        cpu = r.metric(CPU_TOTAL)
        cells = [
            name,
            fmt_value(rate.value, rate.unit) if rate else "",
            rate.unit if rate else "",
            _cell(r, lat[0]) + ("*" if lat[0].startswith("retry") else ""),
            _cell(r, lat[1]) + ("*" if lat[1].startswith("retry") else ""),
            _cell(r, CPU_SERVER),
            _cell(r, CPU_REDIS),
            _cell(r, CPU_TOTAL),
            cpu.unit if cpu else "",
            _cell(r, CPU_CLIENT),
            _cell(r, CLIENT_BUSY) + ("%" if r.metric(CLIENT_BUSY) is not None else ""),
        ]
        for _, system in RATIO_COLUMNS:
            x = None
            if sc is not None and sc.system == "broker" and sc.shape in ("s1", "s2") and rate is not None:
                x = ratio(results, name, rate.key, peer(sc.shape, system))
            cells.append(f"{x:.2f}x" if x is not None else "")
        vs_s1 = (
            ratio(results, name, "throughput", "s1")
            if any(t.scenario == name and t.against == "s1" for t in TARGETS)
            else None
        )
        cells.append(f"{vs_s1:.2f}x" if vs_s1 is not None else "")
        texts = []
        for t in (t for t in TARGETS if t.scenario == name):
            ev = next(
                (e for e in evaluations if e["scenario"] == name and e["metric"] == t.metric and e["target"] == t.text),
                None,
            )
            if ev is not None:
                texts.append(f"{target_label(t)} {({True: 'ok', False: 'MISSED', None: 'n/a'})[ev['met']]}")
        cells.append("; ".join(texts))
        cells.append(r.status.upper())
        rows.append(cells)
        extra = [m for m in r.metrics if m.key not in COLUMN_KEYS]
        if extra:
            more.append(f"  {name}: " + ", ".join(f"{m.key} {fmt_value(m.value, m.unit)} {m.unit}" for m in extra))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    left = {0, 2, 8, len(head) - 2, len(head) - 1}
    lines = []
    for i, row in enumerate([head, *rows]):
        lines.append(
            "  ".join(c.ljust(w) if j in left else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    out = [line.rstrip() for line in lines]
    out.append("")
    out.append(
        "cpu: the servers' CPU seconds (utime + stime from /proc) over the timed part / messages (S2: / deliveries):"
        " server = broker, relay, nats-server or RabbitMQ; redis = the broker's redis-server or the raw baseline's."
    )
    if any(r.metric("retry_p50") is not None for r in results.values()):
        out.append("*: the retry's delay from due (nack + the backoff the broker chose) to its delivery as attempt 2")
    if more:
        out.append("more:")
        out.extend(more)
    return "\n".join(out)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    with contextlib.suppress(OSError):
        info["loadavg"] = list(os.getloadavg())
    for dist in ("websockets", "orjson", "nats-py", "redis"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[dist] = importlib.metadata.version(dist)
    return info


# ---- main ---------------------------------------------------------------------------------------------------


async def amain(args: argparse.Namespace, names: list[str]) -> int:
    needs: set[Need] = {n for name in names for n in SCENARIOS[name].needs}
    base = Sizes.quick() if args.quick else Sizes()
    sizes = base.with_overrides(
        messages=args.messages,
        payload_bytes=args.payload_bytes,
        window=args.window,
        prefetch=args.prefetch,
        ack_batch=args.ack_batch,
        fanout_messages=args.fanout_messages,
        latency_seconds=args.latency_seconds,
        latency_rate=args.latency_rate,
        dead_letters=args.dead_letters,
        backlog_messages=args.backlog_messages,
        warmup_messages=args.warmup_messages,
        run_timeout_s=args.run_timeout_s,
        confirm_acks=True if args.ack_confirm else None,
    )
    bad = [
        f"{k} must be positive"
        for k in (
            "messages",
            "window",
            "prefetch",
            "ack_batch",
            "fanout_messages",
            "latency_rate",
            "payload_bytes",
            "dead_letters",
            "backlog_messages",
        )
        if getattr(sizes, k) <= 0
    ]
    if sizes.payload_bytes < 48:
        bad.append("payload_bytes must be >= 48 (room for the sequence number and the timestamp)")
    if bad or args.repeat < 1:
        print(f"python -m bench: {'; '.join(bad) or '--repeat must be >= 1'}", file=sys.stderr)
        return 2

    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, task.cancel)

    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    res = Resources(args, workdir)
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    meta = {
        "started_at": started,
        "command": ["python", "-m", "bench", *sys.argv[1:]],
        "quick": args.quick,
        "repeat": args.repeat,
        **machine_info(),
    }
    log(f"scenarios: {', '.join(names)}; {'quick' if args.quick else 'full'} sizes; logs in {workdir}")
    runs: dict[str, list[ScenarioResult]] = {n: [] for n in names}
    keep = args.keep_logs
    try:
        try:
            await res.start(needs)
        except SetupError as e:
            keep = True
            print(f"\npython -m bench: setup failed: {e}", file=sys.stderr)
            if "broker" in needs:
                print(
                    "  (the broker scenarios need `python -m broker serve --port P` to start and answer GET /healthz"
                    " with 200; the baselines alone run with --scenario relay,nats)",
                    file=sys.stderr,
                )
            print(f"  logs kept in {workdir}", file=sys.stderr)
            return 2
        ctx = Context(
            sizes=sizes,
            broker_url=(res.broker.ws_url + (f"/?token={args.broker_token}" if args.broker_token else ""))
            if res.broker
            else "",
            redis_url=res.redis.url_for(args.redis_transport) if res.redis else "",
            broker_env=dict(args.broker_env),
            broker_cmd=res.broker.argv if res.broker else [],
            relay_url=res.relay.ws_url if res.relay else "",
            raw_redis_url=res.raw_redis.url_for(args.redis_transport) if res.raw_redis else "",
            nats_url=args.nats_url,
            nats_storage=args.nats_storage,
            nats_consumer=args.nats_consumer,
            amqp_url=args.amqp_url,
            pids=res.pids(),
            log=log,
        )
        for rep in range(args.repeat):
            for name in names:
                suffix = f" (run {rep + 1}/{args.repeat})" if args.repeat > 1 else ""
                log(f"{name}: {SCENARIOS[name].title}{suffix}")
                t = time.perf_counter()
                r = await run_scenario(name, ctx, res)
                runs[name].append(r)
                summary = ", ".join(f"{m.key}={fmt_value(m.value, m.unit)} {m.unit}" for m in r.metrics)
                log(f"{name}: {r.status} in {time.perf_counter() - t:.1f}s {summary} {r.note}".rstrip())
    finally:
        await res.close()
        meta["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with contextlib.suppress(OSError):
            meta["loadavg_end"] = list(os.getloadavg())

    results = {n: combine(rs) for n, rs in runs.items() if rs}
    evaluations = evaluate(results)

    print()
    print("setup:")
    for key in ("redis", "broker", "relay", "rawredis", "nats", "rabbitmq"):
        if key in res.setup:
            value = res.setup[key]
            print(f"  {key}: {value if isinstance(value, str) else orjson.dumps(value).decode()}")
    repeat_note = f", median of {args.repeat} runs" if args.repeat > 1 else ""
    print(f"  sizes: {'quick' if args.quick else 'full'}{repeat_note}: {sizes}")
    print()
    print(render_table(results, evaluations))
    notes = [(n, r) for n, r in results.items() if r.note or r.problems]
    if notes:
        print()
        for n, r in notes:
            if r.note:
                print(f"{n}: {r.status}: {r.note}")
            for p in r.problems[:10]:
                print(f"{n}: problem: {p}")

    if args.json:
        doc = {
            "meta": meta,
            "setup": res.setup,
            "sizes": asdict(sizes),
            "scenarios": {n: asdict(r) for n, r in results.items()},
            "targets": evaluations,
        }
        data = orjson.dumps(json_safe(doc), option=orjson.OPT_INDENT_2)
        await asyncio.to_thread(_write, Path(args.json), data)
        log(f"wrote {args.json}")

    failed = [n for n, r in results.items() if r.status in ("error", "fail")]
    missed = [e for e in evaluations if e["met"] is False]
    if failed:
        keep = True
    if keep:
        log(f"process logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if failed:
        return 1
    if args.check_targets and missed:
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.list:
        for s in SCENARIOS.values():
            needs = ",".join(s.needs) or "-"
            print(f"{s.name:11} needs {needs:8} {'' if s.default else '(opt-in) '}{s.title}")
        return 0
    try:
        names = select(args.scenario)
    except ValueError as e:
        print(f"python -m bench: {e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(amain(args, names))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("python -m bench: interrupted; child processes stopped", file=sys.stderr)
        return 130
