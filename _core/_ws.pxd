# WebSocket (RFC 6455) framing for the gateway's browser listener: the reader
# that unmasks client frames and streams their payload into a protocol Decoder,
# and the writer that wraps a session's output in binary messages.
from libc.stdint cimport uint8_t, uint16_t, uint64_t
from ._codec cimport Decoder

cdef enum:
    OP_CONT = 0x0
    OP_TEXT = 0x1
    OP_BINARY = 0x2
    OP_CLOSE = 0x8
    OP_PING = 0x9
    OP_PONG = 0xA
    MAX_CONTROL = 125
    MAX_HEADER = 14               # 2 + 8 (64-bit length) + 4 (mask key)
    PEND_MAX = 144                # a split header, or a whole control frame (6 + 125 bytes)
    CLOSE_NORMAL = 1000
    CLOSE_GOING_AWAY = 1001
    CLOSE_PROTOCOL_ERROR = 1002
    CLOSE_UNSUPPORTED = 1003
    CLOSE_NO_STATUS = 1005
    CLOSE_INVALID_DATA = 1007
    CLOSE_POLICY = 1008
    CLOSE_TOO_BIG = 1009
    CLOSE_INTERNAL = 1011


cdef class WsReader:
    # One per WebSocket connection: the small fields are declared together (Cython keeps
    # the order) so the reader is a 128 B block with its GC header, not 144.
    cdef readonly Decoder inner          # gets the unmasked payload of binary messages
    cdef object _on_control              # callable(opcode, bytes): ping, pong, close (validated)
    cdef uint64_t _remaining             # payload bytes of the current data frame not yet seen
    cdef uint64_t _message_len           # bytes of the current message so far
    cdef unsigned char *_pend            # PEND_MAX bytes while a header or control frame is split; else NULL
    cdef bytearray _buf                  # the scratch buffer handed out by get_buffer
    cdef bytes _rest                     # raw bytes after a stop (a hand-off takes them)
    cdef public int max_message          # bytes of one message, all its fragments together (< 2 GiB)
    cdef int _pend_len
    cdef int _scratch_off
    cdef unsigned char _mask[4]
    cdef uint8_t _phase                  # mask offset of the next payload byte
    cdef uint8_t _in_frame
    cdef uint8_t _fin
    cdef uint8_t _in_message             # a fragmented message is open (continuations expected)
    cdef public bint closing             # a Close was sent or received: data is read and dropped

    cdef bint _stopped(self)
    cdef Py_ssize_t _process(self, unsigned char *buf, Py_ssize_t n, object owner) except -1
    cdef int _end_frame(self) except -1
    cdef int _control(self, uint8_t opcode, unsigned char *payload, Py_ssize_t n) except -1
    cdef int _after(self, unsigned char *buf, Py_ssize_t used, Py_ssize_t total) except -1
    cdef int _drop_pend(self) except -1


cdef class WsWriter:
    cdef object _transport               # written with one write() per batch
    cdef object _owner                   # its connection: close() calls owner.session_closed()
    cdef public Py_ssize_t max_message
    cdef readonly int last_type          # type of the last protocol frame written (ERROR, GOAWAY, ...)
    cdef public bint closed              # after our Close frame: drop output

