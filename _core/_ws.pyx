# cython: freethreading_compatible = False
"""WebSocket framing (RFC 6455) in the Cython core: what lets browsers speak
the binary protocol with no change to it.

Client -> server: `WsReader` reads into the codec's shared scratch buffer,
checks each frame header, unmasks payload bytes in place as they arrive and
streams them into the connection's protocol `Decoder` (so a protocol frame may
span WebSocket frames and reads). Between reads it keeps only a split header
or control frame (at most PEND_MAX bytes, inline): an idle connection holds no
read buffer. Data frames are never reassembled in memory; fragments are
counted against `max_message` instead.

Server -> client: `WsWriter` wraps a session's per-turn output in binary
messages, each holding whole protocol frames (cut at frame boundaries when the
batch is larger than `max_message`).

Violations raise `WebSocketError(close_code, reason)`; the connection answers
with a Close frame carrying that code.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.string cimport memcpy

from ._codec cimport (Decoder, shared_scratch, sb_load16, sb_load32, sb_load64, sb_store16, sb_store64,
                      SCRATCH_SIZE, LENGTH_SIZE, SWITCHBOARD_DEBUG)
from .errors import MalformedFrame, WebSocketError

#: what a client may put in a Close frame (RFC 6455 7.4 and the IANA registry;
#: 1004-1006 and 1015 are reserved for local use and never sent)
def close_code_valid(int code):
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


cdef inline void _unmask(unsigned char *p, Py_ssize_t n, const unsigned char *mask, int phase) noexcept nogil:
    """XOR `n` bytes with the mask key, starting at key offset `phase`, 8 bytes at a time."""
    cdef unsigned char m[8]
    cdef uint64_t m64, v
    cdef Py_ssize_t i
    for i in range(8):
        m[i] = mask[(phase + i) & 3]
    memcpy(&m64, m, 8)
    i = 0
    while i + 8 <= n:
        memcpy(&v, p + i, 8)
        v ^= m64
        memcpy(p + i, &v, 8)
        i += 8
    while i < n:
        p[i] ^= m[i & 7]
        i += 1


cdef class WsReader:
    """Incremental reader of client frames for an `asyncio.BufferedProtocol`.

    `get_buffer()`/`buffer_updated(n)` (or `feed(data)`) parse every frame of a
    read. Binary message payloads go to `inner` (the protocol Decoder); Ping,
    Pong and Close go to `on_control(opcode, payload)` after validation. A
    message must end on a protocol frame boundary. When `inner` stops (a
    hand-off after HELLO), reading stops too and `take_state()` /
    `take_rest()` hold everything needed to continue in another process.
    """

    def __init__(self, Decoder inner, on_control, int max_message):
        self._pend = NULL
        self.inner = inner
        self._on_control = on_control
        self.max_message = max_message
        self._pend_len = 0
        self._scratch_off = -1
        self.closing = False

    def __dealloc__(self):
        PyMem_Free(self._pend)

    @property
    def buffered(self):
        """Bytes of a split header or control frame held for the next read."""
        return self._pend_len

    cdef int _drop_pend(self) except -1:
        # the pending bytes were copied to the front of scratch: idle again, hold nothing
        self._pend_len = 0
        PyMem_Free(self._pend)
        self._pend = NULL
        return 0

    @property
    def in_message(self):
        return self._in_message or self._in_frame

    def get_buffer(self, Py_ssize_t sizehint=-1):
        cdef bytearray scratch = shared_scratch()
        if self._pend_len:
            memcpy(PyByteArray_AS_STRING(scratch), self._pend, self._pend_len)
        self._scratch_off = self._pend_len
        self._buf = scratch
        return memoryview(scratch)[self._pend_len:]

    def buffer_updated(self, Py_ssize_t nbytes):
        cdef bytearray scratch = self._buf
        cdef unsigned char *buf
        cdef Py_ssize_t total, used
        if scratch is None or self._scratch_off < 0:
            raise RuntimeError("buffer_updated() without get_buffer()")
        self._buf = None
        total = self._scratch_off + nbytes
        self._scratch_off = -1
        self._drop_pend()
        buf = <unsigned char *>PyByteArray_AS_STRING(scratch)
        used = self._process(buf, total, scratch)
        return self._after(buf, used, total)

    def feed(self, data):
        """Parse `data` (any bytes-like object), through the scratch buffer in chunks."""
        cdef Py_buffer view
        cdef bytearray scratch
        cdef unsigned char *buf
        cdef Py_ssize_t off = 0, chunk, total, used, room
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            while off < view.len and not self._stopped():
                scratch = shared_scratch()
                buf = <unsigned char *>PyByteArray_AS_STRING(scratch)
                memcpy(buf, self._pend, self._pend_len)
                room = SCRATCH_SIZE - self._pend_len
                chunk = min(room, view.len - off)
                memcpy(buf + self._pend_len, <const char *>view.buf + off, chunk)
                off += chunk
                total = self._pend_len + chunk
                self._drop_pend()
                used = self._process(buf, total, scratch)
                self._after(buf, used, total)
            if off < view.len:
                self._rest = (self._rest or b"") + PyBytes_FromStringAndSize(<const char *>view.buf + off,
                                                                            view.len - off)
        finally:
            PyBuffer_Release(&view)
        return 0

    cdef bint _stopped(self):
        return self.inner._stopped and not self.closing

    cdef int _after(self, unsigned char *buf, Py_ssize_t used, Py_ssize_t total) except -1:
        cdef Py_ssize_t left = total - used
        if left <= 0:
            return 0
        if self._stopped():
            # handed off mid-stream: the new owner reads these after our state
            self._rest = (self._rest or b"") + PyBytes_FromStringAndSize(<const char *>buf + used, left)
            return 0
        if left > PEND_MAX:
            raise AssertionError(f"WebSocket reader left {left} bytes unparsed")
        if self._pend == NULL:
            self._pend = <unsigned char *>PyMem_Malloc(PEND_MAX)
            if self._pend == NULL:
                raise MemoryError()
        memcpy(self._pend, buf + used, left)
        self._pend_len = left
        return 0

    cdef Py_ssize_t _process(self, unsigned char *buf, Py_ssize_t n, object owner) except -1:
        cdef Py_ssize_t pos = 0, avail, hlen, m
        cdef uint8_t b0, b1, opcode, len7
        cdef uint64_t length
        while pos < n:
            if self._stopped():
                break
            if self._in_frame:
                m = <Py_ssize_t>min(<uint64_t>(n - pos), self._remaining)
                if not self.closing:
                    _unmask(buf + pos, m, self._mask, self._phase)
                    self.inner.feed_ptr(buf + pos, m, owner)
                self._phase = (self._phase + m) & 3
                self._remaining -= m
                pos += m
                if self._remaining == 0:
                    self._end_frame()
                continue
            avail = n - pos
            if avail < 2:
                break
            b0 = buf[pos]
            b1 = buf[pos + 1]
            opcode = b0 & 0x0F
            len7 = b1 & 0x7F
            if b0 & 0x70:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension was negotiated)")
            if not (b1 & 0x80):
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
            if opcode & 0x08:
                if opcode != OP_CLOSE and opcode != OP_PING and opcode != OP_PONG:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, f"unknown control opcode 0x{opcode:x}")
                if not (b0 & 0x80):
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "control frames must not be fragmented")
                if len7 > MAX_CONTROL:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "control frame payload over 125 bytes")
                if avail < 6 + len7:
                    break
                _unmask(buf + pos + 6, len7, buf + pos + 2, 0)
                pos += 6 + len7
                self._control(opcode, buf + pos - len7, len7)
                continue
            if opcode == OP_CONT:
                if not self._in_message:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "continuation frame outside a message")
            elif opcode == OP_BINARY:
                if self._in_message:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "new message before the last one's final fragment")
            elif opcode == OP_TEXT:
                if self._in_message:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "new message before the last one's final fragment")
                if not self.closing:
                    raise WebSocketError(CLOSE_UNSUPPORTED, "text messages are not accepted: send the "
                                                            "protocol in binary messages")
            else:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, f"unknown data opcode 0x{opcode:x}")
            hlen = 6 if len7 < 126 else (8 if len7 == 126 else 14)
            if avail < hlen:
                break
            if len7 < 126:
                length = len7
            elif len7 == 126:
                length = sb_load16(buf + pos + 2)
                if length < 126:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "length not in its shortest form")
            else:
                length = sb_load64(buf + pos + 2)
                if length >> 63:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "64-bit length with its high bit set")
                if length <= 0xFFFF:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "length not in its shortest form")
            if self._message_len + length > <uint64_t>self.max_message:
                raise WebSocketError(CLOSE_TOO_BIG, f"message over {self.max_message} bytes")
            self._message_len += length
            memcpy(self._mask, buf + pos + hlen - 4, 4)
            self._phase = 0
            self._remaining = length
            self._fin = (b0 & 0x80) != 0
            self._in_frame = True
            if opcode != OP_CONT:
                self._in_message = True
            pos += hlen
            if length == 0:
                self._end_frame()
        return pos

    cdef int _end_frame(self) except -1:
        self._in_frame = False
        if not self._fin:
            return 0
        self._in_message = False
        self._message_len = 0
        if not self._stopped() and not self.closing and self.inner._own_len:
            raise MalformedFrame("a WebSocket message ended inside a protocol frame")
        return 0

    cdef int _control(self, uint8_t opcode, unsigned char *payload, Py_ssize_t n) except -1:
        cdef int code
        if opcode == OP_CLOSE and n:
            if n == 1:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
            code = sb_load16(payload)
            if not close_code_valid(code):
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
            try:
                PyUnicode_DecodeUTF8(<const char *>payload + 2, n - 2, NULL)
            except UnicodeDecodeError:
                raise WebSocketError(CLOSE_INVALID_DATA, "close reason is not UTF-8") from None
        if opcode == OP_CLOSE:
            self.closing = True
        self._on_control(opcode, PyBytes_FromStringAndSize(<const char *>payload, n))
        return 0

    # -- hand-off ---------------------------------------------------------------------
    def take_state(self):
        """The reader's position in the stream (frame and mask state, split
        header) as bytes, for `set_state` in the worker that takes over."""
        cdef unsigned char hdr[24]
        sb_store64(hdr, self._remaining)
        sb_store64(hdr + 8, self._message_len)
        memcpy(hdr + 16, self._mask, 4)
        hdr[20] = self._phase
        hdr[21] = (self._in_frame << 0) | (self._fin << 1) | (self._in_message << 2)
        sb_store16(hdr + 22, <uint16_t>self._pend_len)
        return PyBytes_FromStringAndSize(<const char *>hdr, 24) + \
            PyBytes_FromStringAndSize(<const char *>self._pend, self._pend_len)

    def set_state(self, bytes state):
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(state)
        cdef Py_ssize_t pend
        if len(state) < 24:
            raise ValueError("WebSocket reader state is truncated")
        pend = sb_load16(p + 22)
        if pend > PEND_MAX or len(state) != 24 + pend:
            raise ValueError("WebSocket reader state is malformed")
        self._remaining = sb_load64(p)
        self._message_len = sb_load64(p + 8)
        memcpy(self._mask, p + 16, 4)
        self._phase = p[20] & 3
        self._drop_pend()
        if pend:
            self._pend = <unsigned char *>PyMem_Malloc(PEND_MAX)
            if self._pend == NULL:
                raise MemoryError()
        self._in_frame = (p[21] & 1) != 0
        self._fin = (p[21] & 2) != 0
        self._in_message = (p[21] & 4) != 0
        memcpy(self._pend, p + 24, pend)
        self._pend_len = pend

    def take_rest(self):
        """Raw bytes read after the stop, not yet parsed."""
        out = self._rest or b""
        self._rest = None
        return out


# -- server -> client ---------------------------------------------------------------

cdef inline Py_ssize_t _header_size(Py_ssize_t n) noexcept:
    return 2 if n < 126 else (4 if n <= 0xFFFF else 10)


cdef inline Py_ssize_t _put_header(unsigned char *p, uint8_t opcode, Py_ssize_t n) noexcept:
    p[0] = 0x80 | opcode
    if n < 126:
        p[1] = <uint8_t>n
        return 2
    if n <= 0xFFFF:
        p[1] = 126
        sb_store16(p + 2, <uint16_t>n)
        return 4
    p[1] = 127
    sb_store64(p + 2, <uint64_t>n)
    return 10


def frame(int opcode, data=b""):
    """One unmasked, final server frame (any opcode) around `data`."""
    cdef Py_buffer view
    cdef bytes out
    cdef unsigned char *p
    cdef Py_ssize_t h
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if opcode & 0x08 and view.len > MAX_CONTROL:
            raise ValueError("control frame payload over 125 bytes")
        out = PyBytes_FromStringAndSize(NULL, _header_size(view.len) + view.len)
        p = <unsigned char *>PyBytes_AS_STRING(out)
        h = _put_header(p, <uint8_t>opcode, view.len)
        memcpy(p + h, view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return out


def close_frame(int code, str reason=""):
    """A Close frame; the reason is cut to fit 125 bytes on a character boundary."""
    if code == CLOSE_NO_STATUS:
        return frame(OP_CLOSE, b"")
    raw = reason.encode("utf-8")[:MAX_CONTROL - 2].decode("utf-8", "ignore").encode("utf-8")
    return frame(OP_CLOSE, code.to_bytes(2, "big") + raw)


cdef class WsWriter:
    """A WebSocket session's transport, as the router session sees it (holding the
    TCP transport and its connection, not two bound methods: two objects less per
    connection): each write becomes binary messages of whole protocol frames (one
    message unless the batch is over `max_message`), written with one transport
    write; close() hands the goodbye to the connection, which picks the Close code
    from the type of the last protocol frame (GOAWAY: 1001, fatal ERROR: 1008)."""

    def __init__(self, transport, Py_ssize_t max_message, owner=None):
        self._transport = transport
        self._owner = owner
        self.max_message = max_message
        self.last_type = 0
        self.closed = False

    def close(self):
        """The router is done with the session (fatal ERROR, GOAWAY, replaced)."""
        if self._owner is not None:
            self._owner.session_closed()

    def write(self, data):
        _ws_write(self, data)

    def get_protocol(self):
        """Its connection, as a transport's get_protocol() is."""
        return self._owner


