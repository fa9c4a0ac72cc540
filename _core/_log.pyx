"""The memory-mapped append log (Cython): segment files, records, recovery scan,
and the per-recipient index of unconsumed messages.

A record is written into a mapped, pre-zeroed segment with its length stored
last, so a process killed mid-write leaves a zero length (or a bad CRC) that
recovery recognises as a torn tail. The CRC32C covers the segment's nonce and
id and the record's offset, so bytes from another file or another place can
never pass as a valid record. File management, threads and durability policy
live in `_core/log.py`.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeUTF8, PyUnicode_AsUTF8AndSize
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from libc.stdint cimport int64_t
from libc.string cimport memcpy, memset
from posix.mman cimport mmap, munmap, madvise, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED

from ._codec cimport sb_load16, sb_load32, sb_load64, sb_store16, sb_store32, sb_store64

from .errors import StoreError
from .protocol import ErrorCode

cdef extern from "crc32c.h":
    void sb_crc32c_setup(int allow_hw)
    uint32_t sb_crc32c_update(uint32_t state, const void *data, size_t n) nogil
    int sb_crc32c_mode

cdef extern from "errno.h":
    int errno

cdef enum:
    MADV_POPULATE_WRITE_ = 23     # Linux 5.14+; older kernels fall back to touching pages

sb_crc32c_setup(1)


def crc32c(data, uint32_t value=0):
    """CRC32C of `data`, continuing from `value` (like zlib.crc32's second argument)."""
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return ~sb_crc32c_update(~value, view.buf, view.len) & 0xFFFFFFFF
    finally:
        PyBuffer_Release(&view)


def crc32c_hardware():
    """True when the SSE4.2 instruction computes CRC32C here."""
    return sb_crc32c_mode == 1


cdef inline Py_ssize_t _loc_off(uint64_t loc) noexcept nogil:
    return <Py_ssize_t>(loc & <uint64_t>0xFFFFFFFFu)


cdef inline Py_ssize_t _align(Py_ssize_t n) noexcept nogil:
    return (n + RECORD_ALIGN - 1) & ~(<Py_ssize_t>RECORD_ALIGN - 1)


cdef bint _parse_message(const unsigned char *r, Py_ssize_t length, MsgView *m) noexcept nogil:
    """Fill `m` from a MESSAGE record; False if its lengths are inconsistent."""
    cdef Py_ssize_t pos = 40
    if length < MESSAGE_FIXED:
        return False
    m.payload_len = sb_load32(r + 12)
    m.msg_id = sb_load64(r + 16)
    m.ts = sb_load64(r + 24)
    m.client_id = sb_load64(r + 32)
    m.recipient_len = r[pos]
    m.recipient = <const char *>r + pos + 1
    pos += 1 + m.recipient_len
    if pos >= length:
        return False
    m.recipient_device_len = r[pos]
    m.recipient_device = <const char *>r + pos + 1
    pos += 1 + m.recipient_device_len
    if pos >= length:
        return False
    m.sender_len = r[pos]
    m.sender = <const char *>r + pos + 1
    pos += 1 + m.sender_len
    if pos >= length:
        return False
    m.sender_device_len = r[pos]
    m.sender_device = <const char *>r + pos + 1
    pos += 1 + m.sender_device_len
    m.payload = <const char *>r + pos
    return pos + m.payload_len == length and m.recipient_len > 0


cdef inline str _text(const char *p, Py_ssize_t n):
    return PyUnicode_DecodeUTF8(p, n, "replace")


cdef int _put_id(unsigned char *p, const char *s, Py_ssize_t n) noexcept nogil:
    p[0] = <uint8_t>n
    memcpy(p + 1, s, n)
    return 0


cdef const char *_utf8(str s, Py_ssize_t *n) except NULL:
    cdef const char *p = PyUnicode_AsUTF8AndSize(s, n)
    if n[0] > 255:
        raise ValueError(f"id longer than 255 bytes: {s[:40]!r}...")
    return p


cdef class Segment:
    """One fixed-size segment file, mapped read-write. Created by `_core.log`."""

    def __cinit__(self):
        self.base = NULL
        self.fd = -1

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL

    @staticmethod
    def map(path, int fd, uint64_t segment_id, uint64_t nonce, Py_ssize_t size):
        """Map an existing, fully reserved segment file (never a sparse one)."""
        cdef Segment seg = Segment()
        cdef void *p
        with nogil:
            p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            raise OSError(errno, f"mmap of {path} failed")
        seg.base = <unsigned char *>p
        seg.size = size
        seg.fd = fd
        seg.path = path
        seg.segment_id = segment_id
        seg.nonce = nonce
        seg.end = SEGMENT_HEADER_SIZE
        return seg

    def populate(self, Py_ssize_t start=0, Py_ssize_t length=-1):
        """Fault pages in ahead of use (called off the event loop) so the first
        append to a page does not stall."""
        cdef Py_ssize_t i, stop
        cdef volatile unsigned char sink
        if self.base == NULL:
            return
        if length < 0:
            length = self.size - start
        stop = min(start + length, self.size)
        with nogil:
            if madvise(self.base + start, stop - start, MADV_POPULATE_WRITE_) != 0:
                i = start
                while i < stop:
                    sink = self.base[i]
                    i += 4096

    def close(self):
        """Unmap; the caller closes the fd. Nothing may use this segment afterwards."""
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL

    @property
    def free(self):
        return self.size - self.end

    @property
    def mapped(self):
        return self.base != NULL

    def header(self):
        return PyBytes_FromStringAndSize(<const char *>self.base, SEGMENT_HEADER_SIZE)

    def write_header(self, bytes header):
        if len(header) != SEGMENT_HEADER_SIZE:
            raise ValueError("segment header must be 64 bytes")
        memcpy(self.base, <const char *>header, SEGMENT_HEADER_SIZE)

    def read(self, Py_ssize_t off, Py_ssize_t n):
        """Raw bytes (tests and tools)."""
        if off < 0 or n < 0 or off + n > self.size:
            raise ValueError("out of range")
        return PyBytes_FromStringAndSize(<const char *>self.base + off, n)

    def zero(self, Py_ssize_t start, Py_ssize_t stop):
        """Zero a torn tail before appending resumes over it."""
        if start < SEGMENT_HEADER_SIZE or stop > self.size or start > stop:
            raise ValueError("out of range")
        memset(self.base + start, 0, stop - start)
        self.dirty = True

    def set_end(self, Py_ssize_t end):
        self.end = end

    def first_nonzero(self, Py_ssize_t start):
        """Offset of the first non-zero byte at or after `start`, or -1."""
        cdef Py_ssize_t i = start
        cdef uint64_t w
        with nogil:
            while i + 8 <= self.size:
                memcpy(&w, self.base + i, 8)
                if w != 0:
                    break
                i += 8
            while i < self.size and self.base[i] == 0:
                i += 1
        return i if i < self.size else -1

    def last_nonzero(self, Py_ssize_t start):
        """One past the last non-zero byte at or after `start` (or `start`)."""
        cdef Py_ssize_t i = self.size
        with nogil:
            while i > start and self.base[i - 1] == 0:
                i -= 1
        return i

    cdef uint32_t record_crc(self, Py_ssize_t off, Py_ssize_t length) noexcept nogil:
        cdef unsigned char place[24]
        cdef uint32_t state = 0xFFFFFFFF
        sb_store64(place, self.nonce)
        sb_store64(place + 8, self.segment_id)
        sb_store64(place + 16, <uint64_t>off)
        state = sb_crc32c_update(state, place, 24)
        state = sb_crc32c_update(state, self.base + off + 8, length - 8)
        return ~state

    cdef bint record_valid(self, Py_ssize_t off) noexcept nogil:
        cdef uint32_t length
        cdef const unsigned char *r
        cdef MsgView m
        cdef Py_ssize_t idl
        if off < SEGMENT_HEADER_SIZE or off + RECORD_HEADER_SIZE > self.size:
            return False
        r = self.base + off
        length = sb_load32(r)
        if length < RECORD_HEADER_SIZE or off + <Py_ssize_t>length > self.size:
            return False
        if (r[8] != REC_MESSAGE and r[8] != REC_CONSUME) or r[10] != 0 or r[11] != 0:
            return False
        if r[8] == REC_MESSAGE:
            if not _parse_message(r, length, &m):
                return False
        else:
            if length < CONSUME_FIXED:
                return False
            idl = r[14]
            if 15 + idl >= <Py_ssize_t>length:
                return False
            idl += r[15 + idl]
            if <Py_ssize_t>length != CONSUME_FIXED + idl + 8 * <Py_ssize_t>sb_load16(r + 12):
                return False
        return sb_load32(r + 4) == self.record_crc(off, length)

    def valid_at(self, Py_ssize_t off):
        return self.record_valid(off)

    def next_valid(self, Py_ssize_t start):
        """The first offset at or after `start` holding a valid record, or -1."""
        cdef Py_ssize_t q = _align(start)
        with nogil:
            while q + RECORD_HEADER_SIZE <= self.size:
                if sb_load32(self.base + q) != 0 and self.record_valid(q):
                    break
                q += RECORD_ALIGN
        return q if q + RECORD_HEADER_SIZE <= self.size else -1

    cdef int seal_record(self, Py_ssize_t off, Py_ssize_t length) except -1:
        # CRC first, length last: a write cut short leaves length 0 or a bad CRC.
        sb_store32(self.base + off + 4, self.record_crc(off, length))
        sb_store32(self.base + off, <uint32_t>length)
        self.end = off + _align(length)
        self.dirty = True
        return 0

    def __repr__(self):
        return f"<Segment {self.segment_id} end={self.end}/{self.size} live={self.live}/{self.messages}>"


cdef class LogCore:
    """The index and the record paths of the log. `_core.log.AppendLog` adds
    files, threads, durability, expiry and compaction around it."""

    def __init__(self, Py_ssize_t max_pending=10000, uint64_t ttl_ms=30 * 86400 * 1000,
                 Py_ssize_t consume_reserve=65536):
        self._inboxes = {}
        self._segments = {}
        self._active = None
        self.max_pending = max_pending
        self.ttl_ms = ttl_ms
        self.consume_reserve = consume_reserve
        self.storage_full = False

    # -- segments (managed by AppendLog) ------------------------------------------
    def _add_segment(self, Segment seg):
        self._segments[seg.segment_id] = seg

    def _remove_segment(self, uint64_t segment_id):
        return self._segments.pop(segment_id, None)

    def _set_active(self, Segment seg):
        if self._active is not None:
            self._active.sealed = True
        self._active = seg

    @property
    def active(self):
        return self._active

    @property
    def segments(self):
        return [self._segments[k] for k in sorted(self._segments)]

    def _roll(self):
        """Install a new active segment or raise StoreError (overridden)."""
        raise StoreError("storage full: no segment available", ErrorCode.STORAGE_FULL)

    cdef Py_ssize_t _place(self, Py_ssize_t length, bint is_message) except -1:
        # Where a record of `length` bytes goes; rolls to a new segment when the
        # active one is full. Messages leave `consume_reserve` bytes free so
        # acknowledgements can still be recorded when the disk is full.
        cdef Py_ssize_t need = _align(length)
        cdef Segment a = self._active
        if a is not None and a.size - a.end >= need + (self.consume_reserve if is_message else 0):
            return a.end
        if not is_message and a is not None and a.size - a.end >= need:
            if self.storage_full:
                return a.end             # use the reserve rather than fail
        try:
            self._roll()
        except StoreError:
            if not is_message and a is not None and a.size - a.end >= need:
                return a.end
            if is_message:
                raise
            return -1
        a = self._active
        if a.size - a.end < need:
            raise StoreError(f"record of {length} bytes does not fit in a segment", ErrorCode.INTERNAL)
        return a.end

    cdef int append_message(self, str recipient, uint64_t msg_id, uint64_t ts, uint64_t client_id,
                            str sender, str sender_device, const char *payload, Py_ssize_t n) except -1:
        cdef Py_ssize_t rl, sl, sdl, off, length
        cdef const char *rp = _utf8(recipient, &rl)
        cdef const char *sp = _utf8(sender, &sl)
        cdef const char *sdp = _utf8(sender_device, &sdl)
        cdef unsigned char *r
        cdef Segment a
        inbox = self._inboxes.get(recipient)
        if inbox is not None and len(<dict>inbox) >= self.max_pending:
            raise StoreError(f"{recipient} has {len(<dict>inbox)} undelivered messages (the limit)",
                             ErrorCode.QUOTA_EXCEEDED)
        length = MESSAGE_FIXED + rl + sl + sdl + n
        off = self._place(length, True)
        a = self._active
        r = a.base + off
        r[8] = REC_MESSAGE
        r[9] = 0
        r[10] = 0
        r[11] = 0
        sb_store32(r + 12, <uint32_t>n)
        sb_store64(r + 16, msg_id)
        sb_store64(r + 24, ts)
        sb_store64(r + 32, client_id)
        _put_id(r + 40, rp, rl)
        r[41 + rl] = 0                              # recipient device: all devices
        _put_id(r + 42 + rl, sp, sl)
        _put_id(r + 43 + rl + sl, sdp, sdl)
        memcpy(r + 44 + rl + sl + sdl, payload, n)  # the payload's one copy into the log
        a.seal_record(off, length)
        if inbox is None:
            inbox = self._inboxes[recipient] = {}
        (<dict>inbox)[msg_id] = (a.segment_id << 32) | <uint64_t>off
        a.messages += 1
        a.live += 1
        if ts > a.newest_ts:
            a.newest_ts = ts
        if msg_id > self.last_msg_id:
            self.last_msg_id = msg_id
        self.appended += 1
        self.pending_total += 1
        return 0

    def append(self, str recipient, uint64_t msg_id, uint64_t ts, str sender, str sender_device,
               payload, uint64_t client_id=0):
        """OfflineStore.append: the payload is copied into the log."""
        cdef Py_buffer view
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            self.append_message(recipient, msg_id, ts, client_id, sender, sender_device,
                                <const char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef int _drop(self, dict inbox, uint64_t msg_id, object loc) except -1:
        cdef Segment seg = self._segments.get(<uint64_t>loc >> 32)
        if seg is not None:
            seg.live -= 1
        self.pending_total -= 1
        return 0

    cdef int consume_ids(self, str recipient, object ids) except -1:
        cdef list removed = []
        cdef Py_ssize_t i, k, off, length, rl
        cdef const char *rp
        cdef unsigned char *r
        cdef Segment a
        inbox = self._inboxes.get(recipient)
        if inbox is None:
            return 0
        for msg_id in ids:
            loc = (<dict>inbox).pop(msg_id, None)
            if loc is not None:
                self._drop(<dict>inbox, msg_id, loc)
                removed.append(msg_id)
        if not inbox:
            del self._inboxes[recipient]
        if not removed:
            return 0
        self.consumed += len(removed)
        rp = _utf8(recipient, &rl)
        for i in range(0, len(removed), MAX_CONSUME_IDS):
            chunk = removed[i:i + MAX_CONSUME_IDS]
            length = CONSUME_FIXED + rl + 8 * len(chunk)
            off = self._place(length, False)
            if off < 0:
                # disk full and the reserve used up: consumed in memory only; after a
                # restart these are delivered again (clients drop them by id)
                self.unrecorded_consumes += len(chunk)
                continue
            a = self._active
            r = a.base + off
            r[8] = REC_CONSUME
            r[9] = 0
            r[10] = 0
            r[11] = 0
            sb_store16(r + 12, <uint16_t>len(chunk))
            _put_id(r + 14, rp, rl)
            r[15 + rl] = 0
            k = 16 + rl
            for msg_id in chunk:
                sb_store64(r + k, <uint64_t>msg_id)
                k += 8
            a.seal_record(off, length)
        return 0

    def consume(self, str recipient, ids):
        """Drop acknowledged messages (records a CONSUME); unknown ids are ignored."""
        before = self.consumed
        self.consume_ids(recipient, ids)
        return self.consumed - before

    def consume_through(self, str recipient, uint64_t msg_id):
        inbox = self._inboxes.get(recipient)
        if not inbox:
            return 0
        ids = []
        for i in inbox:
            if i > msg_id:
                break
            ids.append(i)
        return self.consume(recipient, ids)

    cdef int write_pending(self, WriteBuffer out, str recipient, uint64_t now_ms) except -1:
        cdef MsgView m
        cdef Segment seg
        cdef uint64_t loc
        cdef const unsigned char *r
        inbox = self._inboxes.get(recipient)
        if not inbox:
            return 0
        expired = None
        for msg_id, oloc in (<dict>inbox).items():
            loc = oloc
            seg = self._segments[loc >> 32]
            r = seg.base + _loc_off(loc)
            _parse_message(r, sb_load32(r), &m)
            if m.ts + self.ttl_ms <= now_ms:
                if expired is None:
                    expired = []
                expired.append(msg_id)
                continue
            out.write_deliver_raw(m.msg_id, m.ts, m.sender, m.sender_len, m.sender_device,
                                  m.sender_device_len, m.payload, m.payload_len)
        if expired:
            self._expire(recipient, expired)
        return 0

    def write_pending_into(self, WriteBuffer out, str recipient, uint64_t now_ms):
        """Append a DELIVER for each unconsumed message of `recipient`, oldest first,
        straight from the mapping."""
        self.write_pending(out, recipient, now_ms)

    def _expire(self, str recipient, ids):
        inbox = self._inboxes.get(recipient)
        if inbox is None:
            return 0
        n = 0
        for msg_id in ids:
            loc = inbox.pop(msg_id, None)
            if loc is not None:
                self._drop(<dict>inbox, msg_id, loc)
                n += 1
        if not inbox:
            del self._inboxes[recipient]
        self.expired += n
        return n

    def expire_prefix(self, str recipient, uint64_t now_ms):
        """Drop the expired messages at the front of one inbox (ids grow with time)."""
        cdef MsgView m
        cdef Segment seg
        cdef uint64_t loc
        cdef const unsigned char *r
        inbox = self._inboxes.get(recipient)
        if not inbox:
            return 0
        ids = []
        for msg_id, oloc in inbox.items():
            loc = oloc
            seg = self._segments[loc >> 32]
            r = seg.base + _loc_off(loc)
            _parse_message(r, sb_load32(r), &m)
            if m.ts + self.ttl_ms > now_ms:
                break
            ids.append(msg_id)
        return self._expire(recipient, ids) if ids else 0

    def read_message(self, uint64_t loc):
        """(msg_id, ts, client_id, recipient, sender, sender_device, payload) at `loc`."""
        cdef MsgView m
        cdef Segment seg = self._segments[loc >> 32]
        cdef const unsigned char *r = seg.base + _loc_off(loc)
        _parse_message(r, sb_load32(r), &m)
        return (m.msg_id, m.ts, m.client_id, _text(m.recipient, m.recipient_len),
                _text(m.sender, m.sender_len), _text(m.sender_device, m.sender_device_len),
                PyBytes_FromStringAndSize(m.payload, m.payload_len))

    def pending_locations(self, str recipient):
        inbox = self._inboxes.get(recipient)
        return list(inbox.items()) if inbox else []

    def pending_count(self, recipient=None):
        if recipient is not None:
            inbox = self._inboxes.get(recipient)
            return len(inbox) if inbox else 0
        return self.pending_total

    def recipients(self):
        return list(self._inboxes)

    def last_id(self):
        return self.last_msg_id

    # -- recovery -------------------------------------------------------------------
    def _apply_segment(self, Segment seg, uint64_t now_ms, dict dedup, Py_ssize_t dedup_window):
        """Index every valid record of `seg`. Returns (status, end, bad_regions):
        status is 'clean', 'torn' (garbage after the last valid record, nothing
        valid after it) or 'corrupt' (a bad region with valid records after it);
        `end` is where appending may resume; bad_regions lists (start, stop)."""
        cdef Py_ssize_t pos = SEGMENT_HEADER_SIZE, q, nz
        cdef uint32_t length
        cdef const unsigned char *r
        cdef MsgView m
        cdef uint16_t count
        cdef Py_ssize_t k, rl
        cdef Segment owner
        cdef uint64_t loc
        status = "clean"
        regions = []
        while pos + RECORD_HEADER_SIZE <= seg.size:
            r = seg.base + pos
            length = sb_load32(r)
            if length != 0 and seg.record_valid(pos):
                if r[8] == REC_MESSAGE:
                    _parse_message(r, length, &m)
                    self._recover_message(seg, pos, &m, now_ms, dedup, dedup_window)
                else:
                    count = sb_load16(r + 12)
                    rl = r[14]
                    recipient = _text(<const char *>r + 15, rl)
                    inbox = self._inboxes.get(recipient)
                    k = 16 + rl + r[15 + rl]
                    for _ in range(count):
                        if inbox is not None:
                            oloc = (<dict>inbox).pop(sb_load64(r + k), None)
                            if oloc is not None:
                                self._drop(<dict>inbox, 0, oloc)
                        k += 8
                    if inbox is not None and not inbox:
                        del self._inboxes[recipient]
                pos += _align(length)
                continue
            if length == 0:
                nz = seg.first_nonzero(pos)
                if nz < 0:
                    break                                   # clean end of data
            q = seg.next_valid(pos + RECORD_ALIGN)
            if q < 0:
                regions.append((pos, seg.last_nonzero(pos)))
                if status == "clean":
                    status = "torn"
                break
            regions.append((pos, q))
            status = "corrupt"
            pos = q
        seg.end = pos
        return status, pos, regions

    cdef int _recover_message(self, Segment seg, Py_ssize_t off, MsgView *m, uint64_t now_ms,
                              dict dedup, Py_ssize_t dedup_window) except -1:
        cdef Segment old
        seg.messages += 1
        if m.msg_id > self.last_msg_id:
            self.last_msg_id = m.msg_id
        if m.ts > seg.newest_ts:
            seg.newest_ts = m.ts
        if m.client_id:
            key = (_text(m.sender, m.sender_len), _text(m.sender_device, m.sender_device_len))
            table = dedup.get(key)
            if table is None:
                table = dedup[key] = {}
            (<dict>table)[m.client_id] = (m.msg_id, m.ts)
            if len(<dict>table) > dedup_window:
                del (<dict>table)[next(iter(<dict>table))]
        if m.ts + self.ttl_ms <= now_ms:
            self.expired += 1
            return 0
        recipient = _text(m.recipient, m.recipient_len)
        inbox = self._inboxes.get(recipient)
        if inbox is None:
            inbox = self._inboxes[recipient] = {}
        prev = (<dict>inbox).get(m.msg_id)
        if prev is not None:            # a copy made by compaction: the later one wins
            self._drop(<dict>inbox, m.msg_id, prev)
        (<dict>inbox)[m.msg_id] = (seg.segment_id << 32) | <uint64_t>off
        seg.live += 1
        self.pending_total += 1
        return 0

    def _finish_recovery(self):
        """Inboxes back in msg_id order (compaction copies are scanned late)."""
        for recipient, inbox in list(self._inboxes.items()):
            prev = 0
            for i in inbox:
                if i < prev:
                    self._inboxes[recipient] = dict(sorted(inbox.items()))
                    break
                prev = i

    # -- compaction -------------------------------------------------------------------
    def _compact_step(self, Segment seg, Py_ssize_t pos, Py_ssize_t budget):
        """Copy live messages of `seg` (an old segment) to the head, at most
        `budget` records from `pos`. Returns the next position, or -1 when done."""
        cdef uint32_t length
        cdef const unsigned char *r
        cdef MsgView m
        cdef Py_ssize_t off, q
        cdef Segment a
        cdef uint64_t here
        while budget > 0 and pos + RECORD_HEADER_SIZE <= seg.end:
            r = seg.base + pos
            length = sb_load32(r)
            if length == 0 or not seg.record_valid(pos):
                q = seg.next_valid(pos + RECORD_ALIGN)
                if q < 0 or q >= seg.end:
                    return -1
                pos = q
                continue
            budget -= 1
            if r[8] == REC_MESSAGE:
                _parse_message(r, length, &m)
                here = (seg.segment_id << 32) | <uint64_t>pos
                recipient = _text(m.recipient, m.recipient_len)
                inbox = self._inboxes.get(recipient)
                if inbox is not None and (<dict>inbox).get(m.msg_id) == here:
                    off = self._place(length, True)
                    a = self._active
                    memcpy(a.base + off + 8, r + 8, length - 8)
                    a.seal_record(off, length)
                    (<dict>inbox)[m.msg_id] = (a.segment_id << 32) | <uint64_t>off
                    a.messages += 1
                    a.live += 1
                    if m.ts > a.newest_ts:
                        a.newest_ts = m.ts
                    seg.live -= 1
            pos += _align(length)
        return pos if pos + RECORD_HEADER_SIZE <= seg.end else -1
