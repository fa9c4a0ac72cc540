"""Each shard's log on R nodes: the owner streams its changes to the shard's
replicas and ACKs a SEND only once every in-sync replica holds it; when the
owner's lease expires the first live in-sync replica takes the shard over under
a new epoch.

Why it is built this way (docs/cluster.md, Replication):
- Physical replication (`_core/replica.py`): a replica holds the owner's shard
  directory byte for byte, so the idempotent-send (producer) state, CONSUMEs,
  devices and groups travel with the messages, and a replica taking over opens
  the copy with the ordinary recovery, exactly as after a kill -9.
- Over NATS subjects, one per worker (`NAME.r.NODE.WORKER` in, `NAME.ra.NODE.WORKER`
  for answers): the nodes already hold one NATS connection per worker and its
  reconnects, and a replica stream is a few messages per group-commit round
  (one per shard written in it), not per SEND. A direct TCP link per pair would
  save NATS's hop but need addresses, TLS and reconnects of its own.
- Group commit: a loop turn's ACKs wait for one round. `commit(then, arg)` takes
  the next round's number; the round ships every shard that changed; the ACKs
  are released, in order, once every in-sync replica of every shard that changed
  acknowledged them (and the local fsync in `always` mode ran). In `always` mode
  a replica fdatasyncs before it acknowledges; in `interval` mode it acknowledges
  what is in its page cache, which survives kill -9 of any one machine's
  processes.
- The shard map (one CAS-ed key) is the only authority: it lists each shard's
  in-sync replicas (`replicas`) and those catching up (`catching`). A replica
  catching up becomes in-sync only through a CAS by the owner once it holds
  everything; only an in-sync replica may take over, and the takeover is a CAS
  that gives the shard a new `since` epoch. Replicas refuse changes of an older
  epoch (ReplicaLog.fence), so a deposed owner — paused, or cut from NATS —
  cannot collect the acknowledgements it needs: it ACKs nothing more.
- With fewer copies than `replicas` (a replica dead and not yet replaced) a
  shard's ACKs wait, unless `degraded_writes` is on (then the owner drops the
  silent replica from the in-sync set by CAS before it ACKs without it).
"""
import asyncio
import collections
import errno
import itertools
import json
import os
import shutil
import struct
import time
from pathlib import Path

from _core import replica as rp
from _core._routing import LinkCore
from _core.errors import ChangeRefused, EpochFenced, ReplicaDiverged, ReplicaError
from _core.log import fsync_dir, shard_dir_name

from .. import log

_log = log.get("switchboard.cluster")

K_OPEN, K_SHIP, K_ACK, K_HELD, K_REFUSED, K_FENCED, K_RESET, K_CHECK, K_CHECKED = 1, 2, 3, 4, 5, 6, 7, 8, 9
_ENV = struct.Struct("!BIQQQ")            # kind, shard, epoch (the owner's since), stream generation, seq
#: bytes of records per shipment (NATS max_payload is 1 MiB by default)
CHUNK = 512 << 10
#: bytes a stream may have unacknowledged before it waits
WINDOW = 8 << 20
#: bytes this worker's streams may have unacknowledged before a snapshot batch waits: a node that
#: comes back empty is sent every shard at once, and 64 streams' windows would swamp it (its NATS
#: subscription drops, streams time out and start their snapshots again)
SNAPSHOT_BUDGET = 16 << 20
OPEN_PARALLEL = 16
SWEEP = 0.1
#: bytes of sealed segments one check of a shard's copies reads on each side, at most
CHECK_BYTES = 256 << 20
_generations = itertools.count(time.time_ns())


def host_subject(cluster: str, node: str, worker: int) -> str:
    return f"{cluster}.r.{node}.{worker}"


def answer_subject(cluster: str, node: str, worker: int) -> str:
    return f"{cluster}.ra.{node}.{worker}"


def _env(kind: int, shard: int, epoch: int, gen: int, seq: int, body: bytes = b"") -> bytes:
    return _ENV.pack(kind, shard, epoch, gen, seq) + body


# -- the owner's side -----------------------------------------------------------------

class Stream:
    """The owner's stream of one shard to one replica."""

    def __init__(self, shard: int, node: str):
        self.shard, self.node = shard, node
        # new -> opening -> live, or waiting-log (neither side holds anything yet) until the
        # shard's first write; broken (timeout, refusal) -> new again after a pause
        self.state = "new"
        self.gen = next(_generations)
        self.tap: rp.LogTap | None = None
        self.snap = None                  # a snapshot iterator being shipped
        self.seq = 0
        self.outstanding: collections.deque = collections.deque()   # (seq, round, nbytes, sent at)
        self.out_bytes = 0
        self.caught_up = False            # the last batch shipped was complete
        #: the oldest round whose changes this replica has not acknowledged (None: none)
        self.need_round: int | None = None
        self.retry_at = 0.0
        self.broken_since = 0.0
        self.why = ""
        self.acked = self.shipped_bytes = 0
        self.rebuild = ""                 # why its next open must send a whole snapshot (the copy is bad)

    def effective(self, current: int) -> int:
        return current if self.need_round is None else self.need_round - 1


class ShardStreams:
    def __init__(self, shard: int):
        self.shard = shard
        self.streams: dict[str, Stream] = {}
        self.last_pos = None              # the log's (newest segment, end) at the last round
        self.hole_round: int | None = None    # changes made while the shard had too few copies
        self.refusing: str | None = None      # why its SENDs are refused: too few copies, no node for another


class Hosted:
    """A replica copy this worker keeps for another node's shard."""

    def __init__(self, shard: int, directory: Path):
        self.shard = shard
        self.log = rp.ReplicaLog(directory)
        self.gen = 0                      # the owner's stream generation it follows
        self.owner = ""
        self.synced = False               # applied a complete batch of this owner's stream since it opened
        self.dirty = False


