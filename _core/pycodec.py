"""Pure-Python reference codec.

Same API and the same behaviour as the Cython codec in `_codec.pyx`; the codec
tests run against both. It is the readable statement of docs/PROTOCOL.md and the
fallback selected with SWITCHBOARD_CODEC=python.
"""
from struct import Struct

from . import frames as F
from .errors import FrameTooLarge, MalformedFrame, UnknownFrameType
from .protocol import (DEFAULT_MAX_FRAME, FLAG_FATAL, FLAG_GROUP, FLAG_MIRROR, FLAG_MORE, FLAG_SEND_ONLY, HEADER_SIZE, LENGTH_SIZE,
                       MAX_ID_LENGTH, MAX_RECEIVED_IDS, MAX_SUBSCRIBE, MAX_TOKEN_LENGTH, MIN_FRAME,
                       PRIVACY_HIDE_LAST_SEEN, FrameType)

_HEADER = Struct("!IBB")
_U8 = Struct("!B")
_U16 = Struct("!H")
_U32 = Struct("!I")
_U64 = Struct("!Q")
_KNOWN = frozenset(int(t) for t in FrameType)
_READ_CHUNK = 65536


class _Cursor:
    __slots__ = ("buf", "pos", "end")

    def __init__(self, body):
        self.buf = body
        self.pos = 0
        self.end = len(body)

    def _take(self, n: int):
        if self.end - self.pos < n:
            raise MalformedFrame("truncated field")
        start = self.pos
        self.pos += n
        return start

    def u8(self) -> int:
        return _U8.unpack_from(self.buf, self._take(1))[0]

    def u16(self) -> int:
        return _U16.unpack_from(self.buf, self._take(2))[0]

    def u32(self) -> int:
        return _U32.unpack_from(self.buf, self._take(4))[0]

    def u64(self) -> int:
        return _U64.unpack_from(self.buf, self._take(8))[0]

    def _text(self, n: int) -> str:
        start = self._take(n)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedFrame("string is not UTF-8") from None

    def boolean(self) -> bool:
        v = self.u8()
        if v > 1:
            raise MalformedFrame(f"a boolean is 0 or 1, not {v}")
        return v == 1

    def str8(self, min_len: int = 0) -> str:
        n = self.u8()
        if n < min_len:
            raise MalformedFrame("empty id")
        return self._text(n)

    def str16(self, max_len: int = 65535) -> str:
        n = self.u16()
        if n > max_len:
            raise MalformedFrame("string too long")
        return self._text(n)

    def rest(self) -> bytes:
        data = bytes(self.buf[self.pos:self.end])
        self.pos = self.end
        return data

    def done(self) -> None:
        if self.pos != self.end:
            raise MalformedFrame("trailing bytes in frame")


