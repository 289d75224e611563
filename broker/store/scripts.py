"""Loading and calling the Lua scripts of ``scripts/`` (each one state transition; ``_lib.lua`` is prepended).

Scripts are called by SHA through the store's one pipelined connection (``pipe.ScriptPipe``): concurrent calls share
one write and one breaker call, and calls answered NOSCRIPT (a Redis restart or SCRIPT FLUSH forgets scripts) are
loaded and sent again. Many calls of one caller (``run``) stay together and in order: one round trip for a publish to
several topics with its riding claims, a sweep of many groups, an import.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from broker.store.gateway import Gateway, is_refusal
from broker.store.pipe import ScriptCall, ScriptPipe

__all__ = ["ScriptCall", "Scripts", "load_script"]


def load_script(name: str) -> str:
    lib = resources.files("broker.store").joinpath("scripts/_lib.lua").read_text()
    return lib + "\n" + resources.files("broker.store").joinpath(f"scripts/{name}.lua").read_text()


class Scripts:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.pipe = ScriptPipe(gateway)
        self._loaded: dict[str, AsyncScript] = {}

    def get(self, name: str) -> AsyncScript:
        """The script ``scripts/<name>.lua`` (registered on first use; the text is read once)."""
        script = self._loaded.get(name)
        if script is None:
            script = self._loaded[name] = self.gateway.client.register_script(load_script(name))
        return script

    async def call(self, name: str, keys: list[str], args: list[Any], what: str) -> Any:
        """One script call; an error reply raises (translated)."""
        (res,) = await self.run([(self.get(name), keys, args)], what)
        return res

    async def run(
        self, calls: Sequence[ScriptCall], what: str, *, keep_errors: bool = False, keep_refusals: bool = False
    ) -> list[Any]:
        """Many script calls in one round trip, in order. Without ``keep_errors`` the first error reply fails the
        call (translated: ``StoreRefusedError`` for a refusal, else ``BrokerError``); with it, error replies come back
        in place as exception values (see ``eval_many``)."""
        res = await self.eval_many(calls, keep_refusals=keep_refusals, what=what)
        if not keep_errors:
            for x in res:
                if isinstance(x, Exception):
                    raise self.gateway.reply_error(x, what)
        return res

    async def eval_many(
        self, calls: Sequence[ScriptCall], keep_refusals: bool = False, what: str = "script"
    ) -> list[Any]:
        """Run scripts by SHA in one round trip (``ScriptPipe``). Error replies come back as exception values, in
        place; a refusal (OOM, READONLY...) fails the whole call (``StoreRefusedError``) unless ``keep_refusals``
        (the caller then handles each reply, e.g. claims that did run). An outage raises ``UnavailableError``."""
        res = await self.pipe.run(calls, what)
        if not keep_refusals:
            for x in res:
                if isinstance(x, ResponseError) and is_refusal(x):
                    raise self.gateway.reply_error(x, what)
        return res

    async def close(self) -> None:
        await self.pipe.close()
