# cython: freethreading_compatible = False
"""Cython framing codec: the incremental decoder and the frame writers.

Same Python API as `pycodec` (the reference); the server's hot path uses the
C-level parts declared in `_codec.pxd` (cursor reads, `FrameSink`, `WriteBuffer`).
"""
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE,
                             PyBUF_FORMAT, PyBUF_ND, PyBUF_STRIDES)
from cpython.memoryview cimport PyMemoryView_FromObject
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.unicode cimport PyUnicode_DecodeUTF8, PyUnicode_AsUTF8AndSize
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from libc.string cimport memcpy, memmove

from . import frames as F
from .errors import BodyViewLeaked, FrameTooLarge, MalformedFrame, UnknownFrameType, ProtocolError
from .protocol import DEFAULT_MAX_FRAME

cdef extern from "Python.h":
    int PyBUF_READ

cdef enum:
    SMALL_PENDING = 16384     # incomplete frames up to this size are re-read via scratch
    WRITE_INITIAL = 256
    MAX_REASON = 1000         # bytes of an ERROR's reason the routing core writes

# All connections read into this one buffer and parse in place; only the bytes
# of an incomplete frame are copied out. An idle connection holds no read buffer.
cdef bytearray _scratch
cdef object _scratch_view
cdef unsigned char *_scratch_ptr


cdef int _new_scratch() except -1:
    # Also used to abandon a scratch buffer that a leaked view still points into.
    global _scratch, _scratch_view, _scratch_ptr
    _scratch = bytearray(SCRATCH_SIZE)
    _scratch_view = memoryview(_scratch)
    _scratch_ptr = <unsigned char *>PyByteArray_AS_STRING(_scratch)
    return 0

_new_scratch()


cdef bytearray shared_scratch():
    """The process's scratch read buffer (SCRATCH_SIZE bytes). Valid until the
    next call: a leaked body view makes the codec switch to a fresh one."""
    return _scratch


cdef class _BodyExporter:
    """Exports a frame body to Python sinks and counts the views of it, so a
    view that outlives the callback (e.g. `body[:]` kept by the sink) is
    caught instead of silently pointing at reused memory."""
    cdef const char *ptr
    cdef Py_ssize_t length
    cdef Py_ssize_t itemsize
    cdef int exports
    cdef object owner       # pins the memory if a view leaked

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("frame bodies are read-only")
        buffer.buf = <void *>self.ptr
        buffer.obj = self
        buffer.len = self.length
        buffer.readonly = 1
        buffer.itemsize = 1
        buffer.format = NULL
        if flags & PyBUF_FORMAT:
            buffer.format = b"B"
        buffer.ndim = 1
        buffer.shape = NULL
        buffer.strides = NULL
        self.itemsize = 1
        if flags & PyBUF_ND:
            buffer.shape = &self.length
        if flags & PyBUF_STRIDES == PyBUF_STRIDES:
            buffer.strides = &self.itemsize
        buffer.suboffsets = NULL
        buffer.internal = NULL
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self.exports -= 1


# -- cursor ---------------------------------------------------------------------

cdef inline int _truncated() except -1:
    raise MalformedFrame("truncated field")

cdef int cur_u8(Cursor *c, uint8_t *out) except -1:
    if c.end - c.p < 1:
        _truncated()
    out[0] = c.p[0]
    c.p += 1
    return 0

cdef int cur_u16(Cursor *c, uint16_t *out) except -1:
    if c.end - c.p < 2:
        _truncated()
    out[0] = sb_load16(c.p)
    c.p += 2
    return 0

cdef int cur_u32(Cursor *c, uint32_t *out) except -1:
    if c.end - c.p < 4:
        _truncated()
    out[0] = sb_load32(c.p)
    c.p += 4
    return 0

cdef int cur_u64(Cursor *c, uint64_t *out) except -1:
    if c.end - c.p < 8:
        _truncated()
    out[0] = sb_load64(c.p)
    c.p += 8
    return 0

cdef int cur_bytes8(Cursor *c, const char **p, Py_ssize_t *n, Py_ssize_t min_len) except -1:
    cdef uint8_t k
    cur_u8(c, &k)
    if k < min_len:
        raise MalformedFrame("empty id")
    if c.end - c.p < k:
        _truncated()
    p[0] = <const char *>c.p
    n[0] = k
    c.p += k
    return 0

