"""Every client-to-server frame type of PROTOCOL.md section 3 with a malformed
body gets ERROR MALFORMED_FRAME, fatal, over a real socket; and the order of
the checks of section 2 (length, type, state, body, then what the frame asks).

Each case is named after the section it checks. Malformed frames are made from
valid ones built by the codec (`encode`), then cut, extended or with one field's
bytes replaced, so they follow the frame layouts whatever those become.
Three servers: the default (Cython codec), one running the pure-Python codec
(SWITCHBOARD_CODEC=python), and the WebSocket transport for a sample.
"""
import struct
import uuid

import pytest

from _core import frames as F
from _core.pycodec import encode
from _core.protocol import (MAX_RECEIVED_IDS, MAX_SUBSCRIBE, MAX_TOKEN_LENGTH, PROTOCOL_VERSION, ErrorCode,
                            FrameType)
from rawclient import Raw
from test_adversarial import assert_fatal, assert_still_serving
from wsclient import OP_BINARY, WsRaw, ws_frame

HEADER = struct.Struct("!IBB")


# -- malformed frames from valid ones ---------------------------------------------------

def body_of(wire: bytes) -> bytes:
    return wire[HEADER.size:]


def reframe(wire: bytes, body: bytes) -> bytes:
    """`wire`'s type and flags around another body, with the length that body needs."""
    return HEADER.pack(len(body) + 2, wire[4], wire[5]) + body


def cut(wire: bytes, n: int) -> bytes:
    """The frame without the last `n` bytes of its body (a truncated field)."""
    return reframe(wire, body_of(wire)[:-n])


def keep(wire: bytes, n: int) -> bytes:
    """Only the first `n` bytes of the body."""
    return reframe(wire, body_of(wire)[:n])


def plus(wire: bytes, extra: bytes = b"\0") -> bytes:
    """A trailing byte after the last field."""
    return reframe(wire, body_of(wire) + extra)


def swap(wire: bytes, old: bytes, new: bytes) -> bytes:
    """One field's bytes (found by a marker value that occurs once) replaced."""
    body = body_of(wire)
    assert body.count(old) == 1, (old, body)
    return reframe(wire, body.replace(old, new))


def str8_empty(wire: bytes, marker: str) -> bytes:
    """The str8 field holding `marker` made empty (0 bytes)."""
    m = marker.encode()
    return swap(wire, bytes([len(m)]) + m, b"\0")


def not_utf8(wire: bytes, marker: str) -> bytes:
    """The field holding `marker` with its first byte replaced by 0xFF (never UTF-8)."""
    m = marker.encode()
    return swap(wire, m, b"\xff" + m[1:])


def set_byte(wire: bytes, offset: int, value: int) -> bytes:
    body = bytearray(body_of(wire))
    body[offset] = value
    return reframe(wire, bytes(body))


def set_u16(wire: bytes, offset: int, value: int) -> bytes:
    body = bytearray(body_of(wire))
    struct.pack_into("!H", body, offset, value)
    return reframe(wire, bytes(body))


def raw_frame(ftype: int, body: bytes) -> bytes:
    return HEADER.pack(len(body) + 2, ftype, 0) + body


# Marker values: each occurs once in its frame's body.
RCPT, PEER, USER, GRP, ARG, DEV, TOK = "RCPT", "PEER", "USER", "#GRPX", "ARGS", "DEVX", "TOKEN"
SEND = encode(F.Send(7, RCPT, b"payload"))
SEND_NO_PAYLOAD = encode(F.Send(7, RCPT, b""))
RECEIVED = encode(F.Received((11, 12)))
PING, PONG = encode(F.Ping(7)), encode(F.Pong(7))
READ = encode(F.Read(PEER, (11, 12)))
SUBSCRIBE = encode(F.Subscribe((USER, "OTHR"), True))
TYPING = encode(F.Typing(PEER, True))
PRIVACY = encode(F.Privacy(True))
GROUP = encode(F.Group(9, 8, GRP, '{"ARGS": 1}'))


