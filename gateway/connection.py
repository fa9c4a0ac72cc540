"""One client connection: read into the decoder, authenticate HELLO, then hand
every frame to the router session. The data path after HELLO never comes back
to Python: decoder -> SessionCore.on_frame -> RouteCore.route (all Cython)."""
import asyncio

from _core import frames
from _core.codec import Decoder, decode_body, encode
from _core.errors import ProtocolError, UnexpectedFrame
from _core.protocol import PROTOCOL_VERSION, ErrorCode, FrameType

from . import log
from .auth import AuthError

_log = log.get("switchboard.conn")


class Connection(asyncio.BufferedProtocol):
    __slots__ = ("gateway", "transport", "session", "decoder", "_hello_timer", "peer")

    def __init__(self, gateway):
        self.gateway = gateway
        self.transport = None
        self.session = None
        self.peer = None
        self.decoder = Decoder(self._hello_sink, gateway.config.pre_auth_max_frame)
        self._hello_timer = None

    # -- asyncio.BufferedProtocol ------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        self.gateway.connections.add(self)
        self._hello_timer = self.gateway.loop.call_later(self.gateway.config.hello_timeout,
                                                         self._hello_timed_out)

    def get_buffer(self, sizehint):
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes):
        try:
            self.decoder.buffer_updated(nbytes)
        except ProtocolError as exc:
            self.gateway.count_error(exc.code)
            self.fail(exc.code, exc.reason)
        except Exception:
            _log.exception("internal error on connection from %s", self.peer)
            self.gateway.count_error(ErrorCode.INTERNAL)
            self.fail(ErrorCode.INTERNAL, "internal server error")

    def eof_received(self):
        return False    # close our side too; undelivered messages stay stored

    def connection_lost(self, exc):
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        if self.session is not None:
            self.gateway.router.close_session(self.session)
        self.gateway.connections.discard(self)

    # -- before WELCOME ----------------------------------------------------------
    def _hello_sink(self, ftype, flags, body):
        if ftype != FrameType.HELLO:
            raise UnexpectedFrame(f"expected HELLO, got {FrameType(ftype).name}")
        hello = decode_body(ftype, flags, body)
        if hello.version != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {hello.version} is not supported; this server "
                                f"speaks {PROTOCOL_VERSION}", ErrorCode.UNSUPPORTED_VERSION)
        gw = self.gateway
        try:
            user, device = gw.authority.verify(hello.token, hello.device)
        except AuthError as exc:
            raise ProtocolError(str(exc), exc.code) from None
        self._hello_timer.cancel()
        self._hello_timer = None
        cfg = gw.config
        welcome = frames.Welcome(PROTOCOL_VERSION, 0, user, device, cfg.max_frame,
                                 gw.router.max_payload, cfg.ping_interval_ms, gw.now_ms())
        self.session = gw.router.open_session(user, device, self.transport.write, self.transport.close,
                                              resume_after=hello.resume_after, welcome=welcome)
        self.decoder.max_frame = cfg.max_frame
        self.decoder.set_sink(self.session)

    def _hello_timed_out(self):
        self._hello_timer = None
        if self.session is None and not self.transport.is_closing():
            self.gateway.count_error(ErrorCode.HELLO_TIMEOUT)
            self.fail(ErrorCode.HELLO_TIMEOUT, "no HELLO within "
                      f"{self.gateway.config.hello_timeout:g} s")

    # -- errors -------------------------------------------------------------------
    def fail(self, code: int, reason: str) -> None:
        """Answer ERROR (fatal) and close; the rest of the worker is unaffected."""
        _log.info("closing %s: %s (%s)", self.peer, reason, ErrorCode(code).name)
        self.decoder.stop()
        if self.transport.is_closing():
            return
        self.transport.pause_reading()
        if self.session is not None:
            self.session.error(code, reason, 0, True)   # after any ACKs already queued
        else:
            self.transport.write(encode(frames.Error(code, 0, reason, True)))
            self.transport.close()
