"""Splitting a data dir's shards offline: `switchboard reshard --data-dir DIR --shards N`.

A user (or group) is on shard xxh3_64(id) mod S. When N is a power-of-two
multiple of S, (h mod N) mod S = h mod S, so old shard k splits exactly into the
new shards k + S*j: each record of k belongs to one child, the one its key's
hash mod N names. Why it is built this way:

- The key of each kind of state is the one the router shards it by: every
  inbox record (messages, mirrors, receipts, members' group copies) by its
  inbox's user, a group's own inbox by the group id; META records by the id in
  their key (`d` devices and last seen, `p` privacy: the user; `g` a group's
  state: the group). An unknown META kind stops the split: nothing can say
  where it belongs.
- Producer state (PROTOCOL.md section 6) lives in each shard of a device's
  recipients, and a child must answer as its parent would for the SENDs that
  can still reach it: retries to its own recipients. A SEND's record names its
  recipient, so an answer a record proves goes to that recipient's child only
  (the answers are not multiplied). But deleted records (consumed segments)
  leave seqs whose recipient nobody knows, proven by a checkpoint or only by the
  highest seq: once a parent has deleted any, every child gets each device's
  producer and highest seq (a retry of any of those seqs is still a duplicate,
  an older producer still fenced) and the answers no record proves. A parent
  that never deleted a message record gives a device's state only to the
  children its records went to. Each child gets its state as a checkpoint
  record (the same META record a segment deletion writes).
- Consumed messages are not copied, but two things they prove are: a member's
  group copy (a fan-out resumed after the restart must not copy it again) is
  carried as a consumed record with no payload, and ids: every child's first
  segment header holds its parent's highest id as its id floor, so the worker
  owning a child makes ids above every id its users have seen.
- The children are written with the log's own writer (AppendLog: append,
  meta_put, consume) and the parents read with its recovery (AppendLog.open):
  no second file format.
- Crash safety: the children are built in DIR/reshard.tmp/log, each parent's
  children fsynced and then marked done (a rerun redoes only the unfinished
  parents). The commit point is layout.json, replaced in one step by one that
  says N shards and carries the mark `reshard`; after it only renames are
  left (DIR/log -> reshard.tmp/old-log, reshard.tmp/log -> DIR/log,
  layout.json without the mark, reshard.tmp removed), which
  `finish_committed` completes from any point: a rerun and a gateway's start
  both call it. So a kill -9 at any moment leaves the old data dir as it was
  (before the commit) or the new one (after it). A gateway started on the old
  data dir before the commit removes the unfinished split (`settle`): its
  copies would be stale once the old shards change.
- Offline: the gateway's DATA_DIR/LOCK and every shard's lock are held from
  start to end; a gateway running on the dir, or a worker still holding a shard,
  is a refusal before anything is written.
"""
import json
import os
import re
import shutil
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from _core._producers import encode_checkpoint
from _core.dirlock import DirLock
from _core.errors import DataDirInUse
from _core.log import HEADER, PRODUCER_META, AppendLog, LogConfig, fsync_dir, shard_dir_name
from router.sharding import HASH, LAYOUT_FILE, LAYOUT_VERSION, RESHARD_MARK, SEED, shard_of, write_layout
from router.store import GROUP, inbox_key

from .cluster.config import MAX_SHARDS

TMP = "reshard.tmp"
#: (no expiry while reading: the gateway applies its TTL when it starts on the result)
_FOREVER_S = 1e12
_NO_QUOTA = 1 << 62
_SHARD_DIR = re.compile(r"^shard-([0-9]{4,})$")
_LEFTOVER = re.compile(r"^shard-[0-9]{4,}\.(incoming|tomb-[0-9a-f]+)$")   # a move killed half-way: garbage


class ReshardError(Exception):
    """A refusal or a failure, said in one line; the data dir is as it was (or, after
    the commit, finished by the next run)."""


@dataclass
class Counts:
    shards_in: int = 0
    shards_out: int = 0
    records: int = 0            # every record written into the children
    messages: int = 0           # inbox entries (messages, mirrors, receipts, group copies), per device inbox
    copies_kept: int = 0        # consumed group copies carried for the fan-out dedup
    devices: int = 0
    groups: int = 0
    producers: int = 0          # producer checkpoints written
    bytes_in: int = 0           # bytes of records the parents hold
    bytes_out: int = 0          # bytes of records the children hold
    seconds: float = 0.0

    def add(self, other: dict) -> None:
        for k in ("records", "messages", "copies_kept", "devices", "groups", "producers", "bytes_in", "bytes_out"):
            setattr(self, k, getattr(self, k) + other.get(k, 0))


