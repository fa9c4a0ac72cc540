"""The routing hot path: from a decoded SEND to DELIVER bytes in the recipient's
output buffer, and the ACK in the sender's, flushed once per loop turn.

Policy (opening sessions, limits, what an embedder sees) lives in `router/`;
this module is the part that runs per message.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.stdint cimport uint16_t
from posix.time cimport clock_gettime, timespec, CLOCK_REALTIME, CLOCK_MONOTONIC

from cpython.unicode cimport PyUnicode_AsUTF8
from ._codec cimport (Cursor, cur_u8, cur_u64, cur_u16, cur_bytes8, cur_done, cur_str16, sb_load64, sb_utf8_valid,
                      FT_READ,
                      FT_SUBSCRIBE, FT_TYPING, FT_PRIVACY, FT_GROUP, FLAG_GROUP,
                      FT_SEND, FT_RECEIVED, FT_PING, FT_PONG, FT_GOAWAY, MAX_RECEIVED_IDS,
                      SWITCHBOARD_DEBUG)
from ._codec import encode_into
from ._log import merge_copies, forget_copies
import os
from .errors import UnexpectedFrame, MalformedFrame, StoreError
from .ids import id_problem, is_user_id
from ._log cimport LogCore, MsgView, MSG_MIRROR, MSG_RECEIPT, MSG_GROUP, CopyWindow, copy_window
from ._shards cimport ShardMap
from ._producers cimport (SendState, ProducerTable, ProducerState, ADMIT_NEW, ADMIT_DUPLICATE, ADMIT_FENCED,
                          ADMIT_OUT_OF_ORDER)
from .protocol import ErrorCode, FrameType

_ERROR_NAMES = {int(c): c.name for c in ErrorCode}
#: a single gateway's ids: worker << 16 (6 bits of generator, 16 of sequence)
WORKER_BITS = 6
#: group copies remembered per (group, member), so a fan-out retried after a restart makes none twice
cdef Py_ssize_t COPY_WINDOW = 4096
#: refusals remembered per shard whose log is not here yet, and for how long (a move or
#: takeover lands within seconds; anything older is no pipelined SEND's business)
cdef Py_ssize_t EARLY_HOLDS_MAX = 65536
cdef uint64_t EARLY_HOLD_NS = 60_000_000_000


cdef inline uint64_t _now_ms() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <uint64_t>ts.tv_sec * 1000 + <uint64_t>(ts.tv_nsec // 1000000)


cdef inline uint64_t _mono_ns() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec


#: upper bounds (seconds) of the routing latency histogram's buckets (Prometheus `le`)
LATENCY_BOUNDS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
                  0.1, 0.25, 0.5, 1.0, 2.5)
cdef uint64_t _LAT_NS[LAT_BUCKETS]
for _i, _b in enumerate(LATENCY_BOUNDS):
    _LAT_NS[_i] = <uint64_t>round(_b * 1e9)
assert len(LATENCY_BOUNDS) == LAT_BUCKETS


def now_ms():
    """Wall-clock milliseconds, as the router stamps messages."""
    return _now_ms()


cdef inline uint32_t _mono_ms() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint32_t>(<uint64_t>ts.tv_sec * 1000 + <uint64_t>(ts.tv_nsec // 1000000))


cdef inline bint _final(int code) noexcept:
    """A SEND refused with `code` is refused for good: the client reports it and
    never sends that seq again. Any other refusal is resent, in order."""
    return (code == ErrorCode.PAYLOAD_TOO_LARGE or code == ErrorCode.BAD_RECIPIENT
            or code == ErrorCode.QUOTA_EXCEEDED or code == ErrorCode.NOT_A_MEMBER
            or code == ErrorCode.NO_SUCH_GROUP or code == ErrorCode.FENCED)


cdef inline bint _take_token(SessionCore s, double rate, double burst) noexcept:
    """Token bucket per session: refill by elapsed time, take one if there is one."""
    cdef uint32_t now = _mono_ms()
    cdef double tokens
    if s._rl_stamp == 0:
        tokens = burst                              # first SEND: a full bucket
    else:
        tokens = s._rl_tokens + <double>(now - s._rl_stamp) * rate / 1000.0   # u32 difference: wraps right
        if tokens > burst:
            tokens = burst
    s._rl_stamp = now if now != 0 else 1
    if tokens < 1.0:
        s._rl_tokens = <float>tokens
        return False
    s._rl_tokens = <float>(tokens - 1.0)
    return True


cdef inline bint _legal_id(const char *p, Py_ssize_t n) except -1:
    """The id rule (_core/ids.py) for a SEND recipient, in C for printable ASCII
    (0x21..0x7e: legal as it is); other bytes go to `id_problem`. Bytes that are
    not UTF-8 pass here: decoding them is the caller's MALFORMED_FRAME."""
    cdef Py_ssize_t i
    cdef unsigned char b
    cdef bint ascii = True
    for i in range(n):
        b = <unsigned char>p[i]
        if b >= 0x80:
            ascii = False
        elif b <= 0x20 or b == 0x7f:
            return False
    if ascii:
        return True
    try:
        text = PyUnicode_DecodeUTF8(p, n, NULL)
    except UnicodeDecodeError:
        return True
    return id_problem(text) is None


cdef inline bint _defer(RouteCore core, SessionCore s, uint64_t msg_id) noexcept:
    """A paused (slow) session: leave this entry in the log, remember where the gap starts."""
    if not s.paused:
        return False
    if s.skip_from == 0:
        s.skip_from = msg_id
    core.deferred += 1
    return True


cdef inline object _online(object online):
    """A `_sessions` value as a sequence: one session is stored bare (a list per
    user would cost ~100 bytes per connected user), several as a list."""
    return <list>online if type(online) is list else (online,)


cdef class _WriteClose:
    """A session's output as a `write(bytes)` and a `close()` callable, for an embedder
    that passes those instead of a transport."""
    cdef object _w, _c

    def __init__(self, write, close):
        self._w, self._c = write, close

    def write(self, data):
        self._w(data)

    def close(self):
        self._c()

    def get_protocol(self):
        return None


