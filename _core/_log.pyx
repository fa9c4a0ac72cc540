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
from libc.stdint cimport int64_t, uint16_t
from libc.string cimport memcmp, memcpy, memmove, memset
from libc.stdlib cimport qsort
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED

from ._codec cimport sb_load16, sb_load32, sb_load64, sb_store16, sb_store32, sb_store64, FLAG_GROUP, FLAG_MIRROR

from ._producers cimport ProducerTable
from ._sorted cimport lower_bound
from .errors import StoreError
from .protocol import ErrorCode

cdef extern from "crc32c.h":
    void sb_crc32c_setup(int allow_hw)
    uint32_t sb_crc32c_update(uint32_t state, const void *data, size_t n) nogil
    int sb_crc32c_mode

cdef extern from "errno.h":
    int errno

cdef extern from "unistd.h" nogil:
    ssize_t pwrite(int fd, const void *buf, size_t count, int64_t offset)
    int fdatasync(int fd)

cdef extern from "fcntl.h" nogil:
    int sync_file_range(int fd, int64_t offset, int64_t nbytes, unsigned int flags)
    unsigned int SYNC_FILE_RANGE_WAIT_BEFORE
    unsigned int SYNC_FILE_RANGE_WRITE
    unsigned int SYNC_FILE_RANGE_WAIT_AFTER


sb_crc32c_setup(1)


def flush_files(fds):
    """Make the written pages of several files durable with one device cache flush:
    start every file's writes (they overlap on the device), wait for each, then one
    fdatasync, on the last file, flushes the cache for all of them. Enough for files
    whose blocks were reserved and zeroed before use (no metadata changes), plus
    the last one, which fdatasync covers whole. All of it without the GIL: as 129
    Python calls, each return waited for a busy event loop to let go of the GIL
    (a round of 64 files took 7 ms instead of 1). Raises OSError."""
    cdef Py_ssize_t i, n = len(fds)
    cdef int rc = 0
    cdef int *c_fds
    if n == 0:
        return
    c_fds = <int *>PyMem_Malloc(n * sizeof(int))
    if c_fds == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            c_fds[i] = fds[i]
        with nogil:
            for i in range(n - 1):
                rc = sync_file_range(c_fds[i], 0, 0, SYNC_FILE_RANGE_WRITE)
                if rc != 0:
                    break
            if rc == 0:
                for i in range(n - 1):
                    rc = sync_file_range(c_fds[i], 0, 0, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE
                                         | SYNC_FILE_RANGE_WAIT_AFTER)
                    if rc != 0:
                        break
            if rc == 0:
                rc = fdatasync(c_fds[n - 1])
        if rc != 0:
            import os
            raise OSError(errno, os.strerror(errno))
    finally:
        PyMem_Free(c_fds)


def zero_pages(int fd, int64_t start, int64_t stop, int64_t sync_every=1 << 20):
    """Write zeros over [start, stop) one 4 KiB page per pwrite, fdatasync after
    every `sync_every` bytes. Page by page, not in large writes: the page cache
    gives a large write large folios (ext4, Linux 6.16+), and then every append
    into a page of the mapping after a sync write-protected it costs a fault that
    marks the whole folio dirty (about 10-30 us against about 3, and the whole
    folio written back at the next sync). Raises OSError."""
    cdef char page[4096]
    cdef int64_t off = start, synced = start
    cdef ssize_t rc = 0
    cdef size_t n
    memset(page, 0, 4096)
    with nogil:
        while off < stop:
            n = <size_t>(4096 if stop - off >= 4096 else stop - off)
            rc = pwrite(fd, page, n, off)
            if rc < 0:
                break
            off += rc
            if off - synced >= sync_every or off >= stop:
                if fdatasync(fd) != 0:
                    rc = -1
                    break
                synced = off
    if rc < 0:
        import os
        raise OSError(errno, os.strerror(errno))




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
    m.flags = r[9]
    m.payload_len = sb_load32(r + 12)
    m.msg_id = sb_load64(r + 16)
    m.ts = sb_load64(r + 24)
    m.client_id = sb_load64(r + 32)
    m.producer = 0
    if r[8] == REC_MESSAGE_P:
        if length < MESSAGE_P_FIXED:
            return False
        m.producer = sb_load64(r + 40)
        pos = 48
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
    if pos >= length:
        return False
    m.conversation_len = r[pos]
    m.conversation = <const char *>r + pos + 1
    pos += 1 + m.conversation_len
    m.payload = <const char *>r + pos
    return pos + m.payload_len == length and m.recipient_len > 0


cdef bint _meta_view(const unsigned char *r, Py_ssize_t length, const unsigned char **key, Py_ssize_t *kl,
                     const unsigned char **value, Py_ssize_t *vl) noexcept nogil:
    """Key and value of a META (u8 key length) or META_L (u16) record; False if inconsistent."""
    cdef Py_ssize_t k
    if r[8] == REC_META:
        if length < META_FIXED or META_FIXED + r[12] > length:
            return False
        kl[0] = r[12]
        key[0] = r + 13
        k = 13 + kl[0]
    else:
        if length < META_L_FIXED or META_L_FIXED + <Py_ssize_t>sb_load16(r + 12) > length:
            return False
        kl[0] = sb_load16(r + 12)
        key[0] = r + 14
        k = 14 + kl[0]
    vl[0] = sb_load32(r + k)
    value[0] = r + k + 4
    return k + 4 + vl[0] == length


#: bytes before a record's body: u32 length, u32 CRC, type, flags, u16 tag
RECORD_HEADER = RECORD_HEADER_SIZE

#: META key prefix of a device's registration (`_core.log._DeviceRegistry`), then "user\0device"
DEVICE_META = "d\x00"
cdef inline str _device_user(str key):
    """The user of a device key ("d\\0user\\0device"; all of the rest if it has no device)."""
    cdef Py_ssize_t end = key.find("\x00", len(DEVICE_META))
    return key[len(DEVICE_META):end] if end >= 0 else key[len(DEVICE_META):]


#: META key prefix of a producer checkpoint (`ProducerTable.checkpoint`), then "user\0device"
PRODUCER_META = "\x00seq\x00"


cdef inline Py_ssize_t _meta_key_len(const unsigned char *r) noexcept nogil:
    """Bytes of a META or META_L record's key (compaction's reading of the layout)."""
    return r[12] if r[8] == REC_META else sb_load16(r + 12)


cdef inline Py_ssize_t _meta_key_off(const unsigned char *r) noexcept nogil:
    """Where a META (u8 length) or META_L (u16 length) record's key starts."""
    return 13 if r[8] == REC_META else 14


cdef inline str _text(const char *p, Py_ssize_t n):
    return PyUnicode_DecodeUTF8(p, n, "replace")


cdef inline str _ikey(str user, str device):
    """The inbox of one device (or, with no device, the user's shared inbox)."""
    return user + "\x00" + device if device else user


def inbox_key(str user, str device=""):
    return _ikey(user, device)


cdef int _put_id(unsigned char *p, const char *s, Py_ssize_t n) noexcept nogil:
    p[0] = <uint8_t>n
    memcpy(p + 1, s, n)
    return 0


