"""The per-frame path of a connection: frames served in the read callback, in order with the ones that wait, and
the outbox written once per loop turn with websockets' flow control."""

from __future__ import annotations

import asyncio

from websockets.asyncio.messages import Assembler
from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import Protocol, Side, State

from broker.core.config import Settings
from broker.core.protocol import Limits
from broker.node.server import BrokerConnection
from broker.node.session import Session, SessionParts


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.reading = True

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return True


def open_connection() -> tuple[BrokerConnection, FakeTransport]:
    protocol = Protocol(Side.SERVER)  # the server side past its handshake: open, parsing frames
    conn = BrokerConnection(protocol, server=None)  # type: ignore[arg-type]
    conn.request = Request("/", Headers())  # the handshake's request was seen
    transport = FakeTransport()
    conn.transport = transport  # type: ignore[assignment]
    conn.recv_messages = Assembler(16, 4, pause=transport.pause_reading, resume=transport.resume_reading)
    return conn, transport


def client_frames(*texts: str, fin: bool = True) -> bytes:
    """Text frames as a client sends them (masked)."""
    return b"".join(Frame(Opcode.TEXT, t.encode(), fin=fin).serialize(mask=True) for t in texts)


class Sink:
    """Serves every frame at once except those starting with "wait" (as a session declines a request that waits)."""

    def __init__(self) -> None:
        self.offered: list[str] = []
        self.served: list[str] = []

    def __call__(self, text: str) -> bool:
        self.offered.append(text)
        if text.startswith("wait"):
            return False
        self.served.append(text)
        return True


async def test_frames_behind_a_declined_one_wait_their_turn_on_the_readers_path() -> None:
    # Given a connection whose session serves frames in the read callback
    conn, _ = open_connection()
    sink = Sink()
    conn.frame_sink = sink
    # When one read brings a frame it serves, one it declines, and one behind that
    conn.data_received(client_frames("a", "wait-1", "b"))
    # Then the first is served at once; the declined one and the one behind it go to the reader, in order
    assert sink.served == ["a"]
    assert sink.offered == ["a", "wait-1"]  # "b" is not even offered while "wait-1" is queued ahead of it
    assert await conn.recv() == "wait-1"
    assert await conn.recv() == "b"
    # And once nothing is queued any more, frames are served in the read callback again
    conn.data_received(client_frames("c"))
    assert sink.served == ["a", "c"]


async def test_a_fragmented_message_is_assembled_by_websockets_not_offered_in_pieces() -> None:
    # Given a connection with a sink
    conn, _ = open_connection()
    sink = Sink()
    conn.frame_sink = sink
    # When a text message arrives in two fragments
    first = Frame(Opcode.TEXT, b"hel", fin=False).serialize(mask=True)
    rest = Frame(Opcode.CONT, b"lo", fin=True).serialize(mask=True)  # a continuation frame
    conn.data_received(first + rest)
    # Then the sink sees nothing, and the reader gets the whole message
    assert sink.offered == []
    assert await conn.recv() == "hello"


async def test_without_a_sink_every_frame_takes_websockets_path() -> None:
    conn, _ = open_connection()
    conn.data_received(client_frames("x", "y"))
    assert [await conn.recv(), await conn.recv()] == ["x", "y"]


def session_on(conn: BrokerConnection) -> Session:
    parts = SessionParts(Settings(), Limits(), publisher=None, dispatch=None, store=None)  # type: ignore[arg-type]
    return Session(parts, conn, "c-test")


async def test_the_outbox_leaves_in_one_write_per_loop_turn_and_waits_while_the_transport_is_full() -> None:
    # Given a session on an open connection
    conn, transport = open_connection()
    session = session_on(conn)
    conn.on_writable = session._kick
    # When three replies are queued in one loop turn
    for text in ("a", "bb", "ccc"):
        session.send(text)
    assert transport.writes == []  # nothing is written before the turn ends
    await asyncio.sleep(0)
    # Then they leave in one socket write, in order
    assert transport.writes == [b"\x81\x01a" + b"\x81\x02bb" + b"\x81\x03ccc"]
    # And while the transport's buffer is over its high-water mark nothing is written, the frames stay queued
    conn.pause_writing()
    session.send("d")
    await asyncio.sleep(0)
    assert len(transport.writes) == 1 and list(session.out) == ["d"]
    # And when it drains, what waited leaves at once
    conn.resume_writing()
    await asyncio.sleep(0)
    assert transport.writes[1:] == [b"\x81\x01d"] and not session.out


