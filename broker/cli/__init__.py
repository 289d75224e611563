"""The ``broker`` command: argument parsing and printing over the library code in ``broker.ops`` and ``broker.node``."""

from broker.cli.main import main

__all__ = ["main"]
