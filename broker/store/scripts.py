"""Loading and calling the Lua scripts of ``scripts/`` (each one state transition, preceded by the part of
``_lib.lua`` it uses).

Scripts are called by SHA through the store's one pipelined connection (``pipe.ScriptPipe``): concurrent calls share
one write and one breaker call, and calls answered NOSCRIPT (a Redis restart or SCRIPT FLUSH forgets scripts) are
loaded and sent again. Many calls of one caller (``run``) stay together and in order: one round trip for a publish to
several topics with its riding claims, a sweep of many groups, an import.

Two kinds of calls bypass the pipe and go out as one pipeline of their own (``_eval_direct``): on a Redis Cluster
every call (split per master, each master's part behind its own breaker: ``_eval_routed``, ``breakers.py``), and a
publish batch that must be followed by ``WAIT`` (``redis.replicas_to_ack``): ``WAIT`` blocks the connection it is
sent on, and the pipe's connection is every caller's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import MovedError, NoScriptError, ResponseError, SlotNotCoveredError

from broker.core.errors import UnavailableError
from broker.store.cluster import (
    eval_pass,
    is_cluster,
    load_script_where,
    node_of,
    ready,
    sharded,
)
from broker.store.gateway import Gateway, is_refusal, raise_outages
from broker.store.lua_lib import with_lib
from broker.store.migration import settle
from broker.store.pipe import ScriptCall, ScriptPipe
from broker.store.replication import Wait, for_part, mark_unreplicated, moved_away

__all__ = ["ScriptCall", "Scripts", "load_script"]

# Passes after the first for calls that did not run (NOSCRIPT, a slot that moved): a failover can need two (MOVED to
# the promoted replica, then NOSCRIPT there).
_REDO_PASSES = 3


def load_script(name: str) -> str:
    """The script's text, preceded by the definitions of ``_lib.lua`` it uses (``lua_lib.with_lib``)."""
    lib = resources.files("broker.store").joinpath("scripts/_lib.lua").read_text()
    return with_lib(lib, resources.files("broker.store").joinpath(f"scripts/{name}.lua").read_text())


