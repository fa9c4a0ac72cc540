# Idempotent sends: per-device sequence state, on the sender's side and per shard.
from libc.stdint cimport uint64_t


cdef enum:
    # ProducerTable.admit answers
    ADMIT_NEW = 0            # store it
    ADMIT_DUPLICATE = 1      # stored (or refused for good) before: answer as then
    ADMIT_FENCED = 2         # a newer producer took over this device's sequence
    ADMIT_OUT_OF_ORDER = 3   # an earlier seq of this device failed here: resend from it


cdef class SendState:
    cdef readonly str key              # "user\0device": the producer tables' key
    cdef public uint64_t producer
    cdef public uint64_t max_seen      # highest seq accepted from this producer
    cdef public uint64_t resume_at     # a seq that failed: nothing after it is accepted before it
    cdef public bint known             # the sequence started here: gaps are detected (not after a restart)
    cdef list _refused                 # later seqs refused while held, ascending: each must come again in turn

    cdef int check(self, uint64_t seq) except -1
    cdef int failed(self, uint64_t seq) except -1
    cdef int _remember(self, uint64_t seq) except -1


cdef class ProducerState:
    cdef readonly uint64_t producer
    cdef readonly uint64_t high        # highest seq stored (or refused for good) here
    cdef readonly uint64_t refused_from  # a seq refused here for now; later ones wait for it
    cdef readonly uint64_t segment_low # oldest log segment holding a remembered answer's record (0: none)
    cdef uint64_t *ring                # (seq, msg_id, ts, segment) per answer, oldest first, seq ascending;
                                       # segment 0: proven by a checkpoint, not by a record
    cdef uint64_t *base                # the allocation `ring` points into (dropping the oldest moves ring)
    cdef Py_ssize_t n
    cdef Py_ssize_t cap                # entries `base` has room for

    cdef int _reset(self, uint64_t producer) except -1
    cdef Py_ssize_t _find(self, uint64_t seq) noexcept
    cdef int _insert(self, uint64_t seq, uint64_t msg_id, uint64_t ts, uint64_t segment,
                     Py_ssize_t window) except -1


cdef class ProducerTable:
    cdef dict _states                  # "user\0device" -> ProducerState
    cdef public Py_ssize_t window

    cdef ProducerState _state(self, str key, uint64_t producer)
    cdef int admit(self, str key, uint64_t producer, uint64_t seq, uint64_t *msg_id, uint64_t *ts) except -1
    cdef int stored(self, str key, uint64_t producer, uint64_t seq, uint64_t msg_id, uint64_t ts,
                    uint64_t segment) except -1
    cdef int refused(self, str key, uint64_t producer, uint64_t seq, int code, bint final) except -1
