"""The soak: many WebSocket connections at a steady rate for a long time, to see what lingers.

``python -m bench.soak`` (defaults: 1,000 connections, 1,000 msg/s, 10 minutes) starts a redis-server (AOF
everysec) and a broker, as the other scenarios do, and runs: ``publishers`` connections that publish at a fixed
schedule (``rate`` msg/s in all, each waiting for its confirmations), and the rest as consumers split over
``groups`` groups of one topic (prefetch ``prefetch``; each acks every delivery at once). Every message is delivered
to every group. Every ``sample_s`` it samples the broker's RSS and open file descriptors (``/proc``), its asyncio
task count (``broker_asyncio_tasks`` from ``/metrics``) and Redis's ``used_memory``; every ``window_s`` the
publish-to-delivery latency's p50 and p99 (the payload carries its send time). At the end, after a drain:
no loss (every confirmed message reached every group), duplicates counted, each resource's slope after the
warm-up (least squares, per minute, and as the change over the measured span relative to its mean), ``judge``'s
verdict (the slope against the deliveries made, within a tolerance from the warm-up's noise), and a sample before
the traffic and once everything is delivered and acked (Redis's key count included). ``--png``
writes the latency over time as a PNG (drawn here: no plotting library needed), ``--json`` the whole result.

The same ``run`` drives the 60-second version in ``tests/test_soak.py`` against a ``BrokerProcess``.
Everything is bounded by progress, not by a deadline a loaded machine could miss: the last confirmations and the
drain end when nothing moved for ``stall_s``; every connect and every Redis or HTTP read has its own timeout, and
the whole run a generous safety bound.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

TOPIC = "soak"


@dataclass
class SoakConfig:
    connections: int = 1_000
    publishers: int = 50
    groups: int = 3
    rate: float = 1_000.0  # msg/s in all
    duration_s: float = 600.0
    warmup_s: float = 60.0  # resources before this are not in the slope
    sample_s: float = 5.0
    window_s: float = 10.0
    prefetch: int = 10
    payload_bytes: int = 100
    stall_s: float = 60.0  # waits (the last confirmations, the drain) end when nothing moved for this long


@dataclass
class SoakResult:
    config: dict[str, Any]
    confirmed: int = 0
    publish_errors: int = 0
    lost: dict[str, int] = field(default_factory=dict)  # group -> confirmed messages it never got
    duplicates: dict[str, int] = field(default_factory=dict)
    deliveries: int = 0
    achieved_rate: float = 0.0
    max_send_lag_ms: float = 0.0
    samples: list[dict[str, float]] = field(default_factory=list)  # t, delivered, rss_kb, fds, tasks, redis_kb
    before: dict[str, float] = field(default_factory=dict)  # the same, once the connections are up, before traffic
    after: dict[str, float] = field(default_factory=dict)  # and once everything is delivered and acked
    windows: list[dict[str, float]] = field(default_factory=list)  # t, n, p50_ms, p99_ms
    slopes: dict[str, dict[str, float]] = field(default_factory=dict)

    def text(self) -> str:
        c = self.config
        lines = [
            f"soak: {c['connections']} connections ({c['publishers']} publishers, {c['groups']} groups), "
            f"{c['rate']:g} msg/s for {c['duration_s']:g} s",
            f"confirmed {self.confirmed} ({self.achieved_rate:.0f} msg/s, max send lag {self.max_send_lag_ms:.0f} "
            f"ms), publish errors {self.publish_errors}, deliveries {self.deliveries}, lost {self.lost}, "
            f"duplicates {self.duplicates}",
        ]
        if self.windows:
            p99 = [w["p99_ms"] for w in self.windows]
            lines.append(f"p99 latency per {c['window_s']:g} s window: median {sorted(p99)[len(p99) // 2]:.1f} ms, "
                         f"max {max(p99):.1f} ms")  # fmt: skip
        for name, s in self.slopes.items():
            lines.append(f"{name}: mean {s['mean']:.0f}, slope {s['per_min']:+.2f}/min "
                         f"({s['span_pct']:+.1f}% of the mean over {s['span_s']:.0f} s after warm-up)")  # fmt: skip
        return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def slope(points: list[tuple[float, float]]) -> dict[str, float]:
    """Least-squares slope of (t, value) per minute, and the change it makes over the span as % of the mean."""
    n = len(points)
    if n < 2:
        return {"mean": points[0][1] if points else 0.0, "per_min": 0.0, "span_pct": 0.0, "span_s": 0.0}
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    k = sum((t - mt) * (v - mv) for t, v in points) / var if var else 0.0
    span = points[-1][0] - points[0][0]
    return {"mean": mv, "per_min": k * 60, "span_pct": (k * span / mv * 100) if mv else 0.0, "span_s": span}


# ---- what the broker and Redis use ------------------------------------------------------------------------------


def _rss_kb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1])
    return 0.0


def _fds(pid: int) -> float:
    return float(len(os.listdir(f"/proc/{pid}/fd")))


async def _http_get(port: int, path: str) -> bytes:
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        w.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(r.read(), 5)
    finally:
        w.close()


async def _broker_tasks(port: int) -> float:
    for line in (await _http_get(port, "/metrics")).decode(errors="replace").splitlines():
        if line.startswith("broker_asyncio_tasks "):
            return float(line.split()[1])
    return math.nan


async def _redis(port: int, *args: str) -> bytes:
    """One command on its own connection; the reply's payload (a bulk string's bytes, an integer's digits)."""
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        w.write(f"*{len(args)}\r\n".encode() + b"".join(f"${len(a)}\r\n{a}\r\n".encode() for a in args))
        head = await asyncio.wait_for(r.readline(), 5)  # $<len> or :<int>
        if head[:1] == b"$":
            return (await asyncio.wait_for(r.readexactly(int(head[1:]) + 2), 5))[:-2]
        return head[1:].strip()
    finally:
        w.close()


