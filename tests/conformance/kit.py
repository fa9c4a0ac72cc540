"""What the conformance tests speak with: raw sessions whose frames are built by
the codec (`_core.frames` + `encode`, never bytes written by hand), the SDK for
sending, fresh ids, and waits bounded by a socket timeout or a deadline."""
import asyncio
import base64
import collections
import hashlib
import hmac
import socket
import struct
import time
import uuid
from pathlib import Path

from _core import frames as F
from _core.protocol import PROTOCOL_VERSION
from _core.pycodec import Decoder, decode_body, encode
from rawclient import Raw
from router.sharding import shard_of

#: the document the conformance tests hold the server to
DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def uid(prefix: str) -> str:
    """A user id no other test uses (the shared gateways keep everything)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def users_on(worker: int, workers: int, n: int, prefix: str) -> list[str]:
    """`n` fresh user ids whose shard belongs to `worker` of `workers`."""
    out = []
    while len(out) < n:
        name = uid(prefix)
        if shard_of(name) % workers == worker:
            out.append(name)
    return out


def hello(token: str, device: str = "raw", resume_after: int = 0, send_only: bool = False,
          version: int = PROTOCOL_VERSION) -> bytes:
    return encode(F.Hello(version=version, token=token, device=device, resume_after=resume_after,
                          send_only=send_only))


class Wire(Raw):
    """A raw client that also keeps each frame as it came: (type, flags, body bytes)."""

    def __init__(self, gw, timeout: float = 5.0, source: str | None = None):
        if source is None:
            super().__init__(gw, timeout)
        else:                               # from another 127.0.0.x address: another client
            s = socket.socket()
            s.settimeout(timeout)
            s.bind((source, 0))
            s.connect((gw.host, gw.port))
            self.sock = s
            self.frames = collections.deque()
            self.decoder = Decoder(self._sink, 1 << 24)
            self.closed = False
        self.wire = collections.deque()

    def _sink(self, ftype, flags, body):
        self.wire.append((ftype, flags, bytes(body)))
        self.frames.append(decode_body(ftype, flags, body))

    def until(self, pred) -> list:
        """Frames up to and including the first for which `pred` is true (bounded by
        the socket timeout: a frame that never comes fails the test)."""
        out = []
        while True:
            f = self.frame()
            out.append(f)
            if pred(f):
                return out

    def ping(self, nonce: int) -> list:
        """PING and read up to its PONG: every frame the server queued before it."""
        self.send(encode(F.Ping(nonce)))
        return self.until(lambda f: f == F.Pong(nonce))[:-1]


def session(gw, user: str, device: str = "raw", timeout: float = 5.0, source: str | None = None, **kw) -> Wire:
    """A raw session past WELCOME (`.welcome`)."""
    w = Wire(gw, timeout, source)
    w.send(hello(gw.token(user), device, **kw))
    first = w.frame()
    assert isinstance(first, F.Welcome), first
    w.welcome = first
    return w


def fatal(w: Raw, code: int, preceding: int | None = 0) -> list:
    """Read to EOF: the last frame is a fatal ERROR `code` with ref 0, then the
    server closed. `preceding` frames before it (None: any number)."""
    frames, closed = w.until_eof()
    assert closed, f"the server did not close after the fatal ERROR: {frames}"
    assert frames and isinstance(frames[-1], F.Error), frames
    err = frames[-1]
    assert (err.code, err.fatal, err.ref) == (code, True, 0), err
    if preceding is not None:
        assert len(frames) == preceding + 1, frames
    return frames[:-1]


def patched(frame: bytes, at: int, value: int) -> bytes:
    """An encoded frame with byte `at` replaced (a flag or a boolean made odd on purpose)."""
    return frame[:at] + bytes([value]) + frame[at + 1:]


def resized(frame: bytes, body_delta: bytes | int) -> bytes:
    """An encoded frame with bytes appended to its body (bytes) or cut from its end
    (a negative int), its length prefix changed to match: trailing or missing bytes."""
    body = frame[4:] + body_delta if isinstance(body_delta, bytes) else frame[4:body_delta]
    return struct.pack("!I", len(body)) + body


def run(coro):
    return asyncio.run(coro)


def wait_for(pred, what: str, timeout: float = 10.0, every: float = 0.02):
    """Poll `pred` until it is true (returns its value) or the deadline fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(every)


def doc_token(secret: bytes, user: str, device: str, expiry: int) -> str:
    """A token made exactly as docs/PROTOCOL.md section 10 describes it (not with
    gateway.auth): lets a test sign what the issuer refuses, e.g. an illegal user."""
    u, d = user.encode(), device.encode()
    body = bytes([len(u)]) + u + bytes([len(d)]) + d + struct.pack("!Q", expiry)
    mac = hmac.new(secret, b"switchboard-token-v1\x00" + body, hashlib.sha256).digest()

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    return "sb1." + b64(body) + "." + b64(mac)
