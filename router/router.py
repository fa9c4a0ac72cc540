"""The embeddable router: sessions in, messages routed, no sockets.

An embedding server authenticates a client its own way, then
`open_session(user, device, write, close)` and feeds the client's protocol
bytes to a decoder whose sink is the returned session. The router answers
through `write(bytes)` once per event-loop turn.
"""
import asyncio
import collections
import itertools
import os

from _core._routing import RouteCore, SessionCore as Session, now_ms
from _core import frames
from _core.errors import ProtocolError, StoreError
from _core.protocol import DEFAULT_MAX_FRAME, DELIVER_OVERHEAD, ErrorCode, GoawayCode

from _core.codec import decode_body
from _core.protocol import FrameType

from .groups import GroupService
from .presence import PresenceService
from .sharding import shard_of
from .store import MIRROR, RECEIPT, MemoryStore, OfflineStore


class Router(RouteCore):
    """Routes 1:1 messages between sessions; hands everything to the offline store first."""

    def __init__(self, store: OfflineStore | None = None, *, loop=None,
                 max_frame: int = DEFAULT_MAX_FRAME, dedup_window: int = 256, max_devices: int = 4,
                 max_group_members: int = 1024):
        store = store if store is not None else MemoryStore()
        if isinstance(store, MemoryStore):
            store.producers.window = dedup_window     # a durable log takes it from its LogConfig
        super().__init__(store, loop=loop, max_payload=max_frame - DELIVER_OVERHEAD, dedup_window=dedup_window)
        self.max_frame = max_frame
        self.max_devices = max_devices
        self.presence = PresenceService(self)
        self.groups = GroupService(self, max_members=max_group_members)
        self._control = self._on_control
        self._group_send = self.groups.send
        self._send_only: dict[str, set] = {}     # user -> its send-only sessions (replies only)
        self._receipt_later = self._queue_receipt
        self._receipt_queue: collections.deque = collections.deque(maxlen=100_000)
        self._receipt_timer = None
        self._session_ids = itertools.count(int.from_bytes(os.urandom(4), "big") << 24)
        #: bytes of backlog queued at once for a session (0: all); the rest follows as it drains
        self.backlog_chunk = 0
        #: user (or group) -> shard, for shard_leaving/shard_arrived given a shard number
        shard_map = getattr(store, "map", None)
        self.shard_of = shard_map.shard if shard_map is not None else shard_of
        self._settle_waits: list = []            # (sessions with SENDs forwarded, future) of shard_leaving

    def open_session(self, user: str, device: str, write=None, close=None, *, transport=None,
                     resume_after: int = 0, welcome: frames.Welcome | None = None,
                     send_only: bool = False, producer: int = 0) -> Session:
        """Register an authenticated device and queue its backlog.

        `write(bytes)` sends to the client, `close()` closes its transport; or
        pass `transport`, any object with write(bytes) and close() (an asyncio
        transport), which costs less memory per session than two bound methods.
        A second session of the same user and device replaces the first (GOAWAY
        REPLACED). If `welcome` is given it is written before the backlog.
        `resume_after` is the highest message id the client has already
        processed: those are consumed instead of delivered again. `producer` is
        the one whose SEND sequence the client continues (HELLO), or 0 for a new
        one; WELCOME carries the session's producer and the send window.
        Raises ProtocolError(FENCED) for a producer a newer one replaced. A `send_only`
        session (a bot, a CLI) is no registered device and gets no DELIVERs.
        Raises ProtocolError(DEVICE_LIMIT) past `max_devices` devices online, and
        ProtocolError(STORAGE_FULL) when a new device cannot be registered (a full
        disk whose reserve is used up).
        """
        online = [s for s in self.sessions_of(user) if s.device != device]
        if not send_only and len(online) >= self.max_devices:
            raise ProtocolError(f"{user} already has {len(online)} devices online (the limit is "
                                f"{self.max_devices})", ErrorCode.DEVICE_LIMIT)
        if transport is None and (write is None or close is None):
            raise TypeError("open_session needs write and close, or transport")
        session = Session(self, user, device, next(self._session_ids), write, close, transport)
        producer = self.bind_producer(session, producer)       # FENCED before anything changes
        new_device = False
        if not send_only and hasattr(self.store, "register_device"):
            try:          # before anything changes: a refused device replaces no session
                new_device = self.store.register_device(user, device, now_ms())
            except StoreError as exc:
                code = ErrorCode.UNAVAILABLE if exc.code == ErrorCode.UNAVAILABLE else ErrorCode.STORAGE_FULL
                raise ProtocolError(f"cannot register device {device!r}: {exc}; retry later", code) from None
        for old in self.sessions_of(user):
            if old.device == device:
                # its queued ACKs, then the GOAWAY, go out with this turn's batch; then it closes
                old.goaway(GoawayCode.REPLACED, 0, "replaced by a newer connection of this device")
                self._unroute(old)
        if welcome is not None:
            # built anew, not dataclasses.replace (a few µs of every session open)
            session.write_frame(frames.Welcome(
                version=welcome.version, session_id=session.session_id, user=welcome.user, device=welcome.device,
                max_frame=welcome.max_frame, max_payload=welcome.max_payload,
                ping_interval_ms=welcome.ping_interval_ms, server_time_ms=welcome.server_time_ms,
                producer=producer, send_window=self.dedup_window))
        if send_only:
            session.send_only = True
            self._attach_send_only(session)
            self._send_only.setdefault(user, set()).add(session)
            return session
        if new_device:
            self.device_registered(user, self.store.devices_of(user))
        was_online = bool(self.sessions_of(user))
        if resume_after:
            self.store.consume_through(user, resume_after, device)
        self._write_backlog(session, 0, self.backlog_chunk)
        self._attach(session)
        if not was_online:
            self.presence.changed(user)
        return session

    def _write_backlog(self, session: Session, min_id: int, max_bytes: int) -> None:
        """Queue the device's stored entries with id >= min_id, oldest first. With
        `max_bytes`, stop past that much: the session is left paused from the first
        entry not written (`resume_session` continues)."""
        user, device = session.user, session.device
        rest = 0
        if hasattr(self.store, "write_pending_into"):      # straight from the log's mapping
            rest = self.store.write_pending_into(session.out, user, now_ms(), device, min_id, max_bytes) or 0
            session.wake()
        else:
            start = session.pending_output
            for m in self.store.pending(user, device):
                if m.msg_id < min_id:
                    continue
                if max_bytes and session.pending_output - start >= max_bytes:
                    rest = m.msg_id
                    break
                if m.flags & RECEIPT:
                    session.write_frame(frames.Receipt(m.msg_id, m.payload[0], m.ref, m.sender, m.sender_device,
                                                       m.timestamp_ms))
                else:
                    session.write_frame(frames.Deliver(m.msg_id, m.timestamp_ms, m.sender, m.sender_device,
                                                       m.payload, m.conversation if m.flags & MIRROR else "",
                                                       m.ref if m.flags & MIRROR else 0))
        if rest:
            session.paused = True
            session.skip_from = rest

    def pause_session(self, session: Session) -> None:
        """The client is not reading fast enough: from now on its live messages stay
        in the store only (they are there already) until `resume_session`."""
        if not session.send_only and not session.closed:
            session.paused = True

    def resume_session(self, session: Session, max_bytes: int = 0) -> bool:
        """The client drained its output: queue exactly what was skipped while it was
        paused (from the store, in order) and push live again. With `max_bytes`, at
        most about that much is queued; returns True if the session is still paused
        (more to write: call again once this has drained)."""
        if not session.paused or session.closed:
            return False
        skip, session.skip_from = session.skip_from, 0
        session.paused = False
        if skip:
            self._write_backlog(session, skip, max_bytes)
        return session.paused

    def close_session(self, session: Session) -> None:
        """The device went away; undelivered messages stay in the store."""
        self._detach(session)
        if not session.send_only and hasattr(self.store, "touch_device"):
            try:
                self.store.touch_device(session.user, session.device, now_ms())
            except StoreError:
                pass          # a full or closed store: last-seen stays at the previous value
        self.presence.session_closed(session)
        if session.send_only:
            left = self._send_only.get(session.user)
            if left is not None:
                left.discard(session)
                if not left:
                    del self._send_only[session.user]
        if not session.send_only and not self.sessions_of(session.user):
            self.presence.changed(session.user)

    def _on_control(self, session, ftype: int, body: bytes) -> None:
        """Low-rate frames handled in Python: groups, presence, typing, privacy."""
        if ftype == FrameType.GROUP:
            self.groups.handle(session, decode_body(ftype, 0, body))
        else:
            self.presence.handle(session, ftype, body)

    def control_message(self, msg: dict) -> None:
        """A control message from another worker (gateway/bus.py)."""
        (self.groups if msg["t"].startswith("g") else self.presence).control(msg)

    def reply_sessions(self, user: str) -> list:
        """Sessions that may get answers to their requests: devices and send-only ones."""
        return self.sessions_of(user) + list(self._send_only.get(user, ()))

    def every_session(self) -> list:
        """Every open session: registered devices and send-only ones."""
        return self.all_sessions() + [s for group in self._send_only.values() for s in group]

    def _queue_receipt(self, *receipt) -> None:
        """The receipt's user lives on a worker that is restarting: try again shortly
        (bounded: past 100,000 waiting, the oldest are dropped; receipts are hints)."""
        self._receipt_queue.append(receipt)
        if self._receipt_timer is None:
            import asyncio
            self._receipt_timer = asyncio.get_running_loop().call_later(0.25, self._retry_receipts)

    def _retry_receipts(self) -> None:
        self._receipt_timer = None
        waiting, self._receipt_queue = self._receipt_queue, collections.deque(maxlen=100_000)
        for r in waiting:
            self.receipt(*r)          # re-queued if still unreachable

    # -- shards moving between nodes (gateway/cluster/shardcopy.py) ----------------------
    def _in_shard(self, shard):
        if callable(shard):
            return shard
        shard_of_ = self.shard_of
        return lambda user: shard_of_(user) == shard

    def shard_leaving(self, shard, goaway_code: int, reason: str, reconnect_ms: int = 0) -> asyncio.Future:
        """`shard` (a number, or a predicate user -> bool) is moving to another
        node: its users' sessions (devices and send-only) get GOAWAY(goaway_code)
        after the ACKs already queued for them, and nothing more is routed to them;
        their last-seen times are recorded while the store still takes them; what
        this router keeps in memory for the shard's users and groups is forgotten
        (send streams, device lists, group copies made, presence watchers and
        privacy, group states and unfinished fan-outs: the log holds all of it and
        the new owner reads it back, shard_arrived). Call it before the log's
        quiesce. Returns a future that resolves once every SEND those sessions
        forwarded to other workers is answered (a mirror copy for the shard is
        stored then): await it, then quiesce."""
        in_shard = self._in_shard(shard)
        now = now_ms()
        leaving = []
        for s in self.all_sessions():
            if in_shard(s.user):
                leaving.append(s)
                if hasattr(self.store, "touch_device"):
                    try:
                        self.store.touch_device(s.user, s.device, now)
                    except StoreError:
                        pass          # already quiesced: last-seen stays at the previous value
        for user in [u for u in self._send_only if in_shard(u)]:
            leaving.extend(self._send_only.pop(user))
        for s in leaving:
            s.goaway(goaway_code, reconnect_ms, reason)
            self._unroute(s)
        self.presence.forget(in_shard)
        self.groups.forget(in_shard)
        self.forget_users(in_shard)
        done = asyncio.get_running_loop().create_future()
        waiting = {s for s in leaving if s.forwards_pending > 0}
        if waiting:
            self._settle_waits.append((waiting, done))
            self._fwd_settled = self._forwards_settled
        else:
            done.set_result(None)
        return done

    def _forwards_settled(self, session) -> None:
        for entry in list(self._settle_waits):
            waiting, done = entry
            waiting.discard(session)
            if not waiting:
                self._settle_waits.remove(entry)
                if not done.done():
                    done.set_result(None)
        if not self._settle_waits:
            self._fwd_settled = None

    def shard_arrived(self, shard) -> None:
        """`shard` (a number, or a predicate with `log`) was adopted by this
        worker's log and is owned here now: read back what the router keeps in
        memory. Group copies the log recovered (so a fan-out retried makes none
        twice), ids above the shard's highest, group messages stored but not yet
        fanned out (as at start), and this worker's watchers of the shard's users
        subscribe again (now locally). Device lists, last seen and privacy are read
        from the log on first use, as at start."""
        in_shard = self._in_shard(shard)
        self.forget_users(in_shard)           # nothing stale from an earlier stay here
        self.presence.forget(in_shard)
        self.groups.forget(in_shard)
        lg = self.store.log_of_shard(shard) if hasattr(self.store, "log_of_shard") and not callable(shard) else None
        if lg is not None:
            self.merge_dedup(lg.recovered_dedup)
            self.raise_last_id(lg.last_id())
            self.shard_log_arrived(shard, lg.producers)   # SENDs refused here before it came hold their device
        self.groups.recover(None if callable(shard) else shard)
        self.shard_owner_changed(in_shard)

    def shard_owner_changed(self, shard) -> None:
        """`shard` has a new owner (here or elsewhere): this worker's sessions
        watching its users subscribe again there (the new owner starts with no
        watchers). Every node calls it when the shard map changes."""
        self.presence.resubscribe(self._in_shard(shard))

    def goaway_all(self, code: int, reason: str, reconnect_ms: int = 0) -> None:
        """Tell every session to go away (and when to come back), then close it."""
        for s in self.all_sessions():
            s.goaway(code, reconnect_ms, reason)


__all__ = ["Router", "Session", "now_ms"]