cdef const char *_utf8(str s, Py_ssize_t *n) except NULL:
    cdef const char *p = PyUnicode_AsUTF8AndSize(s, n)
    if n[0] > 255:
        raise ValueError(f"id longer than 255 bytes: {s[:40]!r}...")
    return p


cdef int write_stored(WriteBuffer out, MsgView *m) except -1:
    """The frame a stored entry becomes: DELIVER, a mirrored DELIVER, or a RECEIPT."""
    if m.flags & MSG_RECEIPT:
        return out.write_receipt_raw(m.msg_id, <uint8_t>(m.payload[0] if m.payload_len else 0), m.client_id,
                                     m.sender, m.sender_len, m.sender_device, m.sender_device_len, m.ts)
    return out.write_deliver_ex(m.msg_id, m.ts, m.sender, m.sender_len, m.sender_device, m.sender_device_len,
                                m.conversation, m.conversation_len,
                                m.client_id if m.flags & (MSG_MIRROR | MSG_GROUP) else 0,
                                m.payload, m.payload_len, FLAG_GROUP if m.flags & MSG_GROUP else FLAG_MIRROR)


cdef class CopyWindow:
    """The group messages already copied to one member: their ids (the origin,
    the group message's id), ascending, at least the newest `window` of them. A
    sorted array of u64, not a dict of tuples: each copy made had cost a dict
    entry, a tuple and three ints (~150 B, and the cyclic GC walked them all:
    an eighth of a worker's CPU in group fan-out); a look-up is a binary search
    over ids that mostly arrive in order (appends at the end)."""

    def __cinit__(self):
        self.ring = NULL
        self.base = NULL
        self.n = 0
        self.cap = 0

    def __dealloc__(self):
        PyMem_Free(self.base)

    cdef Py_ssize_t _lower(self, uint64_t origin) noexcept:
        if self.n and self.ring[self.n - 1] < origin:
            return self.n                               # the usual case: newer than all
        return lower_bound(self.ring, 0, self.n, 1, origin)

    cdef bint has(self, uint64_t origin) noexcept:
        cdef Py_ssize_t i = self._lower(origin)
        return i < self.n and self.ring[i] == origin

    cdef int add(self, uint64_t origin, Py_ssize_t window) except -1:
        """Remember `origin`; beyond `window` ids the oldest other than `origin` is
        dropped (O(1))."""
        cdef Py_ssize_t i = self._lower(origin), cap
        cdef uint64_t *grown
        if i < self.n and self.ring[i] == origin:
            return 0
        if (self.ring - self.base) + self.n == self.cap:        # no room after the last
            if self.ring != self.base and self.n < self.cap // 2 + 1:
                memmove(self.base, self.ring, self.n * sizeof(uint64_t))
            else:
                cap = self.cap * 2 if self.cap else 8
                grown = <uint64_t *>PyMem_Malloc(cap * sizeof(uint64_t))
                if grown == NULL:
                    raise MemoryError()
                if self.n:
                    memcpy(grown, self.ring, self.n * sizeof(uint64_t))
                PyMem_Free(self.base)
                self.base = grown
                self.cap = cap
            self.ring = self.base
        if i < self.n:
            memmove(self.ring + i + 1, self.ring + i, (self.n - i) * sizeof(uint64_t))
        self.ring[i] = origin
        self.n += 1
        if self.n > window:
            if i == 0 and self.n > 1:
                # the id just added is the oldest: keep it, drop the next one (a late retry of an
                # old fan-out must still be recognised when it comes again)
                self.ring[1] = self.ring[0]
            self.ring += 1
            self.n -= 1
        return 0

    def add_py(self, uint64_t origin, Py_ssize_t window):
        self.add(origin, window)

    def merge(self, CopyWindow other, Py_ssize_t window):
        """Remember every id `other` remembers too."""
        cdef Py_ssize_t i
        for i in range(other.n):
            self.add(other.ring[i], window)

    def __contains__(self, uint64_t origin):
        return self.has(origin)

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter([self.ring[i] for i in range(self.n)])

    def __repr__(self):
        return f"<CopyWindow {self.n} ids>"


cdef CopyWindow copy_window(dict copies, str group, str member):
    """`copies[group][member]`, made if missing: the copies made of `group`'s
    messages to `member` (group, then member: both keys are str objects whose
    hashes are cached, no key is built per copy)."""
    members = copies.get(group)
    if members is None:
        members = copies[group] = {}
    w = (<dict>members).get(member)
    if w is None:
        w = (<dict>members)[member] = CopyWindow()
    return <CopyWindow>w


def merge_copies(dict into, dict copies, Py_ssize_t window):
    """Add `copies` ({group: {member: CopyWindow}}, e.g. what a shard log
    recovered) to `into`."""
    for group, members in copies.items():
        for member, w in (<dict>members).items():
            copy_window(into, group, member).merge(w, window)


def forget_copies(dict copies, in_shard):
    """Drop the copy windows of members `in_shard(member)` says are leaving."""
    for group in list(copies):
        members = <dict>copies[group]
        for member in [m for m in members if in_shard(m)]:
            del members[member]
        if not members:
            del copies[group]


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
    def map(path, int fd, uint64_t segment_id, uint64_t nonce, Py_ssize_t size, uint16_t tag=0):
        """Map an existing, fully reserved segment file (never a sparse one). `tag`:
        what its records carry in their reserved u16, nonzero for a recycled file (its
        bytes past the records are its previous use's)."""
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
        seg.tag = tag
        seg.end = SEGMENT_HEADER_SIZE
        return seg

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
        if self.base == NULL:
            raise ValueError(f"segment {self.segment_id} is closed")
        return PyBytes_FromStringAndSize(<const char *>self.base, SEGMENT_HEADER_SIZE)

    def write_header(self, bytes header):
        if len(header) != SEGMENT_HEADER_SIZE:
            raise ValueError("segment header must be 64 bytes")
        memcpy(self.base, <const char *>header, SEGMENT_HEADER_SIZE)

    def read(self, Py_ssize_t off, Py_ssize_t n):
        """A copy of bytes [off, off + n) (replication, tests and tools); ValueError
        once the segment is unmapped (a deleted segment: never a read of freed memory)."""
        if self.base == NULL:
            raise ValueError(f"segment {self.segment_id} is closed")
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
        cdef Py_ssize_t idl, kl, vl
        cdef const unsigned char *kp
        cdef const unsigned char *vp
        if off < SEGMENT_HEADER_SIZE or off + RECORD_HEADER_SIZE > self.size:
            return False
        r = self.base + off
        length = sb_load32(r)
        if length < RECORD_HEADER_SIZE or off + <Py_ssize_t>length > self.size:
            return False
        if r[8] < REC_MESSAGE or r[8] > REC_META_L or sb_load16(r + 10) != self.tag:
            return False                 # (a recycled file's old records fail here, before any CRC)
        if r[8] == REC_MESSAGE or r[8] == REC_MESSAGE_P:
            if not _parse_message(r, length, &m):
                return False
        elif r[8] == REC_META or r[8] == REC_META_L:
            if not _meta_view(r, length, &kp, &kl, &vp, &vl):
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

    cdef bint ours_but_tag(self, Py_ssize_t off) noexcept nogil:
        """Whether the record at `off` would be valid with this use's tag in place of
        the one it has: a record of this use whose tag bytes rotted, not the start
        of the previous use's bytes (one CRC, at the one place recovery stops)."""
        cdef const unsigned char *r = self.base + off
        cdef uint32_t length = sb_load32(r)
        cdef unsigned char place[24]
        cdef unsigned char tag[2]
        cdef uint32_t state = 0xFFFFFFFF
        if length < RECORD_HEADER_SIZE or off + <Py_ssize_t>length > self.size:
            return False
        sb_store64(place, self.nonce)
        sb_store64(place + 8, self.segment_id)
        sb_store64(place + 16, <uint64_t>off)
        sb_store16(tag, self.tag)
        state = sb_crc32c_update(state, place, 24)
        state = sb_crc32c_update(state, r + 8, 2)
        state = sb_crc32c_update(state, tag, 2)
        state = sb_crc32c_update(state, r + 12, length - 12)
        return sb_load32(r + 4) == ~state

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
        sb_store16(self.base + off + 10, self.tag)
        sb_store32(self.base + off + 4, self.record_crc(off, length))
        sb_store32(self.base + off, <uint32_t>length)
        self.end = off + _align(length)
        self.dirty = True
        return 0

    def __repr__(self):
        return f"<Segment {self.segment_id} end={self.end}/{self.size} live={self.live}/{self.messages}>"


