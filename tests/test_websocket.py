"""The WebSocket listener against a real gateway process: the opening
handshake (accepted, and every rejection), the web page's files, the protocol
in binary messages, each RFC 6455 violation with its Close code,
fragmentation, large and many small messages, byte-at-a-time masking, the
third-party `websockets` client, a hostile connection next to a working one,
and the hand-off to another worker."""
import asyncio
import base64
import re
import struct
import time
import uuid

import pytest

from _core import frames as F
from _core.protocol import ErrorCode, GoawayCode
from _core.pycodec import encode
from wsclient import (OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, WsRaw, handshake_request,
                      ws_frame)


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    from conftest import start_gateway
    g = start_gateway(tmp_path_factory.mktemp("ws"), "--workers", "1", "--store", "memory",
                      "--hello-timeout", "2", "--ws-origin", "https://friend.example")
    assert g.ws_port > 0, g.text
    yield g
    g.stop()


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def ws(gw, timeout: float = 5.0) -> WsRaw:
    return WsRaw(gw.host, gw.ws_port, timeout)


def session(gw, user: str, device: str = "web") -> WsRaw:
    c = ws(gw)
    c.upgrade()
    c.send_proto(F.Hello(2, gw.token(user), device, 0))
    w = c.next()
    assert isinstance(w, F.Welcome) and w.user == user, w
    return c


def assert_still_serving(gw) -> None:
    """Two fresh WebSocket sessions exchange a message."""
    assert gw.alive()
    a, b = uid("ok-a"), uid("ok-b")
    with session(gw, a) as ca, session(gw, b) as cb:
        ca.send_proto(F.Send(1, b, b"still here"))
        ack = ca.next()
        d = cb.next()
        assert isinstance(ack, F.Ack) and (d.sender, d.payload, d.msg_id) == (a, b"still here", ack.msg_id)


# -- handshake ---------------------------------------------------------------------------

def test_rfc_example_key_and_subprotocol(gw):
    with ws(gw) as c:
        r = c.http(handshake_request(gw.host, gw.ws_port, key="dGhlIHNhbXBsZSBub25jZQ==",
                                     extra={"Sec-WebSocket-Protocol": "chat, switchboard.v1"}))
        assert r.status == 101
        assert r.headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        assert r.headers["upgrade"].lower() == "websocket" and "upgrade" in r.headers["connection"].lower()
        assert r.headers["sec-websocket-protocol"] == "switchboard.v1"
        assert "sec-websocket-extensions" not in r.headers      # no compression offered back


def test_case_insensitive_headers_and_token_lists(gw):
    with ws(gw) as c:
        r = c.http(handshake_request(gw.host, gw.ws_port, extra={"Upgrade": "WebSocket",
                                                                 "Connection": "keep-alive, Upgrade"}))
        assert r.status == 101


@pytest.mark.parametrize("origin", [None, "https://friend.example", "https://friend.example/", "SAME"])
def test_origins_accepted(gw, origin):
    extra = {}
    if origin == "SAME":
        extra["Origin"] = f"http://{gw.host}:{gw.ws_port}"
    elif origin:
        extra["Origin"] = origin
    with ws(gw) as c:
        assert c.http(handshake_request(gw.host, gw.ws_port, extra=extra)).status == 101


