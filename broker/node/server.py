"""WebSocket server: handshake, sessions, and HTTP /healthz, /readyz, /metrics, /client/ and /console on the same
port."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http
import ssl
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import OPEN, Event

try:  # websockets' C unmasking, as its own parser uses
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover (a build without the extension)
    from websockets.utils import apply_mask

from broker.core.errors import (
    BrokerError,
    ConfigError,
    ForbiddenError,
    NotFoundError,
    ProtocolError,
    RateLimitedError,
    UnauthorizedError,
    UnavailableError,
)
from broker.node.auth import ANONYMOUS, Authenticator, Principal, Refusal
from broker.node.console_gate import PREFIX as CONSOLE
from broker.node.console_gate import ConsoleHandler, Gate
from broker.node.session import Session, SessionParts, new_conn_id
from broker.runtime import metrics

log = structlog.get_logger("broker.server")

WS_PATHS = ("/", "/ws")


def _response(status: http.HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return Response(status.value, status.phrase, headers, body)


def _json(status: http.HTTPStatus, obj: object) -> Response:
    return _response(status, orjson.dumps(obj), "application/json")


def _refused(status: http.HTTPStatus, err: BrokerError) -> Response:
    """An HTTP refusal of a WebSocket handshake: the body names the error as an ``error`` frame would."""
    body: dict[str, object] = {"error": err.code, "message": err.message}
    if err.retry_after_ms is not None:
        body["retry_after_ms"] = err.retry_after_ms
    return _json(status, body)


class ClientFiles:
    """The JavaScript client (``broker/client/js``, package data of the wheel) served at ``/client/<name>``, so a page
    on the broker's origin imports it with nothing else: ``import { connect } from "/client/broker.js"``.

    Only the names below are served (an allowlist: no path from the request ever reaches the file system). The files
    are read once, at start; each answer carries an ETag (a hash of the bytes) and ``Cache-Control: no-cache``, so a
    browser keeps its copy and revalidates it, and gets the new file (a 200) right after an upgrade. No token is needed:
    the files are public code."""

    TYPES = {"broker.js": "text/javascript; charset=utf-8", "broker.d.ts": "application/typescript; charset=utf-8"}
    HOME = Path(__file__).resolve().parent.parent / "client" / "js"

    def __init__(self, home: Path = HOME) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        for name in self.TYPES:
            with contextlib.suppress(OSError):  # not installed with the package: answered 404 like any unknown name
                body = (home / name).read_bytes()
                self.files[name] = (body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')

    def response(self, name: str, if_none_match: str | None) -> Response:
        found = self.files.get(name)
        if found is None:
            return _refused(http.HTTPStatus.NOT_FOUND, NotFoundError(f"no such file /client/{name}"))
        body, etag = found
        cache = [("ETag", etag), ("Cache-Control", "no-cache"), ("Access-Control-Allow-Origin", "*")]
        if if_none_match and {etag, "*"} & {t.strip().removeprefix("W/") for t in if_none_match.split(",")}:
            return Response(304, "Not Modified", Headers(cache), b"")
        headers = Headers([("Content-Type", self.TYPES[name]), ("Content-Length", str(len(body))),
                           ("X-Content-Type-Options", "nosniff"), *cache])  # fmt: skip
        return Response(200, "OK", headers, body)


_TEXT_HEADS = [bytes((0x81, n)) for n in range(126)]  # the header of an unmasked final text frame of n < 126 bytes


class BrokerConnection(ServerConnection):
    """websockets' ``ServerConnection`` (passed to ``serve`` as its documented ``create_connection`` factory) with
    three changes, all on the per-frame path:

    - **Frames in, without the reader task.** websockets hands every frame to its message assembler and wakes the
      task waiting in ``recv()``: a future, a task step and a loop turn per frame. The session may install
      ``frame_sink``: a complete text frame with nothing queued ahead of it in the assembler is offered to it right
      here, in the read callback, and the sink serves it at once (returning True) or declines it (False, e.g. a
      request that has to wait); a declined frame, and every frame behind it until the assembler is empty again, takes
      websockets' own path to ``recv()``. So frames are served in the order they came, and the assembler's flow
      control (``max_queue``) still pauses reading while the reader is held up.
    - **Frames out in one write.** websockets writes every frame with its own ``transport.write``, and an unbuffered
      transport makes each of them a ``send`` system call. The session queues a burst of frames (replies,
      deliveries) before the bytes are sent; here the burst leaves in one write. The end-of-stream marker (an empty
      chunk) is handled as websockets does.
    - **Told when writable again**: ``on_writable`` (the session's flush) is called when the transport's buffer has
      drained below its low-water mark after a pause.

    And once a session has installed its sink and websockets' parser stands between two frames, the connection cuts
    the incoming bytes into frames itself (``data_received``): a complete, unfragmented, masked text frame within the
    size limit is unmasked and decoded here (websockets' generator-based parser cost several times more per frame);
    every other frame (control frames, fragments, anything malformed or too big) is handed to websockets' protocol
    whole, so its parser is always back between two frames and does what it always does (pongs, the closing
    handshake, failing the connection with the right close code). When the connection stops being open, all further
    bytes go to websockets. Outgoing text frames are framed here too (``write_texts``): a server frame is a header
    and the bytes (no mask; the connection has no extensions)."""

    frame_sink: Callable[[str], bool] | None = None
    on_writable: Callable[[], None] | None = None
    _framing = False  # the incoming bytes are cut into frames here (see above)
    _inbuf: bytearray | None = None  # the start of a frame not complete yet (framing only)

    def data_received(self, data: bytes) -> None:
        if not self._framing:
            if self.frame_sink is None or not self._between_frames():
                super().data_received(data)
                return
            self._framing = True
            self._inbuf = bytearray()
        buf = self._inbuf
        assert buf is not None
        buf += data
        p = self.protocol
        limit = p.max_message_size
        assert limit is not None  # _between_frames() checked it
        end = len(buf)
        pos = 0
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            n = b1 & 0x7F
            head = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if b1 & 0x80:
                head += 4
            if n > limit:  # websockets refuses it (1009) as soon as it reads the header
                self._give_up_framing(bytes(buf[pos:]))
                return
            total = head + n
            if end - pos < total:
                break
            if b0 == 0x81 and b1 & 0x80 and p.state is OPEN and p.current_size is None:  # FIN, text, masked
                data_at = pos + head
                payload = apply_mask(buf[data_at : data_at + n], buf[data_at - 4 : data_at])
                pos += total
                sink = self.frame_sink
                if sink is not None and not len(self.recv_messages.frames):
                    try:
                        text = payload.decode()
                    except UnicodeDecodeError:
                        pass  # the reader's recv() reports it, as websockets' own path does
                    else:
                        if sink(text):
                            continue
                super().process_event(Frame(Opcode.TEXT, payload))  # to the assembler, in order
                continue
            frame = bytes(buf[pos : pos + total])
            pos += total
            super().data_received(frame)  # a whole frame: websockets' parser ends between two frames again
            if p.state is not OPEN:  # closing or failed: everything after goes to websockets too
                self._give_up_framing(bytes(buf[pos:]))
                return
        del buf[:pos]

    def _give_up_framing(self, rest: bytes) -> None:
        self._framing = False
        self._inbuf = None
        if rest:
            super().data_received(rest)

    def _between_frames(self) -> bool:
        """Whether websockets' parser has consumed every byte it was given and waits for the next frame's first."""
        p = self.protocol
        if p.state is not OPEN or p.extensions or p.current_size is not None or p.reader.buffer:
            return False
        if p.max_message_size is None or p.max_fragment_size is not None:
            return False
        gen: Any = p.parser
        while getattr(gen, "gi_yieldfrom", None) is not None:
            gen = gen.gi_yieldfrom
        return getattr(getattr(gen, "gi_code", None), "co_name", "") == "at_eof"

    def write_texts(self, frames: list[bytes]) -> None:
        """Write text frames (UTF-8 bytes each) in one socket write, after anything websockets has queued."""
        if self.protocol.extensions:  # never with compression=None: websockets frames them (compressed)
            for data in frames:
                self.protocol.send_text(data)
            self.send_data()
            return
        if self.protocol.writes:
            self.send_data()
        parts: list[bytes] = []
        append = parts.append
        for data in frames:
            n = len(data)
            if n < 126:
                append(_TEXT_HEADS[n])
            elif n < 65536:
                append(b"\x81\x7e" + n.to_bytes(2, "big"))
            else:
                append(b"\x81\x7f" + n.to_bytes(8, "big"))
            append(data)
        self.transport.write(b"".join(parts))

    def process_event(self, event: Event) -> None:
        sink = self.frame_sink
        if (
            sink is not None
            and type(event) is Frame
            and event.opcode is Opcode.TEXT
            and event.fin
            and not len(self.recv_messages.frames)
        ):
            try:
                text = str(event.data, "utf-8")
            except UnicodeDecodeError:
                pass  # websockets' path reports it as it always has
            else:
                if sink(text):
                    return
        super().process_event(event)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.on_writable is not None:
            self.on_writable()

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


class WsServer:
    """The node's listening side. It gets what its sessions work with (``parts``), the node's id for /healthz and
    its readiness for /readyz; from ``stop_accepting`` on it refuses new connections."""

    def __init__(
        self,
        parts: SessionParts,
        node_id: str,
        readiness: Callable[[], tuple[bool, list[str]]],
        console: ConsoleHandler | None = None,
    ) -> None:
        self.parts = parts
        self.settings = parts.settings
        self.node_id = node_id
        self.readiness = readiness
        self.accepting = True
        self.server: Server | None = None
        self.sessions: set[Session] = set()
        self.auth = Authenticator(parts.settings.auth, parts.settings.tokens)
        self._principals: weakref.WeakKeyDictionary[ServerConnection, Principal] = weakref.WeakKeyDictionary()
        self._per_token: dict[str, int] = {}
        self.client_files = ClientFiles()
        self.console = console
        self.console_gate = Gate(self.auth, parts.settings.auth.mode == "open")

    async def start(self) -> None:
        s = self.settings.server
        tls = None
        if s.tls_cert_file:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                tls.load_cert_chain(s.tls_cert_file, s.tls_key_file)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"cannot load TLS certificate/key: {e}") from None
        self.server = await serve(
            self._handle,
            s.host,
            s.port,
            process_request=self._process_request,
            max_size=s.max_frame_bytes,
            max_queue=64,
            ping_interval=20,
            ping_timeout=20,
            open_timeout=s.handshake_timeout_s,
            ssl=tls,
            compression=None,
            create_connection=BrokerConnection,
        )

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(next(iter(self.server.sockets)).getsockname()[1])

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | Awaitable[Response] | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return _json(http.HTTPStatus.OK, {"status": "alive", "node": self.node_id})
        if path == "/readyz":
            ready, reasons = self.readiness()
            status = http.HTTPStatus.OK if ready else http.HTTPStatus.SERVICE_UNAVAILABLE
            return _json(status, {"ready": ready, "reasons": reasons, "node": self.node_id})
        if path == "/metrics" and metrics.enabled:
            return _response(http.HTTPStatus.OK, metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
        if path.startswith("/client/"):
            return self.client_files.response(path.removeprefix("/client/"), request.headers.get("If-None-Match"))
        if path == CONSOLE or path.startswith(CONSOLE + "/"):
            return self._console_request(conn, request, path)
        if path not in WS_PATHS:
            log.info("connection_refused", peer=_peer(conn), path=path, reason="unknown path")
            metrics.connections_total.labels("refused_path").inc()
            return _refused(http.HTTPStatus.NOT_FOUND, NotFoundError(f"no such path {path}"))
        if not self.accepting:
            log.info("connection_refused", peer=_peer(conn), path=path, reason="shutting down")
            metrics.connections_total.labels("refused_shutdown").inc()
            return _refused(http.HTTPStatus.SERVICE_UNAVAILABLE, UnavailableError("shutting down"))
        verdict = self.auth.check(request.path, request.headers.get("Authorization"), request.headers.get("Origin"))
        if isinstance(verdict, Refusal):
            # logged before anything else happens on this connection (seed 003: no record of refused callers)
            log.info("connection_refused", peer=_peer(conn), path=path, reason=verdict.reason, status=verdict.status)
            metrics.connections_total.labels("refused_auth" if verdict.status == 401 else "refused_origin").inc()
            cls = UnauthorizedError if verdict.status == 401 else ForbiddenError
            return _refused(http.HTTPStatus(verdict.status), cls(verdict.reason))
        s = self.settings.server
        busy = None
        if len(self.sessions) >= s.max_connections:
            busy = (http.HTTPStatus.SERVICE_UNAVAILABLE, f"node at server.max_connections ({s.max_connections})")
        elif verdict.name != ANONYMOUS.name and self._per_token.get(verdict.name, 0) >= s.max_connections_per_token:
            busy = (http.HTTPStatus.TOO_MANY_REQUESTS, f"token at server.max_connections_per_token "
                    f"({s.max_connections_per_token})")  # fmt: skip
        if busy is not None:
            log.warning("connection_refused", peer=_peer(conn), path=path, reason=busy[1], principal=verdict.name)
            metrics.connections_total.labels("refused_limit").inc()
            return _refused(busy[0], RateLimitedError(busy[1], retry_after_ms=1000))
        self._principals[conn] = verdict
        return None

    async def _console_request(self, conn: ServerConnection, request: Request, path: str) -> Response:
        """A request for the console, past its gate (``console_gate``), answered by the mounted console."""
        if self.console is None:
            return _refused(http.HTTPStatus.NOT_FOUND, NotFoundError("no console here (`broker serve` mounts it)"))
        headers = {k: v for k in ("authorization", "origin", "host") if (v := request.headers.get(k)) is not None}
        verdict = self.console_gate.admit(request.method, request.path, headers, _peer_host(conn))
        if isinstance(verdict, Refusal):
            log.info("console_refused", peer=_peer(conn), path=path, reason=verdict.reason, status=verdict.status)
            metrics.console_requests.labels("refused").inc()
            cls = {401: UnauthorizedError, 403: ForbiddenError}.get(verdict.status, ProtocolError)
            return _refused(http.HTTPStatus(verdict.status), cls(verdict.reason))
        try:
            answer = await self.console(verdict)
        except Exception as e:  # a bug in the console: said, counted, answered; the node carries on
            log.exception("console_failed", path=path, method=request.method)
            metrics.console_requests.labels("failed").inc()
            return _refused(http.HTTPStatus.INTERNAL_SERVER_ERROR, BrokerError(f"internal error: {e!r}"))
        metrics.console_requests.labels("answered").inc()
        status = http.HTTPStatus(answer.status)
        headers_out = Headers([("Content-Type", answer.content_type), ("Content-Length", str(len(answer.body))),
                               ("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-cache"),
                               *answer.headers])  # fmt: skip
        return Response(status.value, status.phrase, headers_out, answer.body)

    async def _handle(self, ws: ServerConnection) -> None:
        conn_id = new_conn_id()
        principal = self._principals.pop(ws, ANONYMOUS)
        session = Session(self.parts, ws, conn_id, principal)
        log.info("connection_opened", conn_id=conn_id, peer=_peer(ws), path=_path(ws), principal=principal.name)
        metrics.connections_total.labels("accepted").inc()
        metrics.connections.inc()
        self.sessions.add(session)
        self._per_token[principal.name] = self._per_token.get(principal.name, 0) + 1
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            self._per_token[principal.name] -= 1
            metrics.connections.dec()

    def stop_accepting(self) -> None:
        """Close the listening socket only; open connections carry on (they are closed by ``close_all``). A
        handshake still under way is refused from here on."""
        self.accepting = False
        if self.server is not None:
            self.server.server.close()

    async def close_all(self, timeout_s: float) -> None:
        """Close every connection with 1001 (going away) once its replies are out (``Session.goodbye``), bounded; then
        the server itself.

        A connection that cannot finish the closing handshake in time (a client that stopped reading: the close
        frame waits behind a full socket buffer, and websockets' close() waits for it without a deadline) is
        aborted, so its session ends and gives back what it holds while Redis is still open."""
        sessions = list(self.sessions)
        if sessions:
            closing = {asyncio.create_task(s.goodbye(1001, "broker shutting down")): s for s in sessions}
            _, pending = await asyncio.wait(closing, timeout=timeout_s)
            if pending:
                log.warning("connections_cut", remaining=len(pending))
                for task in pending:
                    closing[task].ws.transport.abort()
        if self.server is not None:
            self.server.close(close_connections=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)


def _path(ws: ServerConnection) -> str:
    """The request path without its query string (which may carry a token)."""
    return ws.request.path.split("?", 1)[0] if ws.request else ""


def _peer(conn: ServerConnection) -> str:
    try:
        host, port = conn.remote_address[:2]
        return f"{host}:{port}"
    except Exception:
        return "?"


def _peer_host(conn: ServerConnection) -> str:
    try:
        return str(conn.remote_address[0])
    except Exception:
        return ""
