"""Read-only requests over the WebSocket: ``status`` (where one message is now, per group)."""

from __future__ import annotations

import asyncio
from typing import Protocol

from broker.core import protocol
from broker.core.errors import BrokerError, ForbiddenError
from broker.node.auth import Principal
from broker.store import RedisStore
from broker.store.status import message_status


class Connection(Protocol):
    """What a lookup needs of its connection (a ``Session``)."""

    principal: Principal
    store: RedisStore
    lookups: asyncio.Semaphore

    def send(self, frame: str) -> None: ...

    def reply_error(self, e: BrokerError, ref: protocol.Ref = None, msg_id: str | None = None) -> None: ...

    def forbidden(self, verb: str, topic: str) -> ForbiddenError: ...


async def handle_status(session: Connection, req: protocol.Status) -> None:
    """The rows of ``broker message ID --topic T``. The topic is part of the request so that a token can only look
    into topics it may subscribe or publish to (a message id alone would let it probe every topic)."""
    try:
        who = session.principal
        if not (who.may_subscribe(req.topic) or who.may_publish(req.topic)):
            session.reply_error(session.forbidden("read message status of", req.topic), req.ref)
            return
        try:
            rows = await message_status(session.store, req.id, req.topic)
        except BrokerError as e:
            session.reply_error(e, req.ref, req.id)
            return
        except Exception as e:  # a bug, or a key that does not hold what it should: say so, keep the connection
            session.reply_error(BrokerError(f"internal error: {e!r}"), req.ref, req.id)
            return
        session.send(protocol.reply("message_status", req.ref, id=req.id, topic=req.topic, groups=rows))
    finally:
        session.lookups.release()  # taken by the session's reader before it started this lookup
