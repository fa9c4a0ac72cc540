from libc.stdint cimport uint8_t, uint32_t, uint64_t
from ._codec cimport FrameSink, WriteBuffer
from ._log cimport LogCore
from ._producers cimport SendState, ProducerTable
from ._shards cimport ShardMap


cdef class RouteCore
cdef class LinkCore


cdef class SessionCore(FrameSink):
    # A million of these on a dense gateway: the 4-byte fields are declared together
    # (Cython keeps the order), so no padding follows each one (16 B a session).
    cdef readonly str user
    cdef readonly str device
    cdef readonly uint64_t session_id
    cdef WriteBuffer _out        # this loop turn's output; None while there is none (`_wbuf`)
    cdef object _transport       # write(bytes) and close(): the gateway's transport, or the embedder's pair
    cdef RouteCore _core
    cdef public uint64_t producer             # whose sequence this session's SEND seqs continue
    cdef SendState _send         # this device's stream state; None until its first SEND
    cdef public Py_ssize_t forwards_pending   # SENDs forwarded to other workers, not yet answered
    cdef object _deferred_error               # a fatal ERROR waiting for those answers
    # slow consumer: while paused, live DELIVERs/RECEIPTs stay in the log only; the
    # first one skipped is remembered and the resume writes from it (docs/limits.md)
    cdef public uint64_t skip_from
    cdef public bint paused
    cdef readonly bint closed
    cdef bint _fresh_producer                 # handed out in this session's WELCOME: its seqs start at 1
    cdef bint _queued            # already in the core's flush list this loop turn
    cdef bint _close_after_flush
    cdef public bint send_only                # sends only: gets no DELIVERs, is no registered device
    # message rate token bucket (RouteCore.msg_rate): tokens and when they were counted (ms, wraps)
    cdef float _rl_tokens
    cdef uint32_t _rl_stamp

    cdef WriteBuffer _wbuf(self)
    cdef bytes _take(self)
    cdef int _mark(self) except -1
    cdef int forward_done(self) except -1
    cdef int _release(self, bytes data, bint close) except -1


cdef enum:
    # inter-worker frames (the bus), in the same framing as the client protocol
    LT_FWD = 0x41
    LT_FWD_ACK = 0x42
    LT_FWD_ERR = 0x43
    LT_HANDOFF = 0x44
    LT_LINK_HELLO = 0x45
    LT_RCPT = 0x46
    LT_CTRL = 0x47
    LT_HANDOFF_WS = 0x48
    LT_LAST = 0x48
    FWD_DUPLICATE = 0x01         # FWD_ACK flag: a retry the owner had stored (no mirror again)
    # RouteCore._store_send outcomes besides an ErrorCode (those are >= 20)
    STORED = 0
    DUPLICATE = 1
    RECEIPT_DELIVERED = 1
    RECEIPT_READ = 2
    # routing latency histogram (SEND decoded -> ACK queued): bucket bounds in _routing.pyx
    LAT_BUCKETS = 18