def decode_body(ftype: int, flags: int, body):
    """Decode one frame body (a bytes-like view) into a `frames` object."""
    c = _Cursor(body)
    if ftype == FrameType.SEND:
        frame = F.Send(c.u64(), c.str8(1), c.rest())
    elif ftype == FrameType.DELIVER:
        head = (c.u64(), c.u64(), c.str8(1), c.str8())
        peer, origin = (c.str8(1), c.u64()) if flags & (FLAG_MIRROR | FLAG_GROUP) else ("", 0)
        frame = F.Deliver(*head, c.rest(), peer, origin, bool(flags & FLAG_GROUP))
    elif ftype == FrameType.RECEIPT:
        frame = F.Receipt(c.u64(), c.u8(), c.u64(), c.str8(1), c.str8(), c.u64())
    elif ftype == FrameType.SUBSCRIBE:
        on = c.boolean()
        n = c.u16()
        if n > MAX_SUBSCRIBE:
            raise MalformedFrame("too many users in SUBSCRIBE")
        frame = F.Subscribe(tuple(c.str8(1) for _ in range(n)), on)
    elif ftype == FrameType.PRESENCE:
        frame = F.Presence(c.str8(1), c.boolean(), c.u64())
    elif ftype == FrameType.TYPING:
        frame = F.Typing(c.str8(1), c.boolean())
    elif ftype == FrameType.GROUP:
        frame = F.Group(c.u64(), c.u8(), c.str8(1), c.str16())
    elif ftype == FrameType.GROUP_INFO:
        frame = F.GroupInfo(c.u64(), c.str16(), bool(flags & FLAG_MORE))
    elif ftype == FrameType.PRIVACY:
        frame = F.Privacy(bool(c.u8() & PRIVACY_HIDE_LAST_SEEN))
    elif ftype == FrameType.READ:
        peer = c.str8(1)
        n = c.u16()
        if n > MAX_RECEIVED_IDS:
            raise MalformedFrame("too many ids in READ")
        frame = F.Read(peer, tuple(c.u64() for _ in range(n)))
    elif ftype == FrameType.ACK:
        frame = F.Ack(c.u64(), c.u64(), c.u64())
    elif ftype == FrameType.RECEIVED:
        n = c.u16()
        if n > MAX_RECEIVED_IDS:
            raise MalformedFrame("too many ids in RECEIVED")
        frame = F.Received(tuple(c.u64() for _ in range(n)))
    elif ftype == FrameType.PING:
        frame = F.Ping(c.u64())
    elif ftype == FrameType.PONG:
        frame = F.Pong(c.u64())
    elif ftype == FrameType.HELLO:
        version, token, device, resume = c.u16(), c.str16(MAX_TOKEN_LENGTH), c.str8(1), c.u64()
        frame = F.Hello(version, token, device, resume, bool(flags & FLAG_SEND_ONLY), c.u64())
    elif ftype == FrameType.WELCOME:
        frame = F.Welcome(c.u16(), c.u64(), c.str8(1), c.str8(1), c.u32(), c.u32(), c.u32(), c.u64(), c.u64(), c.u32())
    elif ftype == FrameType.ERROR:
        frame = F.Error(c.u16(), c.u64(), c.str16(), bool(flags & FLAG_FATAL))
    elif ftype == FrameType.GOAWAY:
        frame = F.Goaway(c.u16(), c.u32(), c.str16())
    else:
        raise UnknownFrameType(f"unknown frame type 0x{ftype:02x}")
    c.done()
    return frame


