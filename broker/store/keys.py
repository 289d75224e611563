"""The key schema, in one place. docs/keys.md documents the same names; a test keeps the two in step.

All keys of one topic share the hash tag ``{<topic>}`` so every script touches one Redis Cluster slot.

The Lua scripts get their fixed keys from here in ``KEYS``; the keys they learn only at run time (per message, and
the groups ``publish.lua`` / ``import.lua`` read) they build with ``key()`` in ``scripts/_lib.lua`` from
``TopicKeys.base`` (``ARGV[1]``), the same names: ``tests/test_lua_schema.py`` holds the two together.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = "1"


@dataclass(frozen=True, slots=True)
class TopicKeys:
    prefix: str
    topic: str

    @property
    def base(self) -> str:
        return f"{self.prefix}:{{{self.topic}}}:"

    @property
    def groups(self) -> str:
        return self.base + "groups"

    @property
    def wake(self) -> str:
        return self.base + "wake"

    def body(self, msg_id: str) -> str:
        return f"{self.base}msg:{msg_id}"

    def idem(self, key: str) -> str:
        return f"{self.base}idem:{key}"

    @property
    def imported(self) -> str:
        """ZSET import ledger: what ``broker import`` wrote (member -> import time, ms), so a re-import skips it."""
        return self.base + "imported"

    def group(self, group: str) -> GroupKeys:
        return GroupKeys(self, group)


@dataclass(frozen=True, slots=True)
class GroupKeys:
    topic_keys: TopicKeys
    group: str

    @property
    def base(self) -> str:
        return f"{self.topic_keys.base}g:{self.group}:"

    @property
    def ready(self) -> str:
        return self.base + "ready"

    @property
    def leased(self) -> str:
        return self.base + "leased"

    @property
    def delayed(self) -> str:
        return self.base + "delayed"

    @property
    def dead(self) -> str:
        return self.base + "dead"

    @property
    def acked(self) -> str:
        """ZSET id -> acked_at (epoch ms): the optional, bounded "recently acked" audit record."""
        return self.base + "acked"

    @property
    def held(self) -> str:
        """HASH id -> a first delivery's lease state ``<receipt>|<node>|<consumer>|<key>`` (``leases.held_state``)."""
        return self.base + "held"

    def delivery(self, msg_id: str) -> str:
        return f"{self.base}dlv:{msg_id}"

    def dead_letter(self, msg_id: str) -> str:
        return f"{self.base}dead:{msg_id}"

    def key_line(self, key: str) -> str:
        """LIST: the group's unfinished ids with ordering key ``key``, in publish order; only the head is live."""
        return f"{self.base}key:{key}"


def topics_key(prefix: str) -> str:
    """SET of every topic name (outside any topic's slot; written before a topic's first message)."""
    return f"{prefix}:topics"


def schema_key(prefix: str) -> str:
    return f"{prefix}:schema"


def node_key(prefix: str, node_id: str) -> str:
    """HASH: one broker node's status (heartbeat, consumers per topic/group, breaker states); expires by itself."""
    return f"{prefix}:node:{node_id}"


def nodes_key(prefix: str) -> str:
    """ZSET broker node id -> last heartbeat (epoch ms)."""
    return f"{prefix}:nodes"


def listeners_channel(prefix: str) -> str:
    """Pub/Sub channel (not a key), never published on: every node's wake-up listener subscribes to it on one Redis,
    so ``PUBSUB NUMSUB`` counts the listening nodes (publish.lua skips its note when no other node listens)."""
    return f"{prefix}:listeners"


def listener_channel(prefix: str, node_id: str) -> str:
    """Pub/Sub channel (not a key), never published on: one node's wake-up listener subscribes to it along with
    ``listeners_channel``, so the count of the others is exact (the publishing node's own listener may be down)."""
    return f"{prefix}:listener:{node_id}"
