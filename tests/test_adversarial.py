"""Hostile and broken clients against a real gateway process.

Every case checks the ERROR frame that docs/PROTOCOL.md documents (code, FATAL
flag, ref 0), that the server then closes the connection, and that the server
still serves well-behaved clients afterwards.
"""
import asyncio
import os
import random
import struct
import time
import uuid

import pytest

from _core import frames as F
from _core.protocol import PROTOCOL_VERSION, ErrorCode, FrameType
from _core.pycodec import encode
from gateway.auth import TokenAuthority

HEADER = struct.Struct("!IBB")


from rawclient import Raw  # noqa: E402


def exchange(gw, data: bytes, timeout: float = 5.0):
    """Connect, send `data`, read until the server closes: (frames, server_closed)."""
    with Raw(gw, timeout) as r:
        if data:
            r.send(data)
        return r.until_eof()


def assert_fatal(result, code: ErrorCode, preceding: int = 0):
    """`result` = (frames, closed): exactly `preceding` frames, then one fatal ERROR(code), then close."""
    frames, closed = result
    assert len(frames) == preceding + 1, frames
    err = frames[-1]
    assert isinstance(err, F.Error), frames
    assert (ErrorCode(err.code), err.fatal, err.ref) == (code, True, 0), err
    assert closed, "the server did not close the connection after a fatal ERROR"


def assert_still_serving(gw):
    """Two fresh SDK clients exchange a message through the same server."""
    assert gw.alive(), "gateway process died"
    a, b = f"ok-a-{uuid.uuid4().hex[:8]}", f"ok-b-{uuid.uuid4().hex[:8]}"
    payload = os.urandom(16)

    async def main():
        async with gw.client(a) as ca, gw.client(b) as cb:
            sent = await ca.send(b, payload, timeout=5)
            m = await cb.recv(timeout=5)
            assert (m.sender, m.payload, m.id) == (a, payload, sent.id)
            await cb.ack(m)
    asyncio.run(main())


def hello(token: str, device: str = "raw", version: int = PROTOCOL_VERSION) -> bytes:
    return encode(F.Hello(version, token, device, 0))


def drain_mailbox_first(gw, user: str, marker_from: str = "marker-sender"):
    """Connect `user`, send it a fresh marker, return every message that arrived up to and
    including the marker (so anything left over from earlier shows up first)."""
    marker = os.urandom(8)

    async def main():
        got = []
        async with gw.client(user, device="check") as c, gw.client(marker_from) as s:
            await s.send(user, marker, timeout=5)
            while True:
                m = await c.recv(timeout=5)
                got.append(m)
                await c.ack(m)
                if m.payload == marker and m.sender == marker_from:
                    return got
    return asyncio.run(main())


# -- HELLO / authentication --------------------------------------------------------

AUTH_CASES = {
    "garbage-token": (lambda gw: hello("this is not a token"), ErrorCode.AUTH_FAILED),
    "empty-token": (lambda gw: hello(""), ErrorCode.AUTH_FAILED),
    "other-secret": (lambda gw: hello(TokenAuthority(os.urandom(32)).issue("alice")), ErrorCode.AUTH_FAILED),
    "tampered-user": (lambda gw: hello(_tamper(gw.token("alice"))), ErrorCode.AUTH_FAILED),
    "expired": (lambda gw: hello(gw.token("alice", ttl=1, now=time.time() - 100)), ErrorCode.TOKEN_EXPIRED),
    "wrong-device": (lambda gw: hello(gw.token("alice", device="phone"), device="laptop"), ErrorCode.AUTH_FAILED),
    "version-1": (lambda gw: hello(gw.token("alice"), version=1), ErrorCode.UNSUPPORTED_VERSION),
    "version-3": (lambda gw: hello(gw.token("alice"), version=3), ErrorCode.UNSUPPORTED_VERSION),
    "version-0": (lambda gw: hello(gw.token("alice"), version=0), ErrorCode.UNSUPPORTED_VERSION),
}


