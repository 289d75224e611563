"""A first delivery's lease record: one field of ``<gb>held`` (``GroupKeys.held``), id -> ``<receipt>|<node>|<consumer>|
<key>``, written by ``claim.lua`` for a message claimed for the first time in its group (attempt 1) instead of a
delivery hash, and deleted by its ack (docs/keys.md, "First deliveries"). Its lease deadline is its score in
``<gb>leased``. The readers of delivery state (``broker message ID``, export, ``holders``, ``diagnose``) see it as
the delivery hash it stands for, so what they report does not depend on which of the two holds a lease.
"""

from __future__ import annotations

from collections.abc import Mapping


def held_state(value: str | None, deadline: float | None = None) -> dict[str, str]:
    """The delivery-hash fields a held lease stands for (``{}`` for None): attempts 1, claims 1, receipt, node,
    consumer, key and, given the lease's score, leased_until: what claim.lua writes for a later attempt."""
    if value is None:
        return {}
    receipt, node, consumer, okey = [*value.split("|", 3), "", "", ""][:4]
    out = {"attempts": "1", "claims": "1", "receipt": receipt, "consumer": consumer, "node": node, "key": okey}
    if deadline is not None:
        out["leased_until"] = str(int(deadline))
    return out


def delivery_state(dlv: Mapping[str, str] | None, held: str | None, deadline: float | None = None) -> dict[str, str]:
    """A lease's delivery state, wherever it is kept: the held record when there is one, else the delivery hash."""
    if held is not None:
        return held_state(held, deadline)
    return dict(dlv or {})