cdef inline str _utf8(const char *p, Py_ssize_t n):
    try:
        return PyUnicode_DecodeUTF8(p, n, NULL)
    except UnicodeDecodeError:
        raise MalformedFrame("string is not UTF-8") from None

cdef str cur_str8(Cursor *c, Py_ssize_t min_len):
    cdef const char *p
    cdef Py_ssize_t n
    cur_bytes8(c, &p, &n, min_len)
    return _utf8(p, n)

cdef str cur_str16(Cursor *c, Py_ssize_t max_len):
    cdef uint16_t n
    cur_u16(c, &n)
    if n > max_len:
        raise MalformedFrame("string too long")
    if c.end - c.p < n:
        _truncated()
    cdef const char *p = <const char *>c.p
    c.p += n
    return _utf8(p, n)

cdef int cur_done(Cursor *c) except -1:
    if c.p != c.end:
        raise MalformedFrame("trailing bytes in frame")
    return 0


cdef bytes _rest(Cursor *c):
    cdef bytes out = PyBytes_FromStringAndSize(<const char *>c.p, c.end - c.p)
    c.p = c.end
    return out


cdef object _decode(uint8_t ftype, uint8_t flags, const unsigned char *body, Py_ssize_t n):
    cdef Cursor c
    cdef uint8_t b8
    cdef uint16_t a16, k
    cdef uint32_t a32, b32, c32, d32
    cdef uint64_t a64, b64, c64
    cdef str s1, s2, s3
    c.p = body
    c.end = body + n
    if FT_SUBSCRIBE <= ftype <= FT_GROUP_INFO:
        # low-rate control frames: the reference codec's reading is fast enough
        from . import pycodec
        return pycodec.decode_body(ftype, flags, PyBytes_FromStringAndSize(<const char *>body, n))
    if ftype == FT_SEND:
        cur_u64(&c, &a64)
        s1 = cur_str8(&c, 1)
        frame = F.Send(a64, s1, _rest(&c))
    elif ftype == FT_DELIVER:
        cur_u64(&c, &a64)
        cur_u64(&c, &b64)
        s1 = cur_str8(&c, 1)
        s2 = cur_str8(&c, 0)
        s3 = ""
        c64 = 0
        if flags & (FLAG_MIRROR | FLAG_GROUP):
            s3 = cur_str8(&c, 1)
            cur_u64(&c, &c64)
        frame = F.Deliver(a64, b64, s1, s2, _rest(&c), s3, c64, bool(flags & FLAG_GROUP))
    elif ftype == FT_RECEIPT:
        cur_u64(&c, &a64)
        cur_u8(&c, &b8)
        cur_u64(&c, &b64)
        s1 = cur_str8(&c, 1)
        s2 = cur_str8(&c, 0)
        cur_u64(&c, &c64)
        frame = F.Receipt(a64, b8, b64, s1, s2, c64)
    elif ftype == FT_READ:
        s1 = cur_str8(&c, 1)
        cur_u16(&c, &k)
        if k > MAX_RECEIVED_IDS:
            raise MalformedFrame("too many ids in READ")
        ids = []
        for _ in range(k):
            cur_u64(&c, &a64)
            ids.append(a64)
        frame = F.Read(s1, tuple(ids))
    elif ftype == FT_ACK:
        cur_u64(&c, &a64)
        cur_u64(&c, &b64)
        cur_u64(&c, &c64)
        frame = F.Ack(a64, b64, c64)
    elif ftype == FT_RECEIVED:
        cur_u16(&c, &k)
        if k > MAX_RECEIVED_IDS:
            raise MalformedFrame("too many ids in RECEIVED")
        ids = []
        for _ in range(k):
            cur_u64(&c, &a64)
            ids.append(a64)
        frame = F.Received(tuple(ids))
    elif ftype == FT_PING or ftype == FT_PONG:
        cur_u64(&c, &a64)
        frame = F.Ping(a64) if ftype == FT_PING else F.Pong(a64)
    elif ftype == FT_HELLO:
        cur_u16(&c, &a16)
        s1 = cur_str16(&c, MAX_TOKEN_LENGTH)
        s2 = cur_str8(&c, 1)
        cur_u64(&c, &a64)
        cur_u64(&c, &b64)
        frame = F.Hello(a16, s1, s2, a64, bool(flags & FLAG_SEND_ONLY), b64)
    elif ftype == FT_WELCOME:
        cur_u16(&c, &a16)
        cur_u64(&c, &a64)
        s1 = cur_str8(&c, 1)
        s2 = cur_str8(&c, 1)
        cur_u32(&c, &a32)
        cur_u32(&c, &b32)
        cur_u32(&c, &c32)
        cur_u64(&c, &b64)
        cur_u64(&c, &c64)
        cur_u32(&c, &d32)
        frame = F.Welcome(a16, a64, s1, s2, a32, b32, c32, b64, c64, d32)
    elif ftype == FT_ERROR:
        cur_u16(&c, &a16)
        cur_u64(&c, &a64)
        frame = F.Error(a16, a64, cur_str16(&c, 65535), bool(flags & FLAG_FATAL))
    elif ftype == FT_GOAWAY:
        cur_u16(&c, &a16)
        cur_u32(&c, &a32)
        frame = F.Goaway(a16, a32, cur_str16(&c, 65535))
    else:
        raise UnknownFrameType(f"unknown frame type 0x{ftype:02x}")
    cur_done(&c)
    return frame