REJECTIONS = [
    ("POST", dict(method="POST"), 405, {"allow": "GET"}),
    ("HTTP/1.0", dict(version="HTTP/1.0"), 505, {}),
    ("garbage version", dict(version="HTTX/1.1"), 400, {}),
    ("no Host", dict(drop=("Host",)), 400, {}),
    ("no Upgrade", dict(drop=("Upgrade",)), 426, {"upgrade": "websocket"}),
    ("Upgrade h2c", dict(extra={"Upgrade": "h2c"}), 426, {"upgrade": "websocket"}),
    ("Connection without upgrade", dict(extra={"Connection": "keep-alive"}), 400, {}),
    ("version 8", dict(extra={"Sec-WebSocket-Version": "8"}), 426, {"sec-websocket-version": "13"}),
    ("no version", dict(drop=("Sec-WebSocket-Version",)), 426, {"sec-websocket-version": "13"}),
    ("no key", dict(drop=("Sec-WebSocket-Key",)), 400, {}),
    ("key not base64", dict(key="not base64 at all!!!!!!="), 400, {}),
    ("key of 15 bytes", dict(key=base64.b64encode(b"x" * 15).decode()), 400, {}),
    ("key of 17 bytes", dict(key=base64.b64encode(b"x" * 17).decode()), 400, {}),
    ("foreign origin", dict(extra={"Origin": "https://evil.example"}), 403, {}),
    ("origin on another port", dict(extra={"Origin": "http://127.0.0.1:1"}), 403, {}),
    ("request body", dict(extra={"Content-Length": "5"}), 400, {}),
    ("chunked body", dict(extra={"Transfer-Encoding": "chunked"}), 400, {}),
    ("unknown path", dict(path="/nope"), 404, {}),
]


