"""Idempotent, ordered sends: per-device sequence numbers (docs/PROTOCOL.md section 6).

Each device sends as a *producer* (an id the server hands out in WELCOME) and
numbers its SENDs 1, 2, 3, ... Two places keep state, both memory per device,
not per message:

- `SendState`, on the worker serving the device, orders its stream: once a
  seq has failed for now (UNAVAILABLE, STORAGE_FULL, ...), no later seq is
  accepted until that one is sent again, and each later one refused meanwhile
  must come again in its turn, so a device's messages are stored in the order
  it sent them across retries. Lost when that worker restarts; the
  client then resends in order anyway.
- `ProducerTable`, one per shard store, remembers per device the highest seq
  stored in that shard and the answers of the last `window` seqs, so a retry
  gets its original ACK and is never stored twice. The log rebuilds it on
  recovery from its records and from checkpoints written before a segment is
  deleted (`_core/log.py`), so consuming and deleting forget nothing.

A shard sees only the part of a device's stream sent to its users, in order
(one link per worker pair, processed in order): so "seq <= high" there means
"seen before", and a seq refused here for now blocks the later ones here too.
"""
import struct
from bisect import bisect_left

from cpython.mem cimport PyMem_Realloc, PyMem_Free
from libc.string cimport memmove

from ._producers cimport ADMIT_NEW, ADMIT_DUPLICATE, ADMIT_FENCED, ADMIT_OUT_OF_ORDER
from ._sorted cimport lower_bound

#: seqs a held stream remembers (a client keeps at most send_window, at most 4096, unanswered)
cdef Py_ssize_t MAX_REMEMBERED = 4096

#: answer of `ProducerTable.admit_py`: the names of the C enum
ADMIT = {ADMIT_NEW: "new", ADMIT_DUPLICATE: "duplicate", ADMIT_FENCED: "fenced",
         ADMIT_OUT_OF_ORDER: "out_of_order"}


def encode_checkpoint(uint64_t producer, uint64_t high, answers):
    """A checkpoint's bytes (what `ProducerTable.restore` reads): producer, highest
    seq, then each (seq, msg_id, ts) answer it proves."""
    return b"".join([struct.pack("!QQ", producer, high),
                     *(struct.pack("!QQQ", seq, msg_id, ts) for seq, msg_id, ts in answers)])


cdef class SendState:
    """The device's stream as its serving worker sees it.

    While a seq is held (`resume_at`: it failed and has not come again), every
    later new seq is refused and remembered, and after the held one comes again
    each remembered one is held in turn. So a resend that skips one (a client
    that resent the SENDs it had seen refused while the refusal of another was
    still on its way) gets OUT_OF_ORDER instead of being stored ahead of it:
    stored ahead, the skipped seq's resend would look like a retry of a SEND
    stored long ago (ACK with msg_id 0) and be lost."""

    def __init__(self, str key, uint64_t producer, bint known):
        self.key = key
        self.producer = producer
        self.max_seen = 0
        self.resume_at = 0
        self.known = known
        self._refused = None

    cdef int check(self, uint64_t seq) except -1:
        """ADMIT_NEW (route it: new, or a retry the shard will recognise) or
        ADMIT_OUT_OF_ORDER (a gap, or an earlier seq failed and was not resent)."""
        if self.resume_at:
            if seq > self.resume_at:
                if seq > self.max_seen:      # never routed: it must come again before anything later
                    self._remember(seq)
                return ADMIT_OUT_OF_ORDER
            if seq == self.resume_at:
                self.resume_at = self._refused.pop(0) if self._refused else 0
        elif self.known and seq > self.max_seen + 1:
            return ADMIT_OUT_OF_ORDER
        if seq > self.max_seen:
            self.max_seen = seq
        return ADMIT_NEW

    cdef int failed(self, uint64_t seq) except -1:
        """`seq` was not stored and the client will send it again: hold the rest."""
        if self.resume_at == 0:
            self.resume_at = seq
        elif seq < self.resume_at:
            self._remember(self.resume_at)
            self.resume_at = seq
        elif seq > self.resume_at:
            self._remember(seq)
        return 0

    cdef int _remember(self, uint64_t seq) except -1:
        # seqs refused while held; bounded (a client keeps at most send_window unanswered)
        cdef Py_ssize_t i
        if self._refused is None:
            self._refused = []
        i = bisect_left(self._refused, seq)
        if (i < len(self._refused) and self._refused[i] == seq) or len(self._refused) >= MAX_REMEMBERED:
            return 0
        self._refused.insert(i, seq)
        return 0

    @property
    def waiting(self):
        """The seqs that must come again, in the order they are accepted."""
        return ([self.resume_at] if self.resume_at else []) + list(self._refused or ())

    def check_py(self, uint64_t seq):
        """`check` from Python (tests): "new" or "out_of_order"."""
        return ADMIT[self.check(seq)]

    def failed_py(self, uint64_t seq):
        self.failed(seq)

    def __repr__(self):
        return (f"<SendState producer={self.producer} max_seen={self.max_seen} resume_at={self.resume_at} "
                f"waiting={len(self._refused or ())}>")


