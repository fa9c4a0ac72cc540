"""Limits and abuse, per worker (docs/limits.md): connections per worker and per
source address, the connect rate per address, idle sessions and slow consumers.

Nothing here runs per frame or holds a timer per connection: admission runs once
per accepted connection, and one coarse sweep (every `limits_sweep_interval`, at
most an eighth of a ping interval) checks the paused (slow) sessions, keeps the
clock that reads stamp, and watches the few sessions near a deadline; once per
ping interval a pass over the connections, a slice per turn, finds those.
Deadlines: an idle timeout (nothing read for `idle_timeout_pings` ping intervals)
and the expiry of the session's token. Every limit that triggers is counted in
`events` by class and logged the first time, then summarised at most once a
minute per class.
"""
import time
from collections import Counter

from _core import frames
from _core.codec import encode
from _core.protocol import ErrorCode, GoawayCode

from . import log

_log = log.get("switchboard.limits")

#: connections visited per loop turn by the idle pass (keeps each turn short)
IDLE_SLICE = 5_000
#: summaries of limit events: at most one line per class this often
SUMMARY_EVERY = 60.0
#: a slow consumer told to go away has this long to take the GOAWAY before it is cut
SLOW_GRACE = 1.0


class _Addr:
    """One source address: its open connections and its connect-rate bucket."""
    __slots__ = ("ip", "count", "tokens", "stamp")

    def __init__(self, ip: str, tokens: float, stamp: float):
        self.ip, self.count, self.tokens, self.stamp = ip, 0, tokens, stamp


