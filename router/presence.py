"""Presence, last seen and typing: policy code around the routing core.

Presence is sharded with its user: the worker that owns a user knows whether
any of its devices is online and when it was last seen (from the device
registry in the log). It keeps a watcher table only for users somebody
subscribed to, so memory grows with subscriptions, not with users x watchers.
A subscription is answered at once with the current state; after that the
owner pushes a PRESENCE on the first device online and the last offline.

Typing indicators are relayed to the peer's online devices only, never stored,
and rate-limited per session (token bucket).
"""
import struct
import time

from _core import frames
from _core.codec import decode_body
from _core.errors import StoreError, UnexpectedFrame
from _core.ids import is_user_id
from _core.protocol import FrameType

PRIVACY_KEY = "p\x00{}"


class PresenceService:
    def __init__(self, router, *, typing_rate: float = 5.0, typing_burst: float = 10.0):
        self.router = router
        self.watchers: dict[str, set] = {}              # owned user -> watcher users (idempotent)
        self._subs: dict[int, tuple] = {}               # id(session) -> (session, set of watched users)
        self._local_watch: dict[tuple, int] = {}        # (watcher, user) -> local sessions watching
        self._hidden: dict[str, bool] = {}
        self._buckets: dict[int, list] = {}             # id(session) -> [tokens, last refill]
        self.typing_rate = typing_rate
        self.typing_burst = typing_burst
        self.typing_dropped = 0
        # set by a multi-worker gateway: is_local(user), owner_of(user), bus_send(worker, msg)
        self.is_local = lambda user: True
        self.owner_of = lambda user: 0
        self.bus_send = None

    # -- frames from local sessions -----------------------------------------------------
    def handle(self, session, ftype: int, body: bytes) -> None:
        frame = decode_body(ftype, 0, body)
        if ftype == FrameType.SUBSCRIBE:
            self.subscribe(session, frame.users, frame.on)
        elif ftype == FrameType.TYPING:
            self.typing(session, frame.peer, frame.typing)
        elif ftype == FrameType.PRIVACY:
            try:
                self.set_hidden(session.user, frame.hide_last_seen)
            except StoreError as exc:      # a full disk: the setting is unchanged, the session goes on
                session.error(exc.code, str(exc), 0, False)
        else:
            raise UnexpectedFrame(f"{FrameType(ftype).name} is not sent by clients")

    def subscribe(self, session, users, on: bool) -> None:
        entry = self._subs.get(id(session))
        if entry is None:
            entry = self._subs[id(session)] = (session, set())
        watched = entry[1]
        for user in users:
            if not is_user_id(user):
                # nobody can ever connect as it: offline, nothing known, and nothing to follow
                if on:
                    session.write_frame(frames.Presence(user, False, 0))
                continue
            if on == (user in watched):
                if on:                   # asked again: answer with the state again
                    self._route({"t": "sub", "user": user, "watcher": session.user, "on": True}, user)
                continue
            (watched.add if on else watched.discard)(user)
            self._count(session.user, user, 1 if on else -1)

    def _count(self, watcher: str, user: str, delta: int) -> None:
        """The owner hears "on" when this worker's first session watches, "off" after the last."""
        key = (watcher, user)
        n = self._local_watch.get(key, 0) + delta
        if n > 0:
            self._local_watch[key] = n
        else:
            self._local_watch.pop(key, None)
        if (delta > 0 and n == 1) or (delta < 0 and n <= 0):
            self._route({"t": "sub", "user": user, "watcher": watcher, "on": delta > 0}, user)

    def session_closed(self, session) -> None:
        entry = self._subs.pop(id(session), None)
        self._buckets.pop(id(session), None)
        if entry is not None:
            for user in entry[1]:
                self._count(session.user, user, -1)

    def owner_back(self, worker: int) -> None:
        """A link to `worker` was re-made (it may have restarted and forgotten its
        watchers): tell it again what this worker's sessions watch there."""
        for watcher, user in list(self._local_watch):
            if not self.is_local(user) and self.owner_of(user) == worker:
                self._route({"t": "sub", "user": user, "watcher": watcher, "on": True}, user)

    def forget(self, in_shard) -> None:
        """Users `in_shard(user)` says are moving away: their watchers (the new
        owner hears them again: resubscribe) and cached privacy settings."""
        for user in [u for u in self.watchers if in_shard(u)]:
            del self.watchers[user]
        for user in [u for u in self._hidden if in_shard(u)]:
            del self._hidden[user]

    def resubscribe(self, in_shard) -> None:
        """The users `in_shard(user)` says have a new owner: tell it what this
        worker's sessions watch there (as owner_back does for a restarted worker)."""
        for watcher, user in list(self._local_watch):
            if in_shard(user):
                self._route({"t": "sub", "user": user, "watcher": watcher, "on": True}, user)

    def typing(self, session, peer: str, state: bool) -> None:
        if not is_user_id(peer):
            self.typing_dropped += 1          # to nobody: no user has that id
            return
        now = time.monotonic()
        bucket = self._buckets.setdefault(id(session), [self.typing_burst, now])
        bucket[0] = min(self.typing_burst, bucket[0] + (now - bucket[1]) * self.typing_rate)
        bucket[1] = now
        if bucket[0] < 1:
            self.typing_dropped += 1          # over the rate: dropped, it is only a hint
            return
        bucket[0] -= 1
        self._route({"t": "typing", "to": peer, "from": session.user, "on": state}, peer)

    # -- the owner's side ---------------------------------------------------------------
    def _route(self, msg: dict, user: str) -> None:
        """Handle `msg` where `user` lives: here, or on its owner over the bus."""
        if self.is_local(user) or self.bus_send is None:
            self.control(msg)
        else:
            self.bus_send(self.owner_of(user), msg)

    def control(self, msg: dict) -> None:
        t = msg["t"]
        if t == "sub":
            user, watcher = msg["user"], msg["watcher"]
            if msg["on"]:
                self.watchers.setdefault(user, set()).add(watcher)
                self._tell(watcher, self.state_of(user))
            else:
                table = self.watchers.get(user)
                if table is not None:
                    table.discard(watcher)
                    if not table:
                        del self.watchers[user]
        elif t == "typing":
            for s in self.router.sessions_of(msg["to"]):
                s.write_frame(frames.Typing(msg["from"], msg["on"]))
        elif t == "pres":
            for s in self.router.reply_sessions(msg["to"]):       # send-only watchers too
                s.write_frame(frames.Presence(msg["user"], msg["online"], msg["seen"]))

    def _tell(self, watcher: str, p: frames.Presence) -> None:
        self._route({"t": "pres", "to": watcher, "user": p.user, "online": p.online, "seen": p.last_seen_ms},
                    watcher)

    def state_of(self, user: str) -> frames.Presence:
        online = bool(self.router.sessions_of(user))
        seen = 0 if self.hidden(user) else self._last_seen(user)
        return frames.Presence(user, online, seen)

    def _last_seen(self, user: str) -> int:
        store = self.router.store
        if self.router.sessions_of(user):
            return int(time.time() * 1000)
        return store.last_seen(user) if hasattr(store, "last_seen") else 0

    def changed(self, user: str) -> None:
        """A user's first device came online or its last went offline."""
        watchers = self.watchers.get(user)
        if watchers:
            p = self.state_of(user)
            for watcher in list(watchers):
                self._tell(watcher, p)

    # -- privacy --------------------------------------------------------------------------
    def hidden(self, user: str) -> bool:
        h = self._hidden.get(user)
        if h is None:
            store = self.router.store
            value = store.meta_get_for(user, PRIVACY_KEY.format(user)) if hasattr(store, "meta_get_for") else None
            h = self._hidden[user] = bool(value and value[0])
        return h

    def set_hidden(self, user: str, hide: bool) -> None:
        """Raises StoreError (nothing changed) if the setting cannot be stored."""
        store = self.router.store
        if hasattr(store, "meta_put_for"):
            store.meta_put_for(user, PRIVACY_KEY.format(user), struct.pack("!B", 1 if hide else 0))
        self._hidden[user] = hide
        self.changed(user)
