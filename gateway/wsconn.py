"""A connection on the WebSocket listener: one HTTP/1.1 request, then either a
file of the web page (and close) or RFC 6455 carrying the binary protocol.

Past the opening handshake everything is the TCP connection's path
(gateway/connection.py) with the WebSocket layer of the Cython core around it:
reads go through `_core._ws.WsReader` (unmask, then the same protocol Decoder,
HELLO sink and router session), and the session's per-turn output goes out
through `WsWriter` as binary messages of whole protocol frames.

Closing: a WebSocket violation gets a Close frame with its status code (1002,
1003, 1007, 1009); a fatal protocol ERROR is followed by Close 1008, a GOAWAY
by Close 1001; a client's Close is echoed. The server then closes TCP at once.

Hand-off to the worker owning the user (after HELLO, like TCP) carries
`u16 len, reader state, u32 len, protocol bytes (HELLO and what followed it,
unmasked), raw bytes not yet parsed`.
"""
import struct

from _core._ws import WsReader, WsWriter, close_frame, frame
from _core.errors import WebSocketError
from _core.protocol import LENGTH_SIZE, FrameType

from . import log
from .connection import Connection
from .handshake import MAX_REQUEST, WS_PATH, HttpReject, parse_request, request_end, upgrade

_log = log.get("switchboard.ws")

OP_CLOSE, OP_PING = 0x8, 0x9
OP_PONG = 0xA
#: server messages are cut (at protocol frame boundaries) past this size
OUT_MESSAGE = 256 << 10
_STATE = struct.Struct("!H")
#: every connection reads its request into this one buffer; only an incomplete
#: request's bytes are kept (as `_http`) between reads, so a connection holds no request buffer
_SCRATCH = bytearray(MAX_REQUEST)
_SCRATCH_VIEW = memoryview(_SCRATCH)
_PROTO = struct.Struct("!I")


def pack_handoff(state: bytes, proto: bytes, rest: bytes) -> bytes:
    return _STATE.pack(len(state)) + state + _PROTO.pack(len(proto)) + proto + rest


def unpack_handoff(data: bytes) -> tuple[bytes, bytes, bytes]:
    (n,) = _STATE.unpack_from(data)
    state = data[2:2 + n]
    (m,) = _PROTO.unpack_from(data, 2 + n)
    start = 6 + n
    return state, data[start:start + m], data[start + m:]


