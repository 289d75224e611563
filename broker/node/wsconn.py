"""The broker's WebSocket connection class: websockets' ``ServerConnection`` (passed to ``serve`` as its documented
``create_connection`` factory) with one change, how queued bytes reach the socket.

websockets writes every frame with its own ``transport.write``, and an unbuffered transport makes each of them a
``send`` system call. The session's writer queues a burst of frames (replies, deliveries) before the bytes are
sent; here the burst leaves in one write. The end-of-stream marker (an empty chunk) is handled as websockets does.
"""

from __future__ import annotations

import contextlib

from websockets.asyncio.server import ServerConnection


class BrokerConnection(ServerConnection):
    def send_data(self) -> None:
        pending: list[bytes] = []  # frames written together; an empty chunk is the end-of-stream marker (closing)
        for data in self.protocol.data_to_send():
            if data:
                pending.append(data)
                continue
            if pending:
                self.transport.write(b"".join(pending))
                pending = []
            if self.transport.can_write_eof():
                # As websockets does: a failed half-close while closing changes nothing (the close handshake or its
                # timeout ends the connection either way); uvloop can raise RuntimeError here.
                with contextlib.suppress(Exception):
                    self.transport.write_eof()
            else:
                self.transport.close()
        if pending:
            self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
