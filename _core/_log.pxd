# The memory-mapped append log: segments and the in-memory index over them.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from ._codec cimport WriteBuffer
from ._producers cimport ProducerTable

cdef enum:
    SEGMENT_HEADER_SIZE = 64
    RECORD_HEADER_SIZE = 12      # u32 length, u32 crc, u8 type, u8 flags, u16 reserved
    RECORD_ALIGN = 8
    REC_MESSAGE = 1
    REC_CONSUME = 2
    # MESSAGE: header, u32 payload_len, u64 msg_id, u64 ts, u64 client_id, 5 id lengths
    MESSAGE_FIXED = 12 + 4 + 24 + 5
    # META: header, u8 key length, u32 value length (read only: written as REC_META_L)
    META_FIXED = 12 + 1 + 4
    REC_META = 3
    # MESSAGE_P: MESSAGE with the sender's producer id (u64) after client_id: the
    # record of an original SEND, whose client_id is the producer's seq
    REC_MESSAGE_P = 4
    MESSAGE_P_FIXED = MESSAGE_FIXED + 8
    # META_L: header, u16 key length, u32 value length (keys up to 65535 bytes)
    REC_META_L = 5
    META_L_FIXED = 12 + 2 + 4
    # META keys of the producer checkpoints (_core/_producers.pyx), then "user\0device"
    # (a str constant in _log.pyx: PRODUCER_META)
    # MESSAGE flags
    MSG_RECEIPT = 0x01            # a receipt for the inbox's user (payload: kind)
    MSG_MIRROR = 0x02             # a copy of what the user sent from another device
    MSG_GROUP = 0x04              # a member's copy of a group message (conversation = group, client id = origin)
    # CONSUME: header, u16 count, 2 id lengths
    CONSUME_FIXED = 12 + 2 + 2
    MAX_CONSUME_IDS = 4096
    NO_ROOM = -2                  # LogCore._place: a state record found no room, even in the reserve


ctypedef struct MsgView:
    uint64_t msg_id
    uint64_t ts
    uint64_t client_id
    uint64_t producer             # 0 in records that are no original SEND
    const char *recipient
    Py_ssize_t recipient_len
    const char *recipient_device
    Py_ssize_t recipient_device_len
    const char *sender
    Py_ssize_t sender_len
    const char *sender_device
    Py_ssize_t sender_device_len
    const char *conversation
    Py_ssize_t conversation_len
    uint8_t flags
    const char *payload
    Py_ssize_t payload_len


cdef int write_stored(WriteBuffer out, MsgView *m) except -1


cdef class Segment:
    cdef unsigned char *base
    cdef readonly Py_ssize_t size
    cdef readonly Py_ssize_t end          # where the next record goes (8-aligned)
    cdef readonly uint64_t segment_id
    cdef readonly uint64_t nonce
    cdef readonly uint16_t tag            # in every record of a recycled segment (0: a fresh one)
    cdef readonly int fd
    cdef public object path
    cdef public Py_ssize_t messages       # MESSAGE records held
    cdef public Py_ssize_t live           # of those, unconsumed and indexed
    cdef public uint64_t newest_ts
    cdef public bint sealed
    cdef public bint quarantined
    cdef public bint dirty                # written since the last sync was requested

    cdef uint32_t record_crc(self, Py_ssize_t off, Py_ssize_t length) noexcept nogil
    cdef bint record_valid(self, Py_ssize_t off) noexcept nogil
    cdef bint ours_but_tag(self, Py_ssize_t off) noexcept nogil
    cdef int seal_record(self, Py_ssize_t off, Py_ssize_t length) except -1


cdef class Inbox:
    cdef uint64_t *ids
    cdef uint64_t *locs
    cdef Py_ssize_t head
    cdef Py_ssize_t tail
    cdef Py_ssize_t cap
    cdef Py_ssize_t live
    cdef bint unsorted

    cdef int push(self, uint64_t msg_id, uint64_t loc) except -1
    cdef void _squeeze(self) noexcept
    cdef Py_ssize_t find(self, uint64_t msg_id) noexcept
    cdef uint64_t take(self, Py_ssize_t i) noexcept