def utf8_valid(data):
    """Whether `data` is valid UTF-8 by the C check the routing core applies to
    fields it does not decode (a SEND's recipient); tests hold it to Python's decoder."""
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return bool(sb_utf8_valid(<const unsigned char *>view.buf, view.len))
    finally:
        PyBuffer_Release(&view)


def decode_body(int ftype, int flags, body):
    """Decode one frame body (any bytes-like object) into a `frames` object."""
    cdef Py_buffer view
    PyObject_GetBuffer(body, &view, PyBUF_SIMPLE)
    try:
        return _decode(<uint8_t>ftype, <uint8_t>flags, <const unsigned char *>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


# -- writing --------------------------------------------------------------------

cdef class WriteBuffer:
    """Growable output buffer. Frames are appended with their length prefix
    back-filled; the batch is taken once per flush."""

    def __cinit__(self):
        self.data = NULL
        self.length = 0
        self.capacity = 0

    def __dealloc__(self):
        PyMem_Free(self.data)

    def __len__(self):
        return self.length

    cdef int reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t need = self.length + extra
        cdef Py_ssize_t cap
        cdef unsigned char *p
        if need <= self.capacity:
            return 0
        cap = self.capacity * 2 if self.capacity else WRITE_INITIAL
        while cap < need:
            cap *= 2
        p = <unsigned char *>PyMem_Realloc(self.data, cap)
        if p == NULL:
            raise MemoryError()
        self.data = p
        self.capacity = cap
        return 0

    cdef Py_ssize_t begin_frame(self, uint8_t ftype, uint8_t flags) except -1:
        cdef Py_ssize_t start = self.length
        self.reserve(HEADER_SIZE)
        self.data[start + 4] = ftype
        self.data[start + 5] = flags
        self.length += HEADER_SIZE
        return start

    cdef int end_frame(self, Py_ssize_t start) except -1:
        if SWITCHBOARD_DEBUG:
            if start < 0 or start + HEADER_SIZE > self.length or self.length > self.capacity:
                raise AssertionError(f"end_frame: start={start} length={self.length} capacity={self.capacity}")
        sb_store32(self.data + start, <uint32_t>(self.length - start - LENGTH_SIZE))
        return 0

    cdef int put_u8(self, uint8_t v) except -1:
        self.reserve(1)
        self.data[self.length] = v
        self.length += 1
        return 0

    cdef int put_u16(self, uint16_t v) except -1:
        self.reserve(2)
        sb_store16(self.data + self.length, v)
        self.length += 2
        return 0

    cdef int put_u32(self, uint32_t v) except -1:
        self.reserve(4)
        sb_store32(self.data + self.length, v)
        self.length += 4
        return 0

    cdef int put_u64(self, uint64_t v) except -1:
        self.reserve(8)
        sb_store64(self.data + self.length, v)
        self.length += 8
        return 0

    cdef int put_raw(self, const char *p, Py_ssize_t n) except -1:
        self.reserve(n)
        memcpy(self.data + self.length, p, n)
        self.length += n
        return 0

    cdef int put_id(self, str s, bint allow_empty) except -1:
        cdef Py_ssize_t n
        cdef const char *p = PyUnicode_AsUTF8AndSize(s, &n)
        if n > MAX_ID_LENGTH or (n == 0 and not allow_empty):
            raise ValueError(f"id must be 1..{MAX_ID_LENGTH} bytes of UTF-8: {s!r}")
        self.put_u8(<uint8_t>n)
        return self.put_raw(p, n)

    cdef int put_text16(self, str s, Py_ssize_t max_len) except -1:
        cdef Py_ssize_t n
        cdef const char *p = PyUnicode_AsUTF8AndSize(s, &n)
        if n > max_len:
            raise ValueError("string too long")
        self.put_u16(<uint16_t>n)
        return self.put_raw(p, n)

    cdef int write_ack(self, uint64_t client_id, uint64_t msg_id, uint64_t ts) except -1:
        cdef Py_ssize_t start
        self.reserve(HEADER_SIZE + 24)
        start = self.begin_frame(FT_ACK, 0)
        sb_store64(self.data + self.length, client_id)
        sb_store64(self.data + self.length + 8, msg_id)
        sb_store64(self.data + self.length + 16, ts)
        self.length += 24
        return self.end_frame(start)

    cdef int write_deliver(self, uint64_t msg_id, uint64_t ts, str sender, str sender_device,
                           const char *payload, Py_ssize_t n) except -1:
        cdef Py_ssize_t start
        self.reserve(HEADER_SIZE + 18 + n + 64)
        start = self.begin_frame(FT_DELIVER, 0)
        self.put_u64(msg_id)
        self.put_u64(ts)
        self.put_id(sender, False)
        self.put_id(sender_device, True)
        self.put_raw(payload, n)
        return self.end_frame(start)

    cdef int write_deliver_raw(self, uint64_t msg_id, uint64_t ts, const char *sender, Py_ssize_t sender_len,
                               const char *device, Py_ssize_t device_len,
                               const char *payload, Py_ssize_t n) except -1:
        """DELIVER from bytes already validated (e.g. read back from the log)."""
        cdef Py_ssize_t start
        cdef unsigned char *p
        self.reserve(HEADER_SIZE + 18 + sender_len + device_len + n)
        start = self.begin_frame(FT_DELIVER, 0)
        p = self.data + self.length
        sb_store64(p, msg_id)
        sb_store64(p + 8, ts)
        p[16] = <uint8_t>sender_len
        memcpy(p + 17, sender, sender_len)
        p[17 + sender_len] = <uint8_t>device_len
        memcpy(p + 18 + sender_len, device, device_len)
        memcpy(p + 18 + sender_len + device_len, payload, n)
        self.length += 18 + sender_len + device_len + n
        return self.end_frame(start)

    cdef int write_deliver_ex(self, uint64_t msg_id, uint64_t ts, const char *sender, Py_ssize_t sender_len,
                              const char *device, Py_ssize_t device_len, const char *peer, Py_ssize_t peer_len,
                              uint64_t origin, const char *payload, Py_ssize_t n, uint8_t kind=FLAG_MIRROR) except -1:
        """DELIVER from stored bytes; with a peer, the MIRROR or GROUP form (peer, origin id)."""
        cdef Py_ssize_t start
        if peer_len == 0:
            return self.write_deliver_raw(msg_id, ts, sender, sender_len, device, device_len, payload, n)
        self.reserve(HEADER_SIZE + 27 + sender_len + device_len + peer_len + n)
        start = self.begin_frame(FT_DELIVER, kind)
        self.put_u64(msg_id)
        self.put_u64(ts)
        self.put_u8(<uint8_t>sender_len)
        self.put_raw(sender, sender_len)
        self.put_u8(<uint8_t>device_len)
        self.put_raw(device, device_len)
        self.put_u8(<uint8_t>peer_len)
        self.put_raw(peer, peer_len)
        self.put_u64(origin)
        self.put_raw(payload, n)
        return self.end_frame(start)

    cdef int write_receipt_raw(self, uint64_t rid, uint8_t kind, uint64_t msg_id, const char *by, Py_ssize_t by_len,
                               const char *device, Py_ssize_t device_len, uint64_t ts) except -1:
        cdef Py_ssize_t start = self.begin_frame(FT_RECEIPT, 0)
        self.put_u64(rid)
        self.put_u8(kind)
        self.put_u64(msg_id)
        self.put_u8(<uint8_t>by_len)
        self.put_raw(by, by_len)
        self.put_u8(<uint8_t>device_len)
        self.put_raw(device, device_len)
        self.put_u64(ts)
        return self.end_frame(start)

    cdef int write_error(self, uint16_t code, uint64_t ref, str reason, bint fatal) except -1:
        # the reason (which may quote ids) is cut to MAX_REASON bytes at a character boundary,
        # so that an ERROR fits in the smallest max_frame (1024)
        cdef bytes text = reason.encode("utf-8", "replace")
        cdef Py_ssize_t n = len(text)
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(text)
        cdef Py_ssize_t start = self.begin_frame(FT_ERROR, FLAG_FATAL if fatal else 0)
        if n > MAX_REASON:
            n = MAX_REASON
            while n > 0 and (p[n] & 0xC0) == 0x80:
                n -= 1
        self.put_u16(code)
        self.put_u64(ref)
        self.put_u16(<uint16_t>n)
        self.put_raw(<const char *>p, n)
        return self.end_frame(start)

    cdef int write_u64_frame(self, uint8_t ftype, uint64_t v) except -1:
        cdef Py_ssize_t start = self.begin_frame(ftype, 0)
        self.put_u64(v)
        return self.end_frame(start)

    cdef bytes take_bytes(self):
        cdef bytes out = PyBytes_FromStringAndSize(<const char *>self.data, self.length)
        self.length = 0
        # An idle connection holds no output buffer (hundreds of bytes times a
        # million sessions); the next flush allocates again, from pymalloc's pools.
        PyMem_Free(self.data)
        self.data = NULL
        self.capacity = 0
        return out

    def take(self):
        """The buffered bytes, leaving the buffer empty."""
        return self.take_bytes()

    def getvalue(self):
        return PyBytes_FromStringAndSize(<const char *>self.data, self.length)

    def clear(self):
        self.length = 0


cdef int _encode_into(WriteBuffer buf, object frame) except -1:
    cdef Py_buffer view
    cdef Py_ssize_t start
    t = type(frame)
    if t is F.Send:
        start = buf.begin_frame(FT_SEND, 0)
        buf.put_u64(frame.seq)
        buf.put_id(frame.to, False)
        PyObject_GetBuffer(frame.payload, &view, PyBUF_SIMPLE)
        try:
            buf.put_raw(<const char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
    elif t is F.Deliver:
        if frame.peer:
            start = buf.begin_frame(FT_DELIVER, FLAG_GROUP if frame.group else FLAG_MIRROR)
            buf.put_u64(frame.msg_id)
            buf.put_u64(frame.timestamp_ms)
            buf.put_id(frame.sender, False)
            buf.put_id(frame.sender_device, True)
            buf.put_id(frame.peer, False)
            buf.put_u64(frame.origin_id)
            PyObject_GetBuffer(frame.payload, &view, PyBUF_SIMPLE)
            try:
                buf.put_raw(<const char *>view.buf, view.len)
            finally:
                PyBuffer_Release(&view)
            return buf.end_frame(start)
        PyObject_GetBuffer(frame.payload, &view, PyBUF_SIMPLE)
        try:
            buf.write_deliver(frame.msg_id, frame.timestamp_ms, frame.sender, frame.sender_device,
                              <const char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        return 0
    elif t is F.Receipt:
        start = buf.begin_frame(FT_RECEIPT, 0)
        buf.put_u64(frame.id)
        buf.put_u8(frame.kind)
        buf.put_u64(frame.msg_id)
        buf.put_id(frame.by, False)
        buf.put_id(frame.by_device, True)
        buf.put_u64(frame.timestamp_ms)
    elif t is F.Read:
        if len(frame.msg_ids) > MAX_RECEIVED_IDS:
            raise ValueError("too many ids in one READ frame")
        start = buf.begin_frame(FT_READ, 0)
        buf.put_id(frame.peer, False)
        buf.put_u16(len(frame.msg_ids))
        for i in frame.msg_ids:
            buf.put_u64(i)
    elif t is F.Ack:
        return buf.write_ack(frame.seq, frame.msg_id, frame.timestamp_ms)
    elif t is F.Received:
        if len(frame.msg_ids) > MAX_RECEIVED_IDS:
            raise ValueError("too many ids in one RECEIVED frame")
        start = buf.begin_frame(FT_RECEIVED, 0)
        buf.put_u16(len(frame.msg_ids))
        for i in frame.msg_ids:
            buf.put_u64(i)
    elif t is F.Ping:
        return buf.write_u64_frame(FT_PING, frame.nonce)
    elif t is F.Pong:
        return buf.write_u64_frame(FT_PONG, frame.nonce)
    elif t is F.Hello:
        start = buf.begin_frame(FT_HELLO, FLAG_SEND_ONLY if frame.send_only else 0)
        buf.put_u16(frame.version)
        buf.put_text16(frame.token, MAX_TOKEN_LENGTH)
        buf.put_id(frame.device, False)
        buf.put_u64(frame.resume_after)
        buf.put_u64(frame.producer)
    elif t is F.Welcome:
        start = buf.begin_frame(FT_WELCOME, 0)
        buf.put_u16(frame.version)
        buf.put_u64(frame.session_id)
        buf.put_id(frame.user, False)
        buf.put_id(frame.device, False)
        buf.put_u32(frame.max_frame)
        buf.put_u32(frame.max_payload)
        buf.put_u32(frame.ping_interval_ms)
        buf.put_u64(frame.server_time_ms)
        buf.put_u64(frame.producer)
        buf.put_u32(frame.send_window)
    elif t is F.Error:
        start = buf.begin_frame(FT_ERROR, FLAG_FATAL if frame.fatal else 0)
        buf.put_u16(frame.code)
        buf.put_u64(frame.ref)
        buf.put_text16(frame.reason, 65535)
    elif t is F.Goaway:
        start = buf.begin_frame(FT_GOAWAY, 0)
        buf.put_u16(frame.code)
        buf.put_u32(frame.reconnect_ms)
        buf.put_text16(frame.reason, 65535)
    elif t is F.Subscribe or t is F.Presence or t is F.Typing or t is F.Privacy or t is F.Group or t is F.GroupInfo:
        from . import pycodec                  # low-rate control frames
        ftype, flags, body = pycodec._body(frame)
        start = buf.begin_frame(ftype, flags)
        buf.put_raw(<const char *>body, len(body))
    else:
        raise TypeError(f"not a frame: {frame!r}")
    return buf.end_frame(start)


def encode_into(WriteBuffer buf, frame):
    """Append `frame` (a `frames` object) to `buf`."""
    cdef Py_ssize_t mark = buf.length
    try:
        _encode_into(buf, frame)
    except BaseException:
        buf.length = mark      # never leave half a frame behind
        raise


def encode(frame):
    """`frame` as wire bytes."""
    cdef WriteBuffer buf = WriteBuffer()
    _encode_into(buf, frame)
    return buf.getvalue()


# -- decoding -------------------------------------------------------------------

cdef class FrameSink:
    cdef int on_frame(self, uint8_t ftype, uint8_t flags, const unsigned char *body, Py_ssize_t n) except -1:
        raise NotImplementedError


cdef class SendCounter(FrameSink):
    """Counts frames and reads each SEND's fields the way the router does
    (client id, recipient, payload span) without building objects: the
    decode path of the server, minus routing. For benchmarks and tests."""

    cdef public Py_ssize_t frames
    cdef public Py_ssize_t sends
    cdef public Py_ssize_t payload_bytes

    cdef int on_frame(self, uint8_t ftype, uint8_t flags, const unsigned char *body, Py_ssize_t n) except -1:
        cdef Cursor c
        cdef uint64_t client_id
        cdef const char *to
        cdef Py_ssize_t to_len
        self.frames += 1
        if ftype == FT_SEND:
            c.p = body
            c.end = body + n
            cur_u64(&c, &client_id)
            cur_bytes8(&c, &to, &to_len, 1)
            self.sends += 1
            self.payload_bytes += c.end - c.p
        return 0


cdef class Decoder:
    """Incremental frame decoder for `asyncio.BufferedProtocol`.

    `get_buffer()` hands out a shared scratch buffer (or, for a large frame
    that spans reads, this connection's own buffer); `buffer_updated(n)`
    parses every complete frame in place and gives each to the sink. Only the
    bytes of an incomplete frame are copied out, so an idle connection holds
    no read buffer at all. Frame bodies are views valid only during the call.
    """

    def __init__(self, sink, int max_frame=DEFAULT_MAX_FRAME, int max_type=FT_LAST):
        self.set_sink(sink)
        self.max_frame = max_frame
        self.max_type = max_type            # links between workers also carry the bus's frames
        self._own = None
        self._own_len = 0
        self._scratch_off = -1
        self._stopped = False
        self._failed = None

    @property
    def buffered(self):
        """Bytes of an incomplete frame held for the next read."""
        return self._own_len

    def set_sink(self, sink):
        """Frames after the current one go to `sink` (a FrameSink or a callable)."""
        self._sink = sink
        self._fast_sink = sink if isinstance(sink, FrameSink) else None
        if self._fast_sink is not None:
            self._exporter = None     # only Python sinks need it: an idle session keeps nothing

    def stop(self):
        """Dispatch no more frames; what is left stays buffered (see `take_buffered`)."""
        self._stopped = True

    def resume(self):
        self._stopped = False

    def take_buffered(self):
        """Bytes received but not dispatched, for handing the connection on."""
        if self._own is None:
            return b""
        data = bytes(self._own[:self._own_len])
        self._own = None
        self._own_len = 0
        return data

    def get_buffer(self, Py_ssize_t sizehint=-1):
        # The pending bytes stay in _own until buffer_updated(): an event loop
        # may call get_buffer() again without buffer_updated() (a read that
        # hit EAGAIN), and another connection may have used scratch meanwhile.
        cdef Py_ssize_t need
        cdef unsigned char *own
        if self._own_len == 0:
            self._scratch_off = 0
            return _scratch_view[0:]        # a fresh view: the caller may release it
        need = 0
        own = <unsigned char *>PyByteArray_AS_STRING(self._own)
        if self._own_len >= LENGTH_SIZE:
            need = LENGTH_SIZE + <Py_ssize_t>sb_load32(own)   # checked against max_frame when kept
        if need <= SMALL_PENDING and self._own_len + SMALL_PENDING <= SCRATCH_SIZE:
            # re-read through scratch: copy the few pending bytes to its front
            memcpy(_scratch_ptr, own, self._own_len)
            self._scratch_off = self._own_len
            return _scratch_view[self._scratch_off:]
        # a large frame spans reads: read straight into our own buffer, sized to it
        if len(self._own) < max(need, self._own_len + 4096):
            grown = bytearray(max(need, self._own_len + 4096))
            memcpy(PyByteArray_AS_STRING(grown), own, self._own_len)
            self._own = grown
        self._scratch_off = -1
        return memoryview(self._own)[self._own_len:]

    def buffer_updated(self, Py_ssize_t nbytes):
        """Parse what the last read added; returns the number of frames dispatched."""
        cdef Py_ssize_t total, used
        if self._scratch_off >= 0:
            total = self._scratch_off + nbytes
            self._scratch_off = -1
            self._owner = _scratch
            used = self._parse(_scratch_ptr, total)
            # scratch held the pending bytes too: what is left replaces _own
            self._own = None
            self._own_len = 0
            if used < total:
                self._keep(_scratch_ptr + used, total - used)
        else:
            if self._own is None:
                raise RuntimeError("buffer_updated() without get_buffer()")
            self._own_len += nbytes
            self._owner = self._own
            used = self._parse(<unsigned char *>PyByteArray_AS_STRING(self._own), self._own_len)
            self._consume_own(used)
        self._owner = None
        return self._count

    def feed(self, data):
        """Parse `data` (for callers that are not BufferedProtocols). Returns frames dispatched."""
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            return self.feed_ptr(<const unsigned char *>view.buf, view.len, data)
        finally:
            PyBuffer_Release(&view)

    cdef Py_ssize_t feed_ptr(self, const unsigned char *p, Py_ssize_t n, object owner) except -1:
        """`feed` for C callers (the WebSocket layer feeds unmasked payloads
        straight from the scratch buffer): `owner` is the object holding `p`."""
        cdef Py_ssize_t used
        try:
            if self._own_len == 0:
                self._owner = owner
                used = self._parse(p, n)
                if used < n:
                    self._keep(p + used, n - used)
            else:
                self._append_own(p, n)
                self._owner = self._own
                used = self._parse(<unsigned char *>PyByteArray_AS_STRING(self._own), self._own_len)
                self._consume_own(used)
        finally:
            self._owner = None
        return self._count

    cdef int _append_own(self, const unsigned char *p, Py_ssize_t n) except -1:
        cdef Py_ssize_t cap = len(self._own)
        if self._own_len + n > cap:
            grown = bytearray(max(self._own_len + n, cap * 2))
            memcpy(PyByteArray_AS_STRING(grown), PyByteArray_AS_STRING(self._own), self._own_len)
            self._own = grown
        memcpy(PyByteArray_AS_STRING(self._own) + self._own_len, p, n)
        self._own_len += n
        return 0

    cdef int _consume_own(self, Py_ssize_t used) except -1:
        cdef char *own
        if used == 0:
            return 0
        self._own_len -= used
        if self._own_len == 0:
            self._own = None          # idle: hold no read buffer
        else:
            own = PyByteArray_AS_STRING(self._own)
            memmove(own, own + used, self._own_len)
        return 0

    cdef int _keep(self, const unsigned char *p, Py_ssize_t n) except -1:
        # Copy an incomplete frame out of a buffer we are about to lose. Its
        # header (if present) was already checked against max_frame by _parse.
        if SWITCHBOARD_DEBUG:
            if n >= LENGTH_SIZE and not self._stopped and n >= LENGTH_SIZE + <Py_ssize_t>sb_load32(p):
                raise AssertionError("a complete frame was left unparsed")
        self._own = bytearray(max(n, 256))
        memcpy(PyByteArray_AS_STRING(self._own), p, n)
        self._own_len = n
        return 0

    cdef Py_ssize_t _parse(self, const unsigned char *buf, Py_ssize_t n) except -1:
        cdef Py_ssize_t pos = 0
        cdef uint32_t length
        cdef uint8_t ftype
        self._count = 0
        if self._failed is not None:
            raise self._failed
        try:
            while not self._stopped and n - pos >= LENGTH_SIZE:
                length = sb_load32(buf + pos)
                if length > <uint32_t>self.max_frame:
                    raise FrameTooLarge(f"frame of {length} bytes exceeds the limit of {self.max_frame}")
                if length < MIN_FRAME:
                    raise MalformedFrame(f"frame length {length} is below the minimum of {MIN_FRAME}")
                if n - pos < LENGTH_SIZE + 1:
                    break
                ftype = buf[pos + LENGTH_SIZE]
                if ftype == 0 or ftype > self.max_type:
                    raise UnknownFrameType(f"unknown frame type 0x{ftype:02x}")
                if n - pos - LENGTH_SIZE < <Py_ssize_t>length:
                    break
                self._count += 1
                self._dispatch(ftype, buf[pos + 5], buf + pos + HEADER_SIZE, length - 2)
                pos += LENGTH_SIZE + length
                if SWITCHBOARD_DEBUG:
                    if pos > n:
                        raise AssertionError(f"decoder overran its buffer: pos={pos} n={n}")
        except BaseException as exc:
            self._failed = exc
            raise
        return pos

    cdef int _dispatch(self, uint8_t ftype, uint8_t flags, const unsigned char *body, Py_ssize_t n) except -1:
        cdef _BodyExporter exp
        if self._fast_sink is not None:
            return self._fast_sink.on_frame(ftype, flags, body, n)
        exp = self._exporter
        if exp is None:
            exp = self._exporter = _BodyExporter()
        exp.ptr = <const char *>body
        exp.length = n
        view = PyMemoryView_FromObject(exp)
        try:
            self._sink(ftype, flags, view)
        finally:
            view.release()
            if exp.exports:
                # The sink kept a view derived from the body. Pin the memory it
                # points into (and stop reusing it) so it stays valid, then fail loudly.
                exp.owner = self._owner
                self._exporter = None
                if self._owner is _scratch:
                    _new_scratch()
                raise BodyViewLeaked("a frame body view outlived the sink call; copy it with bytes(body)")
        return 0