cdef class Inbox:
    """One recipient's unconsumed messages: parallel arrays of msg ids (ascending)
    and log locations, 16 bytes per message. Consumed entries become tombstones
    (location 0; a real location is never 0) and are squeezed out as they pile up."""

    def __cinit__(self):
        self.ids = NULL
        self.locs = NULL
        self.head = self.tail = self.cap = self.live = 0
        self.unsorted = False

    def __dealloc__(self):
        PyMem_Free(self.ids)
        PyMem_Free(self.locs)

    def __len__(self):
        return self.live

    cdef int push(self, uint64_t msg_id, uint64_t loc) except -1:
        cdef Py_ssize_t cap
        cdef uint64_t *p
        if self.tail == self.cap:
            if self.head > 0 and self.live <= self.cap // 2:
                self._squeeze()
            if self.tail == self.cap:
                cap = self.cap * 2 if self.cap else 4
                p = <uint64_t *>PyMem_Realloc(self.ids, cap * sizeof(uint64_t))
                if p == NULL:
                    raise MemoryError()
                self.ids = p
                p = <uint64_t *>PyMem_Realloc(self.locs, cap * sizeof(uint64_t))
                if p == NULL:
                    raise MemoryError()
                self.locs = p
                self.cap = cap
        if self.tail > self.head and msg_id <= self.ids[self.tail - 1]:
            self.unsorted = True        # only recovery (compaction copies) does this
        self.ids[self.tail] = msg_id
        self.locs[self.tail] = loc
        self.tail += 1
        self.live += 1
        return 0

    cdef void _squeeze(self) noexcept:
        cdef Py_ssize_t i, j = 0
        for i in range(self.head, self.tail):
            if self.locs[i] != 0:
                self.ids[j] = self.ids[i]
                self.locs[j] = self.locs[i]
                j += 1
        self.head = 0
        self.tail = j

    cdef Py_ssize_t find(self, uint64_t msg_id) noexcept:
        cdef Py_ssize_t lo = lower_bound(self.ids, self.head, self.tail, 1, msg_id)
        if lo < self.tail and self.ids[lo] == msg_id and self.locs[lo] != 0:
            return lo
        return -1

    cdef uint64_t take(self, Py_ssize_t i) noexcept:
        cdef uint64_t loc = self.locs[i]
        self.locs[i] = 0
        self.live -= 1
        while self.head < self.tail and self.locs[self.head] == 0:
            self.head += 1
        if self.live == 0:
            self.head = self.tail = 0
        elif self.tail - self.head > 64 and self.live * 4 < self.tail - self.head:
            self._squeeze()
        return loc

    def ids_list(self):
        return [self.ids[i] for i in range(self.head, self.tail) if self.locs[i] != 0]

    def items(self):
        return [(self.ids[i], self.locs[i]) for i in range(self.head, self.tail) if self.locs[i] != 0]


cdef int _cmp_entry(const void *a, const void *b) noexcept nogil:
    cdef const uint64_t *x = <const uint64_t *>a
    cdef const uint64_t *y = <const uint64_t *>b
    # (id, sequence): equal ids keep scan order, so the last copy wins below
    if x[0] != y[0]:
        return -1 if x[0] < y[0] else 1
    if x[2] != y[2]:
        return -1 if x[2] < y[2] else 1
    return 0