class Limits:
    def __init__(self, gateway):
        self.gw = gateway
        self.cfg = gateway.config
        self.addrs: dict[str, _Addr] = {}
        self.events: Counter = Counter()     # limit class -> times it triggered
        self._reported: dict[str, int] = {}
        self._next_summary = 0.0
        self.paused: dict = {}               # slow connection -> monotonic time of its last progress
        self._transport_paused: set = set()  # between pause_writing and resume_writing
        self._idle_todo: list = []
        self._idle_next = 0.0
        #: monotonic time of the last sweep: what a read stamps on its connection (`Connection._idle`)
        self.clock = time.monotonic()
        #: each earlier clock value -> when the next sweep replaced it: a read that stamped
        #: that value happened before then (kept for a timeout and two intervals)
        self._tick_end: dict[float, float] = {}
        #: the sweep's period: fine enough for deadlines within a quarter of a ping interval
        self.tick = min(self.cfg.limits_sweep_interval, self.cfg.ping_interval_ms / 8000)
        self._due: set = set()               # sessions whose deadline may come before the next pass
        self._expiries: dict[int, int] = {}  # expiry -> the same int: sessions share one object
        self._timer = None
        self._rate_limited = 0               # the router's count of RATE_LIMITED SENDs, last seen

    # -- events ------------------------------------------------------------------------
    def hit(self, kind: str, detail: str = "", n: int = 1) -> None:
        """Count a limit event; log the first of its class (summaries follow from the sweep)."""
        self.events[kind] += n
        if kind not in self._reported:
            self._reported[kind] = 1
            self._reported[kind] = self.events[kind]
            _log.warning("event=limit kind=%s count=%d %s (further ones counted, summarised every %ds)",
                         kind, self.events[kind], detail, SUMMARY_EVERY)

    def _summarise(self) -> None:
        for kind, n in self.events.items():
            last = self._reported.get(kind, 0)
            if n != last:
                self._reported[kind] = n
                _log.warning("event=limit kind=%s count=%d new=%d", kind, n, n - last)

    # -- admission ---------------------------------------------------------------------
    def admit(self, conn) -> bool:
        """A new connection: count it against its address, or refuse it (fatal ERROR, close)."""
        cfg, now = self.cfg, time.monotonic()
        peer = conn.transport.get_extra_info("peername")
        ip = peer[0] if peer else ""
        a = self.addrs.get(ip)
        if a is None:
            a = self.addrs[ip] = _Addr(ip, float(cfg.connect_burst_per_ip), now)
        if not conn.handed_off:          # a hand-off was admitted by the worker that accepted it
            if cfg.max_connections and self.gw.open_connections >= cfg.max_connections:
                return self._refuse(conn, "max_connections", ErrorCode.UNAVAILABLE,
                                    f"this worker holds {cfg.max_connections} connections; retry later", ip)
            if cfg.max_connections_per_ip and a.count >= cfg.max_connections_per_ip:
                return self._refuse(conn, "max_connections_per_ip", ErrorCode.RATE_LIMITED,
                                    f"too many connections from {ip}", ip)
            if cfg.connect_rate_per_ip:
                a.tokens = min(float(cfg.connect_burst_per_ip), a.tokens + (now - a.stamp) * cfg.connect_rate_per_ip)
                a.stamp = now
                if a.tokens < 1.0:
                    return self._refuse(conn, "connect_rate_per_ip", ErrorCode.RATE_LIMITED,
                                        f"connecting too often from {ip}; retry later", ip)
                a.tokens -= 1.0
        a.count += 1
        conn._addr = a
        return True

    def _refuse(self, conn, kind: str, code: int, reason: str, ip: str) -> bool:
        self.hit(kind, f"peer={ip}")
        conn.decoder.stop()
        conn.write_and_close(encode(frames.Error(code, 0, reason, True)))
        return False

    def release(self, conn) -> None:
        a = conn._addr
        if a is not None:
            conn._addr = None
            a.count -= 1
            if a.count == 0 and self._full(a, time.monotonic()):
                self.addrs.pop(a.ip, None)
        self.paused.pop(conn, None)
        self._transport_paused.discard(conn)

    def _full(self, a: _Addr, now: float) -> bool:
        cfg = self.cfg
        return not cfg.connect_rate_per_ip or a.tokens + (now - a.stamp) * cfg.connect_rate_per_ip >= cfg.connect_burst_per_ip

    # -- slow consumers ----------------------------------------------------------------
    def session_opened(self, conn) -> None:
        """After WELCOME: its deadlines, the write buffer marks; a backlog larger than
        the high mark was queued in part, the session starts paused and continues as
        it drains."""
        cfg = self.cfg
        if self._deadline(conn, time.monotonic(), time.time()) == _SOON:
            self._due.add(conn)              # e.g. a token expiring before the next pass
        conn.transport.set_write_buffer_limits(high=cfg.out_high_water, low=cfg.out_low_water)
        if conn.session.paused:
            self.paused[conn] = time.monotonic()
            self.gw.loop.call_soon(self.drain, conn)

    def pause_writing(self, conn) -> None:
        s = conn.session
        self._transport_paused.add(conn)
        if s is not None and not s.send_only and not s.closed:
            if not s.paused:
                self.hit("slow_consumer_paused", f"user={s.user}")
            self.gw.router.pause_session(s)
            self.paused.setdefault(conn, time.monotonic())

    def resume_writing(self, conn) -> None:
        self._transport_paused.discard(conn)
        self.drain(conn)

    def queued(self, conn) -> int:
        s = conn.session
        return conn.transport.get_write_buffer_size() + (s.pending_output if s is not None else 0)

    def drain(self, conn) -> None:
        """A paused session whose output went below the low mark: push what it missed
        (from the log, a high mark's worth at a time), then live again."""
        s = conn.session
        if conn not in self.paused:
            return
        if s is None or s.closed or conn.transport.is_closing():
            self.paused.pop(conn, None)
            return
        if self.queued(conn) > self.cfg.out_low_water:
            if conn not in self._transport_paused:      # no resume_writing will come: look again soon
                self.gw.loop.call_later(0.01, self.drain, conn)
            return
        if self.gw.router.resume_session(s, self.cfg.out_high_water):
            self.paused[conn] = time.monotonic()         # progress: the stall clock starts again
            self.gw.loop.call_soon(self.drain, conn)     # runs after this turn's flush
        else:
            del self.paused[conn]

    def check_slow(self, conn, now: float | None = None) -> None:
        """A paused session: cut it past the hard limit or the stall timeout."""
        cfg, s = self.cfg, conn.session
        now = time.monotonic() if now is None else now
        since = self.paused.get(conn)
        if since is None or s is None or s.closed:
            return
        queued = self.queued(conn)
        if cfg.out_hard_limit and queued > cfg.out_hard_limit:
            self._cut(conn, "slow_consumer_hard_limit",
                      f"{queued} bytes queued, over the limit of {cfg.out_hard_limit}")
        elif cfg.slow_consumer_timeout and now - since > cfg.slow_consumer_timeout:
            self._cut(conn, "slow_consumer_timeout", f"not reading for {now - since:.0f} s")

    def _cut(self, conn, kind: str, reason: str) -> None:
        s = conn.session
        self.hit(kind, f"user={s.user} {reason}")
        self.paused.pop(conn, None)
        s.goaway(GoawayCode.SLOW_CONSUMER, 0, f"slow consumer: {reason}; reconnect to resume")
        # it is not reading: the GOAWAY may never get through; cut it after a short grace
        self.gw.loop.call_later(SLOW_GRACE, conn.transport.abort)

    # -- the sweep ---------------------------------------------------------------------
    def start(self) -> None:
        self._timer = self.gw.loop.call_later(self.tick, self._sweep)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep(self) -> None:
        now = time.monotonic()
        self._tick_end[self.clock] = now
        self.clock = now
        try:
            n = self.gw.router.rate_limited          # counted in the Cython SEND path
            if n != self._rate_limited:
                self.hit("msg_rate", f"limit={self.cfg.msg_rate:g}/s burst={self.cfg.msg_burst}", n - self._rate_limited)
                self._rate_limited = n
            for conn in list(self.paused):
                self.check_slow(conn, now)
                self.drain(conn)
            if self._due:
                wall = time.time()
                for conn in list(self._due):
                    if self._deadline(conn, now, wall) != _SOON:
                        self._due.discard(conn)
            if now >= self._idle_next and not self._idle_todo:
                self._idle_next = now + self.cfg.ping_interval_ms / 1000
                self._idle_todo = [c for c in self.gw.all_connections() if c.session is not None]
                self._expiries = {e: e for e in self._expiries if e > time.time()}
                keep = now - (self.cfg.idle_timeout_pings + 2) * self.cfg.ping_interval_ms / 1000
                self._tick_end = {t: end for t, end in self._tick_end.items() if end >= keep}
                self.gw.loop.call_soon(self._idle_pass)
            if now >= self._next_summary:
                self._next_summary = now + SUMMARY_EVERY
                self._summarise()
                for ip in [ip for ip, a in self.addrs.items() if a.count == 0 and self._full(a, now)]:
                    del self.addrs[ip]
        finally:
            self._timer = self.gw.loop.call_later(self.tick, self._sweep)

    # -- deadlines: idle sessions and expired tokens -----------------------------------
    def expiry(self, when: int) -> int:
        """`when` (a token's expiry) as the object other sessions with that expiry hold."""
        return self._expiries.setdefault(when, when)

    def _idle_pass(self) -> None:
        """One slice of the pass made once per ping interval: act on sessions past a
        deadline, and hand those whose deadline may come before the next pass to
        the sweep (`_due`), which looks at them every tick."""
        todo = self._idle_todo
        batch, self._idle_todo = todo[-IDLE_SLICE:], todo[:-IDLE_SLICE]
        now, wall = time.monotonic(), time.time()
        for conn in batch:
            if self._deadline(conn, now, wall) == _SOON:
                self._due.add(conn)
        if self._idle_todo:
            self.gw.loop.call_soon(self._idle_pass)

    def _deadline(self, conn, now: float, wall: float) -> int:
        """Act on `conn` if a deadline has passed (_DONE); _SOON if one may pass
        before the next pass; else _LATER.

        A read stamps the clock of the last sweep; the read happened before the
        next sweep (`_tick_end`), so the session has been silent for at least
        `now` minus that: the GOAWAY is never early, and it is sent at most two
        sweeps late (a quarter of a ping interval on an idle loop)."""
        s = conn.session
        if s is None or s.closed or conn.transport.is_closing():
            return _DONE
        cfg = self.cfg
        interval = cfg.ping_interval_ms / 1000
        if conn._expires and wall >= conn._expires:
            conn._expires = 0                        # told once
            self.gw.count_error(ErrorCode.TOKEN_EXPIRED)
            conn.fail(ErrorCode.TOKEN_EXPIRED, "the session's token expired; connect with a new one")
            return _DONE
        soon = bool(conn._expires) and wall + interval + 2 * self.tick >= conn._expires
        n = cfg.idle_timeout_pings
        if n:
            timeout = n * interval
            stamp = conn._idle
            if stamp == self.clock:
                silent = 0.0                         # read during the current tick
            else:                                    # a stamp too old to be kept: silent long ago
                silent = now - self._tick_end.get(stamp, stamp)
            if silent >= timeout:
                conn._idle = _NEVER                  # told once (a read after this changes nothing)
                self.hit("idle_timeout", f"user={s.user}")
                s.goaway(GoawayCode.IDLE_TIMEOUT, 0, f"no frame for {n} ping intervals of {cfg.ping_interval_ms} ms")
                self.gw.loop.call_later(cfg.shutdown_grace, conn.transport.abort)
                return _DONE
            soon = soon or now - stamp + interval + 2 * self.tick >= timeout
        return _SOON if soon else _LATER


_DONE, _SOON, _LATER = 0, 1, 2
_NEVER = float("inf")
