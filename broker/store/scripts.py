"""Loading and calling the Lua scripts of ``scripts/`` (each one state transition; ``_lib.lua`` is prepended).

Scripts are called by SHA and reloaded on NOSCRIPT (a Redis restart or SCRIPT FLUSH forgets them). Many calls go
in one pipeline (``run``): one round trip for a publish to several topics, a sweep of many groups, an import.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from broker.store.gateway import Gateway, is_outage, is_refusal

ScriptCall = tuple[AsyncScript, list[str], list[Any]]  # (script, keys, args)


def load_script(name: str) -> str:
    lib = resources.files("broker.store").joinpath("scripts/_lib.lua").read_text()
    return lib + "\n" + resources.files("broker.store").joinpath(f"scripts/{name}.lua").read_text()


class Scripts:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._loaded: dict[str, AsyncScript] = {}

    def get(self, name: str) -> AsyncScript:
        """The script ``scripts/<name>.lua`` (registered on first use; the text is read once)."""
        script = self._loaded.get(name)
        if script is None:
            script = self._loaded[name] = self.gateway.client.register_script(load_script(name))
        return script

    async def call(self, name: str, keys: list[str], args: list[Any], what: str) -> Any:
        """One script call behind the gateway; an error reply raises (translated)."""
        script = self.get(name)

        async def go(_: aioredis.Redis) -> Any:
            return await script(keys=keys, args=args)  # EVALSHA, loading the script on NOSCRIPT

        return await self.gateway.call(go, what)

    async def run(
        self, calls: Sequence[ScriptCall], what: str, *, keep_errors: bool = False, keep_refusals: bool = False
    ) -> list[Any]:
        """Many script calls in one pipeline behind the gateway. Without ``keep_errors`` the first error reply fails
        the call; with it, error replies come back in place as exception values (see ``eval_many``)."""

        async def go(_: aioredis.Redis) -> list[Any]:
            res = await self.eval_many(calls, keep_refusals=keep_refusals)
            if not keep_errors:
                for x in res:
                    if isinstance(x, Exception):
                        raise x
            return res

        return await self.gateway.call(go, what)

    async def eval_many(self, calls: Sequence[ScriptCall], keep_refusals: bool = False) -> list[Any]:
        """Run scripts in one pipeline by SHA (runs inside a gateway call: ``run``). redis-py's own script
        pipelining sends SCRIPT EXISTS first on every execute (a second round trip); instead, only calls answered
        NOSCRIPT (they did not run) are loaded and re-sent. Error replies come back as exception values, in place; a
        refusal (OOM, READONLY...) fails the whole call unless ``keep_refusals`` (the caller then handles each
        reply, e.g. claims that did run)."""
        if len(calls) == 1 and not keep_refusals:  # a plain EVALSHA costs a fraction of a pipeline's client work
            return [await self._eval_one(*calls[0])]
        r = self.gateway.client
        async with r.pipeline(transaction=False) as p:
            for script, keys, args in calls:
                p.evalsha(script.sha, len(keys), *keys, *args)
            res: list[Any] = list(await p.execute(raise_on_error=False))
        again = [i for i, x in enumerate(res) if isinstance(x, NoScriptError)]
        if again:
            for script in {calls[i][0].sha: calls[i][0] for i in again}.values():
                await r.script_load(script.script)
            async with r.pipeline(transaction=False) as p:
                for i in again:
                    script, keys, args = calls[i]
                    p.evalsha(script.sha, len(keys), *keys, *args)
                for i, x in zip(again, await p.execute(raise_on_error=False), strict=True):
                    res[i] = x
        for x in res:  # an outage reaches the breaker as an exception; a refusal fails the call (not the breaker)
            if is_outage(x) or (not keep_refusals and isinstance(x, ResponseError) and is_refusal(x)):
                raise x
        return res

    async def _eval_one(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """``eval_many`` for one call: an error reply comes back as a value, an outage or refusal raises."""
        try:
            return await script(keys=keys, args=args)  # EVALSHA, loading the script on NOSCRIPT
        except ResponseError as e:
            if is_refusal(e):
                raise
            return e
