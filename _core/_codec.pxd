# Public C-level API of the framing codec: cursor reads, the write buffer, the
# decoder and the sink interface the routing core implements.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "wire.h":
    int SWITCHBOARD_DEBUG
    uint16_t sb_load16(const unsigned char *p) nogil
    uint32_t sb_load32(const unsigned char *p) nogil
    uint64_t sb_load64(const unsigned char *p) nogil
    void sb_store16(unsigned char *p, uint16_t v) nogil
    void sb_store32(unsigned char *p, uint32_t v) nogil
    void sb_store64(unsigned char *p, uint64_t v) nogil
    int sb_utf8_valid(const unsigned char *p, size_t n) nogil

# Mirrors _core/protocol.py (tests check they agree).
cdef enum:
    LENGTH_SIZE = 4
    HEADER_SIZE = 6
    MIN_FRAME = 2
    MAX_ID_LENGTH = 255
    MAX_TOKEN_LENGTH = 1024
    MAX_RECEIVED_IDS = 4096
    FLAG_FATAL = 0x01
    FLAG_SEND_ONLY = 0x01
    FLAG_MIRROR = 0x02
    FLAG_GROUP = 0x04

cdef enum FrameType:
    FT_HELLO = 0x01
    FT_WELCOME = 0x02
    FT_SEND = 0x03
    FT_ACK = 0x04
    FT_DELIVER = 0x05
    FT_RECEIVED = 0x06
    FT_PING = 0x07
    FT_PONG = 0x08
    FT_ERROR = 0x09
    FT_GOAWAY = 0x0A
    FT_RECEIPT = 0x0B
    FT_READ = 0x0C
    FT_SUBSCRIBE = 0x0D
    FT_PRESENCE = 0x0E
    FT_TYPING = 0x0F
    FT_PRIVACY = 0x10
    FT_GROUP = 0x11
    FT_GROUP_INFO = 0x12
    FT_LAST = 0x12

ctypedef struct Cursor:
    const unsigned char *p
    const unsigned char *end

cdef int cur_u8(Cursor *c, uint8_t *out) except -1
cdef int cur_u16(Cursor *c, uint16_t *out) except -1
cdef int cur_u32(Cursor *c, uint32_t *out) except -1
cdef int cur_u64(Cursor *c, uint64_t *out) except -1
cdef int cur_bytes8(Cursor *c, const char **p, Py_ssize_t *n, Py_ssize_t min_len) except -1
cdef str cur_str8(Cursor *c, Py_ssize_t min_len)
cdef str cur_str16(Cursor *c, Py_ssize_t max_len)
cdef int cur_done(Cursor *c) except -1


cdef class WriteBuffer:
    cdef unsigned char *data
    cdef Py_ssize_t length
    cdef Py_ssize_t capacity

    cdef int reserve(self, Py_ssize_t extra) except -1
    cdef Py_ssize_t begin_frame(self, uint8_t ftype, uint8_t flags) except -1
    cdef int end_frame(self, Py_ssize_t start) except -1
    cdef int put_u8(self, uint8_t v) except -1
    cdef int put_u16(self, uint16_t v) except -1
    cdef int put_u32(self, uint32_t v) except -1
    cdef int put_u64(self, uint64_t v) except -1
    cdef int put_raw(self, const char *p, Py_ssize_t n) except -1
    cdef int put_id(self, str s, bint allow_empty) except -1
    cdef int put_text16(self, str s, Py_ssize_t max_len) except -1
    cdef int write_ack(self, uint64_t client_id, uint64_t msg_id, uint64_t ts) except -1
    cdef int write_deliver(self, uint64_t msg_id, uint64_t ts, str sender, str sender_device,
                           const char *payload, Py_ssize_t n) except -1
    cdef int write_deliver_raw(self, uint64_t msg_id, uint64_t ts, const char *sender, Py_ssize_t sender_len,
                               const char *device, Py_ssize_t device_len,
                               const char *payload, Py_ssize_t n) except -1
    cdef int write_deliver_ex(self, uint64_t msg_id, uint64_t ts, const char *sender, Py_ssize_t sender_len,
                              const char *device, Py_ssize_t device_len, const char *peer, Py_ssize_t peer_len,
                              uint64_t origin, const char *payload, Py_ssize_t n, uint8_t kind=*) except -1
    cdef int write_receipt_raw(self, uint64_t rid, uint8_t kind, uint64_t msg_id, const char *by, Py_ssize_t by_len,
                               const char *device, Py_ssize_t device_len, uint64_t ts) except -1
    cdef int write_error(self, uint16_t code, uint64_t ref, str reason, bint fatal) except -1
    cdef int write_u64_frame(self, uint8_t ftype, uint64_t v) except -1
    cdef bytes take_bytes(self)


cdef class FrameSink:
    """Receives decoded frames at C speed; the body pointer is valid only during the call."""
    cdef int on_frame(self, uint8_t ftype, uint8_t flags, const unsigned char *body, Py_ssize_t n) except -1


cdef class Decoder:
    # One per connection (a million on a dense gateway): the 4-byte fields sit together
    # so the object is 112 B with its GC header, not 136 (a 144 B block).
    cdef object _sink            # Python callable(ftype, flags, memoryview) when not a FrameSink
    cdef FrameSink _fast_sink
    cdef bytearray _own          # bytes of an incomplete frame between reads; None while idle
    cdef object _failed
    cdef object _owner           # the object whose memory is being parsed
    cdef object _exporter        # lends frame bodies to Python sinks
    cdef public int max_frame    # at most 2 GiB (the gateway allows 16 MiB)
    cdef int _own_len            # < max_frame + a header
    cdef public int max_type
    cdef bint _stopped
    cdef int _scratch_off        # >= 0: the last get_buffer() handed out the shared scratch buffer (< SCRATCH_SIZE)
    cdef int _count              # frames dispatched by the last parse

    cdef Py_ssize_t _parse(self, const unsigned char *buf, Py_ssize_t n) except -1
    cdef int _keep(self, const unsigned char *p, Py_ssize_t n) except -1
    cdef int _append_own(self, const unsigned char *p, Py_ssize_t n) except -1
    cdef int _consume_own(self, Py_ssize_t used) except -1
    cdef int _dispatch(self, uint8_t ftype, uint8_t flags, const unsigned char *body, Py_ssize_t n) except -1
    cdef Py_ssize_t feed_ptr(self, const unsigned char *p, Py_ssize_t n, object owner) except -1


cdef enum:
    SCRATCH_SIZE = 262144        # the shared read buffer every connection reads into

cdef bytearray shared_scratch()