class Scripts:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.pipe = ScriptPipe(gateway)
        self._loaded: dict[str, AsyncScript] = {}

    @property
    def on_cluster(self) -> bool:
        return is_cluster(self.gateway.client)

    def get(self, name: str) -> AsyncScript:
        """The script ``scripts/<name>.lua`` (registered on first use; the text is read once)."""
        script = self._loaded.get(name)
        if script is None:
            client = self.gateway.client
            text = sharded(load_script(name)) if is_cluster(client) else load_script(name)
            script = self._loaded[name] = client.register_script(text)
        return script

    async def call(self, name: str, keys: list[str], args: list[Any], what: str, *, ride: bool = False) -> Any:
        """One script call; an error reply raises (translated). ``ride``: see ``run``."""
        (res,) = await self.run([(self.get(name), keys, args)], what, ride=ride)
        return res

    async def run(
        self,
        calls: Sequence[ScriptCall],
        what: str,
        *,
        keep_errors: bool = False,
        keep_refusals: bool = False,
        wait: Wait | None = None,
        ride: bool = False,
    ) -> list[Any]:
        """Many script calls in one round trip, in order. Without ``keep_errors`` the first error reply fails the
        call (translated: ``StoreRefusedError`` for a refusal, else ``BrokerError``); with it, error replies come back
        in place as exception values (see ``eval_many``). ``ride``: nobody waits on the answer soon, so on a single
        Redis the calls share the pipe's next write (``ScriptPipe``, riders) instead of one of their own."""
        res = await self.eval_many(calls, keep_refusals=keep_refusals, what=what, wait=wait, ride=ride)
        if not keep_errors:
            for x in res:
                if isinstance(x, Exception):
                    raise self.gateway.reply_error(x, what)
        return res

    async def eval_many(
        self,
        calls: Sequence[ScriptCall],
        keep_refusals: bool = False,
        what: str = "script",
        wait: Wait | None = None,
        ride: bool = False,
    ) -> list[Any]:
        """Run scripts by SHA in one round trip (``ScriptPipe``; on a cluster or with ``wait``, ``_eval_direct``).
        Error replies come back as exception values, in place; a refusal (OOM, READONLY...) fails the whole call
        (``StoreRefusedError``) unless ``keep_refusals`` (the caller then handles each reply, e.g. claims that did
        run). An outage raises ``UnavailableError``; on a cluster, a master's outage (or its open breaker) puts the
        ``UnavailableError`` in the place of each of its calls instead (``_eval_routed``). With ``wait`` the batch
        ends with ``WAIT`` (``replication.py``)."""
        if self.gateway.masters is not None:

            def routed(some: Sequence[ScriptCall], w: Wait | None) -> Awaitable[list[Any]]:
                return self._eval_routed(some, what, w)

            # calls refused because their slot is moving (resharding) go again, outside the breaker (migration.py)
            res = await settle(await routed(calls, wait), calls, wait, routed, what)
        elif wait is not None:

            def direct(some: Sequence[ScriptCall], w: Wait | None) -> Awaitable[list[Any]]:
                return self.gateway.call(lambda r: self._eval_direct(r, some, w), what)

            res = await settle(await direct(calls, wait), calls, wait, direct, what)
        else:
            res = await self.pipe.run(calls, what, ride)
        if not keep_refusals:
            for x in res:
                if isinstance(x, ResponseError) and is_refusal(x):
                    raise self.gateway.reply_error(x, what)
        return res

    async def _eval_routed(self, calls: Sequence[ScriptCall], what: str, wait: Wait | None) -> list[Any]:
        """On a cluster: the calls split by the master of their topic's slot, each master's part in one pipeline
        behind that master's breaker, the masters in parallel. A master that fails (or whose breaker is open) fails
        only its own calls: each gets the ``UnavailableError`` in its place (its topic's callers answer
        ``unavailable``; the other masters' calls are answered as usual). A call redirected to another master
        (a failover, ``MOVED``) is followed within its part, behind the breaker it was routed to first."""
        assert self.gateway.masters is not None
        if not calls:
            return []
        client = self.gateway.client
        await self.gateway.call(ready, what)  # the slot map (a no-op once known; behind no master's breaker)
        parts: dict[str, list[int]] = {}
        out: list[Any] = [None] * len(calls)
        for i, (_, keys, _) in enumerate(calls):
            try:
                parts.setdefault(node_of(client, keys[0]).name, []).append(i)
            except SlotNotCoveredError as e:  # no master serves the slot now (a failover under way): an outage
                out[i] = UnavailableError(f"redis unreachable during {what}: {e}", retry_after_ms=1_000)
        if not parts:
            return out
        if len(parts) == 1 and len(calls) == len(next(iter(parts.values()))):  # one master: no split
            ((master, _),) = parts.items()
            try:
                return await self._eval_on(master, calls, what, wait)
            except UnavailableError as e:
                return [e] * len(calls)
        idxs = list(parts.values())
        got = await asyncio.gather(
            *(
                self._eval_on(m, [calls[i] for i in ix], what, for_part(wait, ix))
                for m, ix in zip(parts, idxs, strict=True)
            ),
            return_exceptions=True,
        )
        for ix, one in zip(idxs, got, strict=True):
            if isinstance(one, UnavailableError):
                for i in ix:
                    out[i] = one
            elif isinstance(one, BaseException):
                raise one  # a bug or a cancellation: the whole call fails as before
            else:
                for i, x in zip(ix, one, strict=True):
                    out[i] = x
        return out

    async def _eval_on(self, master: str, calls: Sequence[ScriptCall], what: str, wait: Wait | None) -> list[Any]:
        assert self.gateway.masters is not None
        breaker = self.gateway.masters.of(master)
        return await self.gateway.call(lambda r: self._eval_direct(r, calls, wait), what, breaker)

    async def _eval_direct(self, r: aioredis.Redis, calls: Sequence[ScriptCall], wait: Wait | None) -> list[Any]:
        """Script calls in one pipeline of their own (inside a gateway call). Calls that did not run are sent again,
        with their own ``WAIT``: those answered NOSCRIPT (a restarted Redis, a promoted replica) once their script is
        loaded (on a cluster, on the master that lacks it only), and on a cluster those answered MOVED (the pass does
        not follow redirections, ``cluster.eval_pass``). A call still MOVED after a few passes (a slot that keeps
        moving) is refused (``replication.moved_away``): the publisher retries with its idempotency key; one still
        sent away by ASK (its slot is migrating) is left for ``migration.settle``."""
        routed = is_cluster(r)
        one_pass = eval_pass if routed else _eval_pass
        res, counts = await one_pass(r, [(s.sha, k, a) for s, k, a in calls], wait)
        for _ in range(_REDO_PASSES):
            again = [i for i, x in enumerate(res) if isinstance(x, (NoScriptError, MovedError))]
            if not again:
                break
            loaded: set[tuple[str, str]] = set()
            for i in again:
                script, keys, _ = calls[i]
                where = node_of(r, keys[0]).name if routed else ""
                if isinstance(res[i], NoScriptError) and (script.sha, where) not in loaded:
                    await (load_script_where(r, str(script.script), keys) if routed else r.script_load(script.script))
                    loaded.add((script.sha, where))
            redo = [(calls[i][0].sha, calls[i][1], calls[i][2]) for i in again]
            res2, counts2 = await one_pass(r, redo, for_part(wait, again))
            for i, x, n in zip(again, res2, counts2, strict=True):
                res[i], counts[i] = x, n
        res = [moved_away(x) if isinstance(x, MovedError) else x for x in res]  # ASK: the slot moves, settle() waits
        raise_outages(res)  # an outage reaches the breaker as an exception
        return mark_unreplicated(res, counts, wait)

    async def close(self) -> None:
        await self.pipe.close()


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
    if isinstance(got, Exception) and not isinstance(got, ResponseError):
        raise got  # the connection failed after the writes: their fate is unknown, an outage
    # an error reply (e.g. this Redis was made a replica) vouches for nothing: the publishes are refused
    return res, [got if isinstance(got, int) else None] * len(calls)