def _read_layout(data: Path) -> dict:
    path = data / LAYOUT_FILE
    try:
        layout = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReshardError(f"{data} has no {LAYOUT_FILE}: not a gateway's data dir (or one never started)") from None
    except (OSError, ValueError) as exc:
        raise ReshardError(f"cannot read {path}: {exc}") from None
    if not (isinstance(layout, dict) and isinstance(layout.get("shards"), int) and layout["shards"] >= 1):
        raise ReshardError(f"{path} does not say how many shards the data dir has: {layout!r}")
    if (layout.get("version"), layout.get("hash"), layout.get("seed")) != (LAYOUT_VERSION, HASH, SEED):
        raise ReshardError(f"{path} says {layout}: this version splits only layouts of version {LAYOUT_VERSION}, "
                           f"hash {HASH}, seed {SEED}")
    return layout


def finish_committed(data_dir) -> bool:
    """Complete a reshard past its commit (layout.json carries the mark): the renames
    that put the new shards in place, from wherever a crash stopped them. The caller
    holds DATA_DIR/LOCK (the reshard, or the gateway's supervisor at start). True if
    there was one to finish."""
    data = Path(data_dir)
    try:
        layout = json.loads((data / LAYOUT_FILE).read_text())
    except (OSError, ValueError):
        return False                  # none, or unreadable: check_layout says so
    if not isinstance(layout, dict) or RESHARD_MARK not in layout:
        return False
    log, tmp = data / "log", data / TMP
    new, old = tmp / "log", tmp / "old-log"
    if new.exists():
        if log.exists():
            if old.exists():
                raise ReshardError(f"{data}: {log}, {new} and {old} all exist: a reshard cannot have left "
                                   "that; look at them before starting a gateway here")
            os.rename(log, old)
            fsync_dir(data)
            fsync_dir(tmp)
        os.rename(new, log)
        fsync_dir(data)
        fsync_dir(tmp)
    if not log.exists():                 # the new shards are gone: never remove the old ones then
        raise ReshardError(f"{data}: layout.json says a reshard committed, but neither {new} nor {log} "
                           f"exists (the old shards are in {old}); look at them before starting a gateway here")
    _keep_quarantined(data, old)
    layout.pop(RESHARD_MARK)
    write_layout(data, layout)
    if tmp.exists():
        shutil.rmtree(tmp)
        fsync_dir(data)
    return True


def settle(data_dir) -> str | None:
    """At a gateway's start (its supervisor, holding DATA_DIR/LOCK): a reshard past
    its commit is finished ("finished"); a split that never committed is removed
    ("abandoned": the old shards are in use again, so its copies of them would go
    stale; the next reshard starts over). None: there was neither."""
    if finish_committed(data_dir):
        return "finished"
    tmp = Path(data_dir) / TMP
    if tmp.exists():
        shutil.rmtree(tmp)
        fsync_dir(Path(data_dir))
        return "abandoned"
    return None


def _keep_quarantined(data: Path, old: Path) -> None:
    """Segments recovery once set aside (`quarantine/`) are kept for inspection, in
    DATA_DIR/quarantine/shard-NNNN-before-reshard, not deleted with the old shards."""
    if not old.is_dir():
        return
    for q in sorted(old.glob("shard-*/quarantine")):
        keep = data / "quarantine" / f"{q.parent.name}-before-reshard"
        if keep.exists():
            continue
        keep.parent.mkdir(exist_ok=True)
        os.rename(q, keep)
        fsync_dir(keep.parent)


class _DryChild:
    """Stands in for a child's AppendLog in a dry run: counts what would be written."""

    def __init__(self):
        self.bytes = 0

    def raise_id_floor(self, floor: int) -> None:
        pass

    def append(self, recipient, msg_id, ts, sender, sender_device, payload, client_id=0, *, device="",
               flags=0, conversation="", producer=0):
        ids = sum(len(x.encode()) for x in (recipient, device, sender, sender_device, conversation))
        self.bytes += (45 + 8 * bool(producer) + ids + len(payload) + 7) & ~7

    def meta_put(self, key: str, value: bytes, use_reserve=False):
        self.bytes += (18 + len(key.encode()) + len(value) + 7) & ~7

    def consume(self, recipient, ids, device=""):
        self.bytes += (16 + len(recipient.encode()) + len(device.encode()) + 8 * len(ids) + 7) & ~7

    def written(self) -> int:
        return self.bytes

    def close(self) -> None:
        pass