# section -> case -> malformed frame, sent after WELCOME
AFTER_WELCOME = {
    "3-SEND": {
        "truncated-client-id": keep(SEND, 5),
        "truncated-recipient": cut(SEND_NO_PAYLOAD, 2),
        "recipient-length-past-the-end": swap(SEND_NO_PAYLOAD, b"\x04" + RCPT.encode(), b"\x09" + RCPT.encode()),
        "empty-recipient": str8_empty(SEND, RCPT),
        "recipient-not-utf8": not_utf8(SEND, RCPT),
    },
    "3-RECEIVED": {
        "empty-body": keep(RECEIVED, 0),
        "truncated-count": keep(RECEIVED, 1),
        "fewer-ids-than-count": cut(RECEIVED, 8),
        "truncated-id": cut(RECEIVED, 3),
        "trailing-byte": plus(RECEIVED),
        "count-over-4096": raw_frame(FrameType.RECEIVED, struct.pack("!H", MAX_RECEIVED_IDS + 1)
                                     + bytes(8 * (MAX_RECEIVED_IDS + 1))),
    },
    "3-PING": {"empty-body": keep(PING, 0), "truncated-nonce": cut(PING, 1), "trailing-byte": plus(PING)},
    "3-PONG": {"empty-body": keep(PONG, 0), "truncated-nonce": cut(PONG, 1), "trailing-byte": plus(PONG)},
    "3-READ": {
        "empty-peer": str8_empty(READ, PEER),
        "peer-not-utf8": not_utf8(READ, PEER),
        "truncated-peer": keep(READ, 3),
        "truncated-count": keep(READ, 1 + len(PEER) + 1),
        "fewer-ids-than-count": cut(READ, 8),
        "trailing-byte": plus(READ),
        "count-over-4096": raw_frame(FrameType.READ, body_of(encode(F.Read(PEER, ())))[:-2]
                                     + struct.pack("!H", MAX_RECEIVED_IDS + 1) + bytes(8 * (MAX_RECEIVED_IDS + 1))),
    },
    "3-SUBSCRIBE": {
        "on-not-a-boolean": set_byte(SUBSCRIBE, 0, 2),
        "truncated-count": keep(SUBSCRIBE, 2),
        "fewer-users-than-count": cut(SUBSCRIBE, 5),
        "truncated-user": cut(SUBSCRIBE, 2),
        "empty-user": str8_empty(SUBSCRIBE, USER),
        "user-not-utf8": not_utf8(SUBSCRIBE, USER),
        "trailing-byte": plus(SUBSCRIBE),
        "count-over-1024": raw_frame(FrameType.SUBSCRIBE, struct.pack("!BH", 1, MAX_SUBSCRIBE + 1)
                                     + b"\x01u" * (MAX_SUBSCRIBE + 1)),
    },
    "3-TYPING": {
        "typing-not-a-boolean": set_byte(TYPING, len(body_of(TYPING)) - 1, 2),
        "no-typing-byte": cut(TYPING, 1),
        "empty-peer": str8_empty(TYPING, PEER),
        "peer-not-utf8": not_utf8(TYPING, PEER),
        "trailing-byte": plus(TYPING),
    },
    "3-PRIVACY": {"empty-body": keep(PRIVACY, 0), "trailing-byte": plus(PRIVACY)},
    "3-GROUP": {
        "truncated-request-id": keep(GROUP, 4),
        "no-op": keep(GROUP, 8),
        "empty-group": str8_empty(GROUP, GRP),
        "group-not-utf8": swap(GROUP, GRP.encode(), b"#\xff" + GRP.encode()[2:]),
        "truncated-arg": cut(GROUP, 1),
        "arg-length-past-the-end": set_u16(GROUP, 8 + 1 + 1 + len(GRP), 200),
        "arg-not-utf8": not_utf8(GROUP, ARG),
        "trailing-byte": plus(GROUP),
    },
}

CASES = [(section, name) for section, cases in AFTER_WELCOME.items() for name in cases]


def hello_cases(token: str) -> dict:
    """Section 3 HELLO: case -> malformed HELLO (with a valid token, only the body is wrong)."""
    good = encode(F.Hello(version=PROTOCOL_VERSION, token=token, device=DEV))
    long_token = encode(F.Hello(version=PROTOCOL_VERSION, token="T" * MAX_TOKEN_LENGTH, device=DEV))
    tok = token.encode()
    return {
        "empty-body": keep(good, 0),
        "truncated-version": keep(good, 1),
        "truncated-token-length": keep(good, 3),
        "truncated-token": keep(good, 2 + 2 + len(tok) - 1),
        "token-not-utf8": swap(good, tok, b"\xff" + tok[1:]),
        "token-over-1024-bytes": swap(long_token, struct.pack("!H", MAX_TOKEN_LENGTH) + b"T" * MAX_TOKEN_LENGTH,
                                      struct.pack("!H", MAX_TOKEN_LENGTH + 1) + b"T" * (MAX_TOKEN_LENGTH + 1)),
        "empty-device": str8_empty(good, DEV),
        "device-not-utf8": not_utf8(good, DEV),
        "truncated-last-field": cut(good, 3),
        "trailing-byte": plus(good),
    }


