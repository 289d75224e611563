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

from broker.store.cluster import eval_pass, is_cluster, load_script_where, node_of, sharded
from broker.store.gateway import Gateway, is_outage, is_refusal
from broker.store.replication import Wait, mark_unreplicated

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
            client = self.gateway.client
            text = sharded(load_script(name)) if is_cluster(client) else load_script(name)
            script = self._loaded[name] = client.register_script(text)
        return script

    async def call(self, name: str, keys: list[str], args: list[Any], what: str) -> Any:
        """One script call behind the gateway; an error reply raises (translated)."""
        (res,) = await self.run([(self.get(name), keys, args)], what)
        return res

    async def run(
        self,
        calls: Sequence[ScriptCall],
        what: str,
        *,
        keep_errors: bool = False,
        keep_refusals: bool = False,
        wait: Wait | None = None,
    ) -> list[Any]:
        """Many script calls in one pipeline behind the gateway. Without ``keep_errors`` the first error reply fails
        the call; with it, error replies come back in place as exception values (see ``eval_many``)."""

        async def go(_: aioredis.Redis) -> list[Any]:
            res = await self.eval_many(calls, keep_refusals=keep_refusals, wait=wait)
            if not keep_errors:
                for x in res:
                    if isinstance(x, Exception):
                        raise x
            return res

        return await self.gateway.call(go, what)

    async def eval_many(
        self, calls: Sequence[ScriptCall], keep_refusals: bool = False, wait: Wait | None = None
    ) -> list[Any]:
        """Run scripts in one pipeline by SHA (runs inside a gateway call: ``run``). redis-py's own script
        pipelining sends SCRIPT EXISTS first on every execute (a second round trip); instead, only calls answered
        NOSCRIPT (they did not run) are loaded and re-sent. Error replies come back as exception values, in place; a
        refusal (OOM, READONLY...) fails the whole call unless ``keep_refusals`` (the caller then handles each
        reply, e.g. claims that did run). With ``wait`` each round ends with ``WAIT`` (``replication.py``). On a
        cluster each call goes to the master of its first key's slot (``cluster.eval_pass``)."""
        r = self.gateway.client
        routed = is_cluster(r)
        if len(calls) == 1 and not keep_refusals and wait is None and not routed:
            return [await self._eval_one(*calls[0])]  # a plain EVALSHA costs a fraction of a pipeline's client work
        one_pass = eval_pass if routed else _eval_pass
        res, counts = await one_pass(r, [(s.sha, k, a) for s, k, a in calls], wait)
        again = [i for i, x in enumerate(res) if isinstance(x, NoScriptError)]
        if again:
            loaded: set[tuple[str, str]] = set()
            for i in again:
                script, keys, _ = calls[i]
                where = node_of(r, keys[0]).name if routed else ""
                if (script.sha, where) not in loaded:  # on a cluster only the master that lacks it
                    await (load_script_where(r, str(script.script), keys) if routed else r.script_load(script.script))
                    loaded.add((script.sha, where))
            redo = [(calls[i][0].sha, calls[i][1], calls[i][2]) for i in again]
            rewait = None if wait is None else Wait(wait.replicas, wait.timeout_ms, len(redo))
            res2, counts2 = await one_pass(r, redo, rewait)
            for i, x, n in zip(again, res2, counts2, strict=True):
                res[i], counts[i] = x, n
        res = mark_unreplicated(res, counts, wait)
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


async def _eval_pass(
    r: aioredis.Redis, calls: Sequence[tuple[str, list[str], list[Any]]], wait: Wait | None
) -> tuple[list[Any], list[int | None]]:
    """One round of script calls (sha, keys, args) in one pipeline on one connection, with ``WAIT`` at its end."""
    async with r.pipeline(transaction=False) as p:
        for sha, keys, args in calls:
            p.evalsha(sha, len(keys), *keys, *args)
        if wait is not None:
            p.execute_command(*wait.command)
        res: list[Any] = list(await p.execute(raise_on_error=False))
    if wait is None:
        return res, [None] * len(calls)
    got = res.pop()
    if isinstance(got, Exception):  # the connection failed after the writes: nothing is vouched for
        raise got
    return res, [int(got)] * len(calls)
