"""Messages, deliveries and the delivery lifecycle (pure: no I/O).

Everything that affects the delivery state machine lives here: the table below is what the Lua scripts in
``broker/store/scripts`` implement, one script per transition (each names its transition in its header).
"""

from __future__ import annotations

import itertools
import os
import re
import time
from dataclasses import dataclass
from enum import StrEnum

from broker.core.errors import InvalidNameError


class State(StrEnum):
    READY = "ready"  # in the group's ready list, waiting for a consumer
    LEASED = "leased"  # held by one consumer until its lease deadline
    RETRY_WAIT = "retry_wait"  # in the group's delayed set until its due time (retry or delayed publish)
    KEY_WAIT = "key_wait"  # behind an earlier message of its ordering key, in the group's line for that key
    DEAD = "dead"  # parked in the group's dead-letter queue until its TTL
    ACKED = "acked"  # done for this group (nothing left in Redis for it)
    EXPIRED = "expired"  # dead letter whose TTL ran out


#: (from, to) -> the scripts that perform it. Strict-order groups park a retry at the head of the ready list with a
#: ``not_before`` time instead of in the delayed set: still RETRY_WAIT, only its place differs (see docs/design.md).
TRANSITIONS: dict[tuple[State | None, State | None], tuple[str, ...]] = {
    (None, State.READY): ("publish", "import"),  # import: `broker import` of an export (a leased one comes back ready)
    (None, State.RETRY_WAIT): ("publish", "import"),  # delay_ms > 0; an exported retry or delayed publish
    (None, State.DEAD): ("import",),  # an exported dead letter
    (State.READY, State.LEASED): ("claim",),
    (State.LEASED, State.LEASED): ("extend",),  # a later deadline
    (State.LEASED, State.ACKED): ("ack",),
    (State.LEASED, State.RETRY_WAIT): ("nack", "expire"),  # nack with a delay; lease expiry; dead node's leases
    (State.LEASED, State.DEAD): ("nack", "expire"),  # dead=true, or attempts exhausted
    # release: claimed but unsent; unclaim: a claim whose reply was lost; both without counting the attempt.
    # nack with delay 0 (and a consumer that disconnects): back at once, attempt counted.
    (State.LEASED, State.READY): ("release", "unclaim", "nack"),
    (State.RETRY_WAIT, State.READY): ("promote",),
    (State.DEAD, State.READY): ("reprocess",),
    # per-key ordering: a keyed message waits behind the earlier ones of its key; it goes live when the one ahead
    # is acked or dead-lettered (ready, or retry_wait while its publish delay runs)
    (None, State.KEY_WAIT): ("publish",),
    (State.KEY_WAIT, State.READY): ("ack", "nack", "expire", "repair_key"),  # repair_key: diagnose --repair
    (State.DEAD, State.KEY_WAIT): ("reprocess",),
    (State.DEAD, State.EXPIRED): ("prune_dead",),  # Redis expires the hash (TTL); the script drops the index entry
    (State.DEAD, None): ("purge_dead", "purge_group"),  # deleted by an operator (a dead letter; a deleted group)
    # diagnose --repair: queue entries whose body is gone (a damaged store) are removed; purge_group: an operator
    # empties a group's queue (`broker group purge`) or deletes the group (`broker group delete`, leased ones too)
    (State.READY, None): ("drop_bodyless", "purge_group"),
    (State.RETRY_WAIT, None): ("drop_bodyless", "purge_group"),
    (State.LEASED, None): ("drop_bodyless", "purge_group"),
    (State.KEY_WAIT, None): ("purge_group",),
}

DEFAULT_GROUP = "default"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,127}")


def validate_name(kind: str, name: object) -> str:
    """Topic and group names end up inside Redis keys and hash tags: no braces, colons, spaces or wildcards."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):  # fullmatch: "$" would accept a trailing "\n"
        raise InvalidNameError(
            f"invalid {kind} name {name!r}: 1-128 chars of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


_counter = itertools.count()
_NODE_TAG = os.urandom(4).hex()


def _new_process_tag() -> None:
    # A forked child inherits the tag and the counter: without a new tag it would mint the parent's next ids,
    # and a duplicate id overwrites another message's body.
    global _NODE_TAG, _counter
    _NODE_TAG = os.urandom(4).hex()
    _counter = itertools.count()


os.register_at_fork(after_in_child=_new_process_tag)


def new_message_id(now_ms: int | None = None) -> str:
    """Sortable, unique across processes: 12 hex of epoch ms, 8 hex of process tag, 8 hex of a counter."""
    ms = now_ms if now_ms is not None else int(time.time() * 1000)
    return f"{ms:012x}{_NODE_TAG}{next(_counter) & 0xFFFFFFFF:08x}"


def now_ms() -> int:
    return int(time.time() * 1000)


# PublishRequest, PublishResult, Delivery and AckItem are made per message: plain @dataclass(slots=True), not
# frozen (a frozen dataclass's __init__ costs ~4x: 1.4 vs 0.3 us). They are never mutated.
@dataclass(slots=True)
class PublishRequest:
    topic: str
    payload: str  # JSON text of the payload, stored and delivered verbatim
    headers: str = "{}"  # JSON text of a str->str object
    idempotency_key: str | None = None
    delay_ms: int = 0
    key: str | None = None  # ordering key: one message per key in flight per group, in publish order
    max_attempts: int | None = None  # the message's own retry policy (None: the configured one)
    backoff_base_ms: int | None = None


@dataclass(slots=True)
class PublishResult:
    id: str
    duplicate: bool = False
    groups: int = 0


@dataclass(slots=True)
class Delivery:
    """One message for one group, as claimed by one consumer."""

    id: str
    topic: str
    group: str
    payload: str  # JSON text
    headers: str  # JSON text
    attempt: int
    receipt: str
    published_at: int  # epoch ms
    lease_expires_at: int  # epoch ms
    key: str | None = None


@dataclass(slots=True)
class AckItem:
    id: str
    receipt: str


@dataclass(frozen=True, slots=True)
class NackItem:
    id: str
    receipt: str
    error: str = ""
    delay_ms: int | None = None  # None: the backoff policy decides
    dead: bool = False


@dataclass(slots=True)
class GroupDepth:
    topic: str
    group: str
    ready: int = 0
    leased: int = 0
    delayed: int = 0
    dead: int = 0