cdef class LogCore:
    """The index and the record paths of the log. `_core.log.AppendLog` adds
    files, threads, durability, expiry and compaction around it."""

    def __init__(self, Py_ssize_t max_pending=10000, uint64_t ttl_ms=30 * 86400 * 1000):
        self._inboxes = {}
        self._segments = {}
        self._meta = {}
        self._devmeta = {}
        self.producers = ProducerTable()
        self._active = None
        self._unrecorded = []
        self.max_pending = max_pending
        self.ttl_ms = ttl_ms
        self.storage_full = False
        self.reserve_ok = False

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

    def _make_room(self, bint content, bint roll):
        """Make room (overridden by AppendLog, which owns the segment files): with
        `roll`, install a new active segment; for `content`, also keep a reserve
        segment. Raises StoreError(STORAGE_FULL) when it cannot."""
        raise StoreError("storage full: no segment available", ErrorCode.STORAGE_FULL)

    cdef bint _fits(self, Segment a, Py_ssize_t need, bint content, bint copy) noexcept:
        if a.size - a.end < need:
            return False
        if content:
            return self.reserve_ok
        # state records in a reserve in use leave room for compacting the front segment
        return copy or self.reserve_ok or a.size - a.end >= need + self.keep_for_compaction

    cdef Py_ssize_t _place(self, Py_ssize_t length, bint content, bint copy=False) except -1:
        # Where a record of `length` bytes goes. Content (messages, receipts,
        # mirrors, group state, last-seen updates) goes only where it leaves the
        # reserve alone: a spare segment that state records (acknowledgements,
        # first device registrations) may roll into, keeping back what compaction
        # (`copy`) needs to free the front segment. Content that cannot be placed
        # raises StoreError(STORAGE_FULL); a state record that finds no room gets
        # NO_ROOM (the caller decides what that means).
        cdef Py_ssize_t need = _align(length)
        cdef Segment a = self._active
        if a is not None and a.base == NULL:
            raise StoreError("the log is closed", ErrorCode.INTERNAL)
        if a is not None and a.size - a.end >= need and (self.reserve_ok or self._fits(a, need, content, copy)):
            return a.end                # the common case decided inline: room, and a reserve held
        try:
            self._make_room(content, a is None or a.size - a.end < need)
        except StoreError:
            if content:
                raise
            return NO_ROOM              # not -1: that is this function's exception value
        a = self._active
        if a.size - a.end < need:
            raise StoreError(f"record of {length} bytes does not fit in a segment", ErrorCode.INTERNAL)
        if not self._fits(a, need, content, copy):
            if content:
                raise StoreError("storage full: no room for a new log segment", ErrorCode.STORAGE_FULL)
            return NO_ROOM
        return a.end

    cdef int make_message_room(self, Py_ssize_t records, Py_ssize_t payload_len) except -1:
        """Before a message goes to several inboxes: room for all of its records in
        the active segment (rolling first if needed), so that a full disk refuses
        the whole message, never a part of it. Raises StoreError(STORAGE_FULL)."""
        cdef Py_ssize_t each = _align(MESSAGE_FIXED + 5 * 255 + payload_len)
        cdef Py_ssize_t need = records * each
        cdef Segment a = self._active
        if a is not None and need > a.size - SEGMENT_HEADER_SIZE:
            need = max(a.size - SEGMENT_HEADER_SIZE, each)     # what a fresh segment holds at least
        try:
            self._place(need, True)
        except StoreError as exc:
            if exc.code == ErrorCode.STORAGE_FULL:
                raise
            # larger than a fresh segment (the segment size was lowered): each append decides
        return 0

    cdef Py_ssize_t _write_message(self, const char *rp, Py_ssize_t rl, const char *rdp, Py_ssize_t rdl,
                                   uint64_t msg_id, uint64_t ts, uint64_t client_id, uint64_t producer,
                                   const char *sp, Py_ssize_t sl, const char *sdp, Py_ssize_t sdl,
                                   const char *cp, Py_ssize_t cl, uint8_t flags,
                                   const char *payload, Py_ssize_t n) except -1:
        """Write one MESSAGE record (MESSAGE_P with a producer) into the active
        segment; returns its offset."""
        cdef Py_ssize_t k = 48 if producer else 40
        cdef Py_ssize_t length = (MESSAGE_P_FIXED if producer else MESSAGE_FIXED) + rl + rdl + sl + sdl + cl + n
        cdef Py_ssize_t off = self._place(length, True)
        cdef Segment a = self._active
        cdef unsigned char *r = a.base + off
        r[8] = REC_MESSAGE_P if producer else REC_MESSAGE
        r[9] = flags
        r[10] = 0
        r[11] = 0
        sb_store32(r + 12, <uint32_t>n)
        sb_store64(r + 16, msg_id)
        sb_store64(r + 24, ts)
        sb_store64(r + 32, client_id)
        if producer:
            sb_store64(r + 40, producer)
        _put_id(r + k, rp, rl)
        k += 1 + rl
        _put_id(r + k, rdp, rdl)
        k += 1 + rdl
        _put_id(r + k, sp, sl)
        k += 1 + sl
        _put_id(r + k, sdp, sdl)
        k += 1 + sdl
        _put_id(r + k, cp, cl)
        k += 1 + cl
        memcpy(r + k, payload, n)                   # the payload's one copy into the log
        a.seal_record(off, length)
        a.messages += 1
        if ts > a.newest_ts:
            a.newest_ts = ts
        if msg_id > self.last_msg_id:
            self.last_msg_id = msg_id
        self.appended += 1
        return off

    cdef Inbox _inbox(self, str recipient, bint create):
        inbox = self._inboxes.get(recipient)
        if inbox is None and create:
            inbox = self._inboxes[recipient] = Inbox()
        return <Inbox>inbox

    cdef int append_message(self, str recipient, str device, uint64_t msg_id, uint64_t ts, uint64_t client_id,
                            str sender, str sender_device, str conversation, uint8_t flags,
                            const char *payload, Py_ssize_t n, uint64_t producer=0) except -1:
        """Append to one device's inbox (device "" = the user's shared inbox). An
        original SEND carries its `producer` (and its seq as `client_id`)."""
        cdef Py_ssize_t rl, rdl, sl, sdl, cl, off
        cdef const char *rp = _utf8(recipient, &rl)
        cdef const char *rdp = _utf8(device, &rdl)
        cdef const char *sp = _utf8(sender, &sl)
        cdef const char *sdp = _utf8(sender_device, &sdl)
        cdef const char *cp = _utf8(conversation, &cl)
        cdef str key = _ikey(recipient, device)
        cdef Inbox inbox = self._inbox(key, False)
        if inbox is not None and inbox.live >= self.max_pending:
            raise StoreError(f"{recipient} has {inbox.live} undelivered messages (the limit)",
                             ErrorCode.QUOTA_EXCEEDED)
        off = self._write_message(rp, rl, rdp, rdl, msg_id, ts, client_id, producer, sp, sl, sdp, sdl, cp, cl,
                                  flags, payload, n)
        if inbox is None:
            inbox = self._inbox(key, True)
        inbox.push(msg_id, (self._active.segment_id << 32) | <uint64_t>off)
        if inbox.unsorted:              # ids from the router only grow; other callers may not
            self._sort_inbox(inbox)
        self._active.live += 1
        self.pending_total += 1
        return 0

    def append(self, str recipient, uint64_t msg_id, uint64_t ts, str sender, str sender_device,
               payload, uint64_t client_id=0, *, str device="", int flags=0, str conversation="",
               uint64_t producer=0):
        """OfflineStore.append: the payload is copied into the log."""
        cdef Py_buffer view
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            self.append_message(recipient, device, msg_id, ts, client_id, sender, sender_device, conversation,
                                <uint8_t>flags, <const char *>view.buf, view.len, producer)
        finally:
            PyBuffer_Release(&view)

    def pending_room(self, str recipient, str device=""):
        """How many more messages this inbox takes before QUOTA_EXCEEDED."""
        cdef Inbox inbox = self._inbox(_ikey(recipient, device), False)
        return self.max_pending - (inbox.live if inbox is not None else 0)

    cdef int _dropped(self, uint64_t loc) except -1:
        cdef Segment seg = self._segments.get(loc >> 32)
        if seg is not None:
            seg.live -= 1
        self.pending_total -= 1
        return 0

    cdef int _forget_if_empty(self, str recipient, Inbox inbox) except -1:
        if inbox.live == 0:
            del self._inboxes[recipient]
        return 0

    cdef int consume_wire(self, str recipient, str device, const unsigned char *ids, Py_ssize_t count,
                          uint64_t *locs, Py_ssize_t *found) except -1:
        """Drop acknowledged messages from a device's inbox and the user's shared
        inbox (recording a CONSUME per inbox). `ids` as a RECEIVED frame carries
        them (big-endian u64), so no Python object is made per id; the consumed
        records' locations go into `locs` (room for 2 * count), their number into
        `found` (the records stay readable until their segment is deleted)."""
        cdef Inbox inbox
        cdef uint64_t msg_id, loc
        cdef Py_ssize_t i, j, removed
        cdef uint64_t *rm = <uint64_t *>PyMem_Malloc(8 * count if count else 8)
        if rm == NULL:
            raise MemoryError()
        found[0] = 0
        try:
            for dev in ((device, "") if device else ("",)):
                key = _ikey(recipient, dev)
                inbox = self._inbox(key, False)
                if inbox is None:
                    continue
                removed = 0
                for i in range(count):
                    msg_id = sb_load64(ids + 8 * i)
                    j = inbox.find(msg_id)
                    if j >= 0:
                        loc = inbox.take(j)
                        self._dropped(loc)
                        rm[removed] = msg_id
                        removed += 1
                        locs[found[0]] = loc
                        found[0] += 1
                self._forget_if_empty(key, inbox)
                if removed:
                    self.consumed += removed
                    self._record_consume_ids(recipient, dev, rm, removed)
        finally:
            PyMem_Free(rm)
        return 0

    cdef int read_view(self, uint64_t loc, MsgView *m) except -1:
        """Parse the MESSAGE record at `loc` into `m` (pointers into the mapping,
        valid while its segment is)."""
        cdef const unsigned char *r = self._record(loc)
        _parse_message(r, sb_load32(r), m)
        return 0

    cdef int _record_consume(self, str recipient, str device, list removed) except -1:
        cdef Py_ssize_t i, n = len(removed)
        cdef uint64_t *ids = <uint64_t *>PyMem_Malloc(8 * n if n else 8)
        if ids == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                ids[i] = removed[i]
            self._record_consume_ids(recipient, device, ids, n)
        finally:
            PyMem_Free(ids)
        return 0

    cdef int _record_consume_ids(self, str recipient, str device, const uint64_t *ids, Py_ssize_t n) except -1:
        """CONSUME records for `ids` of one inbox, MAX_CONSUME_IDS per record."""
        cdef Py_ssize_t i, j, c, k, off, length, rl, dl
        cdef const char *rp = _utf8(recipient, &rl)
        cdef const char *dp = _utf8(device, &dl)
        cdef unsigned char *r
        cdef Segment a
        for i in range(0, n, MAX_CONSUME_IDS):
            c = min(MAX_CONSUME_IDS, n - i)
            length = CONSUME_FIXED + rl + dl + 8 * c
            off = self._place(length, False)
            if off < 0:
                # the disk and the reserve are full: consumed in memory now (which lets
                # segments be deleted), written by record_deferred() once there is room;
                # a crash before that delivers them again (clients drop them by id)
                self._unrecorded.append((recipient, device, [ids[j] for j in range(i, i + c)]))
                self.unrecorded_consumes += c
                continue
            a = self._active
            r = a.base + off
            r[8] = REC_CONSUME
            r[9] = 0
            r[10] = 0
            r[11] = 0
            sb_store16(r + 12, <uint16_t>c)
            _put_id(r + 14, rp, rl)
            _put_id(r + 15 + rl, dp, dl)
            k = 16 + rl + dl
            for j in range(i, i + c):
                sb_store64(r + k, ids[j])
                k += 8
            a.seal_record(off, length)
        return 0

    def record_deferred(self):
        """Write the CONSUME records that found no room when they were made (see
        _record_consume); returns how many ids are still waiting."""
        waiting, self._unrecorded = self._unrecorded, []
        for recipient, device, chunk in waiting:
            self.unrecorded_consumes -= len(chunk)
            self._record_consume(recipient, device, chunk)     # deferred again if still no room
        return self.unrecorded_consumes

    def consume(self, str recipient, ids, str device=""):
        """Drop acknowledged messages (records a CONSUME); unknown ids are ignored."""
        cdef Py_ssize_t i, n, found = 0
        cdef bytearray wire
        if type(ids) is not list:
            ids = list(ids)
        n = len(ids)
        wire = bytearray(8 * n)
        cdef uint64_t *locs = <uint64_t *>PyMem_Malloc(16 * n if n else 8)
        if locs == NULL:
            raise MemoryError()
        before = self.consumed
        try:
            for i in range(n):
                sb_store64(<unsigned char *>(<char *>wire) + 8 * i, <uint64_t>ids[i])
            self.consume_wire(recipient, device, <const unsigned char *>(<char *>wire), n, locs, &found)
        finally:
            PyMem_Free(locs)
        return self.consumed - before

    def consume_through(self, str recipient, uint64_t msg_id, str device=""):
        cdef Inbox inbox
        cdef Py_ssize_t i
        ids = []
        for dev in ((device, "") if device else ("",)):
            inbox = self._inbox(_ikey(recipient, dev), False)
            if inbox is None:
                continue
            for i in range(inbox.head, inbox.tail):
                if inbox.ids[i] > msg_id:
                    break
                if inbox.locs[i] != 0:
                    ids.append(inbox.ids[i])
        return self.consume(recipient, ids, device)

    cdef const unsigned char *_record(self, uint64_t loc) except NULL:
        cdef Segment seg = self._segments[loc >> 32]
        if seg.base == NULL:
            raise StoreError("the log is closed", ErrorCode.INTERNAL)
        return seg.base + _loc_off(loc)

    cdef list _pending_locs(self, str recipient, str device):
        """(msg_id, loc) of a device's inbox merged with the user's shared inbox, by id."""
        cdef Inbox inbox
        cdef Py_ssize_t i
        cdef list out = []
        for dev in ((device, "") if device else ("",)):
            inbox = self._inbox(_ikey(recipient, dev), False)
            if inbox is None:
                continue
            for i in range(inbox.head, inbox.tail):
                if inbox.locs[i] != 0:
                    out.append((inbox.ids[i], inbox.locs[i]))
        if device:
            out.sort()
        return out

    cdef int write_pending(self, WriteBuffer out, str recipient, str device, uint64_t now_ms,
                           uint64_t min_id, Py_ssize_t max_bytes, uint64_t *rest) except -1:
        cdef MsgView m
        cdef const unsigned char *r
        cdef Py_ssize_t start = out.length
        expired = None
        for msg_id, loc in self._pending_locs(recipient, device):
            if <uint64_t>msg_id < min_id:
                continue
            if max_bytes and out.length - start >= max_bytes:
                rest[0] = msg_id            # the first entry not written
                break
            r = self._record(loc)
            _parse_message(r, sb_load32(r), &m)
            if m.ts + self.ttl_ms <= now_ms:
                if expired is None:
                    expired = []
                expired.append(m.msg_id)
                continue
            write_stored(out, &m)
        if expired:
            for dev in ((device, "") if device else ("",)):
                self._expire(_ikey(recipient, dev), expired)
        return 0

    def write_pending_into(self, WriteBuffer out, str recipient, uint64_t now_ms, str device="",
                           uint64_t min_id=0, Py_ssize_t max_bytes=0):
        """Append a frame for each unconsumed entry of this device's inbox (and the
        user's shared inbox), oldest first, straight from the mapping; only ids >=
        `min_id`; stop once `max_bytes` (0: no limit) were written. Returns the id
        of the first entry left unwritten, 0 if none was left."""
        cdef uint64_t rest = 0
        self.write_pending(out, recipient, device, now_ms, min_id, max_bytes, &rest)
        return rest

    def read_flags(self, uint64_t loc):
        """(flags, sender, sender_device, conversation, client_id) of a MESSAGE record."""
        cdef MsgView m
        cdef const unsigned char *r = self._record(loc)
        _parse_message(r, sb_load32(r), &m)
        return (m.flags, _text(m.sender, m.sender_len), _text(m.sender_device, m.sender_device_len),
                _text(m.conversation, m.conversation_len), m.client_id, m.msg_id)

    def _expire(self, str recipient, ids):
        cdef Inbox inbox = self._inbox(recipient, False)
        cdef Py_ssize_t i, n = 0
        if inbox is None:
            return 0
        for msg_id in ids:
            i = inbox.find(msg_id)
            if i >= 0:
                self._dropped(inbox.take(i))
                n += 1
        self._forget_if_empty(recipient, inbox)
        self.expired += n
        return n

    def expire_prefix(self, str recipient, uint64_t now_ms):
        """Drop the expired messages at the front of one inbox (ids grow with time)."""
        cdef MsgView m
        cdef const unsigned char *r
        cdef Inbox inbox = self._inbox(recipient, False)
        cdef Py_ssize_t i
        if inbox is None:
            return 0
        ids = []
        for i in range(inbox.head, inbox.tail):
            if inbox.locs[i] == 0:
                continue
            r = self._record(inbox.locs[i])
            _parse_message(r, sb_load32(r), &m)
            if m.ts + self.ttl_ms > now_ms:
                break
            ids.append(m.msg_id)
        return self._expire(recipient, ids) if ids else 0

    def read_message(self, uint64_t loc):
        """(msg_id, ts, client_id, recipient, sender, sender_device, payload) at `loc`."""
        cdef MsgView m
        cdef const unsigned char *r = self._record(loc)
        _parse_message(r, sb_load32(r), &m)
        return (m.msg_id, m.ts, m.client_id, _text(m.recipient, m.recipient_len),
                _text(m.sender, m.sender_len), _text(m.sender_device, m.sender_device_len),
                PyBytes_FromStringAndSize(m.payload, m.payload_len))

    def pending_locations(self, str recipient, str device=""):
        return self._pending_locs(recipient, device)

    def pending_count(self, recipient=None, str device=""):
        cdef Inbox inbox
        if recipient is not None:
            inbox = self._inbox(_ikey(recipient, device), False)
            return inbox.live if inbox is not None else 0
        return self.pending_total

    # -- META: the latest value per key (device registry, groups, settings) -----------
    def meta_put(self, str key, bytes value, bint use_reserve=False, str user=None):
        """Record `value` for `key` (empty: delete it). Kept across compaction while latest.
        `use_reserve`: state that must not fail on a full disk (a device's registration).
        `user`: for a device's key ("d\\0user\\0device"), the caller's user string,
        which the index then shares instead of keeping a key string of its own."""
        cdef Py_ssize_t kl, off, length
        cdef const char *kp = PyUnicode_AsUTF8AndSize(key, &kl)
        cdef unsigned char *r
        cdef Segment a
        if kl > 65535:
            raise ValueError("META key longer than 65535 bytes")
        length = META_L_FIXED + kl + len(value)
        off = self._place(length, not use_reserve)
        if off < 0:
            raise StoreError("storage full: cannot record state", ErrorCode.STORAGE_FULL)
        a = self._active
        r = a.base + off
        r[8] = REC_META_L
        r[9] = 0
        r[10] = 0
        r[11] = 0
        sb_store16(r + 12, <uint16_t>kl)
        memcpy(r + 14, kp, kl)
        sb_store32(r + 14 + kl, <uint32_t>len(value))
        memcpy(r + 18 + kl, <const char *>value, len(value))
        a.seal_record(off, length)
        self._meta_set(key, (a.segment_id << 32) | <uint64_t>off, len(value) == 0, user)

    # The latest record of each key is found through one of two dicts. A device's
    # registration ("d\0user\0device", one per device ever seen: a million on a dense
    # gateway) is found by its user, whose string the caller shares, and the record
    # holds the rest of the key: a key string of its own was 64 B of every device.
    cdef int _meta_set(self, str key, uint64_t loc, bint tombstone, str user=None) except -1:
        cdef Segment seg
        if key.startswith(DEVICE_META):
            prev = self._dev_swap(_device_user(key) if user is None else user, key, None if tombstone else loc)
        else:
            prev = self._meta.pop(key, None)
            if not tombstone:
                self._meta[key] = loc
        if prev is not None:
            seg = self._segments.get(<uint64_t>prev >> 32)
            if seg is not None:
                seg.live -= 1
        if not tombstone:
            seg = self._segments[loc >> 32]
            seg.live += 1
        return 0

    cdef object _dev_swap(self, str user, str key, object loc):
        """Put `loc` (None: nothing) in place of `key`'s record among `user`'s; the old location or None."""
        entry = self._devmeta.get(user)
        locs = () if entry is None else entry if type(entry) is tuple else (entry,)
        prev = None
        for i in range(len(locs)):
            if self._record_has_key(locs[i], key):
                prev = locs[i]
                locs = locs[:i] + locs[i + 1:]
                break
        if loc is not None:
            locs = locs + (loc,)
        if not locs:
            if entry is not None:
                del self._devmeta[user]
        else:
            self._devmeta[user] = locs[0] if len(locs) == 1 else locs
        return prev

    cdef bint _record_has_key(self, uint64_t loc, str key) except -1:
        cdef Py_ssize_t kl
        cdef const char *kp = PyUnicode_AsUTF8AndSize(key, &kl)
        cdef const unsigned char *r = self._record(loc)
        return _meta_key_len(r) == kl and memcmp(r + _meta_key_off(r), kp, kl) == 0

    cdef object _meta_loc(self, str key):
        """The location of `key`'s latest record, or None."""
        if not key.startswith(DEVICE_META):
            return self._meta.get(key)
        entry = self._devmeta.get(_device_user(key))
        if entry is None:
            return None
        for loc in (entry if type(entry) is tuple else (entry,)):
            if self._record_has_key(loc, key):
                return loc
        return None

    def meta_get(self, str key):
        cdef const unsigned char *r
        cdef const unsigned char *kp
        cdef const unsigned char *vp
        cdef Py_ssize_t kl, vl
        loc = self._meta_loc(key)
        if loc is None:
            return None
        r = self._record(loc)
        _meta_view(r, sb_load32(r), &kp, &kl, &vp, &vl)
        return PyBytes_FromStringAndSize(<const char *>vp, vl)

    def meta_keys(self, str prefix=""):
        keys = [k for k in self._meta if k.startswith(prefix)]
        if prefix.startswith(DEVICE_META) or DEVICE_META.startswith(prefix):
            for entry in self._devmeta.values():
                for loc in (entry if type(entry) is tuple else (entry,)):
                    k = self._meta_key_at(self._record(loc))
                    if k.startswith(prefix):
                        keys.append(k)
        return keys

    def recipients(self):
        return list(self._inboxes)

    def last_id(self):
        return self.last_msg_id

    def _raise_last_id(self, uint64_t floor):
        if floor > self.last_msg_id:
            self.last_msg_id = floor

    # -- recovery -------------------------------------------------------------------
    def _apply_segment(self, Segment seg, uint64_t now_ms, dict dedup, Py_ssize_t dedup_window):
        """Index every valid record of `seg`. Returns (status, end, bad_regions):
        status is 'clean', 'torn' (garbage after the last valid record, nothing
        valid after it) or 'corrupt' (a bad region with valid records after it);
        `end` is where appending may resume; bad_regions lists (start, stop)."""
        cdef Py_ssize_t pos = SEGMENT_HEADER_SIZE, q, nz, i
        cdef uint32_t length
        cdef const unsigned char *r
        cdef MsgView m
        cdef uint16_t count
        cdef Py_ssize_t k, rl, kl, vl
        cdef const unsigned char *kp
        cdef const unsigned char *vp
        cdef Inbox inbox
        status = "clean"
        regions = []
        while pos + RECORD_HEADER_SIZE <= seg.size:
            r = seg.base + pos
            length = sb_load32(r)
            if length != 0 and seg.record_valid(pos):
                if r[8] == REC_MESSAGE or r[8] == REC_MESSAGE_P:
                    _parse_message(r, length, &m)
                    self._recover_message(seg, pos, &m, now_ms, dedup, dedup_window)
                elif r[8] == REC_META or r[8] == REC_META_L:
                    _meta_view(r, length, &kp, &kl, &vp, &vl)
                    key = _text(<const char *>kp, kl)
                    self._meta_set(key, (seg.segment_id << 32) | <uint64_t>pos, vl == 0)
                    if vl and key.startswith(PRODUCER_META):
                        self.producers.restore(key[len(PRODUCER_META):],
                                               PyBytes_FromStringAndSize(<const char *>vp, vl), seg.segment_id)
                else:
                    count = sb_load16(r + 12)
                    rl = r[14]
                    recipient = _ikey(_text(<const char *>r + 15, rl),
                                      _text(<const char *>r + 16 + rl, r[15 + rl]))
                    inbox = self._inbox(recipient, False)
                    k = 16 + rl + r[15 + rl]
                    if inbox is not None:
                        if inbox.unsorted:
                            self._sort_inbox(inbox)
                        for _ in range(count):
                            i = inbox.find(sb_load64(r + k))
                            if i >= 0:
                                self._dropped(inbox.take(i))
                            k += 8
                        self._forget_if_empty(recipient, inbox)
                pos += _align(length)
                continue
            if seg.tag != 0 and sb_load16(r + 10) != seg.tag and not seg.ours_but_tag(pos):
                break              # a recycled file: its previous use's bytes begin here, the end of ours
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
        cdef Inbox inbox
        seg.messages += 1
        if m.msg_id > self.last_msg_id:
            self.last_msg_id = m.msg_id
        if m.ts > seg.newest_ts:
            seg.newest_ts = m.ts
        if m.client_id and m.flags & MSG_GROUP:
            # a member's copy: deduplicated per (group, member) by the group message's id
            copy_window(dedup, _text(m.conversation, m.conversation_len),
                        _text(m.recipient, m.recipient_len)).add(m.client_id, dedup_window)
        elif m.producer and m.flags == 0:
            self.producers.stored(_text(m.sender, m.sender_len) + "\x00" + _text(m.sender_device, m.sender_device_len),
                                  m.producer, m.client_id, m.msg_id, m.ts, seg.segment_id)
        if m.ts + self.ttl_ms <= now_ms:
            self.expired += 1
            return 0
        inbox = self._inbox(_ikey(_text(m.recipient, m.recipient_len),
                                  _text(m.recipient_device, m.recipient_device_len)), True)
        inbox.push(m.msg_id, (seg.segment_id << 32) | <uint64_t>off)   # a compaction copy is sorted out later
        seg.live += 1
        self.pending_total += 1
        return 0

    cdef int _sort_inbox(self, Inbox inbox) except -1:
        """Order by id; of several copies of one message (compaction) the last scanned wins."""
        cdef Py_ssize_t n = inbox.tail - inbox.head, i, j = 0
        cdef uint64_t *e
        if n <= 0:
            inbox.unsorted = False
            return 0
        e = <uint64_t *>PyMem_Malloc(n * 3 * sizeof(uint64_t))
        if e == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                e[3 * i] = inbox.ids[inbox.head + i]
                e[3 * i + 1] = inbox.locs[inbox.head + i]
                e[3 * i + 2] = i
            qsort(e, n, 3 * sizeof(uint64_t), _cmp_entry)
            for i in range(n):
                if e[3 * i + 1] == 0:
                    continue
                if i + 1 < n and e[3 * (i + 1)] == e[3 * i] and e[3 * (i + 1) + 1] != 0:
                    self._dropped(e[3 * i + 1])       # an older copy of the same message
                    inbox.live -= 1
                    continue
                inbox.ids[j] = e[3 * i]
                inbox.locs[j] = e[3 * i + 1]
                j += 1
            inbox.head = 0
            inbox.tail = j
            inbox.unsorted = False
        finally:
            PyMem_Free(e)
        return 0

    def _finish_recovery(self):
        """Inboxes back in msg_id order (compaction copies are scanned late)."""
        cdef Inbox inbox
        for inbox in self._inboxes.values():
            if inbox.unsorted:
                self._sort_inbox(inbox)

    # -- reading a shard whole (a tool that splits it: gateway/reshard.py) ----------------
    def inbox_entries(self, str key):
        """(msg_id, loc) of one inbox (a key of `recipients()`), in id order."""
        cdef Inbox inbox = self._inbox(key, False)
        return inbox.items() if inbox is not None else []

    def message_at(self, uint64_t loc):
        """Every field of the MESSAGE record at `loc`, in `append`'s terms: (recipient,
        device, msg_id, ts, sender, sender_device, payload, client_id, flags,
        conversation, producer)."""
        cdef MsgView m
        cdef const unsigned char *r = self._record(loc)
        _parse_message(r, sb_load32(r), &m)
        return (_text(m.recipient, m.recipient_len), _text(m.recipient_device, m.recipient_device_len),
                m.msg_id, m.ts, _text(m.sender, m.sender_len), _text(m.sender_device, m.sender_device_len),
                PyBytes_FromStringAndSize(m.payload, m.payload_len), m.client_id, m.flags,
                _text(m.conversation, m.conversation_len), m.producer)

    def record_length(self, uint64_t loc):
        """Bytes of the record at `loc` (unpadded)."""
        return sb_load32(self._record(loc))

    def sends_and_copies(self, Segment seg):
        """What recovery learns from `seg` besides the inbox index, consumed records
        included: ("send", sender key, producer, seq, recipient) for every original
        SEND (MESSAGE_P, flags 0: the producer table) and ("copy", member, device,
        msg_id, ts, origin, group, sender, sender_device, live) for every member's
        group copy (the copy dedup; `live`: this record is the one its inbox holds).
        Only records recovery found valid (up to `seg.end`)."""
        cdef Py_ssize_t pos = SEGMENT_HEADER_SIZE, q, i
        cdef uint32_t length
        cdef const unsigned char *r
        cdef MsgView m, lm
        out = []
        if seg.base == NULL:
            raise StoreError("the log is closed", ErrorCode.INTERNAL)
        while pos + RECORD_HEADER_SIZE <= seg.end:
            r = seg.base + pos
            length = sb_load32(r)
            if length == 0 or not seg.record_valid(pos):
                q = seg.next_valid(pos + RECORD_ALIGN)
                if q < 0 or q >= seg.end:
                    break
                pos = q
                continue
            if (r[8] == REC_MESSAGE or r[8] == REC_MESSAGE_P) and _parse_message(r, length, &m):
                if m.producer and m.flags == 0:
                    key = _text(m.sender, m.sender_len) + "\x00" + _text(m.sender_device, m.sender_device_len)
                    out.append(("send", key, m.producer, m.client_id, _text(m.recipient, m.recipient_len)))
                elif m.client_id and m.flags & MSG_GROUP:
                    out.append(("copy", _text(m.recipient, m.recipient_len),
                                _text(m.recipient_device, m.recipient_device_len), m.msg_id, m.ts, m.client_id,
                                _text(m.conversation, m.conversation_len), _text(m.sender, m.sender_len),
                                _text(m.sender_device, m.sender_device_len),
                                self._live_inbox(r, length, (seg.segment_id << 32) | <uint64_t>pos, &lm, &i)
                                is not None))
            pos += _align(length)
        return out

    # -- compaction -------------------------------------------------------------------
    cdef str _meta_key_at(self, const unsigned char *r):
        """The key of the META record `r` (its layout: see meta_put)."""
        return _text(<const char *>r + _meta_key_off(r), _meta_key_len(r))

    cdef Inbox _live_inbox(self, const unsigned char *r, uint32_t length, uint64_t here, MsgView *m,
                           Py_ssize_t *index):
        """The inbox still holding the MESSAGE record `r` at `here` (its entry in
        `index`), or None if that message was consumed or moved."""
        cdef Inbox inbox
        cdef Py_ssize_t i
        if not _parse_message(r, length, m):
            return None
        inbox = self._inbox(_ikey(_text(m.recipient, m.recipient_len),
                                  _text(m.recipient_device, m.recipient_device_len)), False)
        if inbox is None:
            return None
        i = inbox.find(m.msg_id)
        if i < 0 or inbox.locs[i] != here:
            return None
        index[0] = i
        return inbox

    def _compact_step(self, Segment seg, Py_ssize_t pos, Py_ssize_t budget, bint use_reserve=False):
        """Copy live messages of `seg` (an old segment) to the head, at most
        `budget` records from `pos`. Returns the next position, or -1 when done.
        `use_reserve`: the disk is full and this compaction is what frees it; it
        may use all the room there is (the caller checked that the rest fits)."""
        cdef uint32_t length
        cdef const unsigned char *r
        cdef MsgView m
        cdef Py_ssize_t off, q, i
        cdef Segment a
        cdef uint64_t here
        cdef Inbox inbox
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
            here = (seg.segment_id << 32) | <uint64_t>pos
            if r[8] == REC_META or r[8] == REC_META_L:
                key = self._meta_key_at(r)
                if self._meta_loc(key) == here:
                    off = self._place(length, not use_reserve, use_reserve)
                    if off < 0:
                        raise StoreError("no room to compact", ErrorCode.STORAGE_FULL)
                    a = self._active
                    memcpy(a.base + off + 8, r + 8, length - 8)
                    a.seal_record(off, length)
                    self._meta_set(key, (a.segment_id << 32) | <uint64_t>off, False)
            elif r[8] == REC_MESSAGE or r[8] == REC_MESSAGE_P:
                inbox = self._live_inbox(r, length, here, &m, &i)
                if inbox is not None:
                    off = self._place(length, not use_reserve, use_reserve)
                    if off < 0:
                        raise StoreError("no room to compact", ErrorCode.STORAGE_FULL)
                    a = self._active
                    memcpy(a.base + off + 8, r + 8, length - 8)
                    a.seal_record(off, length)       # a new CRC: the place changed
                    inbox.locs[i] = (a.segment_id << 32) | <uint64_t>off
                    a.messages += 1
                    a.live += 1
                    if m.ts > a.newest_ts:
                        a.newest_ts = m.ts
                    seg.live -= 1
            pos += _align(length)
        return pos if pos + RECORD_HEADER_SIZE <= seg.end else -1

    def _live_bytes(self, Segment seg, bint messages=True):
        """Bytes compaction would copy out of `seg`: its latest META values and
        (with `messages`) its pending messages; the room a full shard keeps so
        that it can always free its front segment. A walk over the record
        headers, no CRCs (every indexed record was checked when it was written
        or recovered)."""
        cdef Py_ssize_t pos = SEGMENT_HEADER_SIZE, total = 0, i, q
        cdef uint32_t length
        cdef const unsigned char *r
        cdef MsgView m
        cdef uint64_t here
        cdef bint plausible
        while pos + RECORD_HEADER_SIZE <= seg.end:
            r = seg.base + pos
            length = sb_load32(r)
            plausible = length >= RECORD_HEADER_SIZE and pos + <Py_ssize_t>length <= seg.end
            if plausible and (r[8] == REC_META or r[8] == REC_META_L):
                plausible = (META_FIXED if r[8] == REC_META else META_L_FIXED) + _meta_key_len(r) <= <Py_ssize_t>length
            if not plausible:
                q = seg.next_valid(pos + RECORD_ALIGN)
                if q < 0 or q >= seg.end:
                    break
                pos = q
                continue
            here = (seg.segment_id << 32) | <uint64_t>pos
            if r[8] == REC_META or r[8] == REC_META_L:
                if self._meta_loc(self._meta_key_at(r)) == here:
                    total += _align(length)
            elif (r[8] == REC_MESSAGE or r[8] == REC_MESSAGE_P) and messages:
                if self._live_inbox(r, length, here, &m, &i) is not None:
                    total += _align(length)
            pos += _align(length)
        return total