cdef _ws_write(WsWriter w, data):
    """WsWriter's write (a function, not a method: no method table in every writer)."""
    cdef Py_buffer view
    cdef const unsigned char *src
    cdef Py_ssize_t n, pos, start, flen, headers = 0, out_pos = 0, msgs = 0
    cdef Py_ssize_t limit = w.max_message
    cdef bytes out
    cdef unsigned char *dst
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        src = <const unsigned char *>view.buf
        n = view.len
        if n == 0 or w.closed:
            return
        # pass 1: message boundaries (whole protocol frames, at most `limit` bytes unless one frame is larger)
        pos = 0
        start = 0
        while pos + LENGTH_SIZE + 1 <= n:
            flen = LENGTH_SIZE + <Py_ssize_t>sb_load32(src + pos)
            if pos + flen > n:
                break                     # not our framing: send the rest as it is
            w.last_type = src[pos + LENGTH_SIZE]
            if pos > start and pos + flen - start > limit:
                headers += _header_size(pos - start)
                msgs += 1
                start = pos
            pos += flen
        headers += _header_size(n - start)
        if msgs == 0:
            out = PyBytes_FromStringAndSize(NULL, headers + n)
            dst = <unsigned char *>PyBytes_AS_STRING(out)
            out_pos = _put_header(dst, OP_BINARY, n)
            memcpy(dst + out_pos, src, n)
        else:
            out = PyBytes_FromStringAndSize(NULL, headers + n)
            dst = <unsigned char *>PyBytes_AS_STRING(out)
            pos = 0
            start = 0
            while pos + LENGTH_SIZE + 1 <= n:
                flen = LENGTH_SIZE + <Py_ssize_t>sb_load32(src + pos)
                if pos + flen > n:
                    break
                if pos > start and pos + flen - start > limit:
                    out_pos += _put_header(dst + out_pos, OP_BINARY, pos - start)
                    memcpy(dst + out_pos, src + start, pos - start)
                    out_pos += pos - start
                    start = pos
                pos += flen
            out_pos += _put_header(dst + out_pos, OP_BINARY, n - start)
            memcpy(dst + out_pos, src + start, n - start)
            if SWITCHBOARD_DEBUG:
                if out_pos + n - start != headers + n:
                    raise AssertionError("WsWriter miscounted its output")
    finally:
        PyBuffer_Release(&view)
    w._transport.write(out)