cdef class ProducerState:
    """One device's sequence in one shard."""

    def __cinit__(self):
        self.ring = NULL
        self.base = NULL
        self.n = 0
        self.cap = 0

    def __dealloc__(self):
        PyMem_Free(self.base)

    cdef int _reset(self, uint64_t producer) except -1:
        self.producer = producer
        self.high = 0
        self.refused_from = 0
        self.segment_low = 0
        self.n = 0
        self.ring = self.base
        return 0

    cdef Py_ssize_t _find(self, uint64_t seq) noexcept:
        return lower_bound(self.ring, 0, self.n, 4, seq)

    cdef int _insert(self, uint64_t seq, uint64_t msg_id, uint64_t ts, uint64_t segment,
                     Py_ssize_t window) except -1:
        """Remember the answer for `seq` (its record in log `segment`; 0: a checkpoint
        proves it); keep only seqs within `window` of the newest. Appends in the
        common case (seqs arrive in order); recovery may insert."""
        cdef Py_ssize_t i, drop = 0
        cdef uint64_t *grown
        if seq > self.high:
            self.high = seq
        while drop < self.n and self.ring[4 * drop] + <uint64_t>window <= self.high:
            drop += 1
        if drop:                 # O(1): the window moves; the room is reclaimed when the end is reached
            self.ring += 4 * drop
            self.n -= drop
        if seq + <uint64_t>window <= self.high:
            return 0                               # older than the window: nothing to answer with
        i = self._find(seq)
        if i < self.n and self.ring[4 * i] == seq:
            return 0                               # already known (one message, several inboxes)
        if self.ring + 4 * self.n == self.base + 4 * self.cap:       # no room after the newest
            if (self.ring - self.base) // 4 >= max(1, self.cap // 8):
                # an eighth or more is dropped entries: move down (a full window of 256 moves once
                # per ~36 SENDs, not on every one: that memmove was 3% of a worker)
                memmove(self.base, self.ring, 4 * self.n * sizeof(uint64_t))
                self.ring = self.base
            else:
                grown = <uint64_t *>PyMem_Realloc(self.base, 4 * (self.cap + max(4, self.cap // 4)) * sizeof(uint64_t))
                if grown == NULL:
                    raise MemoryError()
                self.ring = grown + (self.ring - self.base)
                self.base = grown
                self.cap += max(4, self.cap // 4)
        if i < self.n:
            memmove(self.ring + 4 * (i + 1), self.ring + 4 * i, 4 * (self.n - i) * sizeof(uint64_t))
        self.ring[4 * i] = seq
        self.ring[4 * i + 1] = msg_id
        self.ring[4 * i + 2] = ts
        self.ring[4 * i + 3] = segment
        self.n += 1
        if segment and (self.segment_low == 0 or segment < self.segment_low):
            self.segment_low = segment
        return 0

    def entries(self):
        """[(seq, msg_id, ts)] remembered, oldest first (msg_id 0: refused for good, ts = the code)."""
        return [(self.ring[4 * i], self.ring[4 * i + 1], self.ring[4 * i + 2]) for i in range(self.n)]

    @property
    def memory(self):
        """Bytes this state holds outside the object itself."""
        return 4 * self.cap * sizeof(uint64_t)


cdef class ProducerTable:
    """Per device ("user\\0device"): the producer, the highest seq seen and the
    answers of the last `window` seqs, for one shard."""

    def __init__(self, Py_ssize_t window=256):
        self._states = {}
        self.window = window

    cdef int admit(self, str key, uint64_t producer, uint64_t seq, uint64_t *msg_id, uint64_t *ts) except -1:
        """May `seq` of `producer` be stored here? On ADMIT_DUPLICATE, `msg_id`/`ts`
        are the original answer (msg_id 0: stored, id no longer known; or, with
        ts != 0, refused for good with error code `ts`)."""
        cdef ProducerState st = <ProducerState>self._states.get(key)
        cdef Py_ssize_t i
        if st is None or producer > st.producer:
            return ADMIT_NEW
        if producer < st.producer:
            return ADMIT_FENCED
        if st.refused_from:
            if seq == st.refused_from:
                return ADMIT_NEW
            if seq > st.refused_from:
                return ADMIT_OUT_OF_ORDER
        if seq > st.high:
            return ADMIT_NEW
        i = st._find(seq)
        if i < st.n and st.ring[4 * i] == seq:
            msg_id[0] = st.ring[4 * i + 1]
            ts[0] = st.ring[4 * i + 2]
        else:
            msg_id[0] = 0
            ts[0] = 0
        return ADMIT_DUPLICATE

    cdef ProducerState _state(self, str key, uint64_t producer):
        cdef ProducerState st = <ProducerState>self._states.get(key)
        if st is None:
            st = ProducerState()
            st._reset(producer)
            self._states[key] = st
        elif producer > st.producer:
            st._reset(producer)
        return st

    cdef int stored(self, str key, uint64_t producer, uint64_t seq, uint64_t msg_id, uint64_t ts,
                    uint64_t segment) except -1:
        """`seq` is stored under `msg_id` (its record is in log segment `segment`)."""
        cdef ProducerState st = self._state(key, producer)
        if producer < st.producer:
            return 0                               # an old producer's record (recovery)
        if st.refused_from and seq >= st.refused_from:
            st.refused_from = 0
        st._insert(seq, msg_id, ts, segment, self.window)
        return 0

    cdef int refused(self, str key, uint64_t producer, uint64_t seq, int code, bint final) except -1:
        """`seq` was not stored. `final`: the client must not send it again (too
        large, bad recipient, ...): a retry gets the same answer. Otherwise later
        seqs of this device wait here until `seq` is sent again."""
        cdef ProducerState st = self._state(key, producer)
        if producer != st.producer:
            return 0
        if final:
            st._insert(seq, 0, <uint64_t>code, 0, self.window)
        elif st.refused_from == 0 or seq < st.refused_from:
            st.refused_from = seq
        return 0

    # -- Python side: recovery, checkpoints, tests, metrics -------------------------------
    # (a checkpoint is `!QQ` producer, high, then `!QQQ` seq, msg_id, ts per answer)

    def admit_py(self, str key, uint64_t producer, uint64_t seq):
        """(answer name, msg_id, ts), as `admit`."""
        cdef uint64_t msg_id = 0, ts = 0
        cdef int r = self.admit(key, producer, seq, &msg_id, &ts)
        return ADMIT[r], msg_id, ts

    def stored_py(self, str key, uint64_t producer, uint64_t seq, uint64_t msg_id, uint64_t ts,
                  uint64_t segment=0):
        self.stored(key, producer, seq, msg_id, ts, segment)

    def refused_py(self, str key, uint64_t producer, uint64_t seq, int code, bint final):
        self.refused(key, producer, seq, code, final)

    def get(self, str key):
        return self._states.get(key)

    def keys(self):
        """Every device ("user\\0device") this shard holds a sequence for."""
        return list(self._states)

    def in_segment(self, uint64_t segment):
        """Keys with an answer whose record is in `segment` or an older one: before
        that segment is deleted they need a checkpoint."""
        cdef ProducerState st
        return [k for k, st in self._states.items() if st.segment_low and st.segment_low <= segment]

    def checkpoint(self, str key, uint64_t segment):
        """Segments up to `segment` are going: the state of `key` as bytes (producer,
        high, then the (seq, msg_id, ts) answers no record will prove any more: those
        in those segments and those an earlier checkpoint proves), which from now on
        this checkpoint proves. Records in newer segments still prove the rest."""
        cdef ProducerState st = <ProducerState>self._states[key]
        cdef Py_ssize_t i
        answers = []
        st.segment_low = 0
        for i in range(st.n):
            if st.ring[4 * i + 1] == 0:
                continue                           # refused for good: not durable
            if st.ring[4 * i + 3] <= segment:
                st.ring[4 * i + 3] = 0
                answers.append((st.ring[4 * i], st.ring[4 * i + 1], st.ring[4 * i + 2]))
            elif st.segment_low == 0 or st.ring[4 * i + 3] < st.segment_low:
                st.segment_low = st.ring[4 * i + 3]
        return encode_checkpoint(st.producer, st.high, answers)

    def restore(self, str key, bytes data, uint64_t segment):
        """Merge a checkpoint (recovery): the newest producer and the highest seq win."""
        cdef ProducerState st
        producer, high = struct.unpack_from("!QQ", data, 0)
        st = self._state(key, producer)
        if producer < st.producer:
            return
        for off in range(16, len(data) - 23, 24):
            seq, msg_id, ts = struct.unpack_from("!QQQ", data, off)
            st._insert(seq, msg_id, ts, 0, self.window)
        if high > st.high:
            st.high = high

    def __len__(self):
        return len(self._states)

    def memory(self):
        """Bytes held by the rings (the objects themselves are ~100 bytes each)."""
        cdef ProducerState st
        return sum(st.memory for st in self._states.values())
