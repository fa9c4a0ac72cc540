"""One client connection: read into the decoder, authenticate HELLO, then hand
every frame to the router session. The data path after HELLO never comes back
to Python: decoder -> SessionCore.on_frame -> RouteCore.route (all Cython)."""
import asyncio
import os
import socket

from _core import frames
from _core.codec import Decoder, decode_body, encode
from _core.errors import MalformedFrame, ProtocolError, UnexpectedFrame
from _core.ids import id_problem
from _core.protocol import PROTOCOL_VERSION, ErrorCode, FrameType, GoawayCode

from . import log
from .auth import AuthError

_log = log.get("switchboard.conn")


class Redirected(Exception):
    """Raised from the HELLO sink when another node serves the user: the read
    stops there and `_input` answers GOAWAY REDIRECT (a slot per connection for
    this rare case would cost every idle session)."""

    def __init__(self, user: str, address: str):
        super().__init__(address)
        self.user, self.address = user, address


class Connection(asyncio.BufferedProtocol):
    # Every field here is paid a million times over on a dense gateway: keep it short.
    # Its gateway, and whether another worker handed it over, are its class's
    # (`for_gateway`), not slots: two slots fewer made it 96 B instead of 112.
    __slots__ = ("transport", "session", "decoder", "_hello_timer", "_handoff", "_addr", "_idle", "_expires")
    WEBSOCKET = False        # hand-offs say which kind of connection the owner adopts
    gateway = None
    handed_off = False       # came from another worker: must be ours

    @classmethod
    def for_gateway(cls, gateway, handed_off: bool = False) -> type:
        """The protocol class of `gateway`'s connections (with `handed_off`: of those
        another worker hands it)."""
        return type(cls.__name__, (cls,), {"__slots__": (), "gateway": gateway, "handed_off": handed_off})

    def __init__(self):
        self.transport = None
        self.session = None
        self.decoder = Decoder(self._hello_sink, self.gateway.config.pre_auth_max_frame)
        self._hello_timer = None
        self._handoff = None             # (owner, HELLO bytes) once HELLO says another worker owns it
        self._addr = None                # its source address's counters (gateway/limits.py)
        self._idle = 0.0                 # the limits clock at its last read (gateway/limits.py)
        self._expires = 0                # when its token expires (Unix s; 0 before HELLO)

    # -- asyncio.BufferedProtocol ------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        if not self.gateway.limits.admit(self):
            return                           # refused (connection limits): already closing
        if self.handed_off:
            transport.pause_reading()        # the bytes the other worker read come first
        else:
            self.gateway.connects[self.WEBSOCKET] += 1
        self.gateway.open_conns[self.WEBSOCKET] += 1
        self.gateway.opening.add(self)
        self._hello_timer = self.gateway.loop.call_later(self.gateway.config.hello_timeout,
                                                         self._hello_timed_out)

    @property
    def peer(self):
        """The client's address, for logs (not kept: an idle connection holds as little as it can)."""
        return self.transport.get_extra_info("peername") if self.transport is not None else None

    def get_buffer(self, sizehint):
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes):
        self._input(self.decoder.buffer_updated, nbytes)

    def feed_handed_off(self, data: bytes) -> None:
        """Start a connection handed over by another worker with what it had read."""
        self._input(self.decoder.feed, data)
        if not self.transport.is_closing() and self._handoff is None:
            self.transport.resume_reading()

    def _input(self, parse, arg):
        self._idle = self.gateway.limits.clock      # one shared float: no allocation per read
        try:
            parse(arg)
            if self.session is not None and self.session.paused:
                self.gateway.limits.check_slow(self)
            if self._handoff is not None:
                self._hand_off()
        except Redirected as r:
            self.redirect(r.user, r.address)
        except ProtocolError as exc:
            self.gateway.count_error(exc.code)
            self.fail(exc.code, exc.reason)
        except Exception:
            _log.exception("event=internal_error peer=%s", log.q(self.peer))
            self.gateway.count_error(ErrorCode.INTERNAL)
            self.fail(ErrorCode.INTERNAL, "internal server error")

    def eof_received(self):
        return False    # close our side too; undelivered messages stay stored

    def _cancel_hello_timer(self) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None

    def connection_lost(self, exc):
        self._cancel_hello_timer()
        if self.session is not None:
            self.gateway.router.close_session(self.session)
        if self._addr is not None:              # admitted (a refused one was never counted open)
            self.gateway.open_conns[self.WEBSOCKET] -= 1
        self.gateway.opening.discard(self)
        self.gateway.limits.release(self)

    def pause_writing(self):
        """The transport holds more than the high water mark: a slow consumer (gateway/limits.py)."""
        self.gateway.limits.pause_writing(self)

    def resume_writing(self):
        self.gateway.limits.resume_writing(self)

    # -- before WELCOME ----------------------------------------------------------
    def _hello_sink(self, ftype, flags, body):
        if ftype != FrameType.HELLO:
            raise UnexpectedFrame(f"expected HELLO, got {FrameType(ftype).name}")
        # the version comes first and is checked first: another version's HELLO may have
        # another layout, and must be told UNSUPPORTED_VERSION rather than MALFORMED_FRAME
        if len(body) < 2:
            raise MalformedFrame("HELLO ends before its version")
        version = int.from_bytes(body[:2], "big")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {version} is not supported; this server "
                                f"speaks {PROTOCOL_VERSION}", ErrorCode.UNSUPPORTED_VERSION)
        hello = decode_body(ftype, flags, body)
        problem = id_problem(hello.device)
        if problem is not None:
            raise MalformedFrame(f"HELLO device: {problem}")
        gw = self.gateway
        if not self.handed_off and gw.bus is not None and gw.cluster is None:
            # another worker's user goes there unverified: that worker checks the token
            # (checking it twice was a fifth of a handed-over session's open)
            claimed = gw.authority.claimed_user(hello.token)
            if claimed is not None:
                owner = gw.shards.owner_uncached(claimed)
                if owner != gw.shards.me:
                    self._handoff = (owner, encode(hello))
                    self.decoder.stop()
                    return
        try:
            user, device, expires = gw.authority.grant(hello.token, hello.device)
        except AuthError as exc:
            raise ProtocolError(str(exc), exc.code) from None
        address = gw.redirect_for(user, self.WEBSOCKET)
        if address is not None:
            raise Redirected(user, address)
        owner = gw.shards.owner_uncached(user)
        if owner != gw.shards.me:
            if self.handed_off or gw.bus is None:
                raise ProtocolError(f"{user} is served by worker {owner}, which is not reachable from here",
                                    ErrorCode.UNAVAILABLE)
            # another worker owns this user: hand it the connection after this read
            self._handoff = (owner, encode(hello))
            self.decoder.stop()
            return
        self._hello_timer.cancel()
        self._hello_timer = None
        cfg = gw.config
        welcome = frames.Welcome(PROTOCOL_VERSION, 0, user, device, cfg.max_frame,
                                 gw.router.max_payload, cfg.ping_interval_ms, gw.now_ms())
        self.session = gw.router.open_session(user, device, **self.session_io(),
                                              resume_after=hello.resume_after, welcome=welcome,
                                              send_only=hello.send_only, producer=hello.producer)
        gw.opening.discard(self)                 # reached through its session from now on
        self.decoder.max_frame = cfg.max_frame
        self.decoder.set_sink(self.session)
        self._expires = gw.limits.expiry(expires)
        gw.limits.session_opened(self)

    def session_io(self) -> dict:
        """How the router session writes and closes: the transport itself
        (cheaper per session than two bound methods)."""
        return {"transport": self.transport}

    def handoff_payload(self, hello: bytes) -> bytes:
        """What the owner needs to continue the stream: the HELLO and every byte read after it."""
        return hello + self.decoder.take_buffered()

    def _hand_off(self) -> None:
        owner, hello = self._handoff
        gw = self.gateway
        data = self.handoff_payload(hello)
        self.transport.pause_reading()
        near = None
        if self.transport.get_extra_info("sslcontext") is not None:
            # TLS state cannot move to another process: the owner gets one end of a
            # socket pair carrying the plaintext, and this worker relays (gateway/tls.py)
            near, far = socket.socketpair()
            fd = os.dup(far.fileno())
            far.close()
        else:
            sock = self.transport.get_extra_info("socket")
            fd = os.dup(sock.fileno())
        if gw.bus.hand_off(owner, fd, data, websocket=self.WEBSOCKET):
            gw.handoffs_out += 1
            if near is not None:
                from .tls import relay
                self._cancel_hello_timer()
                gw.opening.discard(self)
                gw.loop.create_task(relay(gw.loop, self.transport, near))
            else:
                self.transport.abort()       # our descriptor only: the owner holds the connection now
        else:
            if near is not None:
                near.close()
            self._handoff = None
            gw.count_error(ErrorCode.UNAVAILABLE)
            self.fail(ErrorCode.UNAVAILABLE, f"worker {owner} is restarting; reconnect shortly")

    def _hello_timed_out(self):
        self._hello_timer = None
        if self.session is None and not self.transport.is_closing():
            self.gateway.count_error(ErrorCode.HELLO_TIMEOUT)
            self.fail(ErrorCode.HELLO_TIMEOUT, "no HELLO within "
                      f"{self.gateway.config.hello_timeout:g} s")

    def redirect(self, user: str, address: str) -> None:
        """GOAWAY REDIRECT in place of WELCOME (PROTOCOL.md section 3, GOAWAY): another
        node serves this user; the client connects to `address` next, keeping its state."""
        gw = self.gateway
        gw.redirects += 1
        _log.info("event=redirect peer=%s user=%s to=%s", log.q(self.peer), log.q(user), log.q(address))
        self.decoder.stop()
        if not self.transport.is_closing():
            self.transport.pause_reading()
            self.goaway_and_close(encode(frames.Goaway(GoawayCode.REDIRECT, 0, address)))

    # -- errors -------------------------------------------------------------------
    def fail(self, code: int, reason: str) -> None:
        """Answer ERROR (fatal) and close; the rest of the worker is unaffected."""
        _log.info("event=conn_closed peer=%s code=%s reason=%s", log.q(self.peer), ErrorCode(code).name, log.q(reason))
        self.decoder.stop()
        if self.transport.is_closing():
            return
        self.transport.pause_reading()
        if self.session is not None:
            self.session.error(code, reason, 0, True)   # after any ACKs already queued
            # a peer worker that never answers must not keep this connection open
            self.gateway.loop.call_later(self.gateway.config.shutdown_grace, self.transport.abort)
        else:
            self.write_and_close(encode(frames.Error(code, 0, reason, True)))

    def write_and_close(self, data: bytes) -> None:
        """Last bytes before a session exists (a fatal ERROR), then close."""
        self.transport.write(data)
        self.transport.close()

    def goaway_and_close(self, data: bytes) -> None:
        """A GOAWAY before a session exists (REDIRECT), then close."""
        self.transport.write(data)
        self.transport.close()
