"""The web console at ``/console``: its pages and its JSON API, built on the operator library (``broker/ops``) the CLI
uses, so the console and ``broker stats`` / ``broker dlq`` / ``broker message`` can never disagree.

A layer of its own between ops and cli: the node serves it but sits below ops, so ``broker serve`` hands ``mount``
to the node (``Broker(settings, console=mount)``), which calls it once its store is up. Who may call it is decided
by the node's ``console_gate`` before a request gets here. See docs/console.md.
"""

from __future__ import annotations

from broker.console.api import Console
from broker.node.console_gate import ConsoleContext

__all__ = ["Console", "mount"]


def mount(ctx: ConsoleContext) -> Console:
    return Console(ctx)
