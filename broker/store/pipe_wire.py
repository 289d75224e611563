"""The script pipe's connection read in a protocol callback (``pipe.py``): no task reads the replies.

``take_over`` moves a connected redis-py connection's socket transport (borrowed from the client's pool, set up by
redis-py's own handshake: AUTH, HELLO, CLIENT SETNAME/SETINFO, SELECT, timeouts, all from the pool's
``connection_kwargs``) to a ``Replies`` protocol: every chunk of bytes Redis sends is fed to a ``hiredis.Reader`` in
``data_received``, and each complete reply goes to ``on_reply`` at once, in the order Redis sent it. Error replies
are the exception values redis-py's parser makes (``NoScriptError``, ``OutOfMemoryError``...: its ``parse_error``),
decoded as redis-py decodes them (the connection's encoder). RESP3 push messages are not replies and are skipped
(redis-py hands them to a handler and reads on; the pipe subscribes to nothing). ``give_back`` returns the transport
to redis-py's stream protocol, so redis-py can close the connection the usual way.

Where the connection cannot be taken over (TLS, a connection that is not the hiredis-packing one, bytes already
buffered) ``take_over`` answers None and the pipe keeps reading through redis-py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import hiredis
import structlog
from redis._parsers.base import BaseParser
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse

from broker.runtime import metrics
from broker.store.connection import HiredisPacking

log = structlog.get_logger("broker.store")

_MORE = object()  # hiredis: no complete reply buffered (a reply may be False: RESP3 booleans)
_PUSH: type[Any] | None = getattr(hiredis, "PushNotification", None)
_said_streams = False  # "redis_pipe_stays_on_streams" is logged once per process (it holds for every connection)


class Replies(asyncio.Protocol):
    """Replies of one connection, each handed to ``on_reply`` as soon as it is complete; ``on_lost(error)`` once,
    when the connection ends (EOF, reset, a protocol error) while attached."""

    def __init__(
        self,
        conn: AbstractConnection,
        on_reply: Callable[[Any], None],
        on_lost: Callable[[Exception], None],
    ) -> None:
        enc = conn.encoder
        kwargs: dict[str, Any] = {
            "protocolError": InvalidResponse,
            "replyError": BaseParser.parse_error,
            "notEnoughData": _MORE,
        }
        if enc.decode_responses:
            kwargs["encoding"] = enc.encoding
            kwargs["errors"] = enc.encoding_errors
        self._reader = hiredis.Reader(**kwargs)
        self._on_reply = on_reply
        self._on_lost = on_lost
        self._streams: asyncio.BaseProtocol | None = None  # redis-py's protocol, given the transport back
        self.transport: asyncio.Transport | None = None
        self.attached = False
        self.paused = False  # the transport's write buffer is over its high-water mark (handed over in give_back)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        while self.attached:
            try:
                reply = reader.gets()
            except Exception as e:  # garbage (InvalidResponse), text that does not decode: the stream is lost here
                self._lost(e)
                return
            if reply is _MORE:
                return
            if _PUSH is not None and isinstance(reply, _PUSH):
                continue
            try:
                self._on_reply(reply)
            except Exception as e:  # a bug of the reply's consumer, not of the stream: said as such, then dropped
                log.error("redis_pipe_on_reply_failed", error=repr(e))
                metrics.child(metrics.store_errors, "script_pipe", "internal").inc()
                self._lost(e)
                return

    def eof_received(self) -> bool:
        self._lost(RedisConnectionError("Connection closed by server."))
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(RedisConnectionError(f"Connection lost: {exc!r}" if exc else "Connection closed by server."))
        if self._streams is not None:  # redis-py's stream waits for this to finish its close (wait_closed)
            self._streams.connection_lost(exc)

    def pause_writing(self) -> None:  # one batch at most is written at a time: nothing to hold back, but the state
        self.paused = True  # goes back to redis-py's protocol with the transport (its resume_writing asserts it)

    def resume_writing(self) -> None:
        self.paused = False

    def _lost(self, err: Exception) -> None:
        if self.attached:
            self.attached = False
            self._on_lost(err)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def give_back(self) -> None:
        """Detach (no more callbacks) and hand the transport back to redis-py's stream protocol."""
        self.attached = False
        if self.transport is not None and self._streams is not None and not self.transport.is_closing():
            streams, self._streams = self._streams, None
            self.transport.set_protocol(streams)
            if self.paused and isinstance(streams, asyncio.Protocol):  # asyncio will call its resume_writing
                streams.pause_writing()


def can_take_over(conn: AbstractConnection) -> bool:
    """Whether ``take_over`` can serve ``conn``: the hiredis-packing connection (``redis://``, ``unix://``), on a
    plain socket (no TLS)."""
    return isinstance(conn, HiredisPacking)


def take_over(
    conn: AbstractConnection, on_reply: Callable[[Any], None], on_lost: Callable[[Exception], None]
) -> Replies | None:
    """Read ``conn``'s replies in a ``Replies`` protocol from now on (None: it cannot be; see the module)."""
    if not can_take_over(conn):
        return None
    # redis-py's stream pair (private attributes: a redis-py that no longer has them keeps the writer task's path)
    reader: asyncio.StreamReader | None = getattr(conn, "_reader", None)
    writer: asyncio.StreamWriter | None = getattr(conn, "_writer", None)
    buffered = getattr(reader, "_buffer", None)
    if reader is None or writer is None or buffered is None:
        global _said_streams
        if not _said_streams:
            _said_streams = True
            log.warning("redis_pipe_stays_on_streams", reason="redis-py connection without its stream pair")
        return None
    if reader.at_eof() or reader.exception() is not None or len(buffered):
        return None
    transport = cast(asyncio.Transport, writer.transport)
    if transport.is_closing() or transport.get_extra_info("sslcontext") is not None:
        return None
    proto = Replies(conn, on_reply, on_lost)
    proto._streams = transport.get_protocol()
    proto.paused = bool(getattr(proto._streams, "_paused", False))  # redis-py's writer may be held back at the moment
    proto.transport = transport
    proto.attached = True
    transport.set_protocol(proto)
    if not transport.is_reading():  # redis-py's stream paused it (a full buffer): ours reads everything
        transport.resume_reading()
    return proto