async def _redis_used_kb(port: int) -> float:
    for line in (await _redis(port, "INFO", "memory")).decode().splitlines():
        if line.startswith("used_memory:"):
            return float(line.split(":")[1]) / 1024
    return math.nan


async def _sample(t: float, delivered: int, broker_pid: int, broker_port: int, redis_port: int) -> dict[str, float]:
    return {
        "t": round(t, 1), "delivered": delivered, "rss_kb": _rss_kb(broker_pid), "fds": _fds(broker_pid),
        "tasks": await _broker_tasks(broker_port), "redis_kb": await _redis_used_kb(redis_port),
        "redis_keys": float(await _redis(redis_port, "DBSIZE")),
    }  # fmt: skip


async def _until(done: Any, progress: Any, stall_s: float, poll_s: float = 0.2) -> bool:
    """Wait until ``done()``, or until ``progress()`` (any value that changes while work moves) stayed the same for
    ``stall_s``: bounded by progress, not by a deadline a loaded machine could miss while everything still flows."""
    last, since = progress(), time.monotonic()
    while not done():
        await asyncio.sleep(poll_s)
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > stall_s:
            return False
    return True


# ---- the load -----------------------------------------------------------------------------------------------------


class _Load:
    def __init__(self, cfg: SoakConfig, url: str) -> None:
        self.cfg = cfg
        self.url = url
        self.total = int(cfg.rate * cfg.duration_s)
        self.confirmed = bytearray(self.total)
        self.got = {f"g{i}": bytearray(self.total) for i in range(cfg.groups)}
        self.dups = dict.fromkeys(self.got, 0)
        self.window: list[float] = []
        self.deliveries = 0
        self.errors = 0
        self.max_lag = 0.0
        self.t0 = 0.0
        self.stop = asyncio.Event()

    async def connect(self) -> ClientConnection:
        return await websockets.connect(self.url, ping_interval=None, open_timeout=30, max_queue=None)

    async def consumer(self, ws: ClientConnection, group: str) -> None:
        got = self.got[group]
        await ws.send(orjson.dumps({"op": "subscribe", "topic": TOPIC, "group": group,
                                    "prefetch": self.cfg.prefetch}).decode())  # fmt: skip
        try:
            async for raw in ws:
                f = orjson.loads(raw)
                if f.get("op") != "message":
                    continue
                now = time.time()
                p = f["payload"]
                seq = p["s"]
                if got[seq]:
                    self.dups[group] += 1
                got[seq] = 1
                self.deliveries += 1
                self.window.append(now - p["t"])
                await ws.send(orjson.dumps({"op": "ack", "id": f["id"], "receipt": f["receipt"]}).decode())
        except ConnectionClosed:
            pass

    async def publisher(self, ws: ClientConnection, k: int) -> None:
        cfg = self.cfg
        pending: dict[int, int] = {}  # ref -> seq

        async def replies() -> None:
            try:
                async for raw in ws:
                    f = orjson.loads(raw)
                    seq = pending.pop(int(f.get("ref", -1)), None)
                    if seq is None:
                        continue
                    if f["op"] == "published":
                        self.confirmed[seq] = 1
                    else:
                        self.errors += 1
            except ConnectionClosed:
                pass

        reader = asyncio.create_task(replies())
        pad = "x" * max(0, cfg.payload_bytes - 40)
        try:
            for seq in range(k, self.total, cfg.publishers):
                at = self.t0 + seq / cfg.rate
                delay = at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    self.max_lag = max(self.max_lag, -delay)
                pending[seq] = seq
                frame = {"op": "publish", "ref": seq, "topic": TOPIC, "payload": {"s": seq, "t": time.time(), "p": pad}}
                await ws.send(orjson.dumps(frame).decode())
            await _until(lambda: not pending, lambda: len(pending), cfg.stall_s)  # the last confirmations
        except ConnectionClosed:
            pass
        finally:
            reader.cancel()