@pytest.mark.parametrize("name,kw,status,headers", REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_handshake_rejections(gw, name, kw, status, headers):
    with ws(gw) as c:
        r = c.http(handshake_request(gw.host, gw.ws_port, **kw))
        assert r.status == status, (r.status, r.body)
        for k, v in headers.items():
            assert r.headers[k] == v
        assert r.headers["connection"] == "close" and r.body
        assert c.read_to_eof() == b""          # and the server closes


@pytest.mark.parametrize("raw,status", [
    (b"GET /ws\r\nHost: x\r\n\r\n", 400),                                   # no version
    (b"GET  /ws HTTP/1.1\r\nHost: x\r\n\r\n", 400),                         # two spaces
    (b"GET /ws HTTP/1.1\r\nHost : x\r\n\r\n", 400),                         # space before the colon
    (b"GET /ws HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),               # obsolete line folding
    (b"GET /ws HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),               # duplicate Host
    (b"GET /ws HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n"
     b"Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n\r\n", 400),         # duplicate key
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),         # a TLS ClientHello
])
def test_malformed_requests(gw, raw, status):
    with ws(gw) as c:
        assert c.http(raw).status == status


def test_request_too_large(gw):
    with ws(gw) as c:
        r = c.http(handshake_request(gw.host, gw.ws_port, extra={"X-Pad": "a" * 9000}))
        assert r.status == 431


def test_handshake_timeout(gw):
    with ws(gw) as c:
        c.send(b"GET /ws HTTP/1.1\r\nHost: x\r\n")        # never finished
        start = time.monotonic()
        r = c.http(b"")
        assert r.status == 408 and time.monotonic() - start < 4.5


def test_hello_timeout_after_upgrade(gw):
    with ws(gw) as c:
        c.upgrade()
        code, _, before = c.close_code()
        assert [type(f) for f in before] == [F.Error] and before[0].code == ErrorCode.HELLO_TIMEOUT
        assert code == 1008


# -- the web page ------------------------------------------------------------------------

def test_static_files(gw):
    with ws(gw) as c:
        r = c.http(f"GET / HTTP/1.1\r\nHost: {gw.host}\r\n\r\n".encode())
        assert r.status == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
        assert r.headers["cache-control"] == "no-cache" and r.headers["etag"].startswith('"')
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"
        assert b"<html" in r.body.lower() and b"switchboard" in r.body.lower()
        etag = r.headers["etag"]
    with ws(gw) as c:
        r = c.http(f"GET /index.html HTTP/1.1\r\nHost: x\r\nIf-None-Match: {etag}\r\n\r\n".encode())
        assert r.status == 304 and r.headers["etag"] == etag and r.body == b""
    with ws(gw) as c:
        r = c.http(b"GET /switchboard.js HTTP/1.1\r\nHost: x\r\n\r\n")
        assert r.status == 200 and r.headers["content-type"] == "text/javascript; charset=utf-8"
        assert b"export class Client" in r.body
    with ws(gw) as c:
        r = c.http(b"HEAD /style.css HTTP/1.1\r\nHost: x\r\n\r\n")
        assert r.status == 200 and r.headers["content-type"] == "text/css; charset=utf-8"
        assert int(r.headers["content-length"]) > 0 and c.read_to_eof() == b""
    with ws(gw) as c:
        assert c.http(b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n").status == 405
    with ws(gw) as c:
        assert c.http(b"GET /../gateway/server.py HTTP/1.1\r\nHost: x\r\n\r\n").status == 404


# -- the protocol over WebSocket ----------------------------------------------------------

def test_chat_with_tcp_sdk_client(gw):
    a, b = uid("wa"), uid("tb")

    async def main():
        async with gw.client(b) as cb:
            c = await asyncio.to_thread(session, gw, a)
            c.send_proto(F.Send(1, b, b"from the browser"))
            ack = await asyncio.to_thread(c.next)
            m = await cb.recv(timeout=5)
            assert (ack.seq, m.sender, m.text, m.id) == (1, a, "from the browser", ack.msg_id)
            await cb.ack(m)
            r = await asyncio.to_thread(c.next)
            assert isinstance(r, F.Receipt) and (r.kind, r.msg_id, r.by) == (1, ack.msg_id, b)
            sent = await cb.send(a, "from python")
            d = await asyncio.to_thread(c.next)
            assert (d.sender, d.payload, d.msg_id) == (b, b"from python", sent.id)
            c.close()
    asyncio.run(main())


def test_ping_pong_and_client_close(gw):
    with session(gw, uid("pp")) as c:
        c.send(ws_frame(OP_PING, b"nonce-123"))
        assert c.frame() == (True, OP_PONG, b"nonce-123")
        c.send(ws_frame(OP_PING, b""))
        assert c.frame() == (True, OP_PONG, b"")
        c.send_proto(F.Ping(99))
        assert c.next() == F.Pong(99)
        c.send(ws_frame(OP_CLOSE, struct.pack("!H", 1000) + "bye ✓".encode()))
        assert c.close_code()[0] == 1000
    with session(gw, uid("pp")) as c:
        c.send(ws_frame(OP_CLOSE, b""))           # no status: the echo has none either
        fin, op, data = c.frame()
        assert (op, data) == (OP_CLOSE, b"")


def test_goaway_replaced_closes_with_1001(gw):
    user = uid("rep")
    with session(gw, user, "phone") as old, session(gw, user, "phone"):
        code, _, before = old.close_code()
        assert [type(f) for f in before] == [F.Goaway] and before[0].code == GoawayCode.REPLACED
        assert code == 1001


def test_protocol_error_sends_error_then_1008(gw):
    with ws(gw) as c:
        c.upgrade()
        c.send_proto(F.Ping(1))                     # not HELLO
        code, _, before = c.close_code()
        assert [(type(f), f.code, f.fatal) for f in before] == [(F.Error, ErrorCode.UNEXPECTED_FRAME, True)]
        assert code == 1008
    with ws(gw) as c:
        c.upgrade()
        c.send_proto(F.Hello(2, "sb1.bad.token", "web", 0))
        code, _, before = c.close_code()
        assert before[0].code == ErrorCode.AUTH_FAILED and code == 1008
    assert_still_serving(gw)


def test_message_must_end_on_a_frame_boundary(gw):
    with session(gw, uid("half")) as c:
        data = encode(F.Send(1, "x", b"abc"))
        c.send(ws_frame(OP_BINARY, data[:-1]))
        code, _, before = c.close_code()
        assert before[0].code == ErrorCode.MALFORMED_FRAME and code == 1008


# -- violations and their Close codes -------------------------------------------------------

def _close_after_hello(gw, data: bytes) -> int:
    with session(gw, uid("bad")) as c:
        c.send(data)
        code, _, _ = c.close_code()
        return code


VIOLATIONS = [
    ("unmasked", ws_frame(OP_BINARY, encode(F.Ping(1)), mask=False), 1002),
    ("rsv1", ws_frame(OP_BINARY, encode(F.Ping(1)), rsv=4), 1002),
    ("rsv3", ws_frame(OP_BINARY, encode(F.Ping(1)), rsv=1), 1002),
    ("data opcode 3", ws_frame(3, b""), 1002),
    ("control opcode 0xB", ws_frame(0xB, b""), 1002),
    ("text message", ws_frame(OP_TEXT, b"hello"), 1003),
    ("ping over 125", ws_frame(OP_PING, b"x" * 126), 1002),
    ("fragmented ping", ws_frame(OP_PING, b"x", fin=False), 1002),
    ("continuation first", ws_frame(OP_CONT, b"x"), 1002),
    ("binary inside a message", ws_frame(OP_BINARY, b"", fin=False) + ws_frame(OP_BINARY, b""), 1002),
    ("64-bit length high bit", ws_frame(OP_BINARY, b"", length=1 << 63, length_form=127), 1002),
    ("non-minimal 16-bit length", ws_frame(OP_BINARY, encode(F.Ping(1)), length_form=126), 1002),
    ("non-minimal 64-bit length", ws_frame(OP_BINARY, encode(F.Ping(1)), length_form=127), 1002),
    ("huge length", ws_frame(OP_BINARY, b"", length=1 << 40), 1009),
    ("message over the limit", ws_frame(OP_BINARY, b"\0" * 70000), 1009),
    ("fragments over the limit", ws_frame(OP_BINARY, encode(F.Send(1, "x", b"\0" * 40000)), fin=False)
        + ws_frame(OP_CONT, encode(F.Send(2, "x", b"\0" * 40000))), 1009),
    ("close with 1 byte", ws_frame(OP_CLOSE, b"\x03"), 1002),
    ("close code 999", ws_frame(OP_CLOSE, struct.pack("!H", 999)), 1002),
    ("close code 1004", ws_frame(OP_CLOSE, struct.pack("!H", 1004)), 1002),
    ("close code 1005", ws_frame(OP_CLOSE, struct.pack("!H", 1005)), 1002),
    ("close code 1006", ws_frame(OP_CLOSE, struct.pack("!H", 1006)), 1002),
    ("close code 1015", ws_frame(OP_CLOSE, struct.pack("!H", 1015)), 1002),
    ("close code 2000", ws_frame(OP_CLOSE, struct.pack("!H", 2000)), 1002),
    ("close code 5000", ws_frame(OP_CLOSE, struct.pack("!H", 5000)), 1002),
    ("close reason not UTF-8", ws_frame(OP_CLOSE, struct.pack("!H", 1000) + b"\xff\xfe"), 1007),
    ("close reason cut UTF-8", ws_frame(OP_CLOSE, struct.pack("!H", 1000) + "✓".encode()[:2]), 1007),
]


@pytest.mark.parametrize("name,data,code", VIOLATIONS, ids=[v[0] for v in VIOLATIONS])
def test_violations_close_with_code(gw, name, data, code):
    assert _close_after_hello(gw, data) == code


def test_valid_close_codes_are_echoed(gw):
    for code in (1000, 1001, 1003, 1011, 3000, 4999):
        assert _close_after_hello(gw, ws_frame(OP_CLOSE, struct.pack("!H", code) + b"ok")) == code


def test_pre_auth_message_limit(gw):
    # before WELCOME one message may hold at most 4096 + 4 bytes
    with ws(gw) as c:
        c.upgrade()
        c.send(ws_frame(OP_BINARY, b"\0" * 5000))
        assert c.close_code()[0] == 1009


def test_hostile_connection_next_to_a_chat(gw):
    """A client sending garbage is closed; the chat beside it goes on, message for message."""
    a, b = uid("calm-a"), uid("calm-b")
    with session(gw, a) as ca, session(gw, b) as cb:
        for i, bad in enumerate(v[1] for v in VIOLATIONS[:8]):
            with session(gw, uid("evil")) as evil:
                evil.send(bad)
                ca.send_proto(F.Send(i + 1, b, f"msg {i}".encode()))
                assert evil.close_code()[0] in (1002, 1003)
                ack = ca.next()
                d = cb.next()
                assert (ack.seq, d.payload, d.msg_id) == (i + 1, f"msg {i}".encode(), ack.msg_id)
        with ws(gw) as junk:
            junk.send(b"\x00" * 64 + b"\r\n\r\n")
            assert junk.http(b"").status == 400
        ca.send_proto(F.Send(9, b, b"last"))
        assert ca.next().seq == 9 and cb.next().payload == b"last"


# -- fragmentation, sizes, masking --------------------------------------------------------

def test_fragmented_message_with_control_frames_between(gw):
    a, b = uid("frag-a"), uid("frag-b")
    with session(gw, a) as ca, session(gw, b) as cb:
        payload = bytes(range(256)) * 100
        data = encode(F.Send(1, b, payload)) + encode(F.Ping(5))
        parts = [data[i:i + 997] for i in range(0, len(data), 997)]
        out = b""
        for i, part in enumerate(parts):
            op = OP_BINARY if i == 0 else OP_CONT
            out += ws_frame(op, part, fin=i == len(parts) - 1)
            if i % 5 == 2:
                out += ws_frame(OP_PING, str(i).encode())      # control frames may sit between fragments
        ca.send(out)
        pongs = [str(i).encode() for i in range(len(parts)) if i % 5 == 2]
        got_pongs = []
        while len(got_pongs) < len(pongs):
            fin, op, data = ca.frame()
            assert op == OP_PONG, op
            got_pongs.append(data)
        assert got_pongs == pongs
        assert isinstance(ca.next(), F.Ack) and ca.next() == F.Pong(5)
        assert cb.next().payload == payload


def test_large_messages_both_ways(gw):
    a, b = uid("big-a"), uid("big-b")
    with session(gw, a) as ca, session(gw, b) as cb:
        payload = bytes((i * 7) % 251 for i in range(64742))         # max_payload
        ca.send_proto(F.Send(1, b, payload))                       # a 64-bit... no: a 16-bit length frame
        assert isinstance(ca.next(), F.Ack)
        assert cb.next().payload == payload
        ca.send_proto(F.Send(2, b, payload + b"x"))
        err = ca.next()
        assert err.code == ErrorCode.PAYLOAD_TOO_LARGE and not err.fatal


def test_many_small_messages_and_split_server_messages(gw):
    """2000 SENDs in 50 messages of 40 frames; the backlog (over 256 KiB) comes back as
    several binary messages, each of whole frames."""
    a, b = uid("many-a"), uid("many-b")
    with session(gw, a) as ca:
        for m in range(50):
            ca.send_proto(*(F.Send(m * 40 + i + 1, b, b"p" * 200) for i in range(40)))
        acks = [ca.next() for _ in range(2000)]
        assert sorted(x.seq for x in acks) == list(range(1, 2001))
    with ws(gw) as cb:
        cb.upgrade()
        cb.send_proto(F.Hello(2, gw.token(b), "web", 0))
        sizes = []
        got = []
        while len(got) < 2001:
            op, data = cb.message()
            sizes.append(len(data))
            cb._decoder.feed(data)
            assert cb._decoder.buffered == 0
            got.extend(cb.protocol)
            cb.protocol.clear()
        assert isinstance(got[0], F.Welcome)
        assert [d.msg_id for d in got[1:]] == [x.msg_id for x in sorted(acks, key=lambda x: x.seq)]
        assert len(sizes) > 1 and max(sizes) <= 256 << 10


def test_byte_at_a_time_with_zero_and_random_masks(gw):
    a, b = uid("drip-a"), uid("drip-b")
    with session(gw, a) as ca, session(gw, b) as cb:
        data = b""
        for i, key in enumerate([b"\0\0\0\0", b"\xff\xff\xff\xff", None, b"\x01\x02\x03\x04"]):
            data += ws_frame(OP_BINARY, encode(F.Send(i + 1, b, bytes([i]) * (i * 50))), key=key)
            data += ws_frame(OP_PING, b"k" * i, key=key)
        for i in range(len(data)):
            ca.send(data[i:i + 1])
        got = []
        while len(got) < 4:
            f = cb.next()
            got.append(f.payload)
        assert got == [bytes([i]) * (i * 50) for i in range(4)]


# -- a third-party client -------------------------------------------------------------------

def test_websockets_library_client(gw):
    websockets = pytest.importorskip("websockets")
    from websockets.asyncio.client import connect
    from _core.pycodec import Decoder, decode_body
    a, b = uid("lib-a"), uid("lib-b")

    def frames_of(data):
        out = []
        Decoder(lambda t, f, body: out.append(decode_body(t, f, bytes(body))), 1 << 20).feed(data)
        return out

    async def main():
        url = f"ws://{gw.host}:{gw.ws_port}/ws"
        async with connect(url, subprotocols=["switchboard.v1"]) as wa, connect(url) as wb:
            assert wa.subprotocol == "switchboard.v1"
            await wa.send(encode(F.Hello(2, gw.token(a), "lib", 0)))
            await wb.send(encode(F.Hello(2, gw.token(b), "lib", 0)))
            assert isinstance(frames_of(await wa.recv())[0], F.Welcome)
            assert isinstance(frames_of(await wb.recv())[0], F.Welcome)
            await wa.send(encode(F.Send(1, b, b"x" * 30000)))
            ack = frames_of(await wa.recv())[0]
            d = frames_of(await wb.recv())[0]
            assert d.msg_id == ack.msg_id and d.payload == b"x" * 30000
            latency = await (await wa.ping(b"lib"))
            assert latency >= 0
            with pytest.raises(websockets.ConnectionClosedError) as info:
                await wa.send("text is refused")
                await wa.recv()
            assert info.value.rcvd.code == 1003
        assert wb.close_code == 1000
    asyncio.run(main())


# -- several workers ---------------------------------------------------------------------------

def test_handoff_to_the_owning_worker(gateway_factory):
    """A WebSocket whose user lives on the other worker is handed over mid-stream:
    HELLO, a SEND in the same message, and a SEND whose frame is split across
    the hand-off all arrive, with one WELCOME."""
    from test_workers import users_on
    gw2 = gateway_factory("--workers", "2", "--store", "memory")
    peers = users_on(0, 2, 2, "ho-a")
    others = users_on(1, 2, 2, "ho-b")
    for me, peer in ((peers[0], others[0]), (others[1], peers[1])):     # each worker accepts some
        for attempt in range(6):
            with WsRaw(gw2.host, gw2.ws_port) as c, WsRaw(gw2.host, gw2.ws_port) as p:
                p.upgrade()
                p.send_proto(F.Hello(2, gw2.token(peer), "web", 0))
                assert isinstance(p.next(), F.Welcome)
                c.upgrade()
                first = encode(F.Hello(2, gw2.token(me), "web", 0)) + encode(F.Send(1, peer, b"one"))
                second = encode(F.Send(2, peer, b"two" * 100))
                c.send(ws_frame(OP_BINARY, first + second[:10], fin=False) + ws_frame(OP_CONT, second[10:])
                       + ws_frame(OP_PING, b"after"))
                got = [c.next(), c.next(), c.next()]
                assert isinstance(got[0], F.Welcome) and got[0].user == me
                assert sorted(f.seq for f in got[1:]) == [1, 2]
                assert {p.next().payload, p.next().payload} == {b"one", b"two" * 100}
                c.send(ws_frame(OP_PING, b"ok"))
                while len(c.pongs) < 2:
                    fin, op, data = c.frame()
                    assert op == OP_PONG
                    c.pongs.append(data)
                assert c.pongs == [b"after", b"ok"]
    assert gw2.alive()
    gw2.stop()
    handed = sum(int(n) for n in re.findall(r"handoffs_out=(\d+)", gw2.text))
    assert handed > 0, "no connection was handed over: the test proved nothing"


@pytest.mark.parametrize("origin", ["https://x.example/path", "ftp://x.example", "x.example", "https://"])
def test_serve_refuses_a_bad_origin_setting(tmp_path, origin):
    import subprocess
    import sys
    from conftest import ROOT
    r = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "0", "--data-dir", str(tmp_path),
                        "--ws-origin", origin], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "WebSocket origin must be" in r.stderr, (r.returncode, r.stderr)