# -- benchmark helpers (bench/): the C paths without Python call overhead ------------

def bench_append(LogCore log, Py_ssize_t n, Py_ssize_t payload_size, uint64_t first_id, bint index=True):
    """Append `n` messages for 64 recipients through the C path (with the index,
    as the router does, or records only). Returns elapsed seconds."""
    import time
    cdef bytes payload = b"x" * payload_size
    cdef const char *p = payload
    cdef list recipients = [f"user{i:04d}" for i in range(64)]
    cdef Py_ssize_t i, rl
    cdef const char *rp
    cdef uint64_t ts = <uint64_t>(time.time() * 1000)
    t = time.perf_counter()
    if index:
        for i in range(n):
            log.append_message(recipients[i & 63], "", first_id + i, ts, 0, "alice", "phone", "", 0, p, payload_size)
    else:
        rp = _utf8(recipients[0], &rl)
        for i in range(n):
            log._write_message(rp, rl, "", 0, first_id + i, ts, 0, 0, "alice", 5, "phone", 5, "", 0, 0, p,
                               payload_size)
    return time.perf_counter() - t


def bench_memcpy(Segment seg, Py_ssize_t n, Py_ssize_t record_size):
    """The floor: memcpy of `n` records of `record_size` bytes into a resident
    mapping (a segment's). Returns elapsed seconds."""
    import time
    cdef bytes src = b"r" * record_size
    cdef const char *p = src
    cdef Py_ssize_t i, off = SEGMENT_HEADER_SIZE, step = _align(record_size)
    cdef Py_ssize_t limit = seg.size - step
    t = time.perf_counter()
    with nogil:
        for i in range(n):
            memcpy(seg.base + off, p, record_size)
            off += step
            if off > limit:
                off = SEGMENT_HEADER_SIZE
    return time.perf_counter() - t