async def _traffic(cfg: SoakConfig, load: _Load, res: SoakResult, pubs: list[asyncio.Task[None]]) -> None:
    # a safety bound only: the publishers keep their schedule or send as fast as the machine lets them
    async with asyncio.timeout(cfg.duration_s * 5 + 10 * cfg.stall_s):
        await asyncio.gather(*pubs)
    published_at = time.monotonic()
    res.confirmed = sum(load.confirmed)
    res.achieved_rate = res.confirmed / max(1e-9, published_at - load.t0)
    want = res.confirmed * cfg.groups

    def delivered() -> int:
        return sum(sum(c & g for c, g in zip(load.confirmed, got, strict=True)) for got in load.got.values())

    # the drain: until every group got every confirmed message, or deliveries stopped moving (then: lost)
    await _until(lambda: delivered() == want, lambda: load.deliveries, cfg.stall_s, poll_s=1.0)


async def _settled(
    res: SoakResult, load: _Load, broker_pid: int, broker_port: int, redis_port: int
) -> dict[str, float]:
    """The last sample, once every ack is applied: Redis's keys back to what they were before the traffic, or no
    longer changing (10 s); the connections are still open, as they were for ``before``."""
    last, since = float(await _redis(redis_port, "DBSIZE")), time.monotonic()
    while last != res.before["redis_keys"] and time.monotonic() - since < 10:
        await asyncio.sleep(0.5)
        now = float(await _redis(redis_port, "DBSIZE"))
        if now != last:
            last, since = now, time.monotonic()
    return await _sample(time.monotonic() - load.t0, load.deliveries, broker_pid, broker_port, redis_port)


async def run(
    cfg: SoakConfig, url: str, broker_pid: int, broker_port: int, redis_port: int, log: Any = print
) -> SoakResult:
    load = _Load(cfg, url)
    res = SoakResult(asdict(cfg))
    n_consumers = cfg.connections - cfg.publishers
    conns: list[ClientConnection] = []
    sem = asyncio.Semaphore(50)

    async def open_one() -> ClientConnection:
        async with sem:
            return await load.connect()

    conns = list(await asyncio.gather(*(open_one() for _ in range(cfg.connections))))
    log(f"{len(conns)} connections open")
    tasks = [asyncio.create_task(load.consumer(ws, f"g{i % cfg.groups}")) for i, ws in enumerate(conns[:n_consumers])]
    await asyncio.sleep(2.0)  # the subscriptions are in (every group exists before the first publish)
    res.before = await _sample(0.0, 0, broker_pid, broker_port, redis_port)
    load.t0 = time.monotonic() + 0.5
    pubs = [asyncio.create_task(load.publisher(ws, k)) for k, ws in enumerate(conns[n_consumers:])]

    async def sampler() -> None:
        next_sample, next_window = load.t0, load.t0 + cfg.window_s
        while True:
            now = time.monotonic()
            if now >= next_window:
                w, load.window = load.window, []
                res.windows.append({"t": round(now - load.t0, 1), "n": len(w), "p50_ms": percentile(w, 0.5) * 1000,
                                    "p99_ms": percentile(w, 0.99) * 1000})  # fmt: skip
                next_window += cfg.window_s
            if now >= next_sample:
                try:
                    s = await _sample(now - load.t0, load.deliveries, broker_pid, broker_port, redis_port)
                except (OSError, TimeoutError, ValueError) as e:  # a /metrics or INFO that did not answer in 5 s
                    log(f"  t={now - load.t0:.0f}s: no sample ({e!r})")
                    next_sample += cfg.sample_s
                    continue
                res.samples.append(s)
                if len(res.samples) % max(1, int(60 / cfg.sample_s)) == 0:
                    log(f"  t={s['t']:.0f}s rss={s['rss_kb']:.0f}kB fds={s['fds']:.0f} tasks={s['tasks']:.0f} "
                        f"redis={s['redis_kb']:.0f}kB p99={res.windows[-1]['p99_ms'] if res.windows else 0:.1f}ms")
                next_sample += cfg.sample_s
            await asyncio.sleep(max(0.0, min(next_sample, next_window) - time.monotonic()))

    sampling = asyncio.create_task(sampler())
    try:
        await _traffic(cfg, load, res, pubs)
        res.after = await _settled(res, load, broker_pid, broker_port, redis_port)
    finally:
        sampling.cancel()
        for ws in conns:
            await ws.close()
        await asyncio.gather(*tasks, *pubs, sampling, return_exceptions=True)
    for group, got in load.got.items():
        res.lost[group] = sum(1 for c, g in zip(load.confirmed, got, strict=True) if c and not g)
        res.duplicates[group] = load.dups[group]
    res.publish_errors = load.errors
    res.deliveries = load.deliveries
    res.max_send_lag_ms = load.max_lag * 1000
    after = [s for s in res.samples if s["t"] >= cfg.warmup_s]
    for name in ("rss_kb", "fds", "tasks", "redis_kb"):
        res.slopes[name] = slope([(s["t"], s[name]) for s in after if not math.isnan(s[name])])
    return res


