# cython: language_level=3
"""The throughput load generator's per-message path, in C, so that the client
is not what a benchmark measures (the Python one topped out near 100 k msgs/s).

A Flow is one sender and its receivers (one for a 1:1 pair, the members for
a group or a NATS subject). The sender keeps `window` messages in flight: a
message is in flight until every receiver has it. Payloads carry a sequence
number and a send timestamp; receivers check the sequence (exactly once, in
order) and record latency. The same machinery speaks three wire formats:
Switchboard's frames, the NATS text protocol and WebSocket (the relay peer).
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free, qsort, strtol
from libc.string cimport memcpy, memchr, memmove, memcmp
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from _core._codec cimport WriteBuffer, MAX_RECEIVED_IDS, sb_load16, sb_load32, sb_load64

cdef enum:
    SWITCHBOARD = 0
    NATS = 1
    WEBSOCKET = 2
    READ_SIZE = 262144
    MAX_ACKS = 16384           # DELIVER/RECEIPT ids one read can hold (each frame is > 16 bytes)
    FT_WELCOME = 0x02
    FT_SEND = 0x03
    FT_ACK = 0x04
    FT_DELIVER = 0x05
    FT_RECEIVED = 0x06
    FT_ERROR = 0x09
    FT_GOAWAY = 0x0A
    FT_RECEIPT = 0x0B
    FLAG_MIRROR = 0x02
    FLAG_GROUP = 0x04
    STAMP = 16                 # payload starts with seq (8) and send time (8)

DIALECTS = {"switchboard": SWITCHBOARD, "nats": NATS, "websockets": WEBSOCKET}
cdef bytes _ZEROS = bytes(65536)          # payload padding after the stamp (sizes are capped below it)


cdef inline uint64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec


cdef int _cmp_u64(const void *a, const void *b) noexcept nogil:
    cdef uint64_t x = (<const uint64_t *>a)[0], y = (<const uint64_t *>b)[0]
    return (x > y) - (x < y)


cdef class Stats:
    """Counters of one load process, and latency samples (every message, up to a cap)."""
    cdef public uint64_t sent, acked, delivered, duplicates, gaps, errors, receipts
    cdef public bint stopped
    cdef public object last_error
    cdef uint64_t *lat
    cdef Py_ssize_t nlat, cap

    def __cinit__(self, Py_ssize_t cap=8_000_000):
        self.cap = cap
        self.lat = <uint64_t *>malloc(cap * sizeof(uint64_t))
        if self.lat == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.lat)

    cdef inline void sample(self, uint64_t ns) noexcept:
        if self.nlat < self.cap:
            self.lat[self.nlat] = ns
            self.nlat += 1

    def reset_latency(self):
        self.nlat = 0

    def percentiles(self, qs):
        """Latency percentiles in ms (q in 0..1) over the samples so far."""
        if self.nlat == 0:
            return [None for _ in qs]
        cdef double q
        cdef list out = []
        qsort(self.lat, self.nlat, sizeof(uint64_t), _cmp_u64)
        for q in qs:
            out.append(self.lat[min(self.nlat - 1, <Py_ssize_t>(q * self.nlat))] / 1e6)
        return out


cdef class Conn:
    """One connection: parses what arrives, writes what its flow sends."""
    cdef public object transport
    cdef public object ready             # a future: set at WELCOME / PONG / 101, or failed
    cdef Flow flow
    cdef int dialect
    cdef public bint sender
    cdef uint64_t expected               # next sequence number (receivers)
    cdef bytes greeting
    cdef unsigned char *buf
    cdef readonly Py_ssize_t have
    cdef readonly bint running
    cdef object view
    cdef bytearray backing
    cdef unsigned char *acks             # Switchboard receivers: RECEIVED ids of this read
    cdef Py_ssize_t nacks

    def __init__(self, Flow flow, bint sender, str dialect, bytes greeting, ready):
        self.flow = flow
        self.sender = sender
        self.dialect = DIALECTS[dialect]
        self.greeting = greeting
        self.ready = ready
        self.expected = 1
        self.backing = bytearray(READ_SIZE)
        self.buf = <unsigned char *><char *>self.backing
        self.view = memoryview(self.backing)

    def __cinit__(self):
        self.acks = <unsigned char *>malloc(MAX_ACKS * 8)
        if self.acks == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.acks)

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.greeting)

    def connection_lost(self, exc):
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed during the handshake: {exc}"))
        elif not self.flow.stats.stopped:
            self.flow.stats.errors += 1
            self.flow.stats.last_error = f"connection lost: {exc}"

    def eof_received(self):
        return False

    def get_buffer(self, Py_ssize_t hint):
        return self.view[self.have:]

    def buffer_updated(self, Py_ssize_t n):
        cdef Py_ssize_t used
        self.have += n
        if not self.running:
            used = self._handshake()
            if self.running and used < self.have:      # frames right behind the WELCOME
                used += self._parse_from(used)
        else:
            used = self._parse_from(0)
        if used > 0:
            if used < self.have:
                memmove(self.buf, self.buf + used, self.have - used)
            self.have -= used
        if self.have == READ_SIZE:
            self._fail("a message larger than the read buffer")
        if self.nacks:
            self._send_received()
        self.flow.pump()

    cdef void _fail(self, str why):
        self.flow.stats.errors += 1
        self.flow.stats.last_error = why
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        self.transport.abort()

    # -- handshakes ---------------------------------------------------------------
    cdef Py_ssize_t _handshake(self) except -1:
        cdef const unsigned char *p = self.buf
        cdef const unsigned char *hit
        cdef Py_ssize_t length, k
        if self.dialect == SWITCHBOARD:
            if self.have < 6:
                return 0
            length = sb_load32(p)
            if self.have < 4 + length:
                return 0
            if p[4] != FT_WELCOME:
                self._fail(f"no WELCOME: frame type {p[4]}: " + bytes(p[6:4 + length]).decode("utf-8", "replace"))
                return 0
            self._ready()
            return 4 + length
        if self.dialect == NATS:
            k = 0
            while True:
                hit = <const unsigned char *>memchr(p + k, 10, self.have - k)
                if hit == NULL:
                    return k
                if hit - (p + k) >= 4 and memcmp(p + k, b"PONG", 4) == 0:
                    self._ready()
                    return hit - p + 1
                if hit - (p + k) >= 4 and memcmp(p + k, b"-ERR", 4) == 0:
                    self._fail(bytes(p[k:hit - p]).decode("utf-8", "replace"))
                    return 0
                k = hit - p + 1
        # WebSocket: the HTTP response ends with an empty line
        for k in range(3, self.have):
            if p[k] == 10 and p[k - 1] == 13 and p[k - 2] == 10 and p[k - 3] == 13:
                if memcmp(p, b"HTTP/1.1 101", 12) != 0:
                    self._fail(bytes(p[:k]).decode("latin-1").split("\r\n")[0])
                    return 0
                self._ready()
                return k + 1
        return 0

    cdef void _ready(self):
        self.running = True
        if not self.ready.done():
            self.ready.set_result(None)

    # -- steady state ---------------------------------------------------------------
    cdef Py_ssize_t _parse_from(self, Py_ssize_t start) except -1:
        """Parse from `start`; returns the bytes used after it."""
        cdef Py_ssize_t used
        self.buf += start
        self.have -= start
        try:
            if self.dialect == SWITCHBOARD:
                used = self._parse_switchboard()
            elif self.dialect == NATS:
                used = self._parse_nats()
            else:
                used = self._parse_ws()
        finally:
            self.buf -= start
            self.have += start
        return used

    cdef int _got(self, const unsigned char *payload, Py_ssize_t n) except -1:
        """A message reached this receiver: check its sequence, sample latency."""
        cdef uint64_t seq
        cdef Stats st = self.flow.stats
        if n < STAMP:
            st.errors += 1
            return 0
        seq = sb_load64(payload)
        if seq == self.expected:
            self.expected += 1
        elif seq < self.expected:
            st.duplicates += 1
            return 0
        else:
            st.gaps += seq - self.expected
            self.expected = seq + 1
        st.delivered += 1
        self.flow.delivered += 1
        st.sample(now_ns() - sb_load64(payload + 8))
        return 0

    cdef Py_ssize_t _parse_switchboard(self) except -1:
        cdef const unsigned char *p = self.buf
        cdef Py_ssize_t pos = 0, length, off
        cdef uint8_t ftype, flags
        while self.have - pos >= 6:
            length = sb_load32(p + pos)
            if self.have - pos - 4 < length:
                break
            ftype = p[pos + 4]
            flags = p[pos + 5]
            if ftype == FT_DELIVER:
                off = pos + 6 + 16                       # msg id, timestamp
                off += 1 + p[off]                        # sender
                off += 1 + p[off]                        # sender device
                if flags & (FLAG_MIRROR | FLAG_GROUP):
                    off += 1 + p[off] + 8                # peer, origin id
                self._got(p + off, pos + 4 + length - off)
                memcpy(self.acks + 8 * self.nacks, p + pos + 6, 8)
                self.nacks += 1
            elif ftype == FT_RECEIPT:                   # stored for us like a message: acknowledge it
                memcpy(self.acks + 8 * self.nacks, p + pos + 6, 8)
                self.nacks += 1
                self.flow.stats.receipts += 1
            elif ftype == FT_ACK:
                self.flow.stats.acked += 1
            elif ftype == FT_ERROR or ftype == FT_GOAWAY:
                self.flow.stats.errors += 1
                self.flow.stats.last_error = bytes(p[pos + 4:pos + 4 + length])
            pos += 4 + length
        return pos

    cdef int _send_received(self) except -1:
        """One RECEIVED frame (or a few, MAX_RECEIVED_IDS each) for every DELIVER
        and RECEIPT of this read, built with the codec's WriteBuffer."""
        cdef WriteBuffer out = self.flow.out_acks
        cdef Py_ssize_t i = 0, k, start
        while i < self.nacks:
            k = min(self.nacks - i, MAX_RECEIVED_IDS)
            start = out.begin_frame(FT_RECEIVED, 0)
            out.put_u16(<uint16_t>k)
            out.put_raw(<const char *>self.acks + 8 * i, 8 * k)
            out.end_frame(start)
            i += k
        self.nacks = 0
        self.transport.write(out.take_bytes())
        return 0

    cdef Py_ssize_t _parse_nats(self) except -1:
        cdef const unsigned char *p = self.buf
        cdef const unsigned char *nl
        cdef const unsigned char *sp
        cdef Py_ssize_t pos = 0, n
        while pos < self.have:
            nl = <const unsigned char *>memchr(p + pos, 10, self.have - pos)
            if nl == NULL:
                break
            if nl - (p + pos) >= 3 and memcmp(p + pos, b"MSG", 3) == 0:
                sp = nl - 2                              # the size is the last field
                while sp > p + pos and sp[0] != 32:
                    sp -= 1
                n = strtol(<const char *>sp + 1, NULL, 10)
                if self.have - (nl + 1 - p) < n + 2:
                    break                                # payload not all here yet
                self._got(nl + 1, n)
                pos = (nl + 1 - p) + n + 2
                continue
            if nl - (p + pos) >= 4 and memcmp(p + pos, b"PING", 4) == 0:
                self.transport.write(b"PONG\r\n")
            elif nl - (p + pos) >= 4 and memcmp(p + pos, b"-ERR", 4) == 0:
                self.flow.stats.errors += 1
                self.flow.stats.last_error = bytes(p[pos:nl - p])
            pos = nl + 1 - p
        return pos

    cdef Py_ssize_t _parse_ws(self) except -1:
        cdef const unsigned char *p = self.buf
        cdef Py_ssize_t pos = 0, head, n
        cdef uint8_t op
        while self.have - pos >= 2:
            op = p[pos] & 0x0F
            n = p[pos + 1] & 0x7F
            head = 2
            if n == 126:
                head = 4
                if self.have - pos < 4:
                    break
                n = sb_load16(p + pos + 2)
            elif n == 127:
                head = 10
                if self.have - pos < 10:
                    break
                n = <Py_ssize_t>sb_load64(p + pos + 2)
            if self.have - pos < head + n:
                break
            if op == 2 and n > 0:                        # [len][from][message]
                self._got(p + pos + head + 1 + p[pos + head], n - 1 - p[pos + head])
            elif op == 8:
                self._fail("websocket closed by the server")
            pos += head + n
        return pos