cdef class LogCore:
    cdef dict _inboxes            # recipient -> Inbox
    cdef dict _segments           # segment id -> Segment
    cdef Segment _active
    cdef readonly uint64_t last_msg_id
    cdef public Py_ssize_t max_pending
    cdef public uint64_t ttl_ms
    cdef public bint storage_full         # the last try to make a segment failed for lack of space
    cdef public bint reserve_ok           # content may use the active segment: a reserve spare is held (AppendLog)
    cdef public object refuse_sends       # None, or why new SENDs to this shard are refused (UNAVAILABLE)
    cdef list _unrecorded                 # CONSUME chunks applied in memory, not yet written (no room)
    cdef readonly uint64_t appended
    cdef readonly uint64_t consumed
    cdef readonly uint64_t expired
    cdef readonly uint64_t unrecorded_consumes
    cdef readonly Py_ssize_t pending_total
    cdef public ProducerTable producers   # idempotent-send state of this shard (rebuilt on recovery)

    cdef public Py_ssize_t keep_for_compaction   # state records leave this in a reserve in use
    cdef bint _fits(self, Segment a, Py_ssize_t need, bint content, bint copy) noexcept
    cdef Py_ssize_t _place(self, Py_ssize_t length, bint content, bint copy=*) except -1
    cdef str _meta_key_at(self, const unsigned char *r)
    cdef Inbox _live_inbox(self, const unsigned char *r, uint32_t length, uint64_t here, MsgView *m,
                           Py_ssize_t *index)
    cdef int make_message_room(self, Py_ssize_t records, Py_ssize_t payload_len) except -1
    cdef int consume_wire(self, str recipient, str device, const unsigned char *ids, Py_ssize_t count,
                          uint64_t *locs, Py_ssize_t *found) except -1
    cdef int read_view(self, uint64_t loc, MsgView *m) except -1
    cdef int _record_consume_ids(self, str recipient, str device, const uint64_t *ids, Py_ssize_t n) except -1
    cdef Py_ssize_t _write_message(self, const char *rp, Py_ssize_t rl, const char *rdp, Py_ssize_t rdl,
                                   uint64_t msg_id, uint64_t ts, uint64_t client_id, uint64_t producer,
                                   const char *sp, Py_ssize_t sl, const char *sdp, Py_ssize_t sdl,
                                   const char *cp, Py_ssize_t cl, uint8_t flags,
                                   const char *payload, Py_ssize_t n) except -1
    cdef Inbox _inbox(self, str recipient, bint create)
    cdef int append_message(self, str recipient, str device, uint64_t msg_id, uint64_t ts, uint64_t client_id,
                            str sender, str sender_device, str conversation, uint8_t flags,
                            const char *payload, Py_ssize_t n, uint64_t producer=*) except -1
    cdef int _record_consume(self, str recipient, str device, list removed) except -1
    cdef list _pending_locs(self, str recipient, str device)
    cdef int write_pending(self, WriteBuffer out, str recipient, str device, uint64_t now_ms,
                           uint64_t min_id, Py_ssize_t max_bytes, uint64_t *rest) except -1
    cdef dict _meta               # key -> location of its latest META record (other than devices')
    cdef dict _devmeta            # user -> location of its device's record, or a tuple of them
    cdef int _meta_set(self, str key, uint64_t loc, bint tombstone, str user=*) except -1
    cdef object _meta_loc(self, str key)
    cdef object _dev_swap(self, str user, str key, object loc)
    cdef bint _record_has_key(self, uint64_t loc, str key) except -1
    cdef const unsigned char *_record(self, uint64_t loc) except NULL
    cdef int _dropped(self, uint64_t loc) except -1
    cdef int _forget_if_empty(self, str recipient, Inbox inbox) except -1
    cdef int _sort_inbox(self, Inbox inbox) except -1
    cdef int _recover_message(self, Segment seg, Py_ssize_t off, MsgView *m, uint64_t now_ms,
                              dict dedup, Py_ssize_t dedup_window) except -1


cdef class CopyWindow:
    cdef uint64_t *ring           # the group message ids copied, ascending (oldest dropped first)
    cdef uint64_t *base           # the allocation `ring` points into
    cdef Py_ssize_t n
    cdef Py_ssize_t cap

    cdef Py_ssize_t _lower(self, uint64_t origin) noexcept
    cdef bint has(self, uint64_t origin) noexcept
    cdef int add(self, uint64_t origin, Py_ssize_t window) except -1


cdef CopyWindow copy_window(dict copies, str group, str member)
