"""The JavaScript client in headless Chromium vs the Python client, S1-shaped, against the same broker in one run.

    .venv/bin/python -m bench.browser_client                       # 50,000 x 256 B, 3 interleaved pairs
    .venv/bin/python -m bench.browser_client --messages 5000 --repeat 1   # smoke run

Each run: a fresh topic, one publishing connection (at most ``--window`` unconfirmed: that many publish lanes, each
awaiting its confirm before the next publish) and one consuming connection (one group, prefetch ``--prefetch``, one
ack per message, not waited for), in one process: the Python client (``broker.client``, on this process's event
loop) or the JavaScript client (``/client/broker.js`` imported by a page on the broker's origin, the browser's own
WebSocket). Payloads are ``{"s": seq, "p": "x..."}`` padded to exactly 256 bytes of JSON. Done = every sequence
number received once and a ``ping`` after the last ack answered; the clock runs from the first publish to then.
Runs alternate (Python first, then JavaScript first) after one untimed warm-up of each. Reported per run: msg/s,
the broker's CPU seconds per 1,000 messages, and the client side's CPU seconds per 1,000 messages (this process for
Python; every Chromium process of this run's browser for JavaScript, also split by role: browser, renderer, network
service, other).

Unlike the scenarios of ``python -m bench``, this imports the Python client (it is what is measured). Chromium is
Debian's (``/usr/bin/chromium``, or ``BROKER_CHROMIUM``), driven by Playwright (a dev dependency); redis-server and
the broker are started as in the other scenarios (AOF everysec, log level warning). Everything is bounded: a
deadline per run (``--run-timeout``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench import cpumon, procs
from broker.client.client import BrokerClient

CHROMIUM = os.environ.get("BROKER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAYLOAD_BYTES = 256
PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>bench</title></head><body>
<script type="module">
import * as broker from "/client/broker.js";
window.broker = broker;
window.wsUrl = "ws://" + location.host + "/";
window.brokerReady = true;
</script></body></html>"""

JS_RUN = """async ({topic, n, win, prefetch, size}) => {
  const payload = (s) => ({s, p: "x".repeat(size - JSON.stringify({s, p: ""}).length)});
  const pub = await broker.connect(wsUrl);
  const con = await broker.connect(wsUrl);
  const sub = await con.subscribe(topic, {group: "bench", prefetch});
  const seen = new Uint8Array(n);
  const out = {got: 0, dup: 0, ackErrors: 0, confirmed: 0};
  const t0 = performance.now();
  const consumed = (async () => {
    for await (const m of sub) {
      const s = m.payload.s;
      if (seen[s]) out.dup++; else { seen[s] = 1; out.got++; }
      m.ack().catch(() => { out.ackErrors++; });
      if (out.got === n) break;
    }
    await con.ping();
  })();
  let next = 0;
  const lane = async () => {
    while (next < n) {
      const s = next++;
      await pub.publish(topic, payload(s));
      out.confirmed++;
    }
  };
  await Promise.all(Array.from({length: Math.min(win, n)}, lane));
  await consumed;
  out.wallS = (performance.now() - t0) / 1000;
  await pub.close();
  await con.close();
  return out;
}"""


def payload(s: int) -> dict[str, Any]:
    base = len(json.dumps({"s": s, "p": ""}, separators=(",", ":")))
    return {"s": s, "p": "x" * (PAYLOAD_BYTES - base)}


async def python_run(url: str, topic: str, n: int, win: int, prefetch: int) -> dict[str, Any]:
    out = {"got": 0, "dup": 0, "ackErrors": 0, "confirmed": 0}
    async with BrokerClient(url) as pub, BrokerClient(url) as con:
        sub = await con.subscribe(topic, "bench", prefetch=prefetch)
        seen = bytearray(n)
        t0 = time.perf_counter()

        async def consume() -> None:
            async for m in sub:
                s = m.payload["s"]
                if seen[s]:
                    out["dup"] += 1
                else:
                    seen[s] = 1
                    out["got"] += 1
                try:
                    await m.ack()
                except Exception:
                    out["ackErrors"] += 1
                if out["got"] == n:
                    break
            await con.ping()

        consumer = asyncio.create_task(consume())
        nxt = 0

        async def lane() -> None:
            nonlocal nxt
            while nxt < n:
                s = nxt
                nxt += 1
                await pub.publish(topic, payload(s))
                out["confirmed"] += 1

        await asyncio.gather(*(lane() for _ in range(min(win, n))))
        await consumer
        out["wallS"] = time.perf_counter() - t0
    return out


def descendants(root: int) -> list[int]:
    """Pids of every process below ``root`` (from /proc: ppid links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def chromium_pids() -> dict[str, list[int]]:
    """This run's Chromium processes by role: ``browser``, ``renderer``, ``network`` (the network service, a
    utility process), ``other`` (gpu, zygotes, other utilities)."""
    roles: dict[str, list[int]] = {}
    for pid in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if not f.read().strip().startswith(("chromium", "chrome")):
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").replace("\0", " ").split()  # Chromium rewrites its title
        except OSError:
            continue
        kind = next((a.split("=", 1)[1] for a in argv if a.startswith("--type=")), "browser")
        if kind == "utility":
            kind = "network" if any("network.mojom.NetworkService" in a for a in argv) else "other"
        elif kind != "renderer" and kind != "browser":
            kind = "other"
        roles.setdefault(kind, []).append(pid)
    return roles


async def main_async(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    from playwright.async_api import async_playwright

    workdir = Path(tempfile.mkdtemp(prefix="bench-browser-"))
    redis = await procs.start_redis(workdir, "everysec")
    broker = await procs.start_broker(
        workdir, redis.url, cmd=procs.DEFAULT_BROKER_CMD, log_level="warning", timeout_s=30, env_extra={}
    )
    url = broker.ws_url + "/"
    origin = f"http://{procs.LOOPBACK}:{broker.port}"
    rows: list[dict[str, Any]] = []
    ok = True
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = await browser.new_page()
            await page.goto(origin + "/healthz")  # the broker's origin (and its loopback address space)
            await page.set_content(PAGE)
            await page.wait_for_function("() => window.brokerReady === true", timeout=30_000)
            browser_pids = chromium_pids()

            async def one(client: str, n: int) -> dict[str, Any]:
                topic = f"bench.browser.{uuid.uuid4().hex[:8]}"
                server = [broker.proc.pid] if broker.proc.pid else []
                meter = cpumon.CpuMeter({"broker": server, **(browser_pids if client == "js" else {})})
                py0 = time.process_time()
                meter.start()
                async with asyncio.timeout(args.run_timeout):
                    if client == "js":
                        r = await page.evaluate(
                            JS_RUN,
                            {"topic": topic, "n": n, "win": args.window, "prefetch": args.prefetch,
                             "size": PAYLOAD_BYTES},
                        )  # fmt: skip
                    else:
                        r = await python_run(url, topic, n, args.window, args.prefetch)
                cpu = meter.stop()
                chromium = {k: v for k, v in cpu.items() if k != "broker"}
                client_cpu = sum(chromium.values()) if client == "js" else time.process_time() - py0
                return {
                    "chromium_cpu_s_per_1k": {k: v * 1000 / n for k, v in chromium.items()},
                    "client": client,
                    "messages": n,
                    **r,
                    "msg_per_s": n / r["wallS"],
                    "broker_cpu_s_per_1k": cpu.get("broker", 0.0) * 1000 / n,
                    "client_cpu_s_per_1k": client_cpu * 1000 / n,
                }

            for client in ("python", "js"):  # warm-up, untimed
                await one(client, args.warmup)
            for i in range(args.repeat):
                for client in ("python", "js") if i % 2 == 0 else ("js", "python"):
                    row = await one(client, args.messages)
                    rows.append(row)
                    good = (row["got"], row["dup"], row["ackErrors"], row["confirmed"]) == (
                        args.messages, 0, 0, args.messages
                    )  # fmt: skip
                    ok &= good
                    print(
                        f"{client:>6}: {row['msg_per_s']:8.0f} msg/s  wall {row['wallS']:6.2f} s  "
                        f"broker CPU {row['broker_cpu_s_per_1k'] * 1000:.0f} ms/1k  "
                        f"client CPU {row['client_cpu_s_per_1k'] * 1000:.0f} ms/1k  "
                        + "".join(f"{k} {v * 1000:.0f} " for k, v in sorted(row["chromium_cpu_s_per_1k"].items()))
                        + f"{'ok' if good else 'CHECK FAILED: ' + json.dumps(row)}",
                        flush=True,
                    )
            await browser.close()
    finally:
        await broker.proc.stop()
        await redis.proc.stop()

    med = {c: statistics.median(r["msg_per_s"] for r in rows if r["client"] == c) for c in ("python", "js")}
    ratio = med["js"] / med["python"]
    print(
        f"median: python {med['python']:.0f} msg/s, js (Chromium) {med['js']:.0f} msg/s, "
        f"js/python = {ratio:.2f} (target >= 0.8)"
    )
    return (0 if ok else 1), {"runs": rows, "median": med, "ratio": ratio}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.browser_client", description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=50_000)
    p.add_argument("--window", type=int, default=1_000, help="unconfirmed publishes at most")
    p.add_argument("--prefetch", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3, help="interleaved python/js pairs")
    p.add_argument("--warmup", type=int, default=2_000)
    p.add_argument("--run-timeout", type=float, default=300.0, help="seconds, per run")
    p.add_argument("--json", help="write the runs here")
    args = p.parse_args()
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        sys.exit(f"no Chromium at {CHROMIUM} (scripts/bootstrap.sh installs Debian's chromium; or set BROKER_CHROMIUM)")
    code, result = asyncio.run(main_async(args))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    sys.exit(code)


if __name__ == "__main__":
    main()