def _written(lg: AppendLog) -> int:
    return sum(s.end for s in lg.segments)


class Reshard:
    """One run: `Reshard(DIR, N).run()` (or the phases one by one: check, split,
    commit, finish, close). `say(line)` gets each phase's line."""

    def __init__(self, data_dir, shards: int, *, dry_run: bool = False, dedup_window: int = 256,
                 segment_size: int = 64 << 20, say=print):
        self.data = Path(data_dir)
        self.to = shards
        self.dry_run = dry_run
        self.dedup_window = dedup_window
        self.segment_size = segment_size
        self.say = say
        self.lock: DirLock | None = None
        self.parent_locks: dict[int, DirLock] = {}
        self.counts = Counts(shards_out=shards)
        self.frm = 0
        self._t0 = time.perf_counter()

    @property
    def log_root(self) -> Path:
        return self.data / "log"

    @property
    def tmp(self) -> Path:
        return self.data / TMP

    # -- the whole run ---------------------------------------------------------------------
    def run(self) -> Counts:
        try:
            if not self.check():
                return self.counts
            self.split()
            if not self.dry_run:
                self.commit()
                self.finish()
        finally:
            self.close()
        self.counts.seconds = time.perf_counter() - self._t0
        return self.counts

    def check(self) -> bool:
        """Lock the data dir and every shard, finish a committed reshard, check N.
        False: nothing to do (N is the current count)."""
        if not self.data.is_dir():
            raise ReshardError(f"no data dir {self.data}")
        if not (1 <= self.to <= MAX_SHARDS):
            raise ReshardError(f"--shards {self.to}: must be from 1 to {MAX_SHARDS}")
        try:
            LogConfig(segment_size=self.segment_size).validate()
        except ValueError as exc:
            raise ReshardError(f"--segment-size: {exc}") from None
        _read_layout(self.data)         # no layout.json: refused before anything is made (a LOCK file)
        lock = DirLock(self.data)
        try:
            held = lock.try_acquire()
        except OSError as exc:
            raise ReshardError(f"cannot lock data dir {self.data}: {exc.strerror or exc}") from None
        if not held:
            pid = lock.holder()
            raise ReshardError(f"data dir {self.data} is in use by a gateway{f' (pid {pid})' if pid else ''}: "
                               "stop it first (resharding is offline)")
        self.lock = lock
        layout = _read_layout(self.data)
        if RESHARD_MARK in layout:
            if self.dry_run:            # its old shards are not where a split would read them
                self.say(f"finish: a reshard to {layout['shards']} shards was interrupted after its commit: a run "
                         "without --dry-run (or a gateway's start) finishes it")
                self.counts.shards_in = self.counts.shards_out = layout["shards"]
                return False
            else:
                finish_committed(self.data)
                self.say(f"finish: completed the reshard to {layout['shards']} shards interrupted after its commit")
        self.frm = layout["shards"]
        self.counts.shards_in = self.frm
        if self.to == self.frm:
            if self.tmp.exists() and not self.dry_run:
                shutil.rmtree(self.tmp)
                fsync_dir(self.data)
                self.say(f"clean: removed {self.tmp}, an unfinished split that never committed")
            self.say(f"reshard: nothing to do: {self.data} already has {self.frm} shards")
            return False
        if self.to < self.frm:
            raise ReshardError(f"--shards {self.to} is fewer than the data dir's {self.frm} shards: shards can "
                               "only be split, not merged")
        if self.to & (self.to - 1):
            raise ReshardError(f"--shards {self.to} is not a power of two")
        if self.to % self.frm or (self.to // self.frm) & (self.to // self.frm - 1):
            raise ReshardError(f"--shards {self.to} is not a power-of-two multiple of the data dir's {self.frm} "
                               "shards: each old shard must split into whole new ones")
        self._lock_parents()
        self.say(f"reshard: {self.data}: {self.frm} shards -> {self.to} (each splits into {self.to // self.frm})"
                 f"{' (dry run: nothing is written)' if self.dry_run else ''}")
        return True

    def _lock_parents(self) -> None:
        if not self.log_root.is_dir():
            return
        for entry in sorted(self.log_root.iterdir()):
            m = _SHARD_DIR.match(entry.name)
            if m and entry.is_dir() and int(m.group(1)) < self.frm:
                continue
            if _LEFTOVER.match(entry.name):
                continue
            raise ReshardError(f"{entry} is not one of the data dir's {self.frm} shards: move it away first")
        for k in range(self.frm):
            d = self.log_root / shard_dir_name(k)
            if not d.is_dir():
                continue
            lock = DirLock(d)
            if not lock.try_acquire():
                raise ReshardError(str(DataDirInUse(d, lock.holder())) + ": a gateway worker still running? "
                                   "stop it first (resharding is offline)")
            self.parent_locks[k] = lock

    # -- split: the children in reshard.tmp --------------------------------------------------
    def split(self) -> None:
        t0 = time.perf_counter()
        job = {"version": 1, "from": self.frm, "to": self.to}
        done_dir = self.tmp / "done"
        resumed = 0
        if not self.dry_run:
            if self.tmp.exists():
                try:
                    had = json.loads((self.tmp / "job.json").read_text())
                except (OSError, ValueError):
                    had = None
                if had != job:
                    shutil.rmtree(self.tmp)
                    fsync_dir(self.data)
                    self.say(f"clean: removed {self.tmp}, an unfinished split "
                             f"{'to ' + str(had['to']) + ' shards ' if isinstance(had, dict) and 'to' in had else ''}"
                             "that never committed")
            if not self.tmp.exists():
                (self.tmp / "log").mkdir(parents=True)
                done_dir.mkdir()
                _write_json(self.tmp / "job.json", job)
                fsync_dir(self.tmp)
                fsync_dir(self.data)
        for k in range(self.frm):
            marker = done_dir / f"{shard_dir_name(k)}.json"
            if not self.dry_run and marker.exists():
                self.counts.add(json.loads(marker.read_text()))
                resumed += 1
                continue
            if not self.dry_run:
                for j in range(self.to // self.frm):
                    stale = self.tmp / "log" / shard_dir_name(k + self.frm * j)
                    if stale.exists():
                        shutil.rmtree(stale)        # a child of a parent the last run did not finish
            counts = self._split_parent(k)
            self.counts.add(counts)
            if not self.dry_run:
                fsync_dir(self.tmp / "log")
                _write_json(marker, counts)
                fsync_dir(done_dir)
        seconds = time.perf_counter() - t0
        c = self.counts
        self.say(f"split: {self.frm} shards read ({_mb(c.bytes_in)}), {self.to} "
                 f"{'would be written' if self.dry_run else 'written to ' + str(self.tmp)} "
                 f"({_mb(c.bytes_out)}): {c.records:,} records in {seconds:.2f} s"
                 f"{f' ({resumed} shards done by an earlier run)' if resumed else ''}")

    def _split_parent(self, k: int) -> dict:
        """Read parent shard k with the log's recovery and write its children."""
        out = dict.fromkeys(("records", "messages", "copies_kept", "devices", "groups", "producers", "bytes_in",
                             "bytes_out"), 0)
        d = self.log_root / shard_dir_name(k)
        if k not in self.parent_locks or not any(d.glob("*.seg")):
            return out
        n = self.to
        parent = AppendLog(d, LogConfig(ttl_s=_FOREVER_S, max_pending=_NO_QUOTA, dedup_window=self.dedup_window),
                           lock=self.parent_locks[k])
        parent.open()
        children: dict = {}
        try:
            out["bytes_in"] = _written(parent)
            meta = {key: parent.meta_get(key) for key in parent.meta_keys("")}
            owners = {key: _meta_owner(k, key) for key in meta if not key.startswith(PRODUCER_META)}
            facts = _Facts(parent, n)
            largest = max([parent.record_length(loc) for key in parent.recipients()
                           for _, loc in parent.inbox_entries(key)]
                          + [18 + len(key.encode()) + len(v) for key, v in meta.items()]
                          + [18 + 2 * 255 + 16 + 24 * self.dedup_window], default=0)   # (+ a checkpoint)
            cfg = LogConfig(segment_size=_segment_size_for(self.segment_size, largest), ttl_s=_FOREVER_S,
                            max_pending=_NO_QUOTA, dedup_window=self.dedup_window, spares=0, max_record=largest)
            floor = parent.last_id()

            def child(c: int):
                lg = children.get(c)
                if lg is None:
                    if self.dry_run:
                        lg = _DryChild()
                    else:
                        lg = AppendLog(self.tmp / "log" / shard_dir_name(c), cfg)
                        lg.open()
                    lg.raise_id_floor(floor)        # ids stay above every id of the parent, consumed ones too
                    children[c] = lg
                return lg

            # state: devices and last seen, privacy, groups (by the id in the key)
            for key, owner in owners.items():
                child(shard_of(owner, n)).meta_put(key, meta[key])
                out["records"] += 1
                out["devices"] += key.startswith("d\x00")
                out["groups"] += key.startswith("g\x00")
            # producer state, as checkpoints (the module's docstring says why where)
            checkpointed = {key[len(PRODUCER_META):] for key in meta if key.startswith(PRODUCER_META)}
            segs = parent.segments          # the oldest one's id floor is 0 if no message was ever before it
            all_kept = not segs or HEADER.unpack_from(segs[0].header())[6] == 0
            for c, key, value in facts.checkpoints(parent.producers, [k + self.frm * j for j in range(n // self.frm)],
                                                   checkpointed, all_kept):
                child(c).meta_put(PRODUCER_META + key, value)
                out["records"] += 1
                out["producers"] += 1
            # inboxes, each in id order, with the consumed group copies the fan-out dedup needs
            tombs = facts.consumed_copies()
            for key in sorted(set(parent.recipients()) | set(tombs)):
                lg = child(shard_of(key.partition("\x00")[0], n))
                entries = sorted([(mid, 0, loc) for mid, loc in parent.inbox_entries(key)]
                                 + [(t[0], 1, t) for t in tombs.get(key, ())])
                for mid, kind, x in entries:
                    if kind == 0:
                        r, dev, _mid, ts, sender, sdev, payload, cid, flags, conv, producer = parent.message_at(x)
                        lg.append(r, mid, ts, sender, sdev, payload, cid, device=dev, flags=flags, conversation=conv,
                                  producer=producer)
                        out["messages"] += 1
                        out["records"] += 1
                    else:
                        _mid, ts, member, dev, origin, group, sender, sdev = x
                        lg.append(member, mid, ts, sender, sdev, b"", origin, device=dev, flags=GROUP,
                                  conversation=group)
                        lg.consume(member, [mid], dev)
                        out["copies_kept"] += 1
                        out["records"] += 2
            out["bytes_out"] = sum(lg.written() if self.dry_run else _written(lg) for lg in children.values())
        finally:
            for lg in children.values():
                lg.close()          # synced, then its lock let go
            parent.close()
        return out

    # -- commit, finish ------------------------------------------------------------------------
    def commit(self) -> None:
        """The commit point: layout.json says N shards (with the mark until the renames are done)."""
        layout = _read_layout(self.data)
        write_layout(self.data, {**layout, "shards": self.to, RESHARD_MARK: {"from": self.frm}})
        self.say(f"commit: {self.data / LAYOUT_FILE} says {self.to} shards")

    def finish(self) -> None:
        for lock in self.parent_locks.values():
            lock.release()
        self.parent_locks.clear()
        finish_committed(self.data)
        self.say(f"swap: {self.log_root} holds the {self.to} new shards; the old ones are removed")

    def close(self) -> None:
        for lock in self.parent_locks.values():
            lock.release()
        self.parent_locks.clear()
        if self.lock is not None:
            self.lock.release()
            self.lock = None


class _Facts:
    """What a parent's records prove beyond its inbox index, consumed records included,
    gathered in one pass over its segments (bounded by the producer rings and the
    copy dedup windows, not by the number of records)."""

    def __init__(self, parent: AppendLog, shards: int):
        table = parent.producers
        in_ring = {key: {seq for seq, msg_id, _ in table.get(key).entries() if msg_id} for key in table.keys()}
        dedup = parent.recovered_dedup
        #: device key -> child -> highest seq of the table's producer stored for that child's recipients
        self.high_in: dict = {}
        #: (device key, seq) -> child, for the answers in the ring that a record proves
        self.child_of: dict = {}
        live_copies, dead_copies = set(), {}
        for seg in parent.segments:
            for f in parent.sends_and_copies(seg):
                if f[0] == "send":
                    _, key, producer, seq, recipient = f
                    c = shard_of(recipient, shards)
                    highs = self.high_in.setdefault(key, {})
                    if producer != table.get(key).producer:
                        highs.setdefault(c, 0)     # an older producer's record: the child fences it too
                        continue
                    highs[c] = max(highs.get(c, 0), seq)
                    if seq in in_ring[key]:
                        self.child_of[(key, seq)] = c
                    continue
                _, member, dev, msg_id, ts, origin, group, sender, sdev, live = f
                if origin not in dedup.get(group, {}).get(member, ()):
                    continue                       # past the dedup window: recovery would not remember it
                if live:
                    live_copies.add((member, group, origin))
                else:
                    dead_copies.setdefault((member, group, origin), (msg_id, ts, member, dev, origin, group, sender,
                                                                     sdev))
        self._copies = [t for k3, t in dead_copies.items() if k3 not in live_copies]

    def checkpoints(self, table, children: list, checkpointed: set, all_kept: bool):
        """(child, device key, checkpoint) for every device with a sequence in the parent.
        Answers a record proves go to its recipient's child, the others to every child.
        While every record the parent ever stored is still there (`all_kept`: no segment
        holding a message was deleted) and no checkpoint speaks for the device, the
        records say where each of its seqs went: a child gets its state only if it has
        records of the device, with the highest seq stored there. Otherwise a retry of any
        seq up to the parent's highest may come to any child (the deleted records' recipients
        are unknown): every child gets the producer and that highest seq, so it is refused
        as a duplicate (and the older producer fenced) as the parent would."""
        for key in table.keys():
            st = table.get(key)
            answers = [a for a in st.entries() if a[1]]       # msg_id 0: refused for good, never durable
            if all_kept and key not in checkpointed and all((key, a[0]) in self.child_of for a in answers):
                targets = self.high_in.get(key, {})
            else:
                targets = dict.fromkeys(children, st.high)
            for c, high in targets.items():
                mine = [a for a in answers if self.child_of.get((key, a[0]), c) == c]
                yield c, key, encode_checkpoint(st.producer, high, mine)

    def consumed_copies(self) -> dict:
        """inbox key -> [(msg_id, ts, member, device, origin, group, sender, sender_device)]:
        consumed group copies the parent's fan-out dedup remembers and no live copy
        proves; each is carried as a consumed record, so a fan-out resumed after the
        restart does not copy it again."""
        out: dict = {}
        for t in self._copies:
            out.setdefault(inbox_key(t[2], t[3]), []).append(t)
        return out


def _meta_owner(shard: int, key: str) -> str:
    """The user or group a META record is sharded by."""
    kind, _, rest = key.partition("\x00")
    if kind == "d":
        return rest.partition("\x00")[0]
    if kind in ("p", "g") and rest:
        return rest
    raise ReshardError(f"shard {shard} holds a state record of a kind this version does not know "
                       f"({key[:40]!r}): it cannot tell which shard it belongs to; nothing was changed")


def _segment_size_for(segment_size: int, largest: int) -> int:
    """The configured segment size, or more if a record needs it (four to a segment)."""
    size = segment_size
    while size < 4 * largest and size < 1 << 31:
        size *= 2
    return size


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(value) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def run(args) -> int:
    """`switchboard reshard`: exit 0 done (or nothing to do), 1 refused or failed (one line)."""
    out = sys.stderr if args.json else sys.stdout

    def say(line: str) -> None:
        print(line, file=out, flush=True)
    job = Reshard(args.data_dir, args.shards, dry_run=args.dry_run, dedup_window=args.dedup_window,
                  segment_size=args.segment_size, say=say)
    try:
        c = job.run()
    except (ReshardError, OSError, struct.error) as exc:
        text = str(exc) if isinstance(exc, ReshardError) else f"{type(exc).__name__}: {exc}"
        print(f"switchboard reshard: {text}", file=sys.stderr, flush=True)
        return 1
    mbps = c.bytes_in / 1e6 / c.seconds if c.seconds else 0.0
    if args.json:
        print(json.dumps({**asdict(c), "data_dir": str(job.data), "dry_run": args.dry_run,
                          "changed": c.shards_in != c.shards_out and not args.dry_run, "mb_per_s": round(mbps, 1)}),
              flush=True)
    elif c.shards_in != c.shards_out:
        say(f"{'dry run' if args.dry_run else 'done'}: shards {c.shards_in} -> {c.shards_out}, records "
            f"{c.records:,}, messages {c.messages:,}, devices {c.devices:,}, groups {c.groups:,}, producers "
            f"{c.producers:,}, bytes {c.bytes_in:,} in, {c.bytes_out:,} out, {c.seconds:.2f} s ({mbps:.1f} MB/s)")
    return 0