class Replication:
    """Per worker: the streams of the shards it owns, the replica copies it keeps
    for other nodes, and the takeover of shards whose owner died."""

    def __init__(self, gateway, node):
        self.gw, self.node = gateway, node
        cfg = node.cfg
        self.cfg = cfg
        self.cluster = cfg.cluster_name
        self.me = node.name
        self.worker = node.me
        self.copies = cfg.replicas
        self.store = gateway.router.store
        self.root = Path(cfg.data_dir) / "replicas"
        self.always = cfg.durability == "always"
        self.owned: dict[int, ShardStreams] = {}
        self.hosted: dict[int, Hosted] = {}
        self.taking: set[int] = set()
        self.round = 0
        self.waiters: collections.deque = collections.deque()     # [ticket, then, arg, local done]
        self._flush_soon = self._check_soon = False
        self._tasks: list = []
        self._subs: list = []
        self._opening = asyncio.Semaphore(OPEN_PARALLEL)
        self._promote: set = set()          # (shard, node) to move from catching to in sync, by one CAS
        self._sets_task = None
        self._demote: set = set()
        #: owned shards with a hole or a stream's unacknowledged round: the only ones _check looks at
        self._watch: set = set()
        self._full_left: set = set()        # shards whose copy our full disk refused, to leave by one CAS
        self._full_task = None
        self._room_checked = 0.0
        self._warned_hopeless = False
        self._check_at = time.monotonic() + cfg.replica_check_interval
        self._checking = None             # the task comparing one shard's copies
        self._check_cursor = -1
        self.checks = self.check_mismatches = 0
        #: per hosted shard: its copy's applies and syncs, one at a time (a sync of one copy never
        #: holds up the applies to the others)
        self._locks: dict[int, asyncio.Lock] = {}
        self._acks_after_sync: list = []
        self._out: collections.deque = collections.deque()
        self._publisher = None
        self._syncing = False
        self.takeovers = self.refused = self.fenced = self.dropped_waiters = 0
        self.shipped_total = 0            # bytes every stream of this worker shipped (streams come and go)
        #: bytes shipped and not yet acknowledged, over every stream (made exact again by each sweep)
        self.inflight = 0
        self._snap_waiting = False
        self.last_takeover: dict = {}

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        nc = self.node.nc
        self._subs.append(await nc.subscribe(host_subject(self.cluster, self.me, self.worker), cb=self._on_host))
        self._subs.append(await nc.subscribe(answer_subject(self.cluster, self.me, self.worker), cb=self._on_answer))
        self.store.committer = ReplicatedCommit(self.store.committer, self)
        self.root.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._sweep()))
        if not self.always:
            self._tasks.append(loop.create_task(self._record_loop()))
        self.reconcile(self.node.view)

    async def close(self) -> None:
        for t in (*self._tasks, self._publisher, self._sets_task, self._full_task, self._checking):
            if t is not None:
                t.cancel()
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        for h in self.hosted.values():
            try:
                h.log.close()
            except Exception as exc:
                _log.warning("event=replica_close_failed shard=%d error=%s", h.shard, log.q(repr(exc)))
        self.hosted.clear()

    def _send(self, subject: str, payload: bytes, reply: str = "") -> None:
        """Publish in order without waiting (the publisher task writes the queue out)."""
        self._out.append((subject, payload, reply))
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.get_running_loop().create_task(self._publish())

    async def _publish(self) -> None:
        nc = self.node.nc
        out = self._out
        while out:
            subject, payload, reply = out.popleft()
            try:
                await nc.publish(subject, payload, reply=reply)
            except Exception as exc:        # lost: its stream times out and opens again
                _log.debug("event=replica_publish_failed error=%s", log.q(repr(exc)))

    # -- the map ------------------------------------------------------------------------
    def _mine(self, s: int) -> bool:
        return s % self.node.workers == self.worker

    def reconcile(self, view) -> None:
        """Streams for the shards we own, to their replicas in the map; copies for the
        shards we are a replica of (made when their owner opens a stream)."""
        for s in view.shards_of(self.me):
            if not self._mine(s) or s in self.store.moving:
                continue
            want = [n for n in (*view.replicas.get(s, ()), *view.catching.get(s, ())) if n != self.me]
            ss = self.owned.get(s)
            if ss is None:                  # every owned shard, replicas or not: too few copies hold its ACKs
                ss = self.owned[s] = ShardStreams(s)
            for n in list(ss.streams):
                if n not in want:
                    # what it had not acknowledged yet is held by too few copies now: the shard's
                    # ACKs from then on wait for a replica that catches up (not released by its leaving)
                    st = ss.streams.pop(n)
                    if st.need_round is not None:
                        ss.hole_round = st.need_round if ss.hole_round is None else min(ss.hole_round,
                                                                                        st.need_round)
                        self._watch.add(s)
            for n in want:
                if n not in ss.streams:
                    st = ss.streams[n] = Stream(s, n)
                    st.need_round = self.round + 1 if ss.last_pos is not None else None
                    self._watch.add(s)
        for s in list(self.owned):
            if view.owner[s] != self.me:
                del self.owned[s]
                self.store.refusing_sends.pop(s, None)
        self._refuse_where_hopeless(view)
        self.schedule_flush()
        self.check_soon()

    def map_changed(self, old, new) -> None:
        """Before the mover adopts or drops shards: fence the copies of shards whose
        owner changed (a deposed owner's changes are refused from now on), forget
        replicas we no longer are, and give up ACKs a shard we lost may hold."""
        deposed, dropped = [], 0
        for s in range(new.shards):
            if not self._mine(s):
                continue
            if old.owner[s] == self.me and new.owner[s] != self.me and s in self.owned:
                if self.store.moving.get(s) is None:
                    dropped += self._deposed(s)        # not handed over by a move: taken from us
                    deposed.append(s)
                else:
                    del self.owned[s]
            h = self.hosted.get(s)
            if h is not None and new.owner[s] != self.me:
                if self.me not in (*new.replicas.get(s, ()), *new.catching.get(s, ())):
                    self._forget_copy(s, "no longer a replica")
                elif new.since[s] > h.log.epoch:
                    try:
                        h.log.fence(new.since[s])
                    except (EpochFenced, OSError) as exc:
                        _log.warning("event=replica_fence_failed shard=%d error=%s", s, log.q(repr(exc)))
                    h.synced = False
                    h.gen = 0
        if deposed:
            _log.warning("event=shard_deposed shards=%d first=%d epoch=%d acks_dropped=%d why=%s", len(deposed),
                         deposed[0], new.epoch, dropped,
                         "another node took them over: this node may not ACK what only it holds")
        self.reconcile(new)

    def _deposed(self, s: int) -> None:
        """Shard s has another owner now (it was taken over while we were paused or
        cut off): ACKs waiting on it must never be written — their messages may be
        on no replica. Their sessions are closed instead (the clients resend; the
        shards still ours answer a resend with the original ACK)."""
        ss = self.owned.pop(s)
        keep_to = min(self.round, *(ss.streams[n].effective(self.round) for n in ss.streams)) if ss.streams \
            else self.round
        if ss.hole_round is not None:
            keep_to = min(keep_to, ss.hole_round - 1)
        return self._drop_waiters_after(keep_to)

    def _drop_waiters_after(self, keep_to: int) -> int:
        """ACK batches of rounds after `keep_to` are never written: their sessions are
        closed instead (the clients resend). Returns how many were dropped."""
        kept = collections.deque()
        dropped = 0
        for w in self.waiters:
            if w[0] <= keep_to:
                kept.append(w)
            else:
                dropped += 1
                _close_instead(w[1], w[2])
        self.waiters = kept
        self.dropped_waiters += dropped
        return dropped

    # -- commit: ACKs after the replicas ------------------------------------------------
    def schedule_flush(self) -> None:
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self.flush)

    def check_soon(self) -> None:
        if not self._check_soon:
            self._check_soon = True
            asyncio.get_running_loop().call_soon(self._check)

    def flush(self) -> None:
        """One round: ship what changed in every owned shard with replicas."""
        self._flush_soon = False
        self.round += 1
        rnd = self.round
        logs = self.store.logs
        view = self.node.view
        for s, ss in self.owned.items():
            lg = logs.get(s)
            pos = None
            if lg is not None and not lg._closed and lg.segments:
                seg = lg.segments[-1]
                pos = (seg.segment_id, seg.end)
            changed = pos != ss.last_pos
            ss.last_pos = pos
            if lg is not None and lg.refuse_sends is not ss.refusing:
                lg.refuse_sends = ss.refusing
            if changed and ss.hole_round is None and ss.refusing is None and self._short(view, s):
                ss.hole_round = rnd
                self._watch.add(s)
            for st in ss.streams.values():
                if changed and st.need_round is None:
                    st.need_round = rnd
                    self._watch.add(s)
                if st.state == "waiting-log" and pos is not None:
                    st.state = "new"          # the shard's first write: ship its log from the start
                if st.state == "new":
                    self._open(st)
                elif st.state == "live" and (changed or st.snap is not None or not st.caught_up):
                    self._ship(st, lg, rnd)
        self.check_soon()

    def _refuse_where_hopeless(self, view) -> None:
        """A shard with fewer in-sync copies than `replicas` and no live node that
        could hold another (too few nodes, or their disks full) refuses new SENDs
        with UNAVAILABLE and says why, rather than storing them to ACK who knows
        when. One that is short but has a node catching up, or one to place, waits
        (its ACKs come once the copy is in sync: seconds)."""
        if self.cfg.degraded_writes:
            return
        members = self.node.members
        spare = {n for n, i in members.live_nodes().items()
                 if n != self.me and not i.get("draining") and n not in view.full}
        hopeless = 0
        for s, ss in self.owned.items():
            isr = view.replicas.get(s, ())
            reason = None
            if 1 + len(isr) < self.copies and len(spare | set(isr)) < self.copies - 1:
                reason = (f"shard {s} has {1 + len(isr)} of {self.copies} copies and there is no live node for "
                          f"another (fewer nodes than replicas, or their disks full): SENDs to it are refused "
                          f"until one joins (degraded_writes would accept them with fewer copies)")
                hopeless += 1
            if reason is not None and ss.refusing is None:
                self._hopeless(ss)
            elif reason is None and ss.refusing is not None and 1 + len(isr) < self.copies:
                ss.hole_round = self.round + 1    # short still: what is answered from now waits for the copy
                self._watch.add(s)
            ss.refusing = reason
            if reason is None:
                self.store.refusing_sends.pop(s, None)
            else:
                self.store.refusing_sends[s] = reason
        if hopeless and not self._warned_hopeless:
            _log.warning("event=replicas_short shards=%d copies=%d live_nodes=%d why=%s", hopeless, self.copies,
                         1 + len(spare), log.q("SENDs to these shards are refused (UNAVAILABLE) until a node joins"))
        self._warned_hopeless = bool(hopeless)

    def _hopeless(self, ss: ShardStreams) -> None:
        """Shard ss.shard has just lost every chance of another copy: ACKs waiting on
        it would wait until a node joins, and hold every later ACK of this worker
        (they are released in order). They are not written; their sessions are
        closed instead, as for a deposed shard: the clients resend, the SENDs to
        this shard are refused (UNAVAILABLE, saying why) and those to others get
        their original ACKs. Its other writes (devices, CONSUMEs) go on with the
        one copy until a node joins and takes a snapshot."""
        if ss.hole_round is None:
            return
        keep_to = ss.hole_round - 1
        ss.hole_round = None
        dropped = self._drop_waiters_after(keep_to)
        if dropped:
            _log.warning("event=replica_acks_dropped shard=%d batches=%d why=%s", ss.shard, dropped,
                         log.q("no node left for a copy: their sessions are closed, the clients resend"))

    def _short(self, view, s: int) -> bool:
        return not self.cfg.degraded_writes and 1 + len(view.replicas.get(s, ())) < self.copies

    def _ship(self, st: Stream, lg, rnd: int) -> None:
        if lg is None or lg._closed:
            return
        if st.tap is None or st.tap.log is not lg:
            self._break(st, "the shard's log was reopened")
            return
        try:
            while st.out_bytes < WINDOW:
                if st.snap is not None:
                    if self.inflight >= SNAPSHOT_BUDGET:
                        self._snap_waiting = True           # an answer (or the sweep) ships the rest
                        break
                    batch = next(st.snap, None)
                    if batch is None:
                        st.snap = None
                        continue
                    if batch.complete:
                        st.snap = None
                else:
                    batch = st.tap.changes(CHUNK)
                    # nothing new; but a stream that opened and has shipped nothing yet ships the empty,
                    # complete batch once: it tells the replica its copy holds everything of this
                    # stream (synced: it may take over), an idle shard's too
                    if not batch.changes and st.seq > 0:
                        st.caught_up = True
                        if not st.outstanding:        # everything shipped was acknowledged already
                            self._caught_up(st)
                        break
                st.caught_up = batch.complete and st.snap is None
                data = rp.encode(batch)
                st.seq += 1
                st.outstanding.append((st.seq, rnd, len(data), time.monotonic()))
                st.out_bytes += len(data)
                self.inflight += len(data)
                st.shipped_bytes += len(data)
                self.shipped_total += len(data)
                self._send(self._dest(st), _env(K_SHIP, st.shard, self._epoch(st.shard),
                                                                  st.gen, st.seq, data),
                                             answer_subject(self.cluster, self.me, self.worker))
                if st.caught_up:
                    break
        except (ReplicaError, OSError) as exc:
            self._break(st, repr(exc))

    def _epoch(self, s: int) -> int:
        return self.node.view.since[s]

    def _dest(self, st: Stream) -> str:
        info = self.node.members.nodes.get(st.node) or {}
        return host_subject(self.cluster, st.node, st.shard % max(1, info.get("workers", 1)))

    def _break(self, st: Stream, why: str) -> None:
        if st.state == "broken":
            return
        _log.warning("event=replica_stream_broken shard=%d replica=%s why=%s", st.shard, st.node, log.q(why))
        st.state = "broken"
        st.why = why
        st.broken_since = time.monotonic()
        st.retry_at = st.broken_since + 0.2
        st.outstanding.clear()
        st.out_bytes = 0
        st.snap = None
        st.tap = None
        if st.need_round is None:
            st.need_round = self.round + 1
            self._watch.add(st.shard)

    def _open(self, st: Stream) -> None:
        st.state = "opening"
        st.gen = next(_generations)
        asyncio.get_running_loop().create_task(self._open_stream(st))

    async def _open_stream(self, st: Stream) -> None:
        """Ask the replica what it holds, then go on from there (or snapshot)."""
        s = st.shard
        try:
            async with self._opening:
                reply = await self.node.nc.request(
                    self._dest(st), _env(K_OPEN, s, self._epoch(s), st.gen, 0, self.me.encode()),
                    timeout=self.cfg.replica_timeout)
            kind, _s, _e, _g, _q = _ENV.unpack_from(reply.data)
            body = bytes(reply.data[_ENV.size:])
            if kind == K_FENCED:
                self.fenced += 1
                await self.node.map.refresh()
                raise ReplicaError(f"fenced: {body.decode(errors='replace')}")
            if kind != K_HELD:
                raise ReplicaError(body.decode(errors="replace") or f"answer kind {kind}")
            holdings = {int(sid): rp.Held(end, bytes.fromhex(header), digest)
                        for sid, (end, header, digest) in json.loads(body).items()}
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if st.state == "opening":
                self._break(st, f"open: {exc!r}")
            return
        ss = self.owned.get(s)
        if ss is None or ss.streams.get(st.node) is not st or st.state != "opening":
            return
        lg = self.store.logs.get(s)
        if lg is None or lg._closed:
            # nothing stored here: the replica empties its copy (one of an older life, if any) and is in sync
            self._send(self._dest(st), _env(K_RESET, s, self._epoch(s), st.gen, 0))
            st.state = "waiting-log"      # nothing stored yet on either side: in sync
            st.need_round = None
            if st.node in self.node.view.catching.get(s, ()):
                self._request_promotion(s, st.node)
            self.check_soon()
            return
        self._start_feed(st, lg, holdings)

    def _start_feed(self, st: Stream, lg, holdings: dict) -> None:
        st.tap = rp.LogTap(lg)
        st.snap = None
        how = "resume"
        if st.rebuild:
            holdings, how, st.rebuild = {}, f"snapshot (rebuild: {st.rebuild})", ""
        if holdings:
            try:
                st.tap.resume(holdings)
            except ReplicaDiverged as exc:
                how = f"snapshot ({exc})"
                st.snap = st.tap.snapshot(CHUNK)
        else:
            how = "snapshot" if how == "resume" else how
            st.snap = st.tap.snapshot(CHUNK)
        st.state = "live"
        st.caught_up = False
        st.seq = 0
        if st.need_round is None:
            st.need_round = self.round + 1
            self._watch.add(st.shard)
        _log.info("event=replica_stream_open shard=%d replica=%s how=%s", st.shard, st.node, log.q(how))
        self.schedule_flush()

    async def _on_answer(self, msg) -> None:
        data = msg.data
        if len(data) < _ENV.size:          # NATS's "no responders" status: the replica is gone; it times out
            return
        kind, s, _epoch, gen, seq = _ENV.unpack_from(data)
        ss = self.owned.get(s)
        if ss is None:
            return
        st = next((x for x in ss.streams.values() if x.gen == gen), None)
        if st is None or st.state != "live":
            return
        if kind == K_ACK:
            while st.outstanding and st.outstanding[0][0] <= seq:
                _, _, n, _ = st.outstanding.popleft()
                st.out_bytes -= n
                self.inflight -= n
                st.acked += 1
            if self._snap_waiting:
                self._snap_waiting = False
                self.schedule_flush()
            if st.outstanding:
                st.need_round = st.outstanding[0][1]
                self._watch.add(s)
            elif st.caught_up:
                self._caught_up(st)
            else:
                self.schedule_flush()               # it waited for the window: ship the rest
            self.check_soon()
        else:
            why = bytes(data[_ENV.size:]).decode(errors="replace")
            if kind == K_FENCED:
                self.fenced += 1
                self.gw.loop.create_task(self.node.map.refresh())
            else:
                self.refused += 1
            self._break(st, f"replica answered {'FENCED' if kind == K_FENCED else 'REFUSED'}: {why}")

    def _caught_up(self, st: Stream) -> None:
        """The replica holds everything the log held at the last round."""
        st.need_round = None
        if st.node in self.node.view.catching.get(st.shard, ()):
            self._request_promotion(st.shard, st.node)
        self.check_soon()

    def _check(self) -> None:
        """Release, in order, the ACKs every required copy holds."""
        self._check_soon = False
        view = self.node.view
        bound = self.round
        watch = self._watch
        for s in list(watch):                  # only shards with rounds not yet held by every copy
            ss = self.owned.get(s)
            if ss is None:
                watch.discard(s)
                continue
            if ss.hole_round is not None:
                if not self._short(view, s):
                    ss.hole_round = None
                else:
                    bound = min(bound, ss.hole_round - 1)
            pending = ss.hole_round is not None
            isr = view.replicas.get(s, ())
            for n, st in ss.streams.items():
                if st.need_round is not None:
                    pending = True
                    if n in isr:
                        bound = min(bound, st.need_round - 1)
            if not pending:
                watch.discard(s)
        waiters = self.waiters
        while waiters and waiters[0][3] and waiters[0][0] <= bound:
            _, then, arg, _ = waiters.popleft()
            then(arg)

    # -- map changes the owner asks for -------------------------------------------------
    def _request_promotion(self, s: int, node: str) -> None:
        self._promote.add((s, node))
        self._schedule_sets()

    def _schedule_sets(self) -> None:
        if self._sets_task is None or self._sets_task.done():
            self._sets_task = self.gw.loop.create_task(self._change_sets())

    async def _change_sets(self) -> None:
        while self._promote or self._demote:
            await asyncio.sleep(0.02)           # a burst of shards caught up: one CAS
            await self._change_sets_once(set(self._promote), set(self._demote))

    async def _change_sets_once(self, promote: set, demote: set) -> None:

        def mutate(d):
            changed = False
            for s, n in promote:
                if d.owner[s] == self.me and n in d.catching.get(s, ()):
                    d.catching[s] = [x for x in d.catching[s] if x != n]
                    d.replicas[s] = [*d.replicas.get(s, ()), n]
                    changed = True
            for s, n in demote:
                if d.owner[s] == self.me and n in d.replicas.get(s, ()):
                    d.replicas[s] = [x for x in d.replicas[s] if x != n]
                    d.catching[s] = [*d.catching.get(s, ()), n]
                    changed = True
            return {} if changed else None
        try:
            new = await self.node.map.change(mutate)
            if new is not None:
                _log.info("event=replica_set_changed promoted=%d demoted=%d epoch=%d", len(promote), len(demote),
                          new.epoch)
        except Exception as exc:              # the sweep asks again
            _log.warning("event=replica_set_change_failed error=%s", log.q(repr(exc)))
        finally:
            self._promote -= promote
            self._demote -= demote
        self.check_soon()

    # -- the replica's side -------------------------------------------------------------
    def _copy_dir(self, s: int) -> Path:
        return self.root / shard_dir_name(s)

    async def _on_host(self, msg) -> None:
        data = msg.data
        if len(data) < _ENV.size:
            return
        kind, s, epoch, gen, seq = _ENV.unpack_from(data)
        body = data[_ENV.size:]
        try:
            if kind == K_SHIP:
                await self._apply(msg, s, epoch, gen, seq, body)
            elif kind == K_OPEN:
                await self._open_copy(msg, s, epoch, gen, bytes(body).decode())
            elif kind == K_CHECK:
                await self._check_copy(msg, s, epoch, gen, body)
            elif kind == K_RESET:
                h = self.hosted.get(s)
                if h is not None and h.gen == gen:
                    if h.log.position() != (0, 0):
                        self._forget_copy(s, "its owner holds nothing of the shard")
                        async with self._copy_lock(s):
                            self._copy_dir(s).mkdir(parents=True, exist_ok=True)
                            fresh = self.hosted[s] = Hosted(s, self._copy_dir(s))
                            fresh.log.open()
                            fresh.log.fence(epoch)
                            fresh.gen, fresh.owner = gen, h.owner
                        h = fresh
                    h.synced = True
        except Exception as exc:
            _log.warning("event=replica_request_failed shard=%d kind=%d error=%s", s, kind, log.q(repr(exc)))
            if msg.reply:
                await self.node.nc.publish(msg.reply, _env(K_REFUSED, s, epoch, gen, seq, repr(exc).encode()))

    async def _refresh_if_behind(self, s: int, epoch: int, owner: str | None = None):
        """Our view, read again if the owner's request shows it is behind (an older
        epoch or owner of s, or a placement that does not name us yet)."""
        view = self.node.view
        if view.since[s] < epoch or (owner is not None and (view.owner[s] != owner
                                                            or self.me not in view.copies(s))):
            view = await self.node.map.refresh()
        return view

    async def _open_copy(self, msg, s: int, epoch: int, gen: int, owner: str) -> None:
        view = await self._refresh_if_behind(s, epoch, owner)
        answer = None
        if epoch < view.since[s]:
            answer = (K_FENCED, f"shard {s} has owner {view.owner[s]} since epoch {view.since[s]}")
        elif view.owner[s] != owner or self.me not in (*view.replicas.get(s, ()), *view.catching.get(s, ())):
            answer = (K_REFUSED, f"{self.me} is not a replica of shard {s} owned by {owner} at epoch {view.epoch}")
        elif s in self.taking or view.owner[s] == self.me:
            answer = (K_FENCED, f"{self.me} is taking shard {s} over")
        if answer is not None:
            await self.node.nc.publish(msg.reply, _env(answer[0], s, epoch, gen, 0, answer[1].encode()))
            return
        async with self._copy_lock(s):
            h = self.hosted.get(s)
            if h is None:
                self._copy_dir(s).mkdir(parents=True, exist_ok=True)
                h = Hosted(s, self._copy_dir(s))
                h.log.open()
                self.hosted[s] = h
            try:
                h.log.fence(epoch)
            except EpochFenced as exc:
                await self.node.nc.publish(msg.reply, _env(K_FENCED, s, epoch, gen, 0, str(exc).encode()))
                return
            h.gen, h.owner, h.synced = gen, owner, False
            held = {str(sid): [x.end, x.header.hex(), x.digest] for sid, x in h.log.holdings().items()}
        await self.node.nc.publish(msg.reply, _env(K_HELD, s, epoch, gen, 0, json.dumps(held).encode()))

    async def _apply(self, msg, s: int, epoch: int, gen: int, seq: int, body) -> None:
        h = self.hosted.get(s)
        if h is None or h.gen != gen or s in self.taking:
            self._send(msg.reply, _env(K_REFUSED, s, epoch, gen, seq,
                                                       b"no stream of this generation here: open again"))
            return
        async with self._copy_lock(s):
            try:
                batch = rp.decode(body)
                h.log.apply(batch, epoch)
            except EpochFenced as exc:
                h.gen = 0
                self._send(msg.reply, _env(K_FENCED, s, epoch, gen, seq, str(exc).encode()))
                return
            except ChangeRefused as exc:
                h.gen = 0
                self._send(msg.reply, _env(K_REFUSED, s, epoch, gen, seq, str(exc).encode()))
                return
            except OSError as exc:
                # a full or failing disk: this copy goes back to what it recorded; the owner opens again
                h.gen = 0
                full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
                _log.error("event=replica_write_failed shard=%d full=%s error=%s", s, full, log.q(repr(exc)))
                self._forget_copy(s, "write failed", delete=False)
                if full:
                    self._leave_full(s)
                self._send(msg.reply, _env(K_REFUSED, s, epoch, gen, seq,
                                                           f"replica {self.me}: {exc}".encode()))
                return
            h.dirty = True
            if batch.complete:
                h.synced = True
        ack = _env(K_ACK, s, epoch, gen, seq)
        if self.always:
            self._acks_after_sync.append((msg.reply, ack))
            if not self._syncing:
                self._syncing = True
                self.gw.loop.create_task(self._sync_then_ack())
        else:
            self._send(msg.reply, ack)

    async def _sync_then_ack(self) -> None:
        """`always`: one fdatasync round for every copy written, then their ACKs."""
        try:
            while self._acks_after_sync:
                acks, self._acks_after_sync = self._acks_after_sync, []
                await self._record(True)
                for reply, ack in acks:
                    self._send(reply, ack)
        finally:
            self._syncing = False

    def _copy_lock(self, s: int) -> asyncio.Lock:
        lock = self._locks.get(s)
        if lock is None:
            lock = self._locks[s] = asyncio.Lock()
        return lock

    async def _record(self, always: bool) -> None:
        """Sync the copies written since the last time: their data, then their record
        (REPLICA). `always`: all of them in one round on a thread, holding their
        locks (the ACKs waiting for it go out after); `interval`: one at a time,
        so an apply to a copy waits for that copy's sync at most."""
        loop = asyncio.get_running_loop()
        dirty = sorted((h for h in self.hosted.values() if h.dirty), key=lambda h: h.shard)
        if not always:
            for h in dirty:
                async with self._copy_lock(h.shard):
                    if self.hosted.get(h.shard) is h and h.dirty:
                        h.dirty = False
                        await loop.run_in_executor(None, h.log.sync)
            return
        locks = [self._copy_lock(h.shard) for h in dirty]
        taken = []
        try:
            for lock in locks:                 # in shard order: no two rounds wait on each other
                await lock.acquire()
                taken.append(lock)
            dirty = [h for h in dirty if self.hosted.get(h.shard) is h and h.dirty]
            for h in dirty:
                h.dirty = False
            if dirty:
                await loop.run_in_executor(None, _sync_all, dirty)
        finally:
            for lock in taken:
                lock.release()

    async def _record_loop(self) -> None:
        """`interval`: the copies' records follow their data every flush interval."""
        while True:
            await asyncio.sleep(self.cfg.flush_interval_ms / 1000)
            try:
                await self._record(False)
            except Exception as exc:
                _log.warning("event=replica_sync_failed error=%s", log.q(repr(exc)))

    def _forget_copy(self, s: int, why: str, delete: bool = True) -> None:
        h = self.hosted.pop(s, None)
        if h is not None:
            try:
                h.log.close()
            except Exception as exc:
                _log.warning("event=replica_close_failed shard=%d error=%s", s, log.q(repr(exc)))
        if delete:
            shutil.rmtree(self._copy_dir(s), ignore_errors=True)
            _log.info("event=replica_dropped shard=%d why=%s", s, log.q(why))

    # -- comparing checksums -------------------------------------------------------------
    async def _check_next(self) -> None:
        """Every `replica_check_interval`: the next owned shard (round-robin) is
        compared with each in-sync replica whose stream is live — xxh3_128 of each
        sealed segment (up to CHECK_BYTES), read on a thread on both sides. The
        bytes a stream ships are checked as they are applied; this finds what went
        wrong at rest (a bad disk, a copy changed by hand) before a takeover would
        open it."""
        owned = sorted(self.owned)
        if not owned:
            return
        later = [s for s in owned if s > self._check_cursor]
        s = self._check_cursor = (later or owned)[0]
        try:
            await self._check_shard(s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:                # asked again at the next check of this shard
            _log.warning("event=replica_check_failed shard=%d error=%s", s, log.q(repr(exc)))

    async def _check_shard(self, s: int) -> None:
        ss = self.owned.get(s)
        lg = self.store.logs.get(s)
        if ss is None or lg is None or lg._closed or len(lg.segments) < 2:
            return
        wanted, total = {}, 0
        for seg in lg.segments[:-1]:               # sealed: their bytes no longer change
            if total + seg.end > CHECK_BYTES and wanted:
                break
            wanted[seg.segment_id] = seg.end
            total += seg.end
        loop = asyncio.get_running_loop()
        for node in [n for n in self.node.view.replicas.get(s, ()) if n in ss.streams]:
            st = ss.streams[node]
            if st.state != "live" or not st.caught_up:
                continue
            bad = await self._compare(s, st, wanted, loop)
            if bad and (await self._compare(s, st, {sid: wanted[sid] for sid in bad}, loop)):
                self._copy_bad(s, st, bad)          # twice: not a segment removed between the two reads

    async def _compare(self, s: int, st: Stream, wanted: dict, loop) -> list:
        """Segment ids whose digest differs between our log and `st`'s replica."""
        ranges = {}
        for sid, end in wanted.items():
            seg = next((x for x in self.store.logs[s].segments if x.segment_id == sid), None)
            if seg is not None:
                try:
                    ranges[sid] = (os.open(seg.path, os.O_RDONLY), end)
                except OSError:
                    pass                            # deleted meanwhile (consumed)
        ours = await loop.run_in_executor(None, rp.digest_files, ranges)
        reply = await self.node.nc.request(
            self._dest(st), _env(K_CHECK, s, self._epoch(s), st.gen, 0,
                                 json.dumps({str(k): v for k, v in wanted.items()}).encode()),
            timeout=max(self.cfg.replica_timeout, 10.0))
        kind = _ENV.unpack_from(reply.data)[0]
        if kind != K_CHECKED:
            return []                               # the stream changed meanwhile: the next check
        theirs = {int(k): v for k, v in json.loads(bytes(reply.data[_ENV.size:])).items()}
        self.checks += 1
        return [sid for sid, d in ours.items() if d is not None and sid in theirs and theirs[sid] != d]

    def _copy_bad(self, s: int, st: Stream, bad: list) -> None:
        """A replica's copy differs from the log: it may not take over (out of the
        in-sync set, by CAS; the shard's ACKs wait for in-sync copies again) and is
        rebuilt from a whole snapshot."""
        self.check_mismatches += 1
        _log.error("event=replica_checksum_mismatch shard=%d replica=%s segments=%s why=%s", s, st.node,
                   ",".join(map(str, bad)), log.q("its copy differs from the log: rebuilt from a snapshot"))
        st.rebuild = f"checksums of segments {','.join(map(str, bad))} differed"
        self._demote.add((s, st.node))
        self._schedule_sets()
        self._break(st, st.rebuild)

    async def _check_copy(self, msg, s: int, epoch: int, gen: int, body) -> None:
        """The owner asks for the digests of sealed segments of our copy of s."""
        h = self.hosted.get(s)
        if h is None or h.gen != gen or not msg.reply:
            if msg.reply:
                await self.node.nc.publish(msg.reply, _env(K_REFUSED, s, epoch, gen, 0, b"no such stream here"))
            return
        wanted = {int(k): v for k, v in json.loads(bytes(body)).items()}
        digests = await asyncio.get_running_loop().run_in_executor(None, rp.digest_files, h.log.dup_ranges(wanted))
        await self.node.nc.publish(msg.reply, _env(K_CHECKED, s, epoch, gen, 0, json.dumps(
            {str(k): v for k, v in digests.items()}).encode()))

    # -- a full disk ----------------------------------------------------------------------
    def _leave_full(self, s: int) -> None:
        """Our disk refused a write to the copy of shard s: leave its replica sets and
        mark this node `full` in the map, by one CAS, so that the owner's placement
        puts the copy on another node (its ACKs wait until that one is in sync)
        rather than on a stream that is refused again every 0.2 s for ever."""
        self._full_left.add(s)
        if self._full_task is None or self._full_task.done():
            self._full_task = self.gw.loop.create_task(self._mark_full())

    async def _mark_full(self) -> None:
        while self._full_left:
            left, self._full_left = self._full_left, set()
            me = self.me

            def mutate(d):
                changed = me not in d.full
                if changed:
                    d.full.append(me)
                for s in left:
                    if d.owner[s] != me and me in d.copies(s):
                        d.replicas[s] = [n for n in d.replicas.get(s, ()) if n != me]
                        d.catching[s] = [n for n in d.catching.get(s, ()) if n != me]
                        changed = True
                return {} if changed else None
            try:
                new = await self.node.map.change(mutate)
                if new is not None:
                    _log.error("event=replica_disk_full shards_left=%d epoch=%d why=%s", len(left), new.epoch,
                               log.q("no room for replica copies: other nodes take them over"))
            except Exception as exc:            # asked again at the next refused write
                _log.warning("event=replica_disk_full_mark_failed error=%s", log.q(repr(exc)))

    def _has_room(self) -> bool:
        """Room again for copies: a few segments' worth free (the mark is cleared)."""
        try:
            return shutil.disk_usage(self.root).free >= 4 * self.cfg.segment_size
        except OSError:
            return False

    async def _clear_full(self) -> None:
        me = self.me

        def mutate(d):
            if me not in d.full:
                return None
            d.full.remove(me)
            return {}
        try:
            if await self.node.map.change(mutate) is not None:
                _log.info("event=replica_disk_room node=%s", me)
        except Exception as exc:
            _log.warning("event=replica_disk_room_failed error=%s", log.q(repr(exc)))

    # -- moves: promoting a replica ------------------------------------------------------
    async def handed_over(self, s: int, node: str, timeout: float) -> None:
        """Shard s is quiesced for a move to `node`, an in-sync replica: return once its
        stream to `node` is live and has acknowledged the log's final position (its
        copy then is the log), or raise. The quiesce waited for the group commit,
        which waited for every in-sync replica: this is the check, and the wait for a
        stream that broke meanwhile and must open again."""
        deadline = time.monotonic() + timeout
        while True:
            ss = self.owned.get(s)
            st = ss.streams.get(node) if ss is not None else None
            if st is None or node not in self.node.view.replicas.get(s, ()):
                raise RuntimeError(f"{node} is no in-sync replica of shard {s}")
            lg = self.store.logs.get(s)
            pos = (lg.segments[-1].segment_id, lg.segments[-1].end) if lg is not None and lg.segments else None
            if pos is None and st.state == "waiting-log":
                return                        # never written: there is nothing to hold
            if (st.state == "live" and st.caught_up and st.snap is None and not st.outstanding
                    and st.need_round is None and ss.last_pos == pos):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the replica stream of shard {s} to {node} did not catch up "
                                   f"(state {st.state}{', ' + st.why if st.why else ''})")
            self.schedule_flush()
            await asyncio.sleep(0.01)        # a round trip to the replica; bounded by `timeout`

    # -- takeover -----------------------------------------------------------------------
    def holds_copy(self, s: int) -> bool:
        return s in self.hosted

    def install_as_log(self, s: int) -> None:
        """The map made us the owner of a shard we kept a copy of: the copy becomes
        the shard's log (its recovery is the ordinary one, as after a kill -9)."""
        h = self.hosted.pop(s)
        h.log.close()
        src = self._copy_dir(s)
        for leftover in (src / rp.STATE_NAME, src / "LOCK"):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(src / rp.STAGING_NAME, ignore_errors=True)
        dst = self.store.root / shard_dir_name(s)
        if dst.exists():                     # an older life's log of this shard: superseded by the copy
            tomb = dst.with_name(f"{dst.name}.tomb-takeover")
            shutil.rmtree(tomb, ignore_errors=True)
            dst.rename(tomb)
            shutil.rmtree(tomb, ignore_errors=True)
        src.rename(dst)
        fsync_dir(self.root)
        fsync_dir(self.store.root)
        self.taking.discard(s)

    def keep_log_as_copy(self, s: int, segments: list, epoch: int, owner: str) -> None:
        """Our move of shard s was switched and the map keeps us as a replica
        (catching up): the log we handed over, closed and final, becomes our copy
        in place of a snapshot back — the new owner's log is the same bytes and
        more, so its stream resumes from what we hold."""
        src = self.store.root / shard_dir_name(s)
        dst = self._copy_dir(s)
        if s in self.hosted:
            self._forget_copy(s, "replaced by the log we handed over")
        shutil.rmtree(dst, ignore_errors=True)
        rp.record_log_as_copy(src, segments, epoch)
        src.rename(dst)
        fsync_dir(self.store.root)
        fsync_dir(self.root)
        h = Hosted(s, dst)
        h.log.open()
        h.log.fence(epoch)
        h.owner = owner
        self.hosted[s] = h
        _log.info("event=replica_kept_log shard=%d owner=%s epoch=%d", s, owner, epoch)

    def _takeover_candidates(self) -> dict[int, str]:
        view = self.node.view
        members = self.node.members
        out = {}
        for s, h in self.hosted.items():
            owner = view.owner[s]
            if owner == self.me or members.alive(owner) or s in self.taking:
                continue                     # (a shard marked moving whose owner died mid-move too)
            isr = view.replicas.get(s, ())
            live = [n for n in isr if n == self.me or members.alive(n)]
            if live and live[0] == self.me and h.synced:
                out[s] = owner
        return out

    async def _take_over(self) -> None:
        if not self.node.serving():
            return
        todo = self._takeover_candidates()
        if not todo:
            return
        self.taking.update(todo)
        t0 = time.monotonic()
        alive = self.node.members.alive

        def mutate(d):
            owners = {}
            for s, was in todo.items():
                if d.owner[s] == was and not alive(was) and self.me in d.replicas.get(s, ()):
                    owners[s] = self.me
                    d.replicas[s] = [n for n in d.replicas[s] if n != self.me]
                    # its owner died mid-move (never switched): every in-sync copy holds what it ACKed
                    d.moving.pop(s, None)
            return owners or None
        try:
            new = await self.node.map.change(mutate)
        except Exception as exc:
            _log.warning("event=takeover_failed shards=%d error=%s", len(todo), log.q(repr(exc)))
            new = None
        finally:
            self.taking.difference_update([s for s in todo if self.node.view.owner[s] != self.me])
        if new is not None:
            got = [s for s in todo if new.owner[s] == self.me]
            self.takeovers += len(got)
            self.last_takeover = {"shards": len(got), "epoch": new.epoch, "seconds": round(time.monotonic() - t0, 3),
                                  "from": sorted(set(todo.values()))}
            _log.warning("event=shards_taken_over count=%d from=%s epoch=%d seconds=%.3f", len(got),
                         ",".join(sorted(set(todo.values()))), new.epoch, time.monotonic() - t0)

    # -- housekeeping -------------------------------------------------------------------
    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP)
            try:
                self._sweep_once()
                await self._take_over()
                now = time.monotonic()
                if (self.cfg.replica_check_interval and now >= self._check_at
                        and (self._checking is None or self._checking.done())):
                    self._check_at = now + self.cfg.replica_check_interval
                    self._checking = self.gw.loop.create_task(self._check_next())
                if self.worker == 0 and self.me in self.node.view.full and now - self._room_checked > 1.0:
                    self._room_checked = now
                    if self._has_room():
                        await self._clear_full()
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("event=replication_sweep_failed")

    def _sweep_once(self) -> None:
        now = time.monotonic()
        timeout = self.cfg.replica_timeout
        view = self.node.view
        # streams that broke or left drop their unacknowledged bytes without telling: count again
        self.inflight = sum(st.out_bytes for ss in self.owned.values() for st in ss.streams.values())
        for s, ss in self.owned.items():
            lg = self.store.logs.get(s)
            for st in ss.streams.values():
                if st.state == "live" and st.outstanding and now - st.outstanding[0][3] > timeout:
                    self._break(st, f"no answer for {timeout:g} s")
                elif st.state == "broken" and now >= st.retry_at and self.node.members.alive(st.node):
                    st.state = "new"
                elif st.state == "waiting-log" and lg is not None and not lg._closed:
                    st.state = "new"
                if (st.node in view.catching.get(s, ()) and st.state in ("live", "waiting-log")
                        and st.need_round is None and st.caught_up | (st.state == "waiting-log")):
                    self._request_promotion(s, st.node)     # again, if a CAS for it failed
                if (self.cfg.degraded_writes and st.state != "live" and now - st.broken_since > timeout
                        and st.node in view.replicas.get(s, ()) and (s, st.node) not in self._demote):
                    self._demote.add((s, st.node))
                    self._schedule_sets()
        self._refuse_where_hopeless(view)          # nodes come and go without a map change too
        self.schedule_flush()

    def stats(self) -> dict:
        streams = [st for ss in self.owned.values() for st in ss.streams.values()]
        states = collections.Counter(st.state for st in streams)
        return {"copies": self.copies, "degraded_writes": self.cfg.degraded_writes, "round": self.round,
                "waiting_acks": len(self.waiters), "streams": dict(states),
                "shipped_bytes": sum(st.shipped_bytes for st in streams),
                "shipped_bytes_total": self.shipped_total,
                "replica_copies": len(self.hosted), "takeovers": self.takeovers,
                "last_takeover": self.last_takeover, "refused": self.refused, "fenced": self.fenced,
                "acks_dropped": self.dropped_waiters, "checks": self.checks,
                "check_mismatches": self.check_mismatches}


