"""How the benchmark clients open and keep a session with each server they
measure: Switchboard (HELLO/WELCOME, PING/PONG frames) and the peers
(a bare uvloop echo, a `websockets` server, nats-server, redis-server).

A dialect is bytes to send and a tiny parser for what comes back, so the same
client machinery drives every server and only the wire format differs."""
import base64
import os
import struct

from _core import frames as F
from _core.codec import encode
from _core.protocol import PROTOCOL_VERSION, FrameType


def _goaway_name(code: int) -> str:
    from _core.protocol import GoawayCode
    try:
        return GoawayCode(code).name
    except ValueError:
        return str(code)


class Dialect:
    name = "?"
    #: the session is usable once this many greeting replies arrived
    def greeting(self, user: str) -> bytes:
        return b""

    def ping(self) -> bytes:
        raise NotImplementedError

    def feed(self, conn, data: bytes) -> None:
        """Parse `data`; call conn.on_ready(), conn.on_pong(), conn.on_failed(reason)."""
        raise NotImplementedError


class Switchboard(Dialect):
    """Real authenticated sessions: a token per user, HELLO, WELCOME."""
    name = "switchboard"
    _PING = struct.Struct("!IBBQ")

    def __init__(self, data_dir: str):
        from gateway.auth import TokenAuthority, load_secret
        self.authority = TokenAuthority(load_secret(data_dir))

    def greeting(self, user):
        return encode(F.Hello(PROTOCOL_VERSION, self.authority.issue(user, ttl=7 * 86400), "d", 0))

    def ping(self):
        return self._PING.pack(10, FrameType.PING, 0, 0)

    def send(self, seq: int, to: str, payload: bytes) -> bytes:
        return encode(F.Send(seq, to, payload))

    def feed(self, conn, data):
        buf = conn.pending + data if conn.pending else data
        pos, n = 0, len(buf)
        while n - pos >= 6:
            (length,) = struct.unpack_from("!I", buf, pos)
            if n - pos - 4 < length:
                break
            ftype = buf[pos + 4]
            body = buf[pos + 6:pos + 4 + length]
            pos += 4 + length
            if ftype == FrameType.PONG:
                conn.on_pong()
            elif ftype == FrameType.WELCOME:
                conn.on_ready()
            elif ftype == FrameType.DELIVER:
                (msg_id,) = struct.unpack_from("!Q", body, 0)
                conn.write(encode(F.Received((msg_id,))))
                conn.on_message(body[-16:])
            elif ftype == FrameType.ERROR:
                code, _ = struct.unpack_from("!HQ", body, 0)
                conn.on_failed(f"ERROR {code}: {body[12:].decode(errors='replace')}")
            elif ftype == FrameType.GOAWAY:              # why the server is about to close it
                (code,) = struct.unpack_from("!H", body, 0)
                conn.why = f"GOAWAY {_goaway_name(code)}"
        conn.pending = buf[pos:] if pos < n else b""


class Lines(Dialect):
    """Text protocols: the session is ready at the first `ready` line; every
    `pong` line answers a PING."""
    ready_line = pong_line = b""
    ping_bytes = b""

    def ping(self):
        return self.ping_bytes

    def feed(self, conn, data):
        buf = conn.pending + data if conn.pending else data
        *lines, rest = buf.split(b"\r\n")
        conn.pending = rest
        for line in lines:
            if line == self.pong_line:
                (conn.on_pong if conn.ready else conn.on_ready)()
            elif line.startswith((b"-ERR", b"-")):
                conn.on_failed(line.decode(errors="replace"))


class Nats(Lines):
    """nats-server: INFO, then our CONNECT and PING; ready at the first PONG."""
    name = "nats"
    pong_line = b"PONG"
    ping_bytes = b"PING\r\n"

    def greeting(self, user):
        return b'CONNECT {"verbose":false,"pedantic":false,"name":"' + user.encode() + b'"}\r\nPING\r\n'


class Redis(Lines):
    name = "redis"
    pong_line = b"+PONG"
    ping_bytes = b"PING\r\n"

    def greeting(self, user):
        return b"PING\r\n"


class Echo(Dialect):
    """The floor: a bare uvloop Protocol echoes whatever it gets."""
    name = "floor"
    _P = b"ping\n"

    def greeting(self, user):
        return self._P

    def ping(self):
        return self._P

    def feed(self, conn, data):
        buf = conn.pending + data if conn.pending else data
        k, rest = divmod(len(buf), len(self._P))
        conn.pending = buf[len(buf) - rest:] if rest else b""
        for _ in range(k):
            (conn.on_pong if conn.ready else conn.on_ready)()


class WebSocket(Dialect):
    """RFC 6455 client: HTTP upgrade, then masked PING frames answered by PONG."""
    name = "websockets"

    def greeting(self, user):
        key = base64.b64encode(os.urandom(16))
        return (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")

    def ping(self):
        return b"\x89\x84" + os.urandom(4) + b"\x00\x00\x00\x00"   # masked: mask xor zeros is the mask

    def feed(self, conn, data):
        buf = conn.pending + data if conn.pending else data
        if not conn.ready:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                conn.pending = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                conn.on_failed(buf.split(b"\r\n", 1)[0].decode(errors="replace"))
                return
            conn.on_ready()
            buf = buf[end + 4:]
        pos, n = 0, len(buf)
        while n - pos >= 2:
            op, ln = buf[pos] & 0x0F, buf[pos + 1] & 0x7F
            head = 2 + (2 if ln == 126 else 8 if ln == 127 else 0)
            if n - pos < head:
                break
            if ln == 126:
                (ln,) = struct.unpack_from("!H", buf, pos + 2)
            elif ln == 127:
                (ln,) = struct.unpack_from("!Q", buf, pos + 2)
            if n - pos < head + ln:
                break
            if op == 0xA:
                conn.on_pong()
            elif op == 0x8:
                conn.on_failed("websocket closed by server")
            pos += head + ln
        conn.pending = buf[pos:]


def make(name: str, data_dir: str | None = None) -> Dialect:
    if name == "switchboard":
        return Switchboard(data_dir)
    return {"nats": Nats, "redis": Redis, "floor": Echo, "websockets": WebSocket}[name]()