class WsConnection(Connection):
    __slots__ = ("_http", "ws", "writer")
    WEBSOCKET = True

    def __init__(self):
        super().__init__()
        self._http = b""         # the start of a request split across reads (copied to the front
        #                          of _SCRATCH by get_buffer); None once answered
        self.ws = None           # WsReader once upgraded
        self.writer = None       # WsWriter once upgraded; its `closed` once our Close frame went out

    def get_buffer(self, sizehint):
        if self.ws is not None:
            return self.ws.get_buffer(sizehint)
        n = len(self._http or b"")
        _SCRATCH[:n] = self._http or b""
        return _SCRATCH_VIEW[n:]

    def buffer_updated(self, nbytes):
        if self.ws is not None:
            self._input(self.ws.buffer_updated, nbytes)
        else:
            self._request(nbytes)

    def _input(self, parse, arg):
        super()._input(self._guarded, (parse, arg))

    def _guarded(self, call) -> None:
        try:
            call[0](call[1])
        except WebSocketError as exc:
            self.gateway.errors[f"WS_{exc.close_code}"] += 1
            self.ws_close(exc.close_code, exc.reason)

    # -- HTTP --------------------------------------------------------------------------
    def _request(self, nbytes: int) -> None:
        if self._http is None:
            return                                   # answered already; ignore what follows
        start = len(self._http)                      # what get_buffer put in front of the new bytes
        total = start + nbytes
        end = request_end(_SCRATCH, total, start)
        if end < 0:
            if total >= MAX_REQUEST:
                self._http_done(HttpReject(431, f"request head over {MAX_REQUEST} bytes").response())
            else:
                self._http = bytes(_SCRATCH_VIEW[:total])
            return
        head, rest = bytes(_SCRATCH_VIEW[:end]), bytes(_SCRATCH_VIEW[end:total])
        self._http = None
        gw = self.gateway
        try:
            req = parse_request(head)
            if req.path != WS_PATH:
                self._http_done(gw.web.answer(req))
                return
            answer = upgrade(req, gw.config.ws_origins)
        except HttpReject as exc:
            gw.errors[f"HTTP_{exc.status}"] += 1
            self._http_done(exc.response())
            return
        self.transport.write(answer)
        self._upgrade()
        if rest:
            self._input(self.ws.feed, rest)

    def _http_done(self, data: bytes) -> None:
        self._http = None
        self.transport.write(data)
        self.transport.close()

    def _upgrade(self) -> None:
        cfg = self.gateway.config
        # the connection itself is the reader's control callback (__call__): no bound method kept
        self.ws = WsReader(self.decoder, self, cfg.pre_auth_max_frame + LENGTH_SIZE)
        self.writer = WsWriter(self.transport, OUT_MESSAGE, self)

    def _hello_timed_out(self):
        if self.ws is None and not self.transport.is_closing():
            self._hello_timer = None
            self.gateway.errors["HTTP_408"] += 1
            self._http_done(HttpReject(408, "no complete request in time").response())
            return
        super()._hello_timed_out()

    # -- the protocol session ----------------------------------------------------------
    def _hello_sink(self, ftype, flags, body):
        super()._hello_sink(ftype, flags, body)
        if self.session is not None:
            self.ws.max_message = self.gateway.config.max_frame + LENGTH_SIZE

    def session_io(self) -> dict:
        return {"transport": self.writer}

    def session_closed(self) -> None:
        """The router is done with the session (fatal ERROR, GOAWAY, replaced)."""
        last = self.writer.last_type
        code = 1001 if last == FrameType.GOAWAY else 1008 if last == FrameType.ERROR else 1000
        self.ws_close(code, "")

    def write_and_close(self, data: bytes) -> None:
        if self.writer is None:                      # no WebSocket yet: nothing to say in it
            self.transport.close()
            return
        self.writer.write(data)
        self.ws_close(1008, "")

    def goaway_and_close(self, data: bytes) -> None:
        """GOAWAY REDIRECT in a binary message, then Close 1001 as after any GOAWAY."""
        self.writer.write(data)
        self.ws_close(1001, "")

    def ws_close(self, code: int, reason: str) -> None:
        """Send Close(code) once, stop reading protocol frames, close TCP."""
        if self.ws is not None:
            self.ws.closing = True
        self.decoder.stop()
        if self.writer is not None and not self.writer.closed and not self.transport.is_closing():
            self.writer.closed = True
            _log.info("event=ws_closed peer=%s code=%d reason=%s", log.q(self.peer), code, log.q(reason or "-"))
            self.transport.write(close_frame(code, reason))
        self.transport.close()

    def __call__(self, opcode: int, payload: bytes) -> None:
        """Ping, Pong and Close from the reader (already validated)."""
        if opcode == OP_PING:
            if not self.writer.closed and not self.transport.is_closing():
                self.transport.write(frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            # echo the client's status code (none if it sent none), then close
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.ws_close(code, "")

    # -- hand-off ------------------------------------------------------------------------
    def handoff_payload(self, hello: bytes) -> bytes:
        return pack_handoff(self.ws.take_state(), hello + self.decoder.take_buffered(), self.ws.take_rest())

    def feed_handed_off(self, data: bytes) -> None:
        state, proto, rest = unpack_handoff(data)
        self._upgrade()
        self.ws.set_state(state)
        self._input(self.decoder.feed, proto)
        if rest and self.session is not None:
            self._input(self.ws.feed, rest)
        if not self.transport.is_closing() and self._handoff is None:
            self.transport.resume_reading()
