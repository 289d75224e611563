"""Redis ``INFO commandstats`` over a timed run of the broker: commands per message, deterministic where CPU times
are not (issue 14: "count what publish, claim and ack touch per message").

``CONFIG RESETSTAT`` at the start, ``INFO commandstats`` at the end; commands run inside scripts are counted by Redis
like any other (an ``EVALSHA`` and each ``redis.call`` it makes). Background work of the broker (heartbeats, the
sweep) is counted too: over thousands of messages it is a rounding error.
"""

from __future__ import annotations

from typing import Any

from .registry import ScenarioResult

SCRIPT_COMMANDS = ("evalsha", "eval", "fcall", "fcall_ro")
IGNORED = ("info", "config|resetstat", "config")


class CommandStats:
    def __init__(self, redis_url: str) -> None:
        self.url = redis_url
        self.calls: dict[str, int] = {}

    async def _client(self) -> Any:
        import redis.asyncio as aioredis

        return aioredis.Redis.from_url(self.url, decode_responses=True)

    async def start(self) -> None:
        if not self.url:
            return
        r = await self._client()
        try:
            await r.config_resetstat()
        finally:
            await r.aclose()

    async def stop(self) -> None:
        if not self.url:
            return
        r = await self._client()
        try:
            info = await r.info("commandstats")
        finally:
            await r.aclose()
        self.calls = {
            k.removeprefix("cmdstat_"): int(v["calls"])
            for k, v in info.items()
            if k.removeprefix("cmdstat_") not in IGNORED
        }

    def add(self, res: ScenarioResult, count: int) -> None:
        """``redis_cmds``: every command per message; ``redis_scripts``: script calls per message; the breakdown in
        the JSON (``redis_commands``)."""
        if not self.calls or not count:
            return
        res.add("redis_cmds", sum(self.calls.values()) / count, "cmd/msg", higher_is_better=False)
        scripts = sum(self.calls.get(k, 0) for k in SCRIPT_COMMANDS)
        res.add("redis_scripts", scripts / count, "call/msg", higher_is_better=False)
        res.extra["redis_commands"] = {
            k: round(v / count, 3) for k, v in sorted(self.calls.items(), key=lambda kv: -kv[1])
        }
