"""Benchmarks for the broker: scenarios S1-S3 plus a bare WebSocket relay and a NATS JetStream baseline.

Run ``python -m bench --help``. Everything runs on loopback; see ``bench/README.md``.
"""

from __future__ import annotations

__all__ = ["BenchError", "SetupError"]


class BenchError(Exception):
    """A scenario could not complete (timeout, lost connection, broker error reply, ...)."""


class SetupError(BenchError):
    """A process the benchmark needs (redis-server, broker, relay) could not be started."""