def _tamper(token: str) -> str:
    """Same MAC, body re-encoded with another user: the signature no longer matches."""
    import base64
    prefix, body, mac = token.split(".")
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    assert raw[1:6] == b"alice"
    raw = raw[:1] + b"mallo" + raw[6:]
    return ".".join([prefix, base64.urlsafe_b64encode(raw).rstrip(b"=").decode(), mac])


@pytest.mark.parametrize("case", list(AUTH_CASES))
def test_hello_rejected(gateway_proc, case):
    make, code = AUTH_CASES[case]
    assert_fatal(exchange(gateway_proc, make(gateway_proc)), code)
    assert_still_serving(gateway_proc)


def test_device_bound_token_works_on_its_own_device(gateway_proc):
    # the positive twin of "wrong-device": the rejection is about the binding, nothing else
    with Raw(gateway_proc) as r:
        w = r.hello(gateway_proc.token("alice", device="phone"), device="phone")
        assert (w.user, w.device) == ("alice", "phone")


def test_rejected_hello_discards_what_follows(gateway_proc):
    # a SEND pipelined behind a rejected HELLO must not be routed
    data = hello("bogus") + encode(F.Send(1, "victim", b"sneaky"))
    assert_fatal(exchange(gateway_proc, data), ErrorCode.AUTH_FAILED)
    got = drain_mailbox_first(gateway_proc, "victim")
    assert [m.sender for m in got] == ["marker-sender"]


def test_no_hello_times_out(gateway_proc):
    start = time.monotonic()
    result = exchange(gateway_proc, b"", timeout=6)
    elapsed = time.monotonic() - start
    assert_fatal(result, ErrorCode.HELLO_TIMEOUT)
    assert 0.8 <= elapsed < 5, elapsed      # --hello-timeout 1
    assert_still_serving(gateway_proc)


def test_partial_hello_times_out(gateway_proc):
    # half a HELLO is not a HELLO: the timer still fires
    data = hello(gateway_proc.token("alice"))
    result = exchange(gateway_proc, data[:len(data) // 2], timeout=6)
    assert_fatal(result, ErrorCode.HELLO_TIMEOUT)
    assert_still_serving(gateway_proc)


@pytest.mark.parametrize("frame", [
    F.Send(1, "bob", b"x"),
    F.Ping(7),
    F.Received((1,)),
    F.Pong(7),
    F.Welcome(2, 1, "alice", "d", 65536, 65006, 30000, 0),
], ids=lambda f: type(f).__name__)
def test_first_frame_must_be_hello(gateway_proc, frame):
    assert_fatal(exchange(gateway_proc, encode(frame)), ErrorCode.UNEXPECTED_FRAME)
    assert_still_serving(gateway_proc)


# -- framing -------------------------------------------------------------------------

def test_oversize_frame_before_auth_decided_from_prefix(gateway_proc):
    # only the 4-byte prefix announcing 5000 (> 4096) is sent; the server must not wait
    # for the body (if it did, the 1 s hello timer would answer HELLO_TIMEOUT instead)
    assert_fatal(exchange(gateway_proc, struct.pack("!I", 5000)), ErrorCode.FRAME_TOO_LARGE)
    assert_fatal(exchange(gateway_proc, struct.pack("!I", 4097)), ErrorCode.FRAME_TOO_LARGE)
    assert_still_serving(gateway_proc)


def test_pre_auth_limit_is_inclusive(gateway_proc):
    # a HELLO of exactly 4096 bytes passes the size check and fails on its trailing bytes
    body = encode(F.Hello(2, gateway_proc.token("alice"), "raw", 0))[6:]
    body += b"\0" * (4096 - 2 - len(body))
    frame = HEADER.pack(4096, FrameType.HELLO, 0) + body
    assert_fatal(exchange(gateway_proc, frame), ErrorCode.MALFORMED_FRAME)
    assert_still_serving(gateway_proc)


def test_oversize_frame_after_auth(gateway_proc):
    with Raw(gateway_proc) as r:
        w = r.hello(gateway_proc.token("alice"))
        r.send(struct.pack("!I", w.max_frame + 1))
        assert_fatal(r.until_eof(), ErrorCode.FRAME_TOO_LARGE)
    assert_still_serving(gateway_proc)


def test_frame_of_exactly_max_frame_is_accepted_after_auth(gateway_proc):
    # length == max_frame passes the size check; its payload is then too large: a
    # non-fatal PAYLOAD_TOO_LARGE, and the connection stays usable
    with Raw(gateway_proc) as r:
        w = r.hello(gateway_proc.token("alice"))
        payload_len = w.max_frame - 2 - 8 - 1 - 3
        frame = encode(F.Send(1, "bob", b"p" * payload_len))
        assert struct.unpack_from("!I", frame)[0] == w.max_frame
        r.send(frame)
        err = r.frame()
        assert isinstance(err, F.Error)
        assert (ErrorCode(err.code), err.fatal, err.ref) == (ErrorCode.PAYLOAD_TOO_LARGE, False, 1)
        r.send(encode(F.Ping(99)))
        assert r.frame() == F.Pong(99)


@pytest.mark.parametrize("data,code", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ErrorCode.FRAME_TOO_LARGE),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32), ErrorCode.FRAME_TOO_LARGE),   # TLS hello
    (HEADER.pack(2, 0x7F, 0), ErrorCode.UNKNOWN_FRAME_TYPE),
    (HEADER.pack(2, 0x00, 0), ErrorCode.UNKNOWN_FRAME_TYPE),
    (HEADER.pack(2, max(FrameType) + 1, 0), ErrorCode.UNKNOWN_FRAME_TYPE),
    (HEADER.pack(100, 0x7F, 0), ErrorCode.UNKNOWN_FRAME_TYPE),    # decided before the body arrives
    (struct.pack("!I", 0), ErrorCode.MALFORMED_FRAME),
    (struct.pack("!IB", 1, FrameType.HELLO), ErrorCode.MALFORMED_FRAME),
    (HEADER.pack(2, FrameType.HELLO, 0), ErrorCode.MALFORMED_FRAME),          # empty HELLO body
], ids=["http", "tls", "type-7f", "type-00", "type-after-last", "type-7f-no-body", "length-0", "length-1",
        "empty-hello"])