cdef class RouteCore:
    cdef dict _sessions          # user -> its SessionCore, or a list of them (several devices online)
    cdef dict _dedup_tables      # group -> member -> CopyWindow (_log.pyx): group copies made
    cdef dict _send_states       # "user\0device" -> SendState of this worker's devices (survives reconnects)
    cdef dict _early_holds       # shard -> {key: (producer, seq, code, mono ns)}: refused before its log came
    cdef list _dirty
    cdef bint _flush_scheduled
    cdef object _loop
    cdef readonly object store
    cdef LogCore _log            # the store, when it is the Cython log: appends skip Python
    cdef object _log_for
    # the hit path of the store's log_for(user) without a Python call: its shard map and its
    # live dict shard -> writable log (a miss, or a shard moving, takes _log_for)
    cdef ShardMap _map
    cdef dict _writers
    cdef uint64_t _last_id
    cdef uint64_t _gen_field
    cdef uint64_t _gen_mask
    cdef uint64_t _seq_mask
    cdef public Py_ssize_t max_payload
    cdef public Py_ssize_t dedup_window
    cdef readonly uint64_t messages_routed
    cdef readonly uint64_t messages_delivered_live
    cdef readonly uint64_t duplicates_dropped
    cdef readonly uint64_t out_of_order       # SENDs refused OUT_OF_ORDER (resend in order)
    cdef readonly uint64_t forwarded
    cdef readonly uint64_t quota_skipped
    cdef readonly uint64_t receipts_sent
    cdef readonly uint64_t receipts_lost
    cdef readonly uint64_t receipts_fenced     # from another node for a user whose shard we do not own
    cdef readonly uint64_t forwards_fenced     # FWDs from another node refused: not our shard at its map epoch
    cdef public double msg_rate           # SENDs per second per session (0: no limit)
    cdef public double msg_burst          # bucket size
    cdef readonly uint64_t rate_limited   # SENDs answered RATE_LIMITED
    cdef readonly uint64_t deferred       # live pushes left in the log for a paused session
    cdef readonly uint64_t messages_in            # SENDs decoded from this worker's sessions
    cdef readonly dict errors_sent                # non-fatal ERROR frames sent to sessions, by code name
    cdef uint64_t _lat_counts[LAT_BUCKETS + 1]    # per bucket (not cumulative); the last is +Inf
    cdef uint64_t _lat_sum_ns
    cdef dict _devices           # user -> tuple of registered devices (this worker's users)
    cdef public object _control  # Python policy for presence, typing, privacy frames
    cdef public object _receipt_later    # receipts whose user's worker is down: retried
    cdef public object _group_send       # a SEND to a group this worker owns (router/groups.py)
    cdef public object _fwd_settled      # called with a session whose forwarded SENDs are all answered
    cdef bint _has_devices
    cdef dict _pending_fwd       # seq -> (sender session, client id, link)
    cdef uint64_t _fwd_seq
    cdef object _link_to
    cdef object _owner_of
    cdef object _is_local_fn
    cdef ShardMap _local_map     # when _is_local_fn is a ShardMap's is_local: called in C

    cdef uint64_t _next_id(self, uint64_t now_ms)
    cdef int route(self, SessionCore sender, uint64_t seq, const char *to, Py_ssize_t to_len,
                   const char *payload, Py_ssize_t n) except -1
    cdef int route_remote(self, SessionCore sender, uint64_t seq, str recipient,
                          const char *payload, Py_ssize_t n, uint64_t t0=*) except -1
    cdef int acked(self, SessionCore sender, uint64_t seq, uint64_t msg_id, uint64_t ts) except -1
    cdef SendState _send_state_of(self, SessionCore s)
    cdef int _hold_later_seqs(self, str key, uint64_t producer, uint64_t seq, str recipient, int code) except -1
    cdef int _hold_early(self, object shard, str key, uint64_t producer, uint64_t seq, int code) except -1
    cdef int _store_send(self, str user, str device, uint64_t producer, uint64_t seq, str recipient,
                         const char *payload, Py_ssize_t n, uint64_t *msg_id, uint64_t *ts,
                         str key=*) except -1
    cdef str _refusal            # why the last _store_send refused its SEND (for the ERROR)
    cdef int _room_for(self, str recipient, Py_ssize_t records, Py_ssize_t n, LogCore log=*) except -1
    cdef int append_deliver(self, str sender, str sender_device, uint64_t client_id, str recipient,
                            const char *payload, Py_ssize_t n, uint64_t *msg_id, uint64_t *ts,
                            uint64_t producer=*, LogCore log=*) except -1
    cdef tuple devices_of(self, str user)
    cdef int _store(self, str recipient, str device, uint64_t msg_id, uint64_t ts, uint64_t ref,
                    str sender, str sender_device, str conversation, uint8_t flags,
                    const char *payload, Py_ssize_t n, uint64_t producer=*, LogCore log=*) except -1
    cdef int mirror(self, SessionCore sender, str recipient, uint64_t origin, const char *payload,
                    Py_ssize_t n) except -1
    cdef int accept_forward(self, LinkCore link, uint64_t fwd_seq, str sender, str device, uint64_t producer,
                            uint64_t seq, str recipient, const char *payload, Py_ssize_t n) except -1
    cdef int forward_answered(self, uint64_t fwd_seq, int code, str reason, uint64_t msg_id, uint64_t ts,
                              bint duplicate) except -1
    cdef bint _is_local(self, str recipient) except -1
    cdef bint _group_copy(self, str member, uint64_t origin, uint64_t ts, str sender, str sender_device,
                          str group, bytes payload) except -1
    cdef LogCore _log_of(self, str user)
    cdef int _receipt(self, str target, unsigned char kind, uint64_t ref, str by, str by_device) except -1
    cdef int received(self, SessionCore session, const unsigned char *ids, Py_ssize_t count) except -1
    cdef int _schedule(self, SessionCore s) except -1
    cdef void _observe(self, uint64_t t0) noexcept


cdef class LinkCore(SessionCore):
    cdef readonly int peer
    cdef object _control
    # a link to another node: callable(recipient) -> 0, or the ErrorCode a FWD or receipt
    # for that recipient is refused with (this node does not own its shard at the sender's
    # map epoch: gateway/cluster/natsbus.py); None between the workers of one node
    cdef public object fence
    cdef readonly Py_ssize_t pending      # our FWDs on this link not yet answered
    cdef readonly uint64_t generation     # bumped by discard_output: output taken before it is never written