cdef class Flow:
    """A sender, its receivers and the window of messages in flight."""
    cdef public Conn sender
    cdef public list receivers
    cdef public Stats stats
    cdef int dialect
    cdef bytes head                     # everything before the stamp, for this target
    cdef Py_ssize_t size
    cdef int window
    cdef public uint64_t sent, delivered
    cdef public uint64_t rate_budget   # open loop: messages allowed so far (0: closed loop)
    cdef public bint open_loop
    cdef public bint started           # set at "go": nothing is sent before every flow is ready
    cdef WriteBuffer out                # this pump's messages, one write
    cdef WriteBuffer out_acks           # a receiver's RECEIVED frames for one read

    def __init__(self, Stats stats, str dialect, str target, Py_ssize_t size, int window):
        self.stats = stats
        self.dialect = DIALECTS[dialect]
        self.size = max(size, STAMP)
        self.window = window
        self.receivers = []
        self.out = WriteBuffer()
        self.out_acks = WriteBuffer()
        t = target.encode()
        if self.dialect == SWITCHBOARD:
            self.head = bytes([len(t)]) + t                  # after the client id
        elif self.dialect == NATS:
            self.head = b"PUB " + t + b" " + str(self.size).encode() + b"\r\n"
        else:
            self.head = bytes([len(t)]) + t

    def add(self, Conn conn):
        if conn.sender:
            self.sender = conn
        else:
            self.receivers.append(conn)

    cpdef int pump(self) except -1:
        """Send while the window allows (and, open loop, the rate budget)."""
        cdef Py_ssize_t nrecv = len(self.receivers)
        cdef uint64_t outstanding
        cdef int k = 0
        if not self.started or self.stats.stopped or self.sender is None or not self.sender.running:
            return 0
        while True:
            outstanding = self.sent * nrecv - self.delivered
            if outstanding + nrecv > <uint64_t>(self.window * nrecv):
                break
            if self.open_loop and self.sent >= self.rate_budget:
                break
            self._append(self.sent + 1)
            self.sent += 1
            self.stats.sent += 1
            k += 1
        if k:
            self.sender.transport.write(self.out.take_bytes())
        return k

    cdef int _append(self, uint64_t seq) except -1:
        """One message into `out`: our SEND frame (through the codec's
        WriteBuffer), a NATS PUB, or a masked WebSocket binary frame."""
        cdef WriteBuffer out = self.out
        cdef Py_ssize_t hl = PyBytes_GET_SIZE(self.head)
        cdef Py_ssize_t ws_len = hl + self.size, start = 0
        if self.dialect == SWITCHBOARD:
            start = out.begin_frame(FT_SEND, 0)
            out.put_u64(seq)                                # client id = sequence number
        elif self.dialect == WEBSOCKET:
            out.put_u8(0x82)
            if ws_len < 126:
                out.put_u8(0x80 | ws_len)
            elif ws_len < 65536:
                out.put_u8(0x80 | 126)
                out.put_u16(<uint16_t>ws_len)
            else:
                out.put_u8(0x80 | 127)
                out.put_u64(ws_len)
            out.put_u32(0)                                  # mask key 0: the payload goes as is
        out.put_raw(PyBytes_AS_STRING(self.head), hl)
        out.put_u64(seq)
        out.put_u64(now_ns())
        out.put_raw(PyBytes_AS_STRING(_ZEROS), self.size - STAMP)
        if self.dialect == SWITCHBOARD:
            out.end_frame(start)
        elif self.dialect == NATS:
            out.put_raw(b"\r\n", 2)
        return 0