def test_garbage_before_auth(gateway_proc, data, code):
    assert_fatal(exchange(gateway_proc, data), code)
    assert_still_serving(gateway_proc)


def _send_body(client_id: int, recipient: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("!QB", client_id, len(recipient)) + recipient + payload


def _frame(ftype: int, body: bytes, flags: int = 0) -> bytes:
    return HEADER.pack(len(body) + 2, ftype, flags) + body


MALFORMED_AFTER_AUTH = {
    # recipient length says 10 but the frame ends after 3 bytes
    "send-truncated-recipient": _frame(FrameType.SEND, struct.pack("!QB", 1, 10) + b"bob"),
    "send-truncated-client-id": _frame(FrameType.SEND, b"\0\0\0\1"),
    "send-empty-recipient": _frame(FrameType.SEND, _send_body(1, b"", b"x")),
    "send-recipient-not-utf8": _frame(FrameType.SEND, _send_body(1, b"\xff\xfe", b"x")),
    "ping-trailing-bytes": _frame(FrameType.PING, struct.pack("!Q", 1) + b"!"),
    "ping-short": _frame(FrameType.PING, b"\0\0"),
    "received-count-mismatch": _frame(FrameType.RECEIVED, struct.pack("!HQ", 2, 1)),
    "received-too-many": _frame(FrameType.RECEIVED, struct.pack("!H", 4097) + bytes(8 * 4097)),
}


@pytest.mark.parametrize("case", list(MALFORMED_AFTER_AUTH))
def test_malformed_frame_after_auth(gateway_proc, case):
    with Raw(gateway_proc) as r:
        r.hello(gateway_proc.token("alice"))
        r.send(MALFORMED_AFTER_AUTH[case])
        assert_fatal(r.until_eof(), ErrorCode.MALFORMED_FRAME)
    assert_still_serving(gateway_proc)


@pytest.mark.parametrize("frame", [
    F.Hello(2, "", "raw", 0),
    F.Welcome(2, 1, "alice", "raw", 65536, 65006, 30000, 0),
    F.Ack(1, 2, 3),
    F.Error(1, 0, "no", True),
    F.Goaway(1, 0, "bye"),
], ids=lambda f: type(f).__name__)
def test_unexpected_frame_after_welcome(gateway_proc, frame):
    data = encode(frame) if not isinstance(frame, F.Hello) else encode(
        F.Hello(2, gateway_proc.token("alice"), "raw", 0))
    with Raw(gateway_proc) as r:
        r.hello(gateway_proc.token("alice"))
        r.send(data)
        assert_fatal(r.until_eof(), ErrorCode.UNEXPECTED_FRAME)
    assert_still_serving(gateway_proc)


def test_acks_queued_before_a_fatal_error_are_sent_first(gateway_proc):
    # PROTOCOL.md 5.6: a fatal ERROR follows any ACKs already queued
    with Raw(gateway_proc) as r:
        r.hello(gateway_proc.token("alice"))
        r.send(encode(F.Send(1, "bob", b"a")) + encode(F.Send(2, "bob", b"b")) + struct.pack("!I", 0))
        frames, closed = r.until_eof()
    assert [f.seq for f in frames[:2] if isinstance(f, F.Ack)] == [1, 2], frames
    assert_fatal((frames, closed), ErrorCode.MALFORMED_FRAME, preceding=2)
    got = drain_mailbox_first(gateway_proc, "bob")
    assert [m.payload for m in got[:2]] == [b"a", b"b"]
    assert len(got) == 3


# -- slow, broken and many clients ---------------------------------------------------

def test_byte_at_a_time_client(gateway_proc):
    gw = gateway_proc
    with Raw(gw, nodelay=True) as r:
        for b in encode(F.Hello(2, gw.token("alice"), "trickle", 0)):
            r.send(bytes([b]))
        w = r.frame()
        assert isinstance(w, F.Welcome) and (w.user, w.device) == ("alice", "trickle")
        for b in encode(F.Send(1, "bob", b"one byte at a time")):
            r.send(bytes([b]))
        ack = r.frame()
        assert isinstance(ack, F.Ack) and ack.seq == 1
        for b in encode(F.Ping(1234)):
            r.send(bytes([b]))
        assert r.frame() == F.Pong(1234)
    got = drain_mailbox_first(gw, "bob")
    assert [(m.id, m.sender, m.sender_device, m.payload) for m in got[:-1]] == \
        [(ack.msg_id, "alice", "trickle", b"one byte at a time")]


def test_abrupt_disconnect_mid_frame(gateway_proc):
    gw = gateway_proc
    # after auth: half a SEND, then RST
    r = Raw(gw)
    r.hello(gw.token("alice"))
    frame = encode(F.Send(1, "bob", b"never finished" * 10))
    r.send(frame[:len(frame) // 2])
    r.abort()
    # before auth: half a HELLO, then RST; and a plain FIN mid-HELLO
    r = Raw(gw)
    r.send(hello(gw.token("alice"))[:20])
    r.abort()
    r = Raw(gw)
    r.send(hello(gw.token("alice"))[:20])
    r.close()
    assert_still_serving(gw)
    got = drain_mailbox_first(gw, "bob")
    assert [m.sender for m in got] == ["marker-sender"]      # the half SEND was not routed
    # alice's device can connect again (its old session is gone, not wedged)
    with Raw(gw) as again:
        assert again.hello(gw.token("alice")).user == "alice"
        again.send(encode(F.Ping(5)))
        assert again.frame() == F.Pong(5)


def test_many_bad_connections_in_a_row(gateway_proc):
    gw = gateway_proc
    rng = random.Random(1234)
    patterns = [
        (b"GET / HTTP/1.1\r\n\r\n", ErrorCode.FRAME_TOO_LARGE),
        (struct.pack("!I", 0), ErrorCode.MALFORMED_FRAME),
        (HEADER.pack(2, 0x7F, 0), ErrorCode.UNKNOWN_FRAME_TYPE),
        (hello("junk"), ErrorCode.AUTH_FAILED),
        (encode(F.Ping(1)), ErrorCode.UNEXPECTED_FRAME),
    ]
    for i in range(50):
        if i % 5 == 4:
            # random junk, then hang up without reading: nobody reads the answer
            r = Raw(gw)
            r.send(b"\xff" + bytes(rng.getrandbits(8) for _ in range(rng.randrange(3, 200))))
            r.abort() if i % 10 == 4 else r.close()
            continue
        data, code = patterns[i % len(patterns)]
        assert_fatal(exchange(gw, data), code)
    assert_still_serving(gw)


def test_idle_unauthenticated_connections_do_not_block_others(gateway_proc):
    gw = gateway_proc
    idle = [Raw(gw, timeout=6) for _ in range(20)]
    try:
        assert_still_serving(gw)
        for r in idle:
            assert_fatal(r.until_eof(), ErrorCode.HELLO_TIMEOUT)
    finally:
        for r in idle:
            r.close()
    assert_still_serving(gw)


# -- identity --------------------------------------------------------------------------

def test_sender_identity_comes_from_the_session(gateway_proc):
    gw = gateway_proc
    with Raw(gw) as r:
        r.hello(gw.token("alice"), device="bob")       # a device id that looks like another user
        r.send(encode(F.Send(1, "bob", b"from: mallory")))
        ack = r.frame()
        assert isinstance(ack, F.Ack)
    got = drain_mailbox_first(gw, "bob")
    assert [(m.id, m.sender, m.sender_device, m.payload) for m in got[:-1]] == \
        [(ack.msg_id, "alice", "bob", b"from: mallory")]


def test_client_cannot_inject_a_deliver(gateway_proc):
    gw = gateway_proc
    with Raw(gw) as r:
        r.hello(gw.token("mallory"))
        r.send(encode(F.Deliver(1, 1, "alice", "phone", b"trust me, I am alice")))
        assert_fatal(r.until_eof(), ErrorCode.UNEXPECTED_FRAME)
    got = drain_mailbox_first(gw, "mallory")
    assert [m.sender for m in got] == ["marker-sender"]
    assert_still_serving(gw)


# -- the pure-Python codec in the server --------------------------------------------

@pytest.mark.parametrize("data,code", [
    (None, ErrorCode.AUTH_FAILED),
    (b"", ErrorCode.HELLO_TIMEOUT),
    (struct.pack("!I", 5000), ErrorCode.FRAME_TOO_LARGE),
], ids=["bad-token", "no-hello", "oversize"])
def test_python_codec_server_reports_errors(gateway_factory, data, code):
    gw = gateway_factory("--hello-timeout", "1", env={"SWITCHBOARD_CODEC": "python"})
    if data is None:
        data = hello("garbage")
    assert_fatal(exchange(gw, data, timeout=4), code)
    assert_still_serving(gw)


def test_read_with_a_peer_that_is_not_utf8(gateway_proc):
    body = bytes([2]) + b"\xff\xfe" + struct.pack("!HQ", 1, 42)          # str8 peer (bad UTF-8), 1 id
    frame = HEADER.pack(len(body) + 2, FrameType.READ, 0) + body
    result = exchange(gateway_proc, hello(gateway_proc.token("alice")) + frame)
    assert_fatal(result, ErrorCode.MALFORMED_FRAME, preceding=1)           # WELCOME, then the error
    assert_still_serving(gateway_proc)


def test_send_only_session_has_nothing_to_acknowledge(gateway_proc):
    hello_send_only = encode(F.Hello(2, gateway_proc.token("bot"), "bot", 0, True))
    result = exchange(gateway_proc, hello_send_only + encode(F.Received((1,))))
    assert_fatal(result, ErrorCode.UNEXPECTED_FRAME, preceding=1)
    assert_still_serving(gateway_proc)