class WriteBuffer:
    """Growable output buffer; frames are appended and the batch taken once per flush."""

    __slots__ = ("_buf",)

    def __init__(self):
        self._buf = bytearray()

    def __len__(self) -> int:
        return len(self._buf)

    def take(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def getvalue(self) -> bytes:
        return bytes(self._buf)

    def clear(self) -> None:
        self._buf.clear()

    # -- frame writers -------------------------------------------------------
    def _frame(self, ftype: int, flags: int, body: bytes) -> None:
        self._buf += _HEADER.pack(len(body) + 2, ftype, flags)
        self._buf += body


def _id(s: str, allow_empty: bool = False) -> bytes:
    b = s.encode("utf-8")
    if len(b) > MAX_ID_LENGTH or (not b and not allow_empty):
        raise ValueError(f"id must be 1..{MAX_ID_LENGTH} bytes of UTF-8: {s!r}")
    return _U8.pack(len(b)) + b


def _text16(s: str, limit: int = 65535) -> bytes:
    b = s.encode("utf-8")
    if len(b) > limit:
        raise ValueError("string too long")
    return _U16.pack(len(b)) + b


def _body(frame) -> tuple[int, int, bytes]:
    t = type(frame)
    if t is F.Send:
        return FrameType.SEND, 0, _U64.pack(frame.seq) + _id(frame.to) + bytes(frame.payload)
    if t is F.Deliver:
        mirror = (_id(frame.peer) + _U64.pack(frame.origin_id)) if frame.peer else b""
        kind = (FLAG_GROUP if frame.group else FLAG_MIRROR) if frame.peer else 0
        return FrameType.DELIVER, kind, (
            _U64.pack(frame.msg_id) + _U64.pack(frame.timestamp_ms) + _id(frame.sender)
            + _id(frame.sender_device, True) + mirror + bytes(frame.payload))
    if t is F.Receipt:
        return FrameType.RECEIPT, 0, (_U64.pack(frame.id) + _U8.pack(frame.kind) + _U64.pack(frame.msg_id)
                                      + _id(frame.by) + _id(frame.by_device, True) + _U64.pack(frame.timestamp_ms))
    if t is F.Subscribe:
        if len(frame.users) > MAX_SUBSCRIBE:
            raise ValueError("too many users in one SUBSCRIBE frame")
        return FrameType.SUBSCRIBE, 0, (_U8.pack(1 if frame.on else 0) + _U16.pack(len(frame.users))
                                        + b"".join(_id(u) for u in frame.users))
    if t is F.Presence:
        return FrameType.PRESENCE, 0, _id(frame.user) + _U8.pack(1 if frame.online else 0) + _U64.pack(frame.last_seen_ms)
    if t is F.Typing:
        return FrameType.TYPING, 0, _id(frame.peer) + _U8.pack(1 if frame.typing else 0)
    if t is F.Group:
        return FrameType.GROUP, 0, _U64.pack(frame.request_id) + _U8.pack(frame.op) + _id(frame.group) + _text16(frame.arg)
    if t is F.GroupInfo:
        return (FrameType.GROUP_INFO, FLAG_MORE if frame.more else 0,
                _U64.pack(frame.request_id) + _text16(frame.info))
    if t is F.Privacy:
        return FrameType.PRIVACY, 0, _U8.pack(PRIVACY_HIDE_LAST_SEEN if frame.hide_last_seen else 0)
    if t is F.Read:
        if len(frame.msg_ids) > MAX_RECEIVED_IDS:
            raise ValueError("too many ids in one READ frame")
        return FrameType.READ, 0, (_id(frame.peer) + _U16.pack(len(frame.msg_ids))
                                   + b"".join(_U64.pack(i) for i in frame.msg_ids))
    if t is F.Ack:
        return FrameType.ACK, 0, _U64.pack(frame.seq) + _U64.pack(frame.msg_id) + _U64.pack(frame.timestamp_ms)
    if t is F.Received:
        if len(frame.msg_ids) > MAX_RECEIVED_IDS:
            raise ValueError("too many ids in one RECEIVED frame")
        return FrameType.RECEIVED, 0, _U16.pack(len(frame.msg_ids)) + b"".join(_U64.pack(i) for i in frame.msg_ids)
    if t is F.Ping:
        return FrameType.PING, 0, _U64.pack(frame.nonce)
    if t is F.Pong:
        return FrameType.PONG, 0, _U64.pack(frame.nonce)
    if t is F.Hello:
        return FrameType.HELLO, FLAG_SEND_ONLY if frame.send_only else 0, (_U16.pack(frame.version) + _text16(frame.token, MAX_TOKEN_LENGTH)
                                    + _id(frame.device) + _U64.pack(frame.resume_after) + _U64.pack(frame.producer))
    if t is F.Welcome:
        return FrameType.WELCOME, 0, (_U16.pack(frame.version) + _U64.pack(frame.session_id) + _id(frame.user)
                                      + _id(frame.device) + _U32.pack(frame.max_frame) + _U32.pack(frame.max_payload)
                                      + _U32.pack(frame.ping_interval_ms) + _U64.pack(frame.server_time_ms)
                                      + _U64.pack(frame.producer) + _U32.pack(frame.send_window))
    if t is F.Error:
        return (FrameType.ERROR, FLAG_FATAL if frame.fatal else 0,
                _U16.pack(frame.code) + _U64.pack(frame.ref) + _text16(frame.reason))
    if t is F.Goaway:
        return FrameType.GOAWAY, 0, _U16.pack(frame.code) + _U32.pack(frame.reconnect_ms) + _text16(frame.reason)
    raise TypeError(f"not a frame: {frame!r}")


def encode_into(buf: WriteBuffer, frame) -> None:
    buf._frame(*_body(frame))


def encode(frame) -> bytes:
    ftype, flags, body = _body(frame)
    return _HEADER.pack(len(body) + 2, ftype, flags) + body


class SendCounter:
    """Counts frames and reads each SEND's fields (client id, recipient,
    payload span) without building objects. For benchmarks and tests."""

    def __init__(self):
        self.frames = self.sends = self.payload_bytes = 0

    def __call__(self, ftype, flags, body):
        self.frames += 1
        if ftype == FrameType.SEND:
            if len(body) < 9:
                raise MalformedFrame("truncated field")
            to_len = body[8]
            if to_len < 1:
                raise MalformedFrame("empty id")
            if len(body) < 9 + to_len:
                raise MalformedFrame("truncated field")
            _U64.unpack_from(body, 0)
            self.sends += 1
            self.payload_bytes += len(body) - 9 - to_len


class Decoder:
    """Incremental frame decoder for `asyncio.BufferedProtocol`.

    `get_buffer()` hands out the free tail of the decoder's buffer,
    `buffer_updated(n)` parses every complete frame and calls
    `sink(ftype, flags, body)` for each; `body` is a view valid only during
    the call. Bytes of an incomplete frame are kept for the next read.
    The buffer is never resized while a view of it may be alive: it is
    replaced when it must grow, and compacted in place.
    """

    def __init__(self, sink, max_frame: int = DEFAULT_MAX_FRAME):
        self._sink = sink
        self.max_frame = max_frame
        self._buf = bytearray()
        self._len = 0         # bytes of data at the front of _buf
        self._failed = None   # the exception that stopped this decoder
        self._stopped = False

    @property
    def buffered(self) -> int:
        return self._len

    def set_sink(self, sink) -> None:
        self._sink = sink

    def stop(self) -> None:
        """Dispatch no more frames; what is left stays buffered (see `take_buffered`)."""
        self._stopped = True

    def resume(self) -> None:
        self._stopped = False

    def take_buffered(self) -> bytes:
        """Bytes received but not dispatched, for handing the connection on."""
        data = bytes(self._buf[:self._len])
        self._buf = bytearray()
        self._len = 0
        return data

    def _room(self, want: int) -> None:
        if len(self._buf) - self._len < want:
            grown = bytearray(self._len + want)
            grown[:self._len] = self._buf[:self._len]
            self._buf = grown

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        self._room(max(sizehint, _READ_CHUNK) if sizehint and sizehint > 0 else _READ_CHUNK)
        return memoryview(self._buf)[self._len:]

    def buffer_updated(self, nbytes: int) -> int:
        self._len += nbytes
        return self._parse()

    def feed(self, data) -> int:
        """Copy `data` in and parse it (for callers that are not BufferedProtocols)."""
        n = len(data)
        self._room(n)
        self._buf[self._len:self._len + n] = data
        self._len += n
        return self._parse()

    def _parse(self) -> int:
        if self._failed is not None:
            raise self._failed
        buf = self._buf
        pos = 0
        count = 0
        view = memoryview(buf)
        try:
            while not self._stopped and self._len - pos >= LENGTH_SIZE:
                length = _U32.unpack_from(buf, pos)[0]
                if length > self.max_frame:
                    raise FrameTooLarge(f"frame of {length} bytes exceeds the limit of {self.max_frame}")
                if length < MIN_FRAME:
                    raise MalformedFrame(f"frame length {length} is below the minimum of {MIN_FRAME}")
                if self._len - pos < LENGTH_SIZE + 1:
                    break
                ftype = buf[pos + LENGTH_SIZE]
                if ftype not in _KNOWN:
                    raise UnknownFrameType(f"unknown frame type 0x{ftype:02x}")
                end = pos + LENGTH_SIZE + length
                if end > self._len:
                    break
                flags = buf[pos + LENGTH_SIZE + 1]
                # The reference copies each body: a view a sink derives from it
                # stays correct (the Cython codec detects such views instead).
                body = memoryview(bytes(view[pos + HEADER_SIZE:end]))
                pos = end
                count += 1
                try:
                    self._sink(ftype, flags, body)
                finally:
                    body.release()
        except BaseException as exc:
            self._failed = exc
            raise
        finally:
            view.release()
        if pos:   # compact once per batch, in place (same-size slice assignment never resizes)
            rest = self._len - pos
            buf[:rest] = buf[pos:self._len]
            self._len = rest
        if self._len == 0 and len(buf) > _READ_CHUNK:
            self._buf = bytearray()      # a burst's buffer is not kept on an idle connection
        return count
