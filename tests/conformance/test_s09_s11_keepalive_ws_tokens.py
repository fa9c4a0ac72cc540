"""docs/PROTOCOL.md sections 9 (keepalive and the idle timeout, measured), 9a
(WebSocket framing), 10 (tokens: the documented format, expiry at HELLO and
during a session) and 11 (versions)."""
import time

import pytest

from _core import frames as F
from _core.protocol import PROTOCOL_VERSION, ErrorCode, GoawayCode
from _core.pycodec import encode
from gateway.auth import load_secret
from wsclient import OP_BINARY, WsRaw, ws_frame

from .kit import Wire, doc_token, fatal, hello, run, session, uid

INTERVAL = 0.2              # gw_fast: --ping-interval-ms 200 --idle-timeout-pings 3
TIMEOUT = 3 * INTERVAL


def _goaway_after(w: Wire, started: float) -> float:
    """Seconds from `started` (when the client last sent) to the GOAWAY IDLE_TIMEOUT."""
    frames, closed = w.until_eof()
    took = time.monotonic() - started
    assert closed and len(frames) == 1 and frames[0].code == GoawayCode.IDLE_TIMEOUT, frames
    assert frames[0].reconnect_ms == 0
    return took


def test_s9_idle_timeout_is_idle_timeout_pings_intervals(gw_fast):
    """Section 9, Idle timeout: a session from which nothing arrives gets GOAWAY
    IDLE_TIMEOUT after 3 ping intervals (0.6 s here): never earlier, and within a
    quarter interval later on a quiet server (asserted: within one interval, for a
    shared test machine). Measured from the client's last write, which is when the
    server's silence starts at the earliest."""
    with Wire(gw_fast, timeout=10) as w:
        w.send(hello(gw_fast.token(uid("idle"))))
        sent = time.monotonic()
        assert w.frame().ping_interval_ms == INTERVAL * 1000
        took = _goaway_after(w, sent)
    assert TIMEOUT <= took < TIMEOUT + INTERVAL, took


def test_s9_any_bytes_restart_the_idle_count(gw_fast):
    """Section 9, Idle timeout: any bytes restart the count, even part of a frame:
    half a PING sent at 0.4 s moves the GOAWAY to 0.6 s after it."""
    with session(gw_fast, uid("idle-part"), timeout=10) as w:
        w.send(encode(F.Ping(1)))
        assert w.frame() == F.Pong(1)
        t0 = time.monotonic()
        w.sock.settimeout(2 * INTERVAL)              # nothing comes before the half frame is sent
        with pytest.raises(TimeoutError):
            w.frame()
        w.sock.settimeout(10)
        w.send(encode(F.Ping(2))[:5])
        sent = time.monotonic()
        assert sent - t0 >= 2 * INTERVAL
        took = _goaway_after(w, sent)
    assert TIMEOUT <= took < TIMEOUT + INTERVAL, took


def test_s9_a_client_that_sends_every_interval_stays_connected(gw_fast):
    """Section 9: a client that keeps its connection open MUST send a frame every
    `ping_interval_ms`; the SDK does and is never told to go, while a silent
    session beside it is."""
    async def main():
        import asyncio
        async with gw_fast.client(uid("keep")) as c:
            with Wire(gw_fast, timeout=10) as w:
                w.send(hello(gw_fast.token(uid("silent"))))
                sent = time.monotonic()
                assert isinstance(w.frame(), F.Welcome)
                took = await asyncio.to_thread(_goaway_after, w, sent)
                assert took >= TIMEOUT
            assert c.connected and c.reconnects == 0 and c.goaway is None
            await c.send(uid("peer"), "still here", timeout=5)
    run(main())


def test_s9a_a_websocket_message_must_not_end_inside_a_frame(gw1):
    """Section 9a: a binary message MUST carry whole frames; one that ends inside a
    frame is MALFORMED_FRAME, then Close 1008."""
    assert gw1.ws_port > 0
    with WsRaw(gw1.host, gw1.ws_port) as c:
        c.upgrade()
        c.send_proto(F.Hello(version=PROTOCOL_VERSION, token=gw1.token(uid("ws")), device="web", resume_after=0))
        assert isinstance(c.next(), F.Welcome)
        c.send(ws_frame(OP_BINARY, encode(F.Ping(1)) + encode(F.Ping(2))[:-1]))
        code, _, before = c.close_code()
        assert before[0] == F.Pong(1)
        err = before[-1]
        assert (err.code, err.fatal, err.ref, code) == (ErrorCode.MALFORMED_FRAME, True, 0, 1008), (before, code)


def test_s10_a_token_made_as_documented_is_accepted(gw1):
    """Section 10: the token format as written there (HMAC-SHA256 with the domain
    string over the body) is what the server accepts: the user in WELCOME is the
    token's, an empty device means any device, a bound one must match (else
    AUTH_FAILED)."""
    secret = load_secret(gw1.data_dir)
    user = uid("fmt")
    expiry = int(time.time()) + 600
    with Wire(gw1) as w:
        w.send(hello(doc_token(secret, user, "", expiry), device="anything"))
        welcome = w.frame()
        assert (welcome.user, welcome.device) == (user, "anything"), welcome
    with Wire(gw1) as w:
        w.send(hello(doc_token(secret, user, "phone", expiry), device="phone"))
        assert w.frame().device == "phone"
    with Wire(gw1) as w:
        w.send(hello(doc_token(secret, user, "phone", expiry), device="laptop"))
        fatal(w, ErrorCode.AUTH_FAILED)


def test_s10_an_expired_token_opens_no_session(gw1):
    """Section 10 and section 4, TOKEN_EXPIRED: `expiry <= now` at HELLO is fatal."""
    secret = load_secret(gw1.data_dir)
    for expiry in (int(time.time()), int(time.time()) - 1, 0):
        with Wire(gw1) as w:
            w.send(hello(doc_token(secret, uid("old"), "", expiry)))
            fatal(w, ErrorCode.TOKEN_EXPIRED)


def test_s10_a_session_ends_when_its_token_expires(gw1):
    """Section 10, A session ends when its token expires: registered and send-only
    sessions get ERROR TOKEN_EXPIRED (fatal, ref 0) at the expiry, within one sweep
    (a second here), and are closed; a session with a later expiry stays."""
    secret = load_secret(gw1.data_dir)
    user = uid("exp")
    expiry = int(time.time()) + 2
    token = doc_token(secret, user, "", expiry)
    sessions = []
    for device, send_only in (("phone", False), ("bot", True)):
        w = Wire(gw1, timeout=10)
        w.send(hello(token, device, send_only=send_only))
        assert isinstance(w.frame(), F.Welcome)
        sessions.append(w)
    with session(gw1, user, "laptop") as lasting:
        for w in sessions:
            fatal(w, ErrorCode.TOKEN_EXPIRED)
            ended = time.time()
            assert expiry <= ended < expiry + 1.5, (expiry, ended)
            w.close()
        assert lasting.ping(1) == []
    with Wire(gw1) as w:                                  # and the same token is refused from then on
        w.send(hello(token, "phone"))
        fatal(w, ErrorCode.TOKEN_EXPIRED)


def test_s11_a_server_refuses_every_other_version(gw1):
    """Section 11: the server accepts only its version and answers anything else
    with UNSUPPORTED_VERSION (fatal); WELCOME carries the version in use."""
    for version in (PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1):
        with Wire(gw1) as w:
            w.send(hello(gw1.token(uid("v")), version=version))
            fatal(w, ErrorCode.UNSUPPORTED_VERSION)
    with session(gw1, uid("v")) as w:
        assert w.welcome.version == PROTOCOL_VERSION