HELLO_CASES = list(hello_cases("t"))


# -- the servers ------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["cython", "python"])
def server(request, tmp_path_factory):
    from conftest import start_gateway
    env = {"SWITCHBOARD_CODEC": request.param} if request.param == "python" else None
    g = start_gateway(tmp_path_factory.mktemp(f"bodies-{request.param}"), "--workers", "1", "--store", "memory",
                      "--hello-timeout", "3", env=env)
    yield g
    g.stop()


def after_welcome(gw, frame: bytes, user: str = "") -> tuple:
    """HELLO, WELCOME, then `frame`: (frames after WELCOME, closed)."""
    with Raw(gw) as r:
        r.hello(gw.token(user or "b-" + uuid.uuid4().hex[:8]))
        r.send(frame)
        return r.until_eof()


@pytest.mark.parametrize("section,case", CASES, ids=[f"{s}-{c}" for s, c in CASES])
def test_malformed_body_after_welcome(server, section, case):
    """PROTOCOL.md section 3 (the frame's table) and section 2: a body that does not match its
    layout exactly is ERROR MALFORMED_FRAME, fatal, ref 0, and the connection closes."""
    assert_fatal(after_welcome(server, AFTER_WELCOME[section][case]), ErrorCode.MALFORMED_FRAME)


@pytest.mark.parametrize("case", HELLO_CASES, ids=[f"3-HELLO-{c}" for c in HELLO_CASES])
def test_malformed_hello(server, case):
    """PROTOCOL.md section 3, HELLO: MALFORMED_FRAME (fatal) before the token is looked at."""
    with Raw(server) as r:
        r.send(hello_cases(server.token("hello-" + uuid.uuid4().hex[:8]))[case])
        assert_fatal(r.until_eof(), ErrorCode.MALFORMED_FRAME)


def test_servers_still_serve_after_every_malformed_frame(server):
    """PROTOCOL.md section 2: a protocol error closes one connection, never the server."""
    assert_still_serving(server)


# -- the order of the checks (section 2) --------------------------------------------------

def test_2_order_type_before_body(server):
    """Section 2, check 3: an unknown type is UNKNOWN_FRAME_TYPE whatever its body holds."""
    bad_type = max(FrameType) + 1
    with Raw(server) as r:
        r.hello(server.token("order-type"))
        r.send(HEADER.pack(2 + 3, bad_type, 0) + b"\xff\xff\xff")
        assert_fatal(r.until_eof(), ErrorCode.UNKNOWN_FRAME_TYPE)


@pytest.mark.parametrize("frame", [
    cut(encode(F.Hello(version=PROTOCOL_VERSION, token="t", device="d")), 3),
    cut(encode(F.Welcome(1, 1, "u", "d", 65536, 64742, 30000, 0)), 3),
    cut(encode(F.Ack(1, 2, 3)), 3),
    cut(encode(F.GroupInfo(1, "{}")), 1),
], ids=["3-HELLO-again", "3-WELCOME", "3-ACK", "3-GROUP_INFO"])
def test_2_order_state_before_body(server, frame):
    """Section 2, check 4 before 5: a frame not valid in the state is UNEXPECTED_FRAME even
    when its body is malformed too (a second HELLO, or a server-to-client type)."""
    assert_fatal(after_welcome(server, frame), ErrorCode.UNEXPECTED_FRAME)


def test_2_order_state_before_body_before_welcome(server):
    """Section 2 and section 5: before WELCOME only HELLO is valid; a truncated PING is
    UNEXPECTED_FRAME, not MALFORMED_FRAME."""
    with Raw(server) as r:
        r.send(cut(PING, 3))
        assert_fatal(r.until_eof(), ErrorCode.UNEXPECTED_FRAME)


