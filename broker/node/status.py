"""Read-only requests over the WebSocket: ``status`` (where one message is now, per group)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.core import protocol
from broker.core.errors import BrokerError
from broker.store.status import message_status

if TYPE_CHECKING:
    from broker.node.session import Session


async def handle_status(session: Session, req: protocol.Status) -> None:
    """The rows of ``broker message ID --topic T``. The topic is part of the request so that a token can only look
    into topics it may subscribe or publish to (a message id alone would let it probe every topic)."""
    try:
        who = session.principal
        if not (who.may_subscribe(req.topic) or who.may_publish(req.topic)):
            session._forbidden("read message status of", req.topic, req.ref)
            return
        try:
            rows = await message_status(session.broker.store, req.id, req.topic)
        except BrokerError as e:
            session._error(e, req.ref, req.id)
            return
        except Exception as e:  # a bug, or a key that does not hold what it should: say so, keep the connection
            session._error(BrokerError(f"internal error: {e!r}"), req.ref, req.id)
            return
        session.send(protocol.reply("message_status", req.ref, id=req.id, topic=req.topic, groups=rows))
    finally:
        session.lookups.release()  # taken by the session's reader before it started this lookup