cdef class SessionCore(FrameSink):
    """One authenticated device as the router sees it: this loop turn's output and
    the object it is written to and closed with (a transport). No sockets here."""

    def __init__(self, RouteCore core, str user, str device, uint64_t session_id, write, close,
                 transport=None):
        self._core = core
        self.user = user
        self.device = device
        self.session_id = session_id
        self._out = None
        # one object with write() and close(): the transport itself (no bound methods kept
        # per session), or the write and close callables given, wrapped once
        self._transport = transport if transport is not None else _WriteClose(write, close)
        self.closed = False
        self._queued = False
        self._close_after_flush = False
        self.producer = 0
        self._fresh_producer = False
        self._send = None
        self.send_only = False
        self.forwards_pending = 0
        self._deferred_error = None
        self.paused = False
        self.skip_from = 0
        self._rl_stamp = 0

    cdef int on_frame(self, uint8_t ftype, uint8_t flags, const unsigned char *body, Py_ssize_t n) except -1:
        cdef Cursor c
        cdef uint64_t client_id
        cdef uint16_t count
        cdef const char *to
        cdef Py_ssize_t to_len, i
        if self.send_only and ftype == FT_RECEIVED:
            raise UnexpectedFrame("a send-only session receives nothing to acknowledge")
        if self.closed or self._close_after_flush or self._deferred_error is not None:
            return 0        # going away: nothing more is read from this session
        c.p = body
        c.end = body + n
        if ftype == FT_SEND:
            cur_u64(&c, &client_id)
            cur_bytes8(&c, &to, &to_len, 1)
            if not sb_utf8_valid(<const unsigned char *>to, to_len):
                raise MalformedFrame("SEND recipient is not UTF-8")   # a body check: before any answer to it
            return self._core.route(self, client_id, to, to_len, <const char *>c.p, c.end - c.p)
        if ftype == FT_RECEIVED:
            cur_u16(&c, &count)
            if count > MAX_RECEIVED_IDS:
                raise MalformedFrame("too many ids in RECEIVED")
            if c.end - c.p != 8 * <Py_ssize_t>count:
                raise MalformedFrame("RECEIVED length does not match its count")
            return self._core.received(self, c.p, count)
        if ftype == FT_PING:
            cur_u64(&c, &client_id)
            cur_done(&c)
            self._wbuf().write_u64_frame(FT_PONG, client_id)
            return self._mark()
        if ftype == FT_PONG:
            cur_u64(&c, &client_id)
            return cur_done(&c)              # checked like any body, then ignored
        if FT_SUBSCRIBE <= ftype <= FT_TYPING or ftype == FT_PRIVACY or ftype == FT_GROUP:
            if self._core._control is None:
                raise UnexpectedFrame(f"{FrameType(ftype).name} is not supported by this server")
            self._core._control(self, ftype, PyBytes_FromStringAndSize(<const char *>body, n))
            return 0
        if ftype == FT_READ:
            cur_bytes8(&c, &to, &to_len, 1)
            try:
                peer = PyUnicode_DecodeUTF8(to, to_len, NULL)
            except UnicodeDecodeError:
                raise MalformedFrame("READ peer is not UTF-8") from None
            cur_u16(&c, &count)
            if count > MAX_RECEIVED_IDS or c.end - c.p != 8 * <Py_ssize_t>count:
                raise MalformedFrame("READ length does not match its count")
            if not is_user_id(peer):
                return 0          # no user can have sent these: no receipt is stored for nobody
            for i in range(count):
                self._core._receipt(peer, RECEIPT_READ, sb_load64(c.p + 8 * i), self.user, self.device)
            return 0
        raise UnexpectedFrame(f"{FrameType(ftype).name} is not valid after WELCOME")

    def __call__(self, int ftype, int flags, body):
        """Python sink entry (used with the pure-Python decoder)."""
        cdef Py_buffer view
        PyObject_GetBuffer(body, &view, PyBUF_SIMPLE)
        try:
            self.on_frame(<uint8_t>ftype, <uint8_t>flags, <const unsigned char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef int forward_done(self) except -1:
        self.forwards_pending -= 1
        if self.forwards_pending == 0 and self._deferred_error is not None:
            code, reason, ref = self._deferred_error
            self._deferred_error = None
            self.error(code, reason, ref, True)
        return 0

    cdef WriteBuffer _wbuf(self):
        """The output buffer, made on the first write of a loop turn: an idle session
        holds none (a buffer object per session was 48 B of each idle one)."""
        if self._out is None:
            self._out = WriteBuffer()
        return self._out

    cdef bytes _take(self):
        """This turn's output as bytes (None if none); the buffer goes with it."""
        cdef WriteBuffer out = self._out
        if out is None:
            return None
        self._out = None
        return out.take_bytes() if out.length else None

    @property
    def out(self):
        """The output buffer, for writing into directly (then `wake()`)."""
        return self._wbuf()

    @property
    def transport(self):
        """What the session writes to and closes (the gateway's transport; its
        get_protocol() is the connection, so the gateway keeps no set of them)."""
        return self._transport

    cdef int _mark(self) except -1:
        if not self._queued:
            self._queued = True
            self._core._schedule(self)
        return 0

    def wake(self):
        """Output was written into `out` directly: flush it this loop turn."""
        if self._out is not None and self._out.length:
            self._mark()

    def write_frame(self, frame):
        """Queue any protocol frame (a `_core.frames` object) for the next flush."""
        if not self.closed:
            encode_into(self._wbuf(), frame)
            self._mark()

    def error(self, int code, str reason, uint64_t ref=0, bint fatal=False):
        """Queue an ERROR; a fatal one closes the session after the flush (after the
        ACKs of SENDs still being stored on other workers, so none is lost)."""
        if self.closed:
            return
        if fatal and self.forwards_pending > 0:
            self._deferred_error = (code, reason, ref)
            return
        if not fatal:         # counted by name for the metrics (a dict lookup: quota floods stay cheap)
            name = _ERROR_NAMES.get(code) or str(code)
            self._core.errors_sent[name] = self._core.errors_sent.get(name, 0) + 1
        self._wbuf().write_error(code, ref, reason, fatal)
        if fatal:
            self._close_after_flush = True
        self._mark()

    def goaway(self, int code, int reconnect_ms, str reason):
        """Queue a GOAWAY and close after the flush."""
        if self.closed:
            return
        from . import frames
        encode_into(self._wbuf(), frames.Goaway(code, reconnect_ms, reason))
        self._close_after_flush = True
        self._mark()

    def flush(self):
        """Write what is buffered now, bypassing the store's commit (no ACKs may be pending)."""
        self._release(self._take(), self._close_after_flush)

    cdef int _release(self, bytes data, bint close) except -1:
        if self.closed:
            return 0
        if data is not None:
            self._transport.write(data)
        if close:
            self.closed = True
            self._transport.close()
        return 0

    def _detach(self):
        self.closed = True

    @property
    def pending_output(self):
        return self._out.length if self._out is not None else 0

    def __repr__(self):
        return f"<Session {self.user}/{self.device} #{self.session_id}>"


cdef class RouteCore:
    """Sessions by user, the store hand-off, and the per-loop-turn flush."""

    def __init__(self, store, *, loop=None, Py_ssize_t max_payload=64512, Py_ssize_t dedup_window=4096):
        self._sessions = {}
        # group copies made per member; a durable store hands back what it recovered
        self._dedup_tables = {}
        merge_copies(self._dedup_tables, getattr(store, "recovered_dedup", None) or {}, COPY_WINDOW)
        self._send_states = {}
        self._early_holds = {}
        self._log = store if isinstance(store, LogCore) else None
        self._pending_fwd = {}
        # FWD numbers start anywhere in 2^62, not at 0: a node's answers travel over NATS,
        # which has no connection to end with a restarted worker, so an answer to the
        # previous life's FWD n must never match this life's FWD n (it would ACK the
        # wrong SEND)
        self._fwd_seq = int.from_bytes(os.urandom(8), "big") >> 2
        self._devices = {}
        self._has_devices = hasattr(store, "devices_of")
        self._control = None
        self._receipt_later = None
        self._group_send = None
        self._link_to = None
        self._owner_of = None
        self._is_local_fn = None
        self._log_for = getattr(store, "log_for", None)
        shard_map = getattr(store, "map", None)
        if self._log_for is not None and isinstance(shard_map, ShardMap) and hasattr(store, "writers"):
            self._map = <ShardMap>shard_map
            self._writers = store.writers
        self._fwd_settled = None
        self._dirty = []
        self._flush_scheduled = False
        self._loop = loop
        self.errors_sent = {}
        self.store = store
        self._last_id = store.last_id()
        self.set_worker(0)
        self.max_payload = max_payload
        self.dedup_window = dedup_window

    cdef uint64_t _next_id(self, uint64_t now_ms):
        # ms timestamp << 22 | generator | sequence: unique across the generators (the
        # workers; in a cluster every worker of every node), increasing per generator,
        # readable as a time. The smallest id above the last one with our generator bits:
        # the last id may be another generator's (raised from an adopted shard's log).
        cdef uint64_t candidate = (now_ms << 22) | self._gen_field
        cdef uint64_t last = self._last_id
        if candidate <= last:
            candidate = ((last >> 22) << 22) | self._gen_field
            if candidate <= last:
                if (last & self._gen_mask) == self._gen_field and (last & self._seq_mask) != self._seq_mask:
                    candidate = last + 1
                else:                         # the sequence of this ms is used up: borrow the next ms
                    candidate = (((last >> 22) + 1) << 22) | self._gen_field
        self._last_id = candidate
        return candidate

    def set_worker(self, int worker):
        """A single gateway: the worker index (0..63) is the generator, 16 bits of sequence."""
        self.set_generator(worker & 0x3F, WORKER_BITS)

    def set_generator(self, unsigned int generator, unsigned int bits):
        """Ids carry `generator` in `bits` bits below the timestamp, and a sequence in the
        22 - bits below it (gateway/cluster/idgen.py: a number claimed per cluster worker)."""
        if not 1 <= bits <= 16 or generator >= (1u << bits):
            raise ValueError(f"generator {generator} does not fit in {bits} bits (1..16)")
        self._seq_mask = (1u << (22 - bits)) - 1
        self._gen_mask = ((1u << 22) - 1) & ~self._seq_mask
        self._gen_field = (<uint64_t>generator) << (22 - bits)

    cdef int route(self, SessionCore sender, uint64_t seq, const char *to, Py_ssize_t to_len,
                   const char *payload, Py_ssize_t n) except -1:
        """A SEND from a local session: store and deliver here, or forward it to
        the worker owning the recipient's shard (which ACKs once it is stored).
        `seq` orders and deduplicates it (`_core/_producers.pyx`)."""
        cdef uint64_t msg_id = 0, ts = 0
        cdef uint64_t t0 = _mono_ns()
        cdef SendState st = sender._send if sender._send is not None else self._send_state_of(sender)
        cdef int outcome, code
        cdef str recipient
        self.messages_in += 1
        if seq == 0:
            raise MalformedFrame("SEND seq 0: a producer's seqs start at 1")
        if st.check(seq) == ADMIT_OUT_OF_ORDER:
            self.out_of_order += 1
            sender.error(ErrorCode.OUT_OF_ORDER, f"seq {seq} is out of order: resend from seq "
                         f"{st.resume_at if st.resume_at else st.max_seen + 1}, in order", seq, False)
            return 0
        if self.msg_rate > 0 and not _take_token(sender, self.msg_rate, self.msg_burst):
            self.rate_limited += 1
            st.failed(seq)
            sender.error(ErrorCode.RATE_LIMITED, f"over {self.msg_rate:g} messages/s; retry later",
                         seq, False)
            return 0
        if n > self.max_payload:
            sender.error(ErrorCode.PAYLOAD_TOO_LARGE,
                         f"payload of {n} bytes exceeds the limit of {self.max_payload}", seq, False)
            return 0
        if not _legal_id(to, to_len):
            sender.error(ErrorCode.BAD_RECIPIENT, "the recipient is not a legal user or group id "
                         "(docs/PROTOCOL.md section 1, Ids)", seq, False)
            return 0
        try:
            recipient = PyUnicode_DecodeUTF8(to, to_len, NULL)
        except UnicodeDecodeError:
            raise MalformedFrame("recipient is not UTF-8") from None
        if not self._is_local(recipient):
            return self.route_remote(sender, seq, recipient, payload, n, t0)
        outcome = self._store_send(sender.user, sender.device, sender.producer, seq, recipient,
                                   payload, n, &msg_id, &ts, sender._send.key)
        if outcome == STORED and not (to_len and to[0] == 35 and self._group_send is not None):
            self.mirror(sender, recipient, msg_id, payload, n)
        if outcome == STORED or (outcome == DUPLICATE and not (msg_id == 0 and ts != 0)):
            self.acked(sender, seq, msg_id, ts)     # a retry gets its original ACK, nothing more
            self._observe(t0)
            return 0
        code = <int>ts if outcome == DUPLICATE else outcome
        if not _final(code):
            st.failed(seq)                          # hold the later seqs until this one comes again
        if code == ErrorCode.OUT_OF_ORDER:
            self.out_of_order += 1
        sender.error(code, self._refusal, seq, False)
        return 0

    cdef int _store_send(self, str user, str device, uint64_t producer, uint64_t seq, str recipient,
                         const char *payload, Py_ssize_t n, uint64_t *msg_id, uint64_t *ts,
                         str key=None) except -1:
        """A SEND at the shard that owns its recipient (this worker), from a local
        session or a FWD: checked against the shard's producer table, then stored
        and delivered. Returns STORED, DUPLICATE (`msg_id`/`ts`: the original
        answer; msg_id 0 with ts != 0: refused for good before, with code ts) or
        the ErrorCode it is refused with (the reason in `_refusal`)."""
        cdef LogCore log = self._log
        cdef ProducerTable table
        cdef uint64_t seg = 0
        cdef int admit, code
        if self._log_for is not None:
            try:                                             # the one look-up of the shard per SEND
                log = self._log_of(recipient)
            except StoreError as exc:    # the shard is moving (UNAVAILABLE): retried
                self._refusal = str(exc)
                self._hold_later_seqs(key if key is not None else user + "\x00" + device, producer, seq,
                                      recipient, exc.code)
                return exc.code
        table = log.producers if log is not None else <ProducerTable>self.store.producers
        if key is None:
            key = user + "\x00" + device
        if log is not None and log.refuse_sends is not None:
            # too few copies and no node for another: refused, a retry of something stored too (its ACK
            # would say R copies hold it); later seqs wait for this one, as for any refusal
            self._refusal = <str>log.refuse_sends
            st = table.get(key)
            if st is None or seq > (<ProducerState>st).high:
                table.refused(key, producer, seq, ErrorCode.UNAVAILABLE, False)
            return ErrorCode.UNAVAILABLE
        admit = table.admit(key, producer, seq, msg_id, ts)
        if admit == ADMIT_DUPLICATE:
            if msg_id[0] == 0 and ts[0] == 0:    # rare: a retry older than the window (its ACK carries id 0)
                _duplicate_without_answer(key, seq, producer, table.get(key), recipient)
            self.duplicates_dropped += 1
            self._refusal = "this SEND was refused before"
            return DUPLICATE
        if admit == ADMIT_FENCED:
            self._refusal = f"a newer producer of {device} took over its sequence"
            return ErrorCode.FENCED
        if admit == ADMIT_OUT_OF_ORDER:
            self._refusal = "an earlier seq of this device was refused here; resend from it, in order"
            return ErrorCode.OUT_OF_ORDER
        if log is not None and log._active is not None:
            seg = log._active.segment_id     # the record lands here or later: a checkpoint before this goes covers it
        try:
            if recipient.startswith("#") and self._group_send is not None:
                msg_id[0], ts[0] = self._group_send(user, device, seq, recipient,
                                                    PyBytes_FromStringAndSize(payload, n), producer)
            else:
                self.append_deliver(user, device, seq, recipient, payload, n, msg_id, ts, producer, log)
        except StoreError as exc:
            code = exc.code
            table.refused(key, producer, seq, code, _final(code))
            self._refusal = str(exc)
            return code
        if seg == 0 and log is not None:
            seg = log._active.segment_id
        table.stored(key, producer, seq, msg_id[0], ts[0], seg)
        return STORED

    cdef int _hold_later_seqs(self, str key, uint64_t producer, uint64_t seq, str recipient, int code) except -1:
        """A SEND refused before its shard's producer table saw it (a fence, a shard
        moving): if that shard's log is here, the table holds the device's later seqs
        (OUT_OF_ORDER) until this one comes again. Else a later seq pipelined behind
        it, arriving once the shard serves again, would be stored first, and this
        one's resend answered as a duplicate of something never stored."""
        cdef ProducerTable table
        logs = getattr(self.store, "logs", None)
        if logs is None:
            return 0
        shard = self.store.map.shard(recipient)
        lg = logs.get(shard)
        if lg is None:
            self._hold_early(shard, key, producer, seq, code)
            return 0
        table = (<LogCore>lg).producers
        st = table.get(key)
        if st is None or seq > st.high:          # a retry of something stored is no gap
            table.refused(key, producer, seq, code, False)
        return 0

    cdef int _hold_early(self, object shard, str key, uint64_t producer, uint64_t seq, int code) except -1:
        """A SEND refused for a shard whose log is not here (yet): a shard on its way
        to this worker (a move, a takeover) may arrive before the SENDs pipelined
        behind this one on the same link. `shard_log_arrived` makes its table hold
        them, as if it had refused this one itself."""
        cdef uint64_t now = _mono_ns()
        holds = self._early_holds.get(shard)
        if holds is None:
            holds = self._early_holds[shard] = {}
        elif len(<dict>holds) >= EARLY_HOLDS_MAX:
            for k in [k for k, v in (<dict>holds).items() if now - <uint64_t>(<tuple>v)[3] > EARLY_HOLD_NS]:
                del holds[k]
            if len(<dict>holds) >= EARLY_HOLDS_MAX:
                return 0
        prev = (<dict>holds).get(key)
        if prev is None or <uint64_t>(<tuple>prev)[0] < producer or (
                <uint64_t>(<tuple>prev)[0] == producer and seq < <uint64_t>(<tuple>prev)[1]):
            holds[key] = (producer, seq, code, now)
        return 0

    def shard_log_arrived(self, shard, ProducerTable table):
        """The log of `shard` is here now: its producer table holds the later seqs of
        every device one of whose SENDs this worker refused for it before (within
        EARLY_HOLD_NS, and not stored since): OUT_OF_ORDER until that one comes
        again, so a resend of it is never taken for a retry of something stored."""
        cdef uint64_t now = _mono_ns()
        holds = self._early_holds.pop(shard, None)
        if not holds:
            return 0
        n = 0
        for key, (producer, seq, code, at) in (<dict>holds).items():
            if now - <uint64_t>at > EARLY_HOLD_NS:
                continue
            st = table.get(key)
            if st is None or seq > (<ProducerState>st).high:
                table.refused(key, producer, seq, code, False)
                n += 1
        return n

    cdef SendState _send_state_of(self, SessionCore s):
        """The device's stream state, made at its first SEND (an idle session costs
        none) and kept across reconnects; a newer producer replaces it."""
        key = s.user + "\x00" + s.device
        st = self._send_states.get(key)
        if st is None or (<SendState>st).producer < s.producer:
            st = SendState(key, s.producer, s._fresh_producer)
            self._send_states[key] = st
        s._send = <SendState>st
        return <SendState>st

    def bind_producer(self, SessionCore s, uint64_t producer):
        """At HELLO: the producer this session sends as — the client's (it continues
        that sequence), or a new one if it gave 0. Returns it (for WELCOME), or
        raises FencedError if a newer producer of this device is already known."""
        if producer == 0:
            producer = self._next_id(_now_ms())     # unique and increasing: newer producers are larger
            s._fresh_producer = True
        else:
            st = self._send_states.get(s.user + "\x00" + s.device)
            if st is not None and (<SendState>st).producer > producer:
                from .errors import ProtocolError
                raise ProtocolError(f"producer {producer} of {s.device} was replaced by a newer one; "
                                    "start a new sequence (HELLO producer 0)", ErrorCode.FENCED)
        s.producer = producer
        return producer

    cdef void _observe(self, uint64_t t0) noexcept:
        """One routing latency sample: a bucket index found by a short scan (most
        samples land in the first few buckets) and two additions."""
        cdef uint64_t d = _mono_ns() - t0
        cdef int i = 0
        while i < LAT_BUCKETS and d > _LAT_NS[i]:
            i += 1
        self._lat_counts[i] += 1
        self._lat_sum_ns += d

    def route_latency(self):
        """(bucket upper bounds in s, count per bucket with +Inf last, sum in s): SEND
        decoded -> its ACK queued (after the local store append, or when the owning
        worker's FWD_ACK arrived). Not cumulative; the exposition makes it so."""
        return (LATENCY_BOUNDS, [self._lat_counts[i] for i in range(LAT_BUCKETS + 1)],
                self._lat_sum_ns / 1e9)

    cdef int acked(self, SessionCore sender, uint64_t seq, uint64_t msg_id, uint64_t ts) except -1:
        sender._wbuf().write_ack(seq, msg_id, ts)
        return sender._mark()

    cdef tuple devices_of(self, str user):
        """The inboxes a message for `user` goes to: one per registered device, or
        the user's shared inbox while it has none."""
        devs = self._devices.get(user)
        if devs is None:
            devs = self._devices[user] = tuple(self.store.devices_of(user)) if self._has_devices else ()
        return <tuple>devs if devs else ("",)

    def device_registered(self, str user, devices):
        """The store's device list for `user` changed (Router keeps this cache right).
        Only users already cached (they were routed to) are updated: caching every
        connected user would cost a dict entry per idle session."""
        if user in self._devices:
            self._devices[user] = tuple(devices)

    cdef int _store(self, str recipient, str device, uint64_t msg_id, uint64_t ts, uint64_t ref,
                    str sender, str sender_device, str conversation, uint8_t flags,
                    const char *payload, Py_ssize_t n, uint64_t producer=0, LogCore log=None) except -1:
        """One inbox record; `log`: the recipient's shard log if the caller has it."""
        if log is None:
            log = self._log_of(recipient) if self._log_for is not None else self._log
        if log is not None:               # the payload's one copy: into the mapped log
            log.append_message(recipient, device, msg_id, ts, ref, sender, sender_device, conversation, flags,
                               payload, n, producer)
        else:
            self.store.append(recipient, msg_id, ts, sender, sender_device, PyBytes_FromStringAndSize(payload, n),
                              ref, device=device, flags=flags, conversation=conversation, producer=producer)
        return 0

    cdef int _room_for(self, str recipient, Py_ssize_t records, Py_ssize_t n, LogCore log=None) except -1:
        """All of a message's inbox records fit, or StoreError(STORAGE_FULL) before any is written."""
        if log is None:
            log = self._log_of(recipient) if self._log_for is not None else self._log
        if log is not None:
            log.make_message_room(records, n)
        return 0

    cdef int append_deliver(self, str sender, str sender_device, uint64_t client_id, str recipient,
                            const char *payload, Py_ssize_t n, uint64_t *msg_id, uint64_t *ts,
                            uint64_t producer=0, LogCore log=None) except -1:
        """Store in every device inbox of the recipient (this worker owns it), under
        one message id, and push to its online devices (`log`: the recipient's shard
        log, if the caller looked it up). Raises StoreError (nothing stored) on a
        full disk, or when no inbox of the recipient has room."""
        cdef SessionCore s
        cdef Py_ssize_t stored = 0
        cdef tuple devices = self.devices_of(recipient)
        if len(devices) > 1:
            self._room_for(recipient, len(devices), n, log)
        ts[0] = _now_ms()
        msg_id[0] = self._next_id(ts[0])
        quota = None
        for dev in devices:
            try:
                self._store(recipient, <str>dev, msg_id[0], ts[0], client_id, sender, sender_device, "", 0,
                            payload, n, producer, log)
                stored += 1
            except StoreError as exc:
                if exc.code != ErrorCode.QUOTA_EXCEEDED:
                    raise
                quota = exc           # this device is far behind; the others still get it
                self.quota_skipped += 1
        if stored == 0:
            raise quota
        online = self._sessions.get(recipient)
        if online is not None:
            for s in _online(online):
                if _defer(self, s, msg_id[0]):
                    continue
                s._wbuf().write_deliver(msg_id[0], ts[0], sender, sender_device, payload, n)
                s._mark()
                self.messages_delivered_live += 1
        self.messages_routed += 1
        return 0

    cdef int mirror(self, SessionCore sender, str recipient, uint64_t origin, const char *payload,
                    Py_ssize_t n) except -1:
        """Copy what `sender` sent to the user's other devices (inboxes and online
        sessions), marked as theirs, with the peer and the id the message got."""
        cdef SessionCore s
        cdef uint64_t ts, msg_id
        cdef tuple devices = self.devices_of(sender.user)
        for dev in devices:
            if dev != "" and dev != sender.device:
                break
        else:
            return 0                      # no other device to copy to
        ts = _now_ms()
        msg_id = self._next_id(ts)
        for dev in devices:
            if dev == sender.device or dev == "":
                continue
            try:
                self._store(sender.user, <str>dev, msg_id, ts, origin, sender.user, sender.device, recipient,
                            MSG_MIRROR, payload, n)
            except StoreError:
                self.quota_skipped += 1
        online = self._sessions.get(sender.user)
        if online is not None:
            for s in _online(online):
                if s is not sender and s.device != sender.device and not _defer(self, s, msg_id):
                    s._wbuf().write_deliver_ex(msg_id, ts, PyUnicode_AsUTF8(sender.user), len(sender.user.encode()),
                                           PyUnicode_AsUTF8(sender.device), len(sender.device.encode()),
                                           PyUnicode_AsUTF8(recipient), len(recipient.encode()), origin, payload, n)
                    s._mark()
        return 0

    def receipt(self, str target, int kind, uint64_t ref, str by, str by_device):
        """Tell `target` (all its devices) that `by` received or read message `ref`:
        stored like a message if this worker owns `target`, else forwarded."""
        self._receipt(target, <unsigned char>kind, ref, by, by_device)

    cdef int _receipt(self, str target, unsigned char k, uint64_t ref, str by, str by_device) except -1:
        cdef SessionCore s
        cdef uint64_t ts, rid
        cdef int kind = k
        cdef Py_ssize_t start
        cdef WriteBuffer out
        if not self._is_local(target):
            link = self._link_to(self._owner_of(target)) if self._link_to is not None else None
            if link is None:
                if self._receipt_later is not None:
                    self._receipt_later(target, kind, ref, by, by_device)     # retried by the router
                else:
                    self.receipts_lost += 1
                return 0
            out = (<LinkCore>link)._wbuf()
            start = out.begin_frame(LT_RCPT, 0)
            out.put_id(target, False)
            out.put_u8(k)
            out.put_u64(ref)
            out.put_id(by, False)
            out.put_id(by_device, True)
            out.end_frame(start)
            (<LinkCore>link)._mark()
            return 0
        ts = _now_ms()
        rid = self._next_id(ts)
        devices = self.devices_of(target)     # ("",): no registered device yet, the shared inbox keeps it
        log = None
        if self._log_for is not None:
            try:
                log = self._log_of(target)
            except StoreError:
                pass                          # _store looks again, and the loop below handles it
        for dev in devices:
            try:
                self._store(target, <str>dev, rid, ts, ref, by, by_device, "", MSG_RECEIPT, <const char *>&k, 1, 0,
                            log)
            except StoreError as exc:
                if exc.code == ErrorCode.UNAVAILABLE and self._receipt_later is not None:
                    # the target's shard is moving (refused before anything was written): later,
                    # to wherever it is then
                    self._receipt_later(target, kind, ref, by, by_device)
                    return 0
                self.receipts_lost += 1
        online = self._sessions.get(target)
        if online is not None:
            for s in _online(online):
                if _defer(self, s, rid):
                    continue
                s._wbuf().write_receipt_raw(rid, k, ref, PyUnicode_AsUTF8(by), len(by.encode()),
                                        PyUnicode_AsUTF8(by_device), len(by_device.encode()), ts)
                s._mark()
        self.receipts_sent += 1
        return 0

    cdef int route_remote(self, SessionCore sender, uint64_t seq, str recipient,
                          const char *payload, Py_ssize_t n, uint64_t t0=0) except -1:
        """FWD to the owner of the recipient's shard over the bus; the ACK comes back
        as FWD_ACK once the owner has stored (and, in `always` mode, synced) it."""
        cdef LinkCore link = None
        cdef uint64_t fwd_seq
        cdef Py_ssize_t start
        cdef WriteBuffer out
        if self._link_to is not None:
            found = self._link_to(self._owner_of(recipient))
            if found is not None:
                link = <LinkCore>found
        if link is None or link.closed:
            sender._send.failed(seq)
            sender.error(ErrorCode.UNAVAILABLE, f"the worker serving {recipient} is restarting; retry",
                         seq, False)
            return 0
        self._fwd_seq += 1
        fwd_seq = self._fwd_seq
        keep = None
        if not recipient.startswith("#"):
            for dev in self.devices_of(sender.user):
                if dev != "" and dev != sender.device:      # copy for the mirror once ACKed
                    keep = (recipient, PyBytes_FromStringAndSize(payload, n))
                    break
        self._pending_fwd[fwd_seq] = (sender, seq, link, keep, t0, recipient)
        sender.forwards_pending += 1
        link.pending += 1
        out = link._wbuf()
        start = out.begin_frame(LT_FWD, 0)
        out.put_u64(fwd_seq)
        out.put_u64(seq)
        out.put_u64(sender.producer)
        out.put_id(sender.user, False)
        out.put_id(sender.device, True)
        out.put_id(recipient, False)
        out.put_raw(payload, n)
        out.end_frame(start)
        self.forwarded += 1
        return link._mark()

    cdef int accept_forward(self, LinkCore link, uint64_t fwd_seq, str sender, str device, uint64_t producer,
                            uint64_t seq, str recipient, const char *payload, Py_ssize_t n) except -1:
        """A FWD from another worker: this worker owns the recipient's shard. The
        answer (FWD_ACK, flagged DUPLICATE for a retry; or FWD_ERR) goes through
        this turn's group commit like a local ACK."""
        cdef uint64_t msg_id = 0, ts = 0
        cdef Py_ssize_t start
        cdef int code = 0
        cdef int outcome
        cdef WriteBuffer out = link._wbuf()
        if link.fence is not None:
            code = link.fence(recipient)
            if code:                  # another node's FWD for a shard we do not own at its map epoch
                self.forwards_fenced += 1
                self._hold_later_seqs(sender + "\x00" + device, producer, seq, recipient, code)
                start = out.begin_frame(LT_FWD_ERR, 0)
                out.put_u64(fwd_seq)
                out.put_u16(code)
                out.put_text16(f"this node does not serve {recipient} at the sender's shard map; retry", 1000)
                out.end_frame(start)
                return link._mark()
        outcome = self._store_send(sender, device, producer, seq, recipient, payload, n, &msg_id, &ts)
        if outcome == DUPLICATE and msg_id == 0 and ts != 0:
            code = <int>ts
        elif outcome != STORED and outcome != DUPLICATE:
            code = outcome
        if code:
            start = out.begin_frame(LT_FWD_ERR, 0)
            out.put_u64(fwd_seq)
            out.put_u16(code)
            out.put_text16(self._refusal, 1000)
            out.end_frame(start)
            return link._mark()
        start = out.begin_frame(LT_FWD_ACK, FWD_DUPLICATE if outcome == DUPLICATE else 0)
        out.put_u64(fwd_seq)
        out.put_u64(msg_id)
        out.put_u64(ts)
        out.end_frame(start)
        return link._mark()

    cdef int forward_answered(self, uint64_t fwd_seq, int code, str reason, uint64_t msg_id, uint64_t ts,
                              bint duplicate) except -1:
        """The owner answered a FWD: ACK (and mirror, unless it was a retry) or
        the error, to the sending session; a refusal for now holds its later seqs."""
        cdef SessionCore origin
        cdef uint64_t seq
        entry = self._pending_fwd.pop(fwd_seq, None)
        if entry is None:
            return 0
        origin = (<tuple>entry)[0]
        seq = (<tuple>entry)[1]
        (<LinkCore>(<tuple>entry)[2]).pending -= 1
        if code:
            if not _final(code):
                origin._send.failed(seq)
            if code == ErrorCode.OUT_OF_ORDER:
                self.out_of_order += 1
            origin.error(code, reason, seq, False)
        else:
            keep = (<tuple>entry)[3]
            if keep is not None and not duplicate:
                self.mirror(origin, keep[0], msg_id, <bytes>keep[1], len(<bytes>keep[1]))
            if not origin.closed:
                self.acked(origin, seq, msg_id, ts)
                self._observe(<uint64_t>(<tuple>entry)[4])
        origin.forward_done()
        if self._fwd_settled is not None and origin.forwards_pending == 0:
            self._fwd_settled(origin)
        return 0

    def fail_link(self, LinkCore link):
        """A link broke: every SEND waiting on it gets UNAVAILABLE (the client
        resends it, in order, with the same seq; the owner drops it if it had stored it)."""
        for fwd_seq in [k for k, v in self._pending_fwd.items() if (<tuple>v)[2] is link]:
            self.forward_answered(fwd_seq, ErrorCode.UNAVAILABLE, "the recipient's worker went away; retry",
                                  0, 0, False)

    def fail_forwards(self, in_shard):
        """The shard map gave the shards `in_shard(user)` accepts another owner: every
        SEND still waiting on the old owner for one of their users gets UNAVAILABLE
        now, before any later SEND of its device is routed to the new owner. Else
        seq N+1 could be stored at the new owner while N is still in flight to the
        old one (dead, or refusing it), and N's resend would then look like a
        retry of something stored (section 6: in order, exactly once)."""
        for fwd_seq in [k for k, v in self._pending_fwd.items() if in_shard((<tuple>v)[5])]:
            self.forward_answered(fwd_seq, ErrorCode.UNAVAILABLE,
                                  "the recipient's shard changed owner while this SEND was on its way; retry",
                                  0, 0, False)

    cdef int received(self, SessionCore session, const unsigned char *ids, Py_ssize_t count) except -1:
        """A device acknowledged delivery: drop the entries from its inbox, and tell
        each message's sender it was delivered (DELIVERED receipt)."""
        cdef Py_ssize_t i, found = 0
        cdef LogCore log = self._log
        cdef MsgView m
        cdef uint64_t few[128]
        cdef uint64_t *locs = few
        cdef str sender
        if not count:
            return 0
        if self._log_for is not None:
            try:
                log = self._log_of(session.user)
            except StoreError:
                return 0      # the shard is moving: the entries stay, its next owner delivers them again
        if log is None:
            id_list = [sb_load64(ids + 8 * i) for i in range(count)]
            for e in self.store.consume_entries(session.user, id_list, session.device):
                if e.flags == 0:
                    self._receipt(e.sender, RECEIPT_DELIVERED, e.msg_id, session.user, session.device)
                elif e.flags & MSG_GROUP and e.sender != session.user:
                    self._receipt(e.sender, RECEIPT_DELIVERED, e.ref, session.user, session.device)
            return 0
        # in C from the frame to the receipts: ids, inbox entries and records are never Python objects
        if count > 64:
            locs = <uint64_t *>PyMem_Malloc(16 * count)
            if locs == NULL:
                raise MemoryError()
        try:
            log.consume_wire(session.user, session.device, ids, count, locs, &found)
            for i in range(found):
                log.read_view(locs[i], &m)
                if m.flags == 0:
                    self._receipt(PyUnicode_DecodeUTF8(m.sender, m.sender_len, "replace"), RECEIPT_DELIVERED,
                                  m.msg_id, session.user, session.device)
                elif m.flags & MSG_GROUP:
                    sender = PyUnicode_DecodeUTF8(m.sender, m.sender_len, "replace")
                    if sender != session.user:
                        self._receipt(sender, RECEIPT_DELIVERED, m.client_id, session.user, session.device)
        finally:
            if locs != few:
                PyMem_Free(locs)
        return 0

    # -- shards moving between nodes (called by router.Router) --------------------

    def forget_users(self, in_shard):
        """Forget what this core keeps for users (and groups) that `in_shard(user)`
        says are leaving: devices' send streams, device lists, group copies made."""
        for key in [k for k in self._send_states if in_shard(k.partition("\x00")[0])]:
            del self._send_states[key]
        for user in [u for u in self._devices if in_shard(u)]:
            del self._devices[user]
        forget_copies(self._dedup_tables, in_shard)

    def merge_dedup(self, dict tables):
        """Group copies an adopted shard's log recovered (as at start)."""
        merge_copies(self._dedup_tables, tables, COPY_WINDOW)

    def raise_last_id(self, uint64_t floor):
        """Ids made from now on are above `floor` (an adopted shard's highest id:
        its inboxes stay in id order even if the old owner's clock was ahead)."""
        if floor > self._last_id:
            self._last_id = floor

    def new_id(self):
        """(msg_id, timestamp_ms) from this worker's sequence."""
        cdef uint64_t ts = _now_ms()
        return self._next_id(ts), ts

    def store_group_copy(self, str member, uint64_t origin, uint64_t ts, str sender, str sender_device,
                         str group, bytes payload):
        """A member's copy of group message `origin` (this worker owns `member`):
        stored for each of its devices (not the one that sent it) and pushed to
        those online. Idempotent: a copy already made is not made again."""
        return self._group_copy(member, origin, ts, sender, sender_device, group, payload)

    def copy_to_members(self, members, uint64_t origin, uint64_t ts, str sender, str sender_device,
                        str group, bytes payload, is_local=None):
        """`store_group_copy` for each of `members` that `is_local(member)` says
        this worker owns (None: all of them), in one C loop instead of a Python
        call per member. Returns the members left: other workers' ones, and those
        whose shard refused for now (StoreError: the caller retries them)."""
        cdef list left = []
        cdef ShardMap local_map = None
        owner = getattr(is_local, "__self__", None)
        if isinstance(owner, ShardMap) and is_local == owner.is_local:
            local_map = <ShardMap>owner                     # asked in C (cpdef), as in set_bus
        for member in members:
            if is_local is not None and not (local_map.is_local(<str>member) if local_map is not None
                                             else is_local(member)):
                left.append(member)
                continue
            try:
                self._group_copy(<str>member, origin, ts, sender, sender_device, group, payload)
            except StoreError:
                left.append(member)
        return left

    cdef bint _group_copy(self, str member, uint64_t origin, uint64_t ts, str sender, str sender_device,
                          str group, bytes payload) except -1:
        cdef SessionCore s
        cdef uint64_t msg_id
        cdef CopyWindow made = copy_window(self._dedup_tables, group, member)
        if made.has(origin):
            return False
        skip = sender_device if member == sender else None
        devices = self.devices_of(member)
        if len(devices) > 1:
            self._room_for(member, len(devices), len(payload))     # StoreError: no copy made, retried
        msg_id = self._next_id(_now_ms())
        for dev in devices:
            if dev == skip:
                continue
            try:
                self._store(member, <str>dev, msg_id, ts, origin, sender, sender_device, group, MSG_GROUP,
                            PyBytes_AS_STRING(payload), len(payload))
            except StoreError as exc:
                if exc.code != ErrorCode.QUOTA_EXCEEDED:
                    raise
                self.quota_skipped += 1
        online = self._sessions.get(member)
        if online is not None:
            for s in _online(online):
                if s.device == skip or _defer(self, s, msg_id):
                    continue
                s._wbuf().write_deliver_ex(msg_id, ts, PyUnicode_AsUTF8(sender), len(sender.encode()),
                                       PyUnicode_AsUTF8(sender_device), len(sender_device.encode()),
                                       PyUnicode_AsUTF8(group), len(group.encode()), origin,
                                       PyBytes_AS_STRING(payload), len(payload), FLAG_GROUP)
                s._mark()
        made.add(origin, COPY_WINDOW)
        return True

    cdef bint _is_local(self, str recipient) except -1:
        if self._local_map is not None:
            return self._local_map.is_local(recipient)      # cpdef: a subclass's override is called
        return self._is_local_fn is None or self._is_local_fn(recipient)

    cdef LogCore _log_of(self, str user):
        """The store's log_for(user): the log of the user's shard (StoreError if it
        is moving or not here). Two dict look-ups in C when the shard's log is open
        for writes, else the store's own (Python) path."""
        if self._writers is not None:
            lg = self._writers.get(self._map.shard_of_user(user))
            if lg is not None:
                return <LogCore>lg
        return <LogCore>self._log_for(user)

    def set_bus(self, link_to, owner_of, is_local):
        """Route recipients on other workers' shards: `link_to(worker)` returns a
        LinkCore or None; `owner_of(user)` and `is_local(user)` read the shard map."""
        self._link_to = link_to
        self._owner_of = owner_of
        self._is_local_fn = is_local
        # a ShardMap's own is_local (or a subclass's override of it) is asked in C, not through
        # the bound method; any other callable is called as given
        owner = getattr(is_local, "__self__", None)
        self._local_map = <ShardMap>owner if isinstance(owner, ShardMap) and is_local == owner.is_local else None

    cdef int _schedule(self, SessionCore s) except -1:
        self._dirty.append(s)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if self._loop is None:
                import asyncio
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self.flush)
        return 0

    def flush(self):
        """Once per loop turn: take every dirty session's output, and write it
        when the store says this turn's appends are durable (group commit)."""
        cdef SessionCore s
        cdef list dirty = self._dirty
        cdef list batch = []
        self._dirty = []
        self._flush_scheduled = False
        for s in dirty:
            s._queued = False
            if s.closed:
                continue
            if type(s) is LinkCore:      # its output may be discarded while this turn's commit runs
                batch.append((s, s._take(), s._close_after_flush,
                              (<LinkCore>s).generation))
            else:
                batch.append((s, s._take(), s._close_after_flush))
        if batch:
            self.store.commit(self._release_batch, batch)

    def _release_batch(self, list batch):
        cdef SessionCore s
        for item in batch:
            s = (<tuple>item)[0]
            try:
                if len(<tuple>item) == 4 and (<tuple>item)[3] != (<LinkCore>s).generation:
                    s._release(None, (<tuple>item)[2])      # framed before the link's stream restarted
                else:
                    s._release((<tuple>item)[1], (<tuple>item)[2])
            except Exception:
                s.closed = True     # its transport is gone; the connection's close path detaches it

    # -- registry (called by router.Router) ---------------------------------------

    def _attach(self, SessionCore s):
        online = self._sessions.get(s.user)
        if online is None:
            self._sessions[s.user] = s            # the common case: one device, no list
        elif type(online) is list:
            (<list>online).append(s)
        else:
            self._sessions[s.user] = [online, s]

    def _attach_send_only(self, SessionCore s):
        """A session that only sends: no routing to it (its send state comes with its first SEND)."""

    def _detach(self, SessionCore s):
        """The session's connection is gone."""
        s.closed = True
        self._unroute(s)

    def _unroute(self, SessionCore s):
        """Route nothing more to `s` (its queued output is still written)."""
        online = self._sessions.get(s.user)
        if online is s:
            del self._sessions[s.user]
        elif type(online) is list and s in <list>online:
            (<list>online).remove(s)
            if len(<list>online) == 1:
                self._sessions[s.user] = (<list>online)[0]

    def sessions_of(self, str user):
        online = self._sessions.get(user)
        return [] if online is None else list(_online(online))

    def all_sessions(self):
        return [s for online in self._sessions.values() for s in _online(online)]

    @property
    def online_users(self):
        return len(self._sessions)



