"""`broker stats --watch SECONDS` as an operator runs it, on a real redis-server: it prints the table again every
SECONDS (clearing the screen first), a refresh shows what changed in Redis since the one before, and Ctrl-C (SIGINT)
ends it at once with exit status 0 and no traceback.

Given a topic with a group holding 3 ready messages
When `broker stats --watch 0.3` runs (a subprocess, its stdout read as it comes), and 4 more are published
Then it refreshes (at least two screens, each cleared first), a later screen shows 7 ready; and SIGINT stops it
     within 5 s, exit 0, nothing on stderr.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from broker.core.config import Settings
from broker.core.model import PublishRequest
from broker.store import connect_redis

from .support import ROOT, RedisServer, make_store

CLEAR = "\033[2J\033[H"


async def _screens(out: asyncio.StreamReader, seen: list[str], until: str, timeout_s: float) -> None:
    """Read stdout until a screen (the text after a clear) contains ``until``."""
    buf = ""
    async with asyncio.timeout(timeout_s):
        while True:
            chunk = await out.read(4096)
            assert chunk, f"stats --watch ended early; saw {seen[-2:]}"
            buf += chunk.decode()
            *done, buf = buf.split(CLEAR)
            seen += [s for s in done if s]
            if any(until in s for s in seen) or until in buf:
                seen.append(buf)
                return


def _as_in_a_terminal() -> None:
    """SIGINT at its default, as in a terminal's foreground process: a test run started as a background job has it
    ignored, the child would inherit that, and Ctrl-C would then reach nothing (the test hung 5 s and failed)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def test_stats_watch_refreshes_and_stops_cleanly_on_sigint(redis_server: RedisServer) -> None:
    prefix = "watch"
    settings = Settings().replace("redis", key_prefix=prefix)
    store = make_store(connect_redis(redis_server.url, settings), settings)
    await store.ensure_group("orders", "billing")
    await store.publish_many([PublishRequest("orders", str(i)) for i in range(3)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_REDIS_KEY_PREFIX"] = prefix
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "stats", "--watch", "0.3", "--no-memory", "--redis-url", redis_server.url,
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=_as_in_a_terminal,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        seen: list[str] = []
        await _screens(proc.stdout, seen, "billing", 20)
        first = len(seen)
        await store.publish_many([PublishRequest("orders", str(i)) for i in range(4)])
        await _screens(proc.stdout, seen, " 7 ", 10)
        assert len(seen) > first, seen
        # Then: a row of the table, as it looks now
        row = next(s for s in seen if " 7 " in s)
        assert "orders" in row and "billing" in row, row
        # When: Ctrl-C
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 5)
        err = (await proc.stderr.read()).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        keys = [k async for k in store.redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await store.redis.delete(*keys)
        await store.close()
    print(f"screens={len(seen)} exit={code} stderr={err!r}")
    assert code == 0
    assert err == "", err
