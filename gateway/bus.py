"""The bus: how a worker reaches shards it does not own.

The router needs three things from a bus: `link_to(worker)` (a LinkCore whose
output buffer takes FWD frames, flushed with the router's per-turn batch),
`hand_off(worker, fd, data)` (pass a client connection and the bytes already
read from it), and pressure signals. `LocalBus` implements them with Unix
stream sockets between the worker processes of one machine, carrying the same
framing as client connections; file descriptors travel with SCM_RIGHTS.

Between the nodes of a cluster, gateway/cluster/natsbus.py carries the same
frames over NATS subjects, and a HELLO at the wrong node is redirected (GOAWAY
REDIRECT), since descriptors cannot cross hosts (docs/cluster.md).
"""
import collections
import json
import os
import socket
import struct
import time

from _core._codec import Decoder
from _core._routing import LinkCore

from . import log

_log = log.get("switchboard.bus")

LT_HANDOFF = 0x44
LT_LINK_HELLO = 0x45
LT_CTRL = 0x47            # presence and typing (JSON: low rate, and easy to read in a capture)
LT_HANDOFF_WS = 0x48      # a WebSocket connection past its handshake (gateway/wsconn.py says what it carries)
LT_LAST = 0x48
#: Largest frame on a link. It must hold the largest message a worker sends another: a FWD
#: of the largest payload (max_frame is at most 16 MiB) and a group copy, whose JSON carries
#: that payload in base64 (4/3 of it, 22.4 MB), and a group's answer (a few MB at most).
LINK_MAX_FRAME = 32 << 20
READ_SIZE = 1 << 18
#: queued bytes to one worker past which this worker stops reading its clients
HIGH_WATER = 8 << 20
LOW_WATER = 2 << 20
_HDR = struct.Struct("!IBB")


def link_frame(ftype: int, body: bytes) -> bytes:
    return _HDR.pack(len(body) + 2, ftype, 0) + body


class Link:
    """One Unix socket to another worker, read and written without a transport
    (asyncio transports cannot carry file descriptors)."""

    def __init__(self, bus: "LocalBus", sock: socket.socket, peer: int):
        self.bus = bus
        self.sock = sock
        self.peer = peer
        self.core = LinkCore(bus.router, peer, self._queue_bytes, self.close, self._control)
        self.decoder = Decoder(self.core, LINK_MAX_FRAME, LT_LAST)
        self.out = collections.deque()      # (bytes, fd or None), in order
        self.out_bytes = 0
        self.fds = collections.deque()      # received descriptors, one per HANDOFF frame, in order
        self.closed = False
        self._writer = False
        sock.setblocking(False)
        bus.loop.add_reader(sock.fileno(), self._readable)

    # -- reading ----------------------------------------------------------------------
    def _readable(self) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, READ_SIZE, 64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(exc)
            return
        self.fds.extend(fds)
        if not data:
            self.close(None)
            return
        try:
            self.decoder.feed(data)
        except Exception as exc:                 # a broken link is dropped, never the worker
            _log.exception("event=link_protocol_error peer=%d", self.peer)
            self.close(exc)

    def _control(self, core, ftype: int, body: bytes) -> None:
        if ftype == LT_HANDOFF or ftype == LT_HANDOFF_WS:
            fd = self.fds.popleft()
            self.bus.on_handoff(fd, body, ftype == LT_HANDOFF_WS)
        elif ftype == LT_LINK_HELLO:
            (self.peer,) = struct.unpack("!H", body)
            self.bus.peer_up(self.peer)
        elif ftype == LT_CTRL:
            self.bus.router.control_message(json.loads(body))
        else:
            raise ValueError(f"unexpected frame 0x{ftype:02x} on a link")

    # -- writing ----------------------------------------------------------------------
    def _queue_bytes(self, data: bytes) -> None:
        self.queue(data, None)

    def queue(self, data: bytes, fd: int | None) -> None:
        if self.closed:
            if fd is not None:
                os.close(fd)
            return
        self.out.append((memoryview(data), fd))
        self.out_bytes += len(data)
        if not self._writer:
            self._flush()
        self.bus.pressure_check()

    def _flush(self) -> None:
        while self.out:
            data, fd = self.out[0]
            try:
                n = socket.send_fds(self.sock, [data], [fd]) if fd is not None else self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.close(exc)
                return
            if fd is not None:
                os.close(fd)                   # our duplicate; the receiver has its own now
            self.out_bytes -= n
            if n < len(data):
                self.out[0] = (data[n:], None)
                break
            self.out.popleft()
        want = bool(self.out)
        if want != self._writer:
            self._writer = want
            if want:                 # more than the socket takes at once: the rest when it is writable
                self.bus.loop.add_writer(self.sock.fileno(), self._flush)
            else:
                self.bus.loop.remove_writer(self.sock.fileno())
        self.bus.pressure_check()

    def close(self, exc=None) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.bus.loop
        loop.remove_reader(self.sock.fileno())
        if self._writer:
            loop.remove_writer(self.sock.fileno())
        for _, fd in self.out:
            if fd is not None:
                os.close(fd)
        for fd in self.fds:
            os.close(fd)
        self.out.clear()
        self.out_bytes = 0
        self.sock.close()
        self.core._detach()
        self.bus.router.fail_link(self.core)
        self.bus.link_closed(self, exc)


