"""Confirms that survive a failover (``redis.replicas_to_ack``): ``WAIT`` after the writes of a batch.

Redis replicates asynchronously: a master can answer a write and die before any replica has it, and the promoted
replica then never had it. With ``replicas_to_ack`` = n ≥ 1 the publish pipeline ends with ``WAIT n timeout`` on
the very connection that sent the writes (``WAIT`` counts the replicas that have everything *this connection*
wrote), one per master the batch touched on a cluster. A call whose master's ``WAIT`` answered fewer than n gets a
``NOREPLICAS`` error reply in place of its own: the same refusal Redis itself gives under ``min-replicas-to-write``,
so it travels the refusal path (``unavailable`` to the publisher, who retries with its idempotency key, so the retry
never duplicates; no breaker failure: the master is up). The write did happen and may survive; what is refused is
the promise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError


@dataclass(frozen=True, slots=True)
class Wait:
    """``WAIT replicas timeout_ms`` after the writes; it vouches for the first ``calls`` calls of the batch (the
    publishes; claims riding after them are not refused for it: a lost lease only means a redelivery)."""

    replicas: int
    timeout_ms: int
    calls: int

    @property
    def command(self) -> tuple[str, int, int]:
        return ("WAIT", self.replicas, self.timeout_ms)


def for_part(wait: Wait | None, idxs: Sequence[int]) -> Wait | None:
    """The ``WAIT`` for a part of a batch (the calls at ``idxs``, in order): it vouches for those among the batch's
    first ``wait.calls``, which come first in the part too (a redo pass, one master's share)."""
    if wait is None:
        return None
    return Wait(wait.replicas, wait.timeout_ms, sum(i < wait.calls for i in idxs))


def not_replicated(wait: Wait, got: int) -> ResponseError:
    return ResponseError(
        f"NOREPLICAS {got} of {wait.replicas} replicas confirmed the write within {wait.timeout_ms} ms; not confirmed"
    )


def mark_unreplicated(replies: list[Any], counts: Sequence[int | None], wait: Wait | None) -> list[Any]:
    """``replies`` with each of the first ``wait.calls`` successful ones whose master's ``WAIT`` count (``counts``,
    per call) is short replaced by a ``NOREPLICAS`` error reply."""
    if wait is None:
        return replies
    out = list(replies)
    for i in range(min(wait.calls, len(out))):
        got = counts[i]
        if not isinstance(out[i], Exception) and (got is None or got < wait.replicas):
            out[i] = not_replicated(wait, got or 0)
    return out


def moved_away(redirect: Exception) -> ResponseError:
    """The refusal for a call whose slot kept moving while a ``WAIT`` was to vouch for it (it did not run)."""
    return ResponseError(f"NOREPLICAS the slot moved ({redirect}) before the write could be confirmed; not confirmed")
