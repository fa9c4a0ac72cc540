"""The routing hot path: from a decoded SEND to DELIVER bytes in the recipient's
output buffer, and the ACK in the sender's, flushed once per loop turn.

Policy (opening sessions, limits, what an embedder sees) lives in `router/`;
this module is the part that runs per message.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint16_t
from posix.time cimport clock_gettime, timespec, CLOCK_REALTIME

from ._codec cimport (Cursor, cur_u64, cur_u16, cur_bytes8, cur_done, sb_load64,
                      FT_SEND, FT_RECEIVED, FT_PING, FT_PONG, FT_GOAWAY, MAX_RECEIVED_IDS,
                      SWITCHBOARD_DEBUG)
from ._codec import encode_into
from .errors import UnexpectedFrame, MalformedFrame, StoreError
from ._log cimport LogCore
from .protocol import ErrorCode, FrameType


cdef inline uint64_t _now_ms() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <uint64_t>ts.tv_sec * 1000 + <uint64_t>(ts.tv_nsec // 1000000)


def now_ms():
    """Wall-clock milliseconds, as the router stamps messages."""
    return _now_ms()


cdef class SessionCore(FrameSink):
    """One authenticated device as the router sees it: an output buffer and
    the transport's write/close callables. No sockets here."""

    def __init__(self, RouteCore core, str user, str device, uint64_t session_id, write, close):
        self._core = core
        self.user = user
        self.device = device
        self.session_id = session_id
        self.out = WriteBuffer()
        self._write = write
        self._close = close
        self.closed = False
        self._queued = False
        self._close_after_flush = False
        self._dedup = None

    cdef int on_frame(self, uint8_t ftype, uint8_t flags, const unsigned char *body, Py_ssize_t n) except -1:
        cdef Cursor c
        cdef uint64_t client_id
        cdef uint16_t count
        cdef const char *to
        cdef Py_ssize_t to_len
        if self.closed or self._close_after_flush:
            return 0        # going away: nothing more is read from this session
        c.p = body
        c.end = body + n
        if ftype == FT_SEND:
            cur_u64(&c, &client_id)
            cur_bytes8(&c, &to, &to_len, 1)
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
            self.out.write_u64_frame(FT_PONG, client_id)
            return self._mark()
        if ftype == FT_PONG:
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

    cdef int _mark(self) except -1:
        if not self._queued:
            self._queued = True
            self._core._schedule(self)
        return 0

    def wake(self):
        """Output was written into `out` directly: flush it this loop turn."""
        if self.out.length:
            self._mark()

    def write_frame(self, frame):
        """Queue any protocol frame (a `_core.frames` object) for the next flush."""
        if not self.closed:
            encode_into(self.out, frame)
            self._mark()

    def deliver(self, uint64_t msg_id, uint64_t ts, str sender, str sender_device, bytes payload):
        """Queue a DELIVER of a stored message."""
        if not self.closed:
            self.out.write_deliver(msg_id, ts, sender, sender_device,
                                   PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))
            self._mark()

    def error(self, int code, str reason, uint64_t ref=0, bint fatal=False):
        """Queue an ERROR; a fatal one closes the session after the flush."""
        if self.closed:
            return
        self.out.write_error(code, ref, reason, fatal)
        if fatal:
            self._close_after_flush = True
        self._mark()

    def goaway(self, int code, int reconnect_ms, str reason):
        """Queue a GOAWAY and close after the flush."""
        if self.closed:
            return
        from . import frames
        encode_into(self.out, frames.Goaway(code, reconnect_ms, reason))
        self._close_after_flush = True
        self._mark()

    def flush(self):
        """Write what is buffered now, bypassing the store's commit (no ACKs may be pending)."""
        self._release(self.out.take_bytes() if self.out.length else None, self._close_after_flush)

    cdef int _release(self, bytes data, bint close) except -1:
        if self.closed:
            return 0
        if data is not None:
            self._write(data)
        if close:
            self.closed = True
            self._close()
        return 0

    def _detach(self):
        self.closed = True

    @property
    def pending_output(self):
        return self.out.length

    def __repr__(self):
        return f"<Session {self.user}/{self.device} #{self.session_id}>"