# ---- the verdict ---------------------------------------------------------------------------------------------------


def _fit(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Least squares y = a + k x: (a, k, standard deviation of the residuals)."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    k = sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0
    a = my - k * mx
    sd = math.sqrt(sum((y - a - k * x) ** 2 for x, y in points) / max(1, n - 2))
    return a, k, sd


def judge(res: SoakResult, floors: dict[str, float], k_noise: float = 4.0) -> dict[str, dict[str, float]]:
    """Does a resource grow with the work done? Per resource: its least-squares slope against the deliveries made
    (not against time: a loaded machine delivers less per second, a leak grows per message or per delivery),
    times the deliveries of the measured part (after the warm-up): ``growth``. The tolerance is ``k_noise`` times
    the noise seen in the second half of the warm-up (the residuals' standard deviation about their own line: the
    jitter of a resource that is already moving with the traffic), and never below ``floors[name]`` (a resource
    that did not move at all in the warm-up still may by a connection or a task). ``ok`` when growth <= tolerance.
    Redis memory follows the backlog (messages waiting), so its slope is reported only: Redis is judged by its
    keys and memory once everything was delivered and acked (``after`` against ``before``, see the test)."""
    warm = [s for s in res.samples if res.config["warmup_s"] / 2 <= s["t"] < res.config["warmup_s"]]
    meas = [s for s in res.samples if s["t"] >= res.config["warmup_s"]]
    out = {}
    for name, floor in floors.items():
        w = [(s["delivered"], s[name]) for s in warm if not math.isnan(s[name])]
        m = [(s["delivered"], s[name]) for s in meas if not math.isnan(s[name])]
        if len(w) < 3 or len(m) < 3:
            raise ValueError(f"too few samples to judge {name}: {len(w)} in the warm-up, {len(m)} after it")
        noise = _fit(w)[2]
        _, k, _ = _fit(m)
        growth = k * (m[-1][0] - m[0][0])
        tolerance = max(floor, k_noise * noise)
        out[name] = {"growth": growth, "noise": noise, "tolerance": tolerance, "per_1k_deliveries": k * 1000,
                     "ok": float(growth <= tolerance)}  # fmt: skip
    return out


# ---- the picture --------------------------------------------------------------------------------------------------

_GLYPHS = {  # 3x5, rows top to bottom
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "s": "000011110011110", "m": "000110111101101", " ": "000000000000000",
}  # fmt: skip


class _Canvas:
    def __init__(self, w: int, h: int) -> None:
        self.w, self.h = w, h
        self.px = bytearray(b"\xff" * (w * h * 3))

    def dot(self, x: int, y: int, rgb: tuple[int, int, int]) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = (y * self.w + x) * 3
            self.px[i : i + 3] = bytes(rgb)

    def line(self, x0: float, y0: float, x1: float, y1: float, rgb: tuple[int, int, int], thick: int = 1) -> None:
        steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for i in range(steps + 1):
            x = x0 + (x1 - x0) * i / steps
            y = y0 + (y1 - y0) * i / steps
            for dx in range(thick):
                for dy in range(thick):
                    self.dot(int(x) + dx, int(y) + dy, rgb)

    def text(self, x: int, y: int, s: str, scale: int = 2) -> None:
        for ch in s:
            g = _GLYPHS.get(ch, _GLYPHS[" "])
            for r in range(5):
                for c in range(3):
                    if g[r * 3 + c] == "1":
                        for dx in range(scale):
                            for dy in range(scale):
                                self.dot(x + c * scale + dx, y + r * scale + dy, (0, 0, 0))
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3 : (y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        ihdr = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def latency_png(windows: list[dict[str, float]]) -> bytes:
    """p99 (red) and p50 (blue) publish-to-delivery latency per window over time; x in s, y in ms."""
    w, h, left, right, top, bottom = 960, 420, 70, 20, 20, 40
    c = _Canvas(w, h)
    t_max = max((x["t"] for x in windows), default=1.0) or 1.0
    y_top = max((x["p99_ms"] for x in windows), default=1.0) * 1.1 or 1.0
    step = 10 ** math.floor(math.log10(y_top / 4)) if y_top > 0 else 1
    step *= 5 if y_top / step > 20 else 2 if y_top / step > 8 else 1

    def xy(t: float, v: float) -> tuple[float, float]:
        return left + (w - left - right) * t / t_max, h - bottom - (h - top - bottom) * v / y_top

    grid = 0.0
    while grid <= y_top:
        _, y = xy(0, grid)
        c.line(left, y, w - right, y, (225, 225, 225))
        c.text(4, int(y) - 5, f"{grid:g}")
        grid += step
    t_step = 60 if t_max > 180 else 10
    t = 0.0
    while t <= t_max:
        x, _ = xy(t, 0)
        c.line(x, top, x, h - bottom, (235, 235, 235))
        c.text(int(x) - 8, h - bottom + 8, f"{t:g}s")
        t += t_step
    c.line(left, h - bottom, w - right, h - bottom, (0, 0, 0))
    c.line(left, top, left, h - bottom, (0, 0, 0))
    c.text(4, top - 14, "ms")
    for key, rgb in (("p50_ms", (40, 90, 200)), ("p99_ms", (210, 40, 40))):
        pts = [xy(x["t"], x[key]) for x in windows]
        for (x0, y0), (x1, y1) in itertools.pairwise(pts):
            c.line(x0, y0, x1, y1, rgb, thick=2)
    return c.png()


# ---- command line -------------------------------------------------------------------------------------------------


async def _main(args: argparse.Namespace) -> SoakResult:
    from .procs import DEFAULT_BROKER_CMD, start_broker, start_redis, stop_all

    cfg = SoakConfig(connections=args.connections, publishers=args.publishers, groups=args.groups, rate=args.rate,
                     duration_s=args.duration, warmup_s=args.warmup)  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    try:
        redis = await start_redis(work, "everysec")
        broker = await start_broker(work, redis.url, cmd=DEFAULT_BROKER_CMD, log_level="warning", timeout_s=30,
                                    env_extra={})  # fmt: skip
        assert broker.proc.pid is not None
        res = await run(cfg, broker.ws_url, broker.proc.pid, broker.port, redis.port, log=print)
    finally:
        stop_all()
    return res


def _report(res: SoakResult, args: argparse.Namespace) -> int:
    print(res.text())
    floors = {"rss_kb": 0.02 * res.before.get("rss_kb", 0.0), "fds": 4.0, "tasks": 16.0}  # as tests/test_soak.py
    for name, v in judge(res, floors).items():
        print(f"{name}: {v['per_1k_deliveries']:+.3f} per 1,000 deliveries, {v['growth']:+.1f} over the measured "
              f"part (tolerance {v['tolerance']:.1f}: warm-up noise {v['noise']:.1f}) {'ok' if v['ok'] else 'GROWS'}")
    print(f"before the traffic: {res.before}\nafter it, all acked: {res.after}")
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(res), indent=1))
    if args.png:
        Path(args.png).write_bytes(latency_png(res.windows))
        print(f"wrote {args.png}")
    return 0 if not any(res.lost.values()) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=1_000)
    p.add_argument("--publishers", type=int, default=50)
    p.add_argument("--groups", type=int, default=3)
    p.add_argument("--rate", type=float, default=1_000.0, help="msg/s in all")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of publishing")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds left out of the slopes")
    p.add_argument("--png", help="write the latency over time here (e.g. docs/soak-latency.png)")
    p.add_argument("--json", help="write the whole result here")
    args = p.parse_args(argv)
    return _report(asyncio.run(_main(args)), args)


if __name__ == "__main__":
    sys.exit(main())