def _duplicate_without_answer(key, seq, producer, state, recipient):
    import logging
    logging.getLogger("switchboard.router").warning(
        "event=duplicate_without_answer device=%s seq=%d producer=%d high=%d to=%s", key.replace("\x00", "/"),
        seq, producer, state.high if state is not None else 0, recipient)


cdef class LinkCore(SessionCore):
    """One end of a connection to another worker. It is a session of the router
    (an output buffer flushed per loop turn, after the group commit) whose frames
    are the bus's: FWD in, FWD_ACK/FWD_ERR back; control frames (hand-off, hello)
    go to a Python callback."""

    def __init__(self, RouteCore core, int peer, write, close, control):
        super().__init__(core, f"#worker{peer}", "", 0, write, close)
        self.peer = peer
        self._control = control
        self.generation = 0

    def discard_output(self):
        """The stream this link writes to restarts (a NATS stream reset): drop every
        frame written to it and not yet sent, also those waiting for this turn's
        commit. Their FWDs were just answered UNAVAILABLE and will be sent again;
        sent now, on the new stream, after earlier ones the old stream lost, a
        later seq would be stored ahead of an earlier one, whose resend would then
        look like a retry of something stored (docs/cluster.md, Cross-node routing)."""
        self._out = None
        self.generation += 1

    cdef int on_frame(self, uint8_t ftype, uint8_t flags, const unsigned char *body, Py_ssize_t n) except -1:
        cdef Cursor c
        cdef uint64_t fwd_seq, seq, producer, msg_id, ts
        cdef const char *p
        cdef Py_ssize_t k
        cdef str sender, device, recipient
        cdef RouteCore core = self._core
        cdef SessionCore origin
        cdef uint16_t code
        cdef uint8_t kind
        if self.closed:
            return 0
        c.p = body
        c.end = body + n
        if ftype == LT_FWD:
            cur_u64(&c, &fwd_seq)
            cur_u64(&c, &seq)
            cur_u64(&c, &producer)
            cur_bytes8(&c, &p, &k, 1)
            sender = PyUnicode_DecodeUTF8(p, k, NULL)
            cur_bytes8(&c, &p, &k, 0)
            device = PyUnicode_DecodeUTF8(p, k, NULL)
            cur_bytes8(&c, &p, &k, 1)
            recipient = PyUnicode_DecodeUTF8(p, k, NULL)
            return core.accept_forward(self, fwd_seq, sender, device, producer, seq, recipient,
                                       <const char *>c.p, c.end - c.p)
        if ftype == LT_FWD_ACK:
            cur_u64(&c, &fwd_seq)
            cur_u64(&c, &msg_id)
            cur_u64(&c, &ts)
            return core.forward_answered(fwd_seq, 0, None, msg_id, ts, flags & FWD_DUPLICATE)
        if ftype == LT_RCPT:
            cur_bytes8(&c, &p, &k, 1)
            recipient = PyUnicode_DecodeUTF8(p, k, NULL)
            cur_u8(&c, &kind)
            cur_u64(&c, &msg_id)
            cur_bytes8(&c, &p, &k, 1)
            sender = PyUnicode_DecodeUTF8(p, k, NULL)
            cur_bytes8(&c, &p, &k, 0)
            device = PyUnicode_DecodeUTF8(p, k, NULL)
            if self.fence is not None and self.fence(recipient):
                core.receipts_fenced += 1          # not ours at the sender's map: never stored or passed on
                return 0
            core._receipt(recipient, kind, msg_id, sender, device)
            return 0
        if ftype == LT_FWD_ERR:
            cur_u64(&c, &fwd_seq)
            cur_u16(&c, &code)
            reason = cur_str16(&c, 65535)
            return core.forward_answered(fwd_seq, code, reason, 0, 0, False)
        view = PyBytes_FromStringAndSize(<const char *>body, n)
        self._control(self, ftype, view)
        return 0
