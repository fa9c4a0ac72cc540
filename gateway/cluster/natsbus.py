"""Links to the workers of other nodes, over core NATS.

The same frames as the Unix links between the workers of one node (FWD,
FWD_ACK/FWD_ERR, receipts, control messages: gateway/bus.py), carried on one
subject per worker, `NAME.w.NODE.WORKER` — never one per user or per shard, so a
NATS server holds two subscriptions per worker however many users there are.

Each message on a subject is an envelope: who sent it (node, worker), which of
the two streams between a pair of workers it belongs to (REQ: frames for the
receiver's incoming link — FWDs, receipts, control; REP: answers for its outgoing
link — FWD_ACK/FWD_ERR), the stream's incarnation and sequence number, and the
sender's shard map epoch (gateway/cluster/shardmap.py: the receiver refuses
frames for shards it does not own at that epoch). A loop turn's frames for one
worker go out as one message, cut at NATS max_payload (a frame up to max_frame
spans several; the receiver's decoder joins them).

NATS delivers a publisher's messages on a subject in order but at most once: a
reconnect can lose some. A gap in a stream's sequence, or a new incarnation, makes
the receiver drop what it had half-read and ask for a RESET; the sender then
answers every FWD it has waiting on that link with UNAVAILABLE (the client
resends; the owner's producer table drops what it had stored, and answers with
the original ACK) and drops what the link wrote but has not sent yet
(`Peer.restart_tx`). A FWD unanswered for `cluster_timeout` is answered the same
way, so no SEND waits forever on a node that went silent.
"""
import asyncio
import collections
import json
import os
import struct
import time

from _core._codec import Decoder
from _core._routing import LinkCore

from .. import log
from ..bus import HIGH_WATER, LINK_MAX_FRAME, LOW_WATER, LT_CTRL, LT_LAST, link_frame

_log = log.get("switchboard.cluster")

MAGIC = 0x53
K_REQ, K_REP, K_RESET = 1, 2, 3
_ENV = struct.Struct("!BBHQQQB")          # magic, kind, src worker, incarnation, seq, epoch, len(src node)
#: a remote (node, worker) is the router's destination REMOTE_BASE + its index here
REMOTE_BASE = 1 << 16
#: whose id each control message is about: it is handled only by the node that owns that id
CTRL_TARGET = {"gop": "group", "greply": "to", "gcopy": "member", "gcopies": "members", "gcopied": "group",
               "sub": "user", "typing": "to", "pres": "to"}


def subject(cluster: str, node: str, worker: int) -> str:
    return f"{cluster}.w.{node}.{worker}"