def test_2_order_state_before_body_send_only(server):
    """Section 2 and section 3 HELLO: RECEIVED from a send-only session is UNEXPECTED_FRAME
    even with a malformed body."""
    with Raw(server) as r:
        r.send(encode(F.Hello(version=PROTOCOL_VERSION, token=server.token("order-bot"), device="bot",
                              send_only=True)))
        assert isinstance(r.frame(), F.Welcome)
        r.send(cut(RECEIVED, 3))
        assert_fatal(r.until_eof(), ErrorCode.UNEXPECTED_FRAME)


def test_2_order_version_before_the_rest_of_hello(server):
    """Section 2: HELLO's version is checked first, so another version's HELLO (whose layout
    may differ) is UNSUPPORTED_VERSION even if the rest does not parse as this version's."""
    other = encode(F.Hello(version=PROTOCOL_VERSION + 1, token=server.token("order-v"), device="d"))
    for frame in (plus(other, b"\0" * 9), cut(other, 3)):
        with Raw(server) as r:
            r.send(frame)
            assert_fatal(r.until_eof(), ErrorCode.UNSUPPORTED_VERSION)


def test_2_order_body_before_token(server):
    """Section 2: the body is validated before the token is checked: a HELLO with a bad token
    and a trailing byte is MALFORMED_FRAME, not AUTH_FAILED."""
    with Raw(server) as r:
        r.send(plus(encode(F.Hello(version=PROTOCOL_VERSION, token="not a token", device="d"))))
        assert_fatal(r.until_eof(), ErrorCode.MALFORMED_FRAME)


def test_2_order_body_before_payload_size(server):
    """Section 2: a SEND whose recipient is not UTF-8 is MALFORMED_FRAME (fatal) even when its
    payload is also too large, which alone would be the non-fatal PAYLOAD_TOO_LARGE."""
    with Raw(server) as r:
        w = r.hello(server.token("order-size"))
        big = encode(F.Send(7, RCPT, b"p" * (w.max_payload + 1)))
        r.send(not_utf8(big, RCPT))
        assert_fatal(r.until_eof(), ErrorCode.MALFORMED_FRAME)


def test_2_order_body_before_retry_answer(server):
    """Section 2: a malformed SEND is MALFORMED_FRAME even when its first field repeats a
    SEND already answered (it is not taken for a retry and answered with the original ACK)."""
    user = "order-retry-" + uuid.uuid4().hex[:6]
    with Raw(server) as r:
        r.hello(server.token(user))
        r.send(encode(F.Send(1, RCPT, b"first")))
        assert isinstance(r.frame(), F.Ack)
        r.send(not_utf8(encode(F.Send(1, RCPT, b"first")), RCPT))
        assert_fatal(r.until_eof(), ErrorCode.MALFORMED_FRAME)


# -- the same over WebSocket (section 9a: everything in sections 2-9 applies unchanged) ----

WS_SAMPLE = [("3-SEND", "recipient-not-utf8"), ("3-PONG", "trailing-byte"), ("3-SUBSCRIBE", "on-not-a-boolean"),
             ("3-RECEIVED", "fewer-ids-than-count"), ("3-GROUP", "arg-not-utf8"), ("3-TYPING", "empty-peer")]


@pytest.mark.parametrize("section,case", WS_SAMPLE, ids=[f"9a-{s}-{c}" for s, c in WS_SAMPLE])
def test_malformed_body_over_websocket(ws_server, section, case):
    """PROTOCOL.md section 9a and section 3: over WebSocket a malformed body is ERROR
    MALFORMED_FRAME, fatal, then Close 1008."""
    with WsRaw(ws_server.host, ws_server.ws_port) as c:
        c.upgrade()
        c.send_proto(F.Hello(version=PROTOCOL_VERSION, token=ws_server.token("ws-" + uuid.uuid4().hex[:6]),
                             device="web"))
        assert isinstance(c.next(), F.Welcome)
        c.send(ws_frame(OP_BINARY, AFTER_WELCOME[section][case]))
        code, _, before = c.close_code()
        assert [(type(f), f.code, f.fatal, f.ref) for f in before] == [(F.Error, ErrorCode.MALFORMED_FRAME, True, 0)]
        assert code == 1008


@pytest.fixture(scope="module")
def ws_server(tmp_path_factory):
    from conftest import start_gateway
    g = start_gateway(tmp_path_factory.mktemp("bodies-ws"), "--workers", "1", "--store", "memory")
    assert g.ws_port > 0, g.text
    yield g
    g.stop()