def _sync_all(hosted) -> None:
    for h in hosted:
        h.log.sync()


def _close_instead(then, arg) -> None:
    """A dropped ACK batch of the router: close its sessions without writing it
    (links to other workers stay: their FWDs time out and are retried)."""
    if isinstance(arg, list) and arg and isinstance(arg[0], tuple):
        then([(item[0], None, not isinstance(item[0], LinkCore)) for item in arg])
    # anything else is a quiesce barrier (arg None): the shard is gone anyway


class ReplicatedCommit:
    """The store's group commit with the replicas in it: `then(arg)` runs once the
    local policy (the wrapped committer) and the replicas both hold the turn."""

    def __init__(self, inner, repl: Replication):
        self.inner, self.repl = inner, repl

    def commit(self, then, arg) -> None:
        if self.inner.failed is not None:
            return
        w = [self.repl.round + 1, then, arg, False]
        self.repl.waiters.append(w)
        self.repl.schedule_flush()
        self.inner.commit(self._local_done, w)

    def _local_done(self, w) -> None:
        w[3] = True
        self.repl.check_soon()

    @property
    def on_fatal(self):
        return self.inner.on_fatal

    @on_fatal.setter
    def on_fatal(self, fn):
        self.inner.on_fatal = fn

    def __getattr__(self, name):
        return getattr(self.inner, name)