cdef class RouteCore:
    """Sessions by user, the store hand-off, and the per-loop-turn flush."""

    def __init__(self, store, *, loop=None, Py_ssize_t max_payload=64512, Py_ssize_t dedup_window=4096):
        self._sessions = {}
        # client ids seen per device; a durable store hands back what it recovered
        self._dedup_tables = dict(getattr(store, "recovered_dedup", None) or {})
        self._log = store if isinstance(store, LogCore) else None
        # a worker's sharded store: the log of the recipient's shard, or None if another worker owns it
        self._local_log = getattr(store, "local_log", None)
        self._log_for = getattr(store, "log_for", None)
        self._dirty = []
        self._flush_scheduled = False
        self._loop = loop
        self.store = store
        self._last_id = store.last_id()
        self.max_payload = max_payload
        self.dedup_window = dedup_window

    cdef uint64_t _next_id(self, uint64_t now_ms):
        # ms timestamp << 22 | sequence: unique, increasing, and readable as a time
        cdef uint64_t candidate = now_ms << 22
        if candidate <= self._last_id:
            candidate = self._last_id + 1
        self._last_id = candidate
        return candidate

    cdef int route(self, SessionCore sender, uint64_t client_id, const char *to, Py_ssize_t to_len,
                   const char *payload, Py_ssize_t n) except -1:
        cdef uint64_t msg_id, ts
        cdef SessionCore s
        cdef dict dedup = sender._dedup
        cdef str recipient
        if n > self.max_payload:
            sender.error(ErrorCode.PAYLOAD_TOO_LARGE,
                         f"payload of {n} bytes exceeds the limit of {self.max_payload}", client_id, False)
            return 0
        key = client_id
        seen = dedup.get(key)
        if seen is not None:
            # a retry (e.g. after reconnect): answer with the original ACK, deliver nothing
            self.duplicates_dropped += 1
            sender.out.write_ack(client_id, (<tuple>seen)[0], (<tuple>seen)[1])
            return sender._mark()
        try:
            recipient = PyUnicode_DecodeUTF8(to, to_len, NULL)
        except UnicodeDecodeError:
            raise MalformedFrame("recipient is not UTF-8") from None
        ts = _now_ms()
        msg_id = self._next_id(ts)
        cdef LogCore log = self._log
        if self._local_log is not None:
            found = self._local_log(recipient)
            if found is None:
                return self.route_remote(sender, client_id, recipient, payload, n)
            log = <LogCore>found
        try:
            if log is not None:           # the payload's one copy: into the mapped log
                log.append_message(recipient, msg_id, ts, client_id, sender.user, sender.device,
                                   payload, n)
            else:
                self.store.append(recipient, msg_id, ts, sender.user, sender.device,
                                  PyBytes_FromStringAndSize(payload, n))
        except StoreError as exc:
            sender.error(exc.code, str(exc), client_id, False)
            return 0
        online = self._sessions.get(recipient)
        if online is not None:
            for s in <list>online:
                s.out.write_deliver(msg_id, ts, sender.user, sender.device, payload, n)
                s._mark()
                self.messages_delivered_live += 1
        sender.out.write_ack(client_id, msg_id, ts)
        sender._mark()
        dedup[key] = (msg_id, ts)
        if len(dedup) > self.dedup_window:
            del dedup[next(iter(dedup))]
        self.messages_routed += 1
        return 0

    cdef int received(self, SessionCore session, const unsigned char *ids, Py_ssize_t count) except -1:
        cdef Py_ssize_t i
        if not count:
            return 0
        cdef LogCore log = self._log
        id_list = [sb_load64(ids + 8 * i) for i in range(count)]
        if self._log_for is not None:
            log = <LogCore>self._log_for(session.user)
        if log is not None:
            return log.consume_ids(session.user, id_list)
        self.store.consume(session.user, id_list)
        return 0

    cdef int route_remote(self, SessionCore sender, uint64_t client_id, str recipient,
                          const char *payload, Py_ssize_t n) except -1:
        """The recipient's shard belongs to another worker (see gateway/worker.py)."""
        sender.error(ErrorCode.UNAVAILABLE, f"{recipient} is served by another worker, not reachable from here",
                     client_id, False)
        return 0

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
            batch.append((s, s.out.take_bytes() if s.out.length else None, s._close_after_flush))
        if batch:
            self.store.commit(self._release_batch, batch)

    def _release_batch(self, list batch):
        cdef SessionCore s
        for item in batch:
            s = (<tuple>item)[0]
            try:
                s._release((<tuple>item)[1], (<tuple>item)[2])
            except Exception:
                s.closed = True     # its transport is gone; the connection's close path detaches it

    # -- registry (called by router.Router) ---------------------------------------

    def _attach(self, SessionCore s):
        online = self._sessions.get(s.user)
        if online is None:
            self._sessions[s.user] = [s]
        else:
            online.append(s)
        key = (s.user, s.device)
        table = self._dedup_tables.get(key)
        if table is None:
            table = self._dedup_tables[key] = {}
        s._dedup = table

    def _detach(self, SessionCore s):
        """The session's connection is gone."""
        s.closed = True
        self._unroute(s)

    def _unroute(self, SessionCore s):
        """Route nothing more to `s` (its queued output is still written)."""
        online = self._sessions.get(s.user)
        if online is not None and s in online:
            online.remove(s)
            if not online:
                del self._sessions[s.user]

    def sessions_of(self, str user):
        return list(self._sessions.get(user, ()))

    def all_sessions(self):
        return [s for online in self._sessions.values() for s in online]

    @property
    def online_users(self):
        return len(self._sessions)

