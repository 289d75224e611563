"""Incident class (seeds/000, seeds/003): a service restarted while its store was down exited or came up broken, and
stayed down until someone noticed. A broker node is restarted by its supervisor or an operator at any time,
including during a Redis outage (the chaos test met exactly that).

Guarantee: `broker serve` waits for an unreachable Redis at start (jittered backoff, a `redis_waiting` warning per
try), bounded by `redis.startup_wait_s`; it comes up by itself when Redis answers, and gives up loudly (one line,
exit 4) when Redis never does.

Given Redis cut off behind a proxy
When a broker starts, and Redis comes back once the broker has logged that it waits for it (read from its log, so
     no start-up time is assumed: on a loaded machine a broker can take seconds to reach Redis at all)
Then the broker becomes healthy and serves publishes; and with `startup_wait_s = 1` and Redis staying away, it
     exits 4 once its planned waits reach that bound (read from its log, not timed), its last line saying why,
     without a traceback.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any

import orjson

from broker.client import BrokerClient
from tests.brokers import ROOT, BrokerProcess
from tests.proxy import TcpProxy
from tests.support import RedisServer


def _restore_when_waiting(proxy: TcpProxy, broker: BrokerProcess, done: threading.Event, restored: list[str]) -> None:
    """Restore the path to Redis once the broker's log has a ``redis_waiting`` line (polled until ``done``, at most
    ``WAITING_BOUND_S``); ``restored`` gets that line. No line, no Redis: the broker cannot come up then."""
    deadline = time.monotonic() + WAITING_BOUND_S
    while not done.is_set() and time.monotonic() < deadline:
        lines = [x for x in broker.log_text().splitlines() if x.startswith("{") and '"redis_waiting"' in x]
        if lines:
            restored.append(lines[0])
            proxy.restore()
            return
        done.wait(0.05)


def _events(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in text.splitlines() if x.startswith("{")]


WAITING_BOUND_S = 60.0  # safety bound on the watcher only; the broker's own start is bounded by tests/brokers.py


async def test_a_broker_started_during_an_outage_comes_up_when_redis_does(redis: RedisServer) -> None:
    with TcpProxy(redis.port) as proxy:
        proxy.cut()
        broker = BrokerProcess(proxy.url)
        done, restored = threading.Event(), []
        watcher = threading.Thread(target=_restore_when_waiting, args=(proxy, broker, done, restored), daemon=True)
        watcher.start()
        try:
            broker.start()  # waits (bounded) for /healthz: it can only come once Redis is back
            done.set()
            watcher.join(5)
            assert restored, "the broker came up while Redis was cut off"
            names = [e["event"] for e in _events(broker.log_text())]
            assert "redis_waiting" in names and "broker_started" in names, names
            assert names.index("redis_waiting") < names.index("broker_started")
            async with BrokerClient(broker.url) as client:
                assert (await client.publish("up", 1)).id
        except BaseException:
            print(f"--- broker log ---\n{broker.log_tail(80)}")
            raise
        finally:
            done.set()
            watcher.join(5)
            broker.close()


def test_a_broker_gives_up_after_startup_wait_s_with_one_line(redis: RedisServer) -> None:
    with TcpProxy(redis.port) as proxy:
        proxy.cut()
        env = {"BROKER_REDIS_URL": proxy.url, "BROKER_REDIS_STARTUP_WAIT_S": "1", "BROKER_LOG_FORMAT": "json"}
        # the timeout is a safety bound only: a loaded machine takes seconds just to start Python
        p = subprocess.run(
            [sys.executable, "-m", "broker", "--config", str(ROOT / "config/broker.toml"), "serve", "--port", "0"],
            cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert p.returncode == 4, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    out = p.stdout + p.stderr
    assert "redis_waiting" in out and "Traceback" not in out, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("error (unavailable): redis unreachable"), last  # one line saying what failed
    # Bounded by startup_wait_s, not by the default 30 s, and no wall clock needed: the broker plans a wait only
    # while less than startup_wait_s has passed since its first try, and it has waited at least all the waits
    # before, so every planned wait but the last adds up to less than startup_wait_s (a slow machine makes fewer
    # tries, never more; each wait is logged rounded to 0.01 s).
    waits = [float(e["retry_in_s"]) for e in _events(out) if e.get("event") == "redis_waiting"]
    print(f"gave up after {len(waits) + 1} tries, waits {waits}")
    assert sum(waits[:-1]) < 1.0 + 0.005 * len(waits), waits
