"""``broker message ID`` as library code: where one message is now, per (topic, group)."""

from __future__ import annotations

from typing import Any

from broker.store import RedisStore
from broker.store.status import message_status

ROW_HEAD = ("topic", "group", "state")  # the columns every row has; the others depend on the state


async def where(store: RedisStore, msg_id: str, topic: str | None = None) -> list[dict[str, Any]]:
    """One row per (topic, group) that knows the message (see ``broker.store.status.message_status`` for the
    states and their fields); [] when Redis holds nothing of it: acked by every group, or never published."""
    return await message_status(store, msg_id, topic)


def detail_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The state-specific fields found in ``rows``, sorted: the columns after ``ROW_HEAD``."""
    return sorted({k for r in rows for k in r} - set(ROW_HEAD))