class LocalBus:
    """Links between the workers of one supervisor, in the abstract Unix namespace."""

    def __init__(self, cluster: str, me: int, workers: int, router, shards, on_handoff, on_pressure=None):
        self.cluster, self.me, self.workers = cluster, me, workers
        self.router = router
        self.shards = shards
        self.on_handoff = on_handoff
        self.on_pressure = on_pressure
        self.loop = None
        self.listener = None
        self.outgoing: dict[int, Link] = {}
        self.incoming: set[Link] = set()
        self._retry_at: dict[int, float] = {}
        self._lost: dict[int, bool] = {}          # workers whose link broke, to re-link
        self._closing = False
        self.paused = False
        self.handoffs_sent = 0

    def address(self, worker: int) -> str:
        return f"\0switchboard-{self.cluster}-w{worker}"

    def start(self, loop) -> None:
        self.loop = loop
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.address(self.me))
        self.listener.listen(256)
        self.listener.setblocking(False)
        loop.add_reader(self.listener.fileno(), self._accept)
        self.router.set_bus(self.link_to, self.shards.owner, self.shards.is_local)
        for service in (self.router.presence, self.router.groups):
            service.is_local, service.owner_of, service.bus_send = self.shards.is_local, self.shards.owner, self.send_control

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                _log.warning("event=link_accept_failed error=%s", log.q(repr(exc)))
                return
            self.incoming.add(Link(self, conn, -1))

    def link_to(self, worker: int):
        """A live link's LinkCore, connecting on first use; None if the worker is down."""
        link = self.outgoing.get(worker)
        if link is not None and not link.closed:
            return link.core
        now = time.monotonic()
        if self._retry_at.get(worker, 0) > now:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(0.2)
            sock.connect(self.address(worker))
        except OSError:
            sock.close()
            self._retry_at[worker] = now + 0.05
            return None
        link = self.outgoing[worker] = Link(self, sock, worker)
        link.queue(link_frame(LT_LINK_HELLO, struct.pack("!H", self.me)), None)
        if self._lost.pop(worker, None):
            # the worker may have restarted: re-send what it must know about our sessions
            self.loop.call_soon(self.router.presence.owner_back, worker)
        return link.core

    def peer_up(self, worker: int) -> None:
        """`worker` connected to us, so it is up (perhaps restarted): forget a connect
        back-off and link back at once. Else answers to what it sends next (the
        presence its watchers subscribe to) could meet the back-off and be dropped,
        and its watchers would wait for a change that may never come."""
        self._retry_at.pop(worker, None)
        self.link_to(worker)

    def send_control(self, worker: int, msg: dict) -> bool:
        """A presence/typing message for the worker that owns its user; dropped if
        that worker is down (these are hints, re-sent on the next change)."""
        if self.link_to(worker) is None:
            return False
        body = json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode()
        if len(body) + 2 > LINK_MAX_FRAME:      # the other end would drop the link on it
            raise ValueError(f"a {msg.get('t')!r} message of {len(body)} bytes is over the link's frame limit")
        self.outgoing[worker].queue(link_frame(LT_CTRL, body), None)
        return True

    def hand_off(self, worker: int, fd: int, data: bytes, websocket: bool = False) -> bool:
        """Give a client connection to `worker`; our descriptor is closed either way.
        `websocket`: past its opening handshake, `data` is gateway/wsconn.py's hand-off payload."""
        if self.link_to(worker) is None:
            os.close(fd)
            return False
        self.outgoing[worker].queue(link_frame(LT_HANDOFF_WS if websocket else LT_HANDOFF, data), fd)
        self.handoffs_sent += 1
        return True

    def link_closed(self, link: Link, exc) -> None:
        self.incoming.discard(link)
        if self.outgoing.get(link.peer) is link:
            del self.outgoing[link.peer]
            self._lost[link.peer] = True
            self._reconnect_later(link.peer)
        _log.info("event=link_closed peer=%d error=%s", link.peer, log.q(repr(exc)))
        self.pressure_check()

    def _reconnect_later(self, worker: int, delay: float = 0.1) -> None:
        """Re-make a broken link once the worker is back (a restart takes ~0.1-1 s)."""
        def attempt():
            if self._closing or worker in self.outgoing:
                return
            if self.link_to(worker) is None:
                self.loop.call_later(min(delay * 2, 2.0), lambda: self._reconnect_later(worker, min(delay * 2, 2.0)))
        self.loop.call_later(delay, attempt)

    def pressure_check(self) -> None:
        queued = max((l.out_bytes for l in (*self.outgoing.values(), *self.incoming)), default=0)
        if not self.paused and queued > HIGH_WATER:
            self.paused = True
        elif self.paused and queued < LOW_WATER:
            self.paused = False
        else:
            return
        _log.info("event=bus_%s queued=%d", "paused" if self.paused else "resumed", queued)
        if self.on_pressure is not None:
            self.on_pressure(self.paused)

    def close(self) -> None:
        self._closing = True
        for link in [*self.outgoing.values(), *self.incoming]:
            link.close(None)
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
