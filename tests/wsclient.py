"""A raw WebSocket test client written from RFC 6455, independent of the
server's Cython codec: it builds (and can break) every byte of the handshake
and of its frames, and reads the server's frames strictly."""
import base64
import collections
import hashlib
import os
import socket
import struct

from _core.pycodec import Decoder, decode_body, encode
from rawclient import SocketClient

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


def mask_bytes(payload: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def ws_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True, rsv: int = 0,
             key: bytes | None = None, length: int | None = None, length_form: int | None = None) -> bytes:
    """One client frame. `length` lies about the payload length; `length_form`
    forces 7-bit (0), 16-bit (126) or 64-bit (127) length encoding."""
    n = len(payload) if length is None else length
    form = length_form if length_form is not None else (0 if n < 126 else 126 if n <= 0xFFFF else 127)
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mbit = 0x80 if mask else 0
    if form == 0:
        head += bytes([mbit | n])
    elif form == 126:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4) if key is None else key
    return head + key + mask_bytes(payload, key)


def handshake_request(host: str, port: int, path: str = "/ws", *, key: str | None = None,
                      extra: dict | None = None, drop: tuple = (), method: str = "GET",
                      version: str = "HTTP/1.1") -> bytes:
    headers = {"Host": f"{host}:{port}", "Upgrade": "websocket", "Connection": "Upgrade",
               "Sec-WebSocket-Key": key or base64.b64encode(os.urandom(16)).decode(),
               "Sec-WebSocket-Version": "13"}
    headers.update(extra or {})
    lines = [f"{method} {path} {version}"] + [f"{k}: {v}" for k, v in headers.items() if k not in drop]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class HttpResponse:
    def __init__(self, head: bytes, body: bytes):
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        self.body = body


class WsRaw(SocketClient):
    """A blocking WebSocket client over a real socket."""

    def __init__(self, host: str, port: int, timeout: float = 5.0):
        self.host, self.port = host, port
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.eof = False
        self.protocol = collections.deque()
        self.pongs = []
        self._decoder = Decoder(lambda t, f, b: self.protocol.append(decode_body(t, f, bytes(b))), 1 << 24)

    # -- bytes ---------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(1 << 16)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            assert self._fill(), f"server closed the connection while {n} bytes were expected"
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    # -- HTTP ------------------------------------------------------------------------
    def http(self, request: bytes) -> HttpResponse:
        """Send a request; read the response head (and a Content-Length body)."""
        self.send(request)
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(), f"server closed before answering: {self.buf!r}"
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        resp = HttpResponse(head, b"")
        n = int(resp.headers.get("content-length", "0"))
        if resp.status not in (101, 304) and not request.startswith(b"HEAD "):
            resp.body = self._take(n)
        return resp

    def upgrade(self, **kw) -> HttpResponse:
        key = base64.b64encode(os.urandom(16)).decode()
        resp = self.http(handshake_request(self.host, self.port, key=key, **kw))
        assert resp.status == 101, (resp.status, resp.body)
        want = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
        assert resp.headers["sec-websocket-accept"] == want
        return resp

    # -- frames ----------------------------------------------------------------------
    def frame(self) -> tuple[bool, int, bytes]:
        """The next server frame (fin, opcode, payload); server frames must be unmasked."""
        b0, b1 = self._take(2)
        assert not b1 & 0x80, "a server frame was masked"
        assert not b0 & 0x70, "a server frame has reserved bits set"
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._take(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._take(8))
        return bool(b0 & 0x80), b0 & 0x0F, self._take(n)

    def message(self) -> tuple[int, bytes]:
        """The next data message (fragments joined); answers nothing by itself."""
        fin, op, data = self.frame()
        while not fin:
            fin, cont, more = self.frame()
            assert cont == OP_CONT
            data += more
        return op, data

    def next(self):
        """The next protocol frame carried in binary messages (each must hold whole frames)."""
        while not self.protocol:
            op, data = self.message()
            if op == OP_PONG:                 # answers to our pings may overtake batched output
                self.pongs.append(data)
                continue
            assert op == OP_BINARY, (op, data)
            self._decoder.feed(data)
            assert self._decoder.buffered == 0, "a server message ended inside a protocol frame"
        return self.protocol.popleft()

    def send_proto(self, *frames, **kw) -> None:
        self.send(ws_frame(OP_BINARY, b"".join(encode(f) for f in frames), **kw))

    def close_code(self) -> tuple[int | None, str, list]:
        """Read until the server's Close: (code, reason, protocol frames before it). Then EOF must follow."""
        before = []
        while True:
            fin, op, data = self.frame()
            if op == OP_CLOSE:
                code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
                while not self.eof:
                    self._fill()
                return code, data[2:].decode("utf-8"), before
            if op == OP_BINARY:
                self._decoder.feed(data)
                before.extend(self.protocol)
                self.protocol.clear()

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        out, self.buf = self.buf, b""
        return out