async def test_a_closing_connection_writes_nothing_and_keeps_what_is_queued_for_the_give_back() -> None:
    # Given a connection the client has started to close
    conn, transport = open_connection()
    session = session_on(conn)
    conn.protocol.state = State.CLOSING
    # When a frame is queued
    session.send("late")
    await asyncio.sleep(0)
    # Then it is not written, and it is still in the outbox (what ``unsent`` reads when the session ends)
    assert transport.writes == [] and list(session.out) == ["late"]


# ---- the connection's own framing ------------------------------------------------------------------------------


async def test_frames_cut_at_any_byte_arrive_whole_and_in_order_whatever_their_length() -> None:
    # Given frames with a 7-bit, a 16-bit and a 64-bit length, sent one byte per read
    conn, _ = open_connection()
    sink = Sink()
    conn.frame_sink = sink
    texts = ["a", "b" * 200, "c" * 70_000, "d"]
    for byte in client_frames(*texts):
        conn.data_received(bytes([byte]))
    # Then each is served whole, in order, and nothing is left over
    assert sink.served == texts
    assert conn._inbuf == bytearray()


async def test_a_ping_between_text_frames_is_answered_and_the_frames_around_it_served() -> None:
    conn, transport = open_connection()
    sink = Sink()
    conn.frame_sink = sink
    ping = Frame(Opcode.PING, b"hi").serialize(mask=True)
    conn.data_received(client_frames("a") + ping + client_frames("b"))
    assert sink.served == ["a", "b"]
    assert transport.writes == [Frame(Opcode.PONG, b"hi").serialize(mask=False)]


async def test_after_a_close_frame_websockets_has_every_byte_and_nothing_more_is_served() -> None:
    conn, transport = open_connection()
    sink = Sink()
    conn.frame_sink = sink
    close = Frame(Opcode.CLOSE, b"\x03\xe8bye").serialize(mask=True)
    conn.data_received(client_frames("a") + close + client_frames("after"))
    assert sink.served == ["a"]
    assert conn.protocol.state is State.CLOSING and conn.protocol.close_rcvd is not None
    assert transport.writes[0].startswith(b"\x88")  # the close frame echoed, as websockets does


async def test_a_frame_over_the_size_limit_fails_the_connection_with_1009_as_websockets_does() -> None:
    conn, _ = open_connection()
    conn.frame_sink = Sink()
    header = Frame(Opcode.TEXT, b"x" * (conn.protocol.max_message_size + 1)).serialize(mask=True)[:14]
    conn.data_received(header)  # only the header: the length alone is refused, nothing is buffered
    assert conn.protocol.close_sent is not None and conn.protocol.close_sent.code == 1009
    assert conn._inbuf is None


async def test_an_unmasked_client_frame_fails_the_connection_with_1002() -> None:
    conn, _ = open_connection()
    conn.frame_sink = Sink()
    conn.data_received(Frame(Opcode.TEXT, b"x").serialize(mask=False))
    assert conn.protocol.close_sent is not None and conn.protocol.close_sent.code == 1002


async def test_framing_starts_only_between_two_frames() -> None:
    # Given half a frame already read by websockets before the session installed its sink
    conn, _ = open_connection()
    wire = client_frames("first", "second")
    half = len(client_frames("first")) // 2
    conn.data_received(wire[:half])
    sink = Sink()
    conn.frame_sink = sink
    # When the rest arrives
    conn.data_received(wire[half:])
    # Then websockets finishes the half-read frame (it is not misread as the start of a new one), both are served
    assert sink.served == ["first", "second"]
    assert not conn._framing  # the connection could not know where the next frame would start...
    # And from the next read on (websockets' parser now waits between two frames) the connection cuts frames itself
    conn.data_received(client_frames("third"))
    assert sink.served == ["first", "second", "third"]
    assert conn._framing


async def test_text_frames_are_framed_byte_for_byte_as_websockets_frames_them() -> None:
    conn, transport = open_connection()
    texts = [b"a", b"b" * 200, b"c" * 70_000]
    conn.write_texts(texts)
    expected = b"".join(Frame(Opcode.TEXT, t).serialize(mask=False) for t in texts)
    assert transport.writes == [expected]