class Peer:
    """One worker of another node, seen from this worker: our link for the FWDs we
    send it (answers come back on REP) and its link for the FWDs it sends us."""

    def __init__(self, bus: "NatsBus", node: str, worker: int, dest: int):
        self.bus, self.node, self.worker, self.dest = bus, node, worker, dest
        self.subject = subject(bus.cluster, node, worker)
        router = bus.router
        self.out = LinkCore(router, dest, lambda data: bus.queue(self, K_REQ, data), self._broken, self._control)
        self.inc = LinkCore(router, dest, lambda data: bus.queue(self, K_REP, data), self._broken, self._control)
        self.rx_epoch = 0
        self.inc.fence = lambda recipient: bus.fence(recipient, self.rx_epoch)
        self.out_dec = Decoder(self.out, LINK_MAX_FRAME, LT_LAST)
        self.in_dec = Decoder(self.inc, LINK_MAX_FRAME, LT_LAST)
        self.tx = {K_REQ: [_incarnation(), 0], K_REP: [_incarnation(), 0]}
        self.rx = {K_REQ: [0, 0], K_REP: [0, 0]}      # incarnation, last seq
        self.reset_asked = {K_REQ: 0, K_REP: 0}      # the incarnation we asked a RESET for
        self.last_heard = time.monotonic()

    def _control(self, core, ftype: int, body: bytes) -> None:
        if ftype != LT_CTRL:
            raise ValueError(f"unexpected frame 0x{ftype:02x} on a link to node {self.node}")
        msg = json.loads(body)
        target = msg.get(CTRL_TARGET.get(msg.get("t"), ""), None)
        if isinstance(target, list):                  # several members: obey for those that are ours
            ours = [m for m in target if not self.bus.fence(m, self.rx_epoch)]
            if len(ours) < len(target):
                self.bus.controls_fenced += 1         # the others' copies: their sender retries them
                if not ours:
                    return
                msg = {**msg, "members": ours}
        elif target is not None and self.bus.fence(target, self.rx_epoch):
            self.bus.controls_fenced += 1             # not ours at the sender's map: its sender retries
            return
        self.bus.router.control_message(msg)

    def _broken(self, exc=None) -> None:
        """A link's frames could not be read: start both streams afresh."""
        self.bus.reset_peer(self, "link_error")

    def restart_tx(self, kind: int) -> None:
        """Our stream `kind` to this worker starts again under a new incarnation. What
        its link wrote and has not sent (waiting for this turn's commit, too) is
        dropped, not sent on the new stream: a later FWD must never reach the owner
        after an earlier one the old stream lost (that one's resend would be taken
        for a retry of something stored). The FWDs it held are failed with the rest."""
        self.tx[kind] = [_incarnation(), 0]
        (self.out if kind == K_REQ else self.inc).discard_output()

    def fail_pending(self) -> None:
        """Every FWD we have waiting on this worker gets UNAVAILABLE (retried by its client)."""
        if self.out.pending:
            self.bus.router.fail_link(self.out)

    def new_decoder(self, kind: int) -> None:
        if kind == K_REP:
            self.out_dec = Decoder(self.out, LINK_MAX_FRAME, LT_LAST)
        else:
            self.in_dec = Decoder(self.inc, LINK_MAX_FRAME, LT_LAST)


def _incarnation() -> int:
    return int.from_bytes(os.urandom(8), "big") or 1


