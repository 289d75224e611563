"""The store's own cost per message, without WebSockets: publish -> claim -> ack through ``RedisStore`` against a
throwaway redis-server, with the CPU seconds of this Python process and of the redis-server, and Redis's
``INFO commandstats``. Unlike the rest of ``bench`` this imports the broker (the store layer is what it measures), so
it measures whichever checkout is first on ``PYTHONPATH``: ``bench/ab_store.sh`` runs an old commit against the
working tree, interleaved.

Shapes (every call is awaited, so each is a fixed sequence of calls whatever the machine's load):
- ``batch``: 100 messages per call: ``publish_many`` of 100, ``claim`` of 100, ``ack_many`` of 100 (S1 under load);
- ``single``: one message per call, one call at a time (a lightly loaded broker: each message's calls go alone);
- ``concurrent``: 20 workers, each ``single`` on a topic of its own, at the same time (calls that meet in flight).

``--listen``: the store's wake-up listener runs meanwhile, as in a broker node alone (the notes of its own
publishes reach it and are dropped, where the checkout sends them). ``--transport unix``: the store reaches the
redis-server it starts through a Unix socket (``unix://``) instead of loopback TCP (a checkout from before the
packing connection took ``unix://`` gets redis-py's own connection there).

``--instructions``: the redis-server runs under valgrind's callgrind, counting the instructions executed inside
``EVALSHA`` (the scripts, their ``redis.call``s and commands; not the socket I/O, the AOF or the event loop) over the
timed part: ``redis_script_instructions_per_msg``, deterministic where CPU seconds on a shared machine are not (a
change of a script shows in one run). About 50 times slower: a few hundred messages are enough.

    PYTHONPATH=. .venv/bin/python bench/storecost.py --shape single --messages 5000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import structlog

from broker.core.config import Settings
from broker.core.model import AckItem, PublishRequest
from broker.runtime.resilience import Breaker
from broker.store import RedisStore, connect_redis

PAYLOAD = '{"p":"' + "x" * 240 + '"}'


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_pid(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime (fields 14, 15), in clock ticks of 10 ms


async def cycle(store: RedisStore, topic: str, n: int) -> None:
    await store.publish_many([PublishRequest(topic, PAYLOAD, "{}", None) for _ in range(n)])
    got = await store.claim(topic, "default", n, 30_000, f"c-{topic}")
    assert len(got) == n, (len(got), n)
    res = await store.ack_many(topic, "default", [AckItem(d.id, d.receipt) for d in got])
    assert all(res), res


def callgrind(pid: int, command: str, out: Path) -> int:
    """``callgrind_control -z`` (zero the counters) or ``-d`` (dump them, and return the instructions counted since
    the last zero: the newest dump file's total)."""
    subprocess.run(["callgrind_control", command, str(pid)], check=True, capture_output=True)
    if command == "-z":
        return 0
    newest = max(out.parent.glob(out.name + ".*"), key=lambda f: int(f.suffix[1:]))
    for line in newest.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {newest}")


async def run(
    shape: str, messages: int, port: int, listen: bool = False, url: str = "", instructions: Path | None = None
) -> dict[str, Any]:
    settings = Settings()
    store = RedisStore(
        connect_redis(url or f"redis://127.0.0.1:{port}/0", settings),
        settings,
        Breaker("redis", fail_max=5, reset_timeout_s=60, call_timeout_s=3.0),
        "cost",
    )
    topics = [f"cost{i}" for i in range(20 if shape == "concurrent" else 1)]
    for t in topics:
        await store.ensure_group(t, "default")
    listening = True
    listener = (
        asyncio.create_task(store.listen_wakes(lambda _t: None, lambda: None, lambda: listening)) if listen else None
    )
    for t in topics:  # warm up: scripts loaded, connections open
        await cycle(store, t, 10)
    admin = aioredis.Redis(port=port, decode_responses=True)
    info = await admin.info("server")
    redis_pid = int(info["process_id"])
    await admin.config_resetstat()
    if instructions is not None:
        callgrind(redis_pid, "-z", instructions)
    c0, r0, t0 = cpu_self(), cpu_pid(redis_pid), time.perf_counter()
    if shape == "batch":
        for _ in range(messages // 100):
            await cycle(store, topics[0], 100)
    elif shape == "single":
        for _ in range(messages):
            await cycle(store, topics[0], 1)
    else:
        per = messages // len(topics)

        async def worker(t: str) -> None:
            for _ in range(per):
                await cycle(store, t, 1)

        await asyncio.gather(*(worker(t) for t in topics))
    c1, r1, t1 = cpu_self(), cpu_pid(redis_pid), time.perf_counter()
    ir = callgrind(redis_pid, "-d", instructions) if instructions is not None else None
    stats = await admin.info("commandstats")
    if listener is not None:
        listening = False
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
    await admin.aclose()
    await store.close()
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
    calls.pop("info", None)
    return {
        "shape": shape + ("+listen" if listen else ""),
        "transport": "unix" if url.startswith("unix://") else "tcp",
        "messages": messages,
        "python_us_per_msg": round((c1 - c0) * 1e6 / messages, 1),
        "redis_us_per_msg": round((r1 - r0) * 1e6 / messages, 1),
        "msg_per_s": round(messages / (t1 - t0)),
        "redis_cmds_per_msg": round(sum(calls.values()) / messages, 2),
        "commands_per_msg": {k: round(v / messages, 3) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])},
        **({} if ir is None else {"redis_script_instructions_per_msg": round(ir / messages)}),
    }


def wait_ready(port: int, timeout_s: float = 60.0) -> None:
    """Until the redis-server answers PING (under valgrind it takes seconds to start)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server on port {port} did not start")
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["batch", "single", "concurrent"], default="single")
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--listen", action="store_true", help="run the store's wake-up listener meanwhile")
    ap.add_argument("--redis-port", type=int, default=0, help="a throwaway redis-server (default: start one)")
    ap.add_argument("--transport", choices=["tcp", "unix"], default="tcp", help="how the store reaches the one started")
    ap.add_argument("--instructions", action="store_true", help="count the scripts' instructions (callgrind)")
    a = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))  # stdout is the JSON
    port, proc, tmp, url, out = a.redis_port, None, None, "", None
    assert not (a.instructions and port), "--instructions starts its own redis-server under valgrind"
    if not port:
        exe = shutil.which("redis-server")
        assert exe, "redis-server not on PATH"
        tmp = tempfile.TemporaryDirectory()
        port = free_port()
        argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"]
        argv += ["--appendfsync", "everysec", "--dir", tmp.name, "--logfile", ""]
        if a.transport == "unix":
            argv += ["--unixsocket", f"{tmp.name}/redis.sock", "--unixsocketperm", "700"]
            url = f"unix://{tmp.name}/redis.sock?db=0"
        if a.instructions:
            out = Path(tmp.name) / "callgrind.out"
            cg = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--toggle-collect=evalGenericCommand"]
            argv = cg + argv
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ready(port)
    try:
        print(json.dumps(asyncio.run(asyncio.wait_for(run(a.shape, a.messages, port, a.listen, url, out), 1800))))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