class NatsBus:
    """This worker's links to every worker of the other nodes, on one NATS connection."""

    def __init__(self, nc, cluster: str, node: str, worker: int, router, epoch, fence, alive, timeout: float,
                 on_pressure=None):
        """`epoch()`: our map epoch; `fence(recipient, epoch)`: 0 or the code a frame for
        `recipient` routed at `epoch` is refused with; `alive(node)`: its lease is live."""
        self.nc, self.cluster, self.node, self.worker, self.router = nc, cluster, node, worker, router
        self.epoch, self.fence, self.alive, self.timeout = epoch, fence, alive, timeout
        self.on_pressure = on_pressure
        self.peers: dict[tuple[str, int], Peer] = {}
        self.by_dest: dict[int, Peer] = {}
        self._dests: dict[tuple[str, int], int] = {}
        self.out = collections.deque()        # (peer, envelope bytes) waiting for the publisher task
        self.out_bytes = 0
        self.paused = False
        self._publisher = None
        self._sub = None
        self._sweeper = None
        self.loop = None
        self.max_payload = 1 << 20
        self.connected = True
        # counters (gateway/metrics.py)
        self.msgs_out = self.bytes_out = self.msgs_in = self.bytes_in = 0
        self.resets = self.timeouts = self.controls_fenced = self.dropped = 0

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.max_payload = self.nc.max_payload or self.max_payload
        self._sub = await self.nc.subscribe(subject(self.cluster, self.node, self.worker), cb=self._on_msg)
        self._sweeper = self.loop.create_task(self._sweep())

    # -- destinations -----------------------------------------------------------------
    def dest(self, node: str, worker: int) -> int:
        d = self._dests.get((node, worker))
        if d is None:
            d = self._dests[(node, worker)] = REMOTE_BASE + len(self._dests)
        return d

    def peer(self, node: str, worker: int) -> Peer:
        p = self.peers.get((node, worker))
        if p is None:
            d = self.dest(node, worker)
            p = self.peers[(node, worker)] = self.by_dest[d] = Peer(self, node, worker, d)
        return p

    def link_to(self, dest: int):
        p = self.by_dest.get(dest)
        if p is None:
            for (node, worker), d in self._dests.items():
                if d == dest:
                    p = self.peer(node, worker)
                    break
            else:
                return None
        if not self.connected or not self.alive(p.node):
            return None
        return p.out

    def send_control(self, dest: int, msg: dict) -> bool:
        link = self.link_to(dest)
        if link is None:
            return False
        body = json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode()
        if len(body) + 2 > LINK_MAX_FRAME:
            raise ValueError(f"a {msg.get('t')!r} message of {len(body)} bytes is over the link's frame limit")
        self.queue(self.by_dest[dest], K_REQ, link_frame(LT_CTRL, body))
        return True

    # -- sending ----------------------------------------------------------------------
    def queue(self, peer: Peer, kind: int, data: bytes) -> None:
        """A turn's frames for `peer`: enveloped, cut at max_payload, published in order."""
        if not data:
            return
        stream = peer.tx[kind]
        node = self.node.encode()
        room = self.max_payload - _ENV.size - len(node)
        epoch = self.epoch()
        view = memoryview(data)
        for i in range(0, len(data), room):
            stream[1] += 1
            env = _ENV.pack(MAGIC, kind, self.worker, stream[0], stream[1], epoch, len(node)) + node
            self._enqueue(peer.subject, env + view[i:i + room])

    def _enqueue(self, subj: str, payload: bytes) -> None:
        self.out.append((subj, payload))
        self.out_bytes += len(payload)
        if self._publisher is None or self._publisher.done():
            self._publisher = self.loop.create_task(self._publish())
        if not self.paused and self.out_bytes > HIGH_WATER:
            self._set_paused(True)

    async def _publish(self) -> None:
        nc = self.nc
        while self.out:
            subj, payload = self.out.popleft()
            self.out_bytes -= len(payload)
            try:
                await nc.publish(subj, payload)
                self.msgs_out += 1
                self.bytes_out += len(payload)
            except Exception as exc:        # disconnected past the client's buffer: lost, like on the wire
                self.dropped += 1
                _log.debug("event=nats_publish_failed error=%s", log.q(repr(exc)))
        if self.paused and self.out_bytes < LOW_WATER:
            self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        self.paused = paused
        _log.info("event=cluster_bus_%s queued=%d", "paused" if paused else "resumed", self.out_bytes)
        if self.on_pressure is not None:
            self.on_pressure(paused)

    def _send_reset(self, peer: Peer, kind: int) -> None:
        node = self.node.encode()
        env = _ENV.pack(MAGIC, K_RESET, self.worker, kind, 0, self.epoch(), len(node)) + node
        self._enqueue(peer.subject, env)

    # -- receiving --------------------------------------------------------------------
    async def _on_msg(self, msg) -> None:
        data = msg.data
        try:
            magic, kind, worker, inc, seq, epoch, nlen = _ENV.unpack_from(data)
            if magic != MAGIC:
                raise ValueError("not a switchboard envelope")
            node = bytes(data[_ENV.size:_ENV.size + nlen]).decode()
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            self.dropped += 1
            _log.warning("event=cluster_bad_envelope subject=%s error=%s", msg.subject, log.q(repr(exc)))
            return
        self.msgs_in += 1
        self.bytes_in += len(data)
        peer = self.peer(node, worker)
        peer.last_heard = time.monotonic()
        if kind == K_RESET:
            self._on_reset(peer, inc)             # `inc` carries the stream kind to restart
            return
        if kind not in (K_REQ, K_REP):
            self.dropped += 1
            return
        rx = peer.rx[kind]
        if inc != rx[0]:
            if seq != 1:                          # we missed this stream's start: ask for a fresh one
                self._lost(peer, kind, inc, "unknown_incarnation")
                return
            if rx[0]:
                self._restart_rx(peer, kind)
            rx[0], rx[1] = inc, 0
        if seq != rx[1] + 1:
            self._lost(peer, kind, inc, "gap")
            return
        rx[1] = seq
        peer.rx_epoch = epoch
        body = data[_ENV.size + nlen:]
        try:
            (peer.out_dec if kind == K_REP else peer.in_dec).feed(body)
        except Exception:
            _log.exception("event=cluster_link_protocol_error node=%s worker=%d", node, worker)
            self.reset_peer(peer, "protocol_error")

    def _restart_rx(self, peer: Peer, kind: int) -> None:
        peer.new_decoder(kind)
        if kind == K_REP:
            peer.fail_pending()                   # answers may be lost with the old stream

    def _lost(self, peer: Peer, kind: int, inc: int, why: str) -> None:
        peer.rx[kind] = [0, 0]
        peer.new_decoder(kind)
        if kind == K_REP:
            peer.fail_pending()
        if peer.reset_asked[kind] != inc:
            peer.reset_asked[kind] = inc
            self.resets += 1
            _log.info("event=cluster_stream_reset node=%s worker=%d stream=%s reason=%s", peer.node,
                      peer.worker, "req" if kind == K_REQ else "rep", why)
            self._send_reset(peer, kind)

    def _on_reset(self, peer: Peer, kind: int) -> None:
        """The peer lost part of our stream `kind`: start it again; FWDs it may not have seen get UNAVAILABLE."""
        if kind not in (K_REQ, K_REP):
            return
        peer.restart_tx(kind)
        if kind == K_REQ:
            peer.fail_pending()

    def reset_peer(self, peer: Peer, why: str) -> None:
        for kind in (K_REQ, K_REP):
            peer.restart_tx(kind)
            peer.rx[kind] = [0, 0]
            peer.new_decoder(kind)
        peer.fail_pending()
        self.resets += 1
        _log.info("event=cluster_peer_reset node=%s worker=%d reason=%s", peer.node, peer.worker, why)

    # -- faults -----------------------------------------------------------------------
    def node_gone(self, node: str) -> None:
        """Its lease is gone: what waits on it gets UNAVAILABLE now, not at the timeout."""
        for (n, _w), peer in self.peers.items():
            if n == node:
                self.reset_peer(peer, "node_gone")

    def disconnected(self) -> None:
        self.connected = False
        for peer in self.peers.values():
            self.reset_peer(peer, "nats_disconnected")

    def reconnected(self) -> None:
        self.connected = True

    async def _sweep(self) -> None:
        """FWDs unanswered for `timeout` on a silent peer: UNAVAILABLE, so no SEND waits forever."""
        period = min(0.5, self.timeout / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for peer in list(self.peers.values()):
                if peer.out.pending and now - peer.last_heard > self.timeout:
                    self.timeouts += 1
                    _log.info("event=cluster_forward_timeout node=%s worker=%d pending=%d", peer.node,
                              peer.worker, peer.out.pending)
                    peer.restart_tx(K_REQ)
                    peer.fail_pending()
                    peer.last_heard = now

    def stats(self) -> dict:
        return {"msgs_out": self.msgs_out, "bytes_out": self.bytes_out, "msgs_in": self.msgs_in,
                "bytes_in": self.bytes_in, "resets": self.resets, "timeouts": self.timeouts,
                "controls_fenced": self.controls_fenced, "dropped": self.dropped, "queued_bytes": self.out_bytes,
                "peers": len(self.peers)}

    async def close(self) -> None:
        for t in (self._sweeper, self._publisher):
            if t is not None and not t.done():
                t.cancel()
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass
