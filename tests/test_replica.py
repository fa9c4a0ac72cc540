"""Physical replication of a shard log (_core/replica.py) on real files: an owner
AppendLog under a mixed workload ships its changes to a ReplicaLog; the
replica's directory, opened as an AppendLog, serves what the owner had, and its
segment files are the owner's byte for byte. Snapshots of a running log,
resuming after a restart, refusals, and kill -9 of the applying process."""
import asyncio
import collections
import json
import random
import shutil
import signal
import struct
import sys
import time
from pathlib import Path

import pytest

from _core.errors import ChangeRefused, DataDirInUse, EpochFenced, ReplicaDiverged, ReplicaError
from _core.log import HEADER_SIZE, AppendLog, LogConfig, segment_name
from _core.replica import (STAGING_NAME, STATE_NAME, Batch, Bytes, Created, Header, Held, LogTap, Removed,
                           ReplicaLog, SnapshotBegin, SnapshotEnd, decode, encode, log_checksums)

from childproc import ChildProcess  # noqa: E402  (tests/ is on sys.path)

CHILD = Path(__file__).resolve().parent / "replica_child.py"
ROOT = CHILD.parent.parent
SEG = 256 << 10
PRODUCER = 7


def cfg(**kw) -> LogConfig:
    kw.setdefault("segment_size", SEG)
    kw.setdefault("max_pending", 100_000)
    return LogConfig(**kw)


class Ids:
    """Router-shaped ids: (ms << 22) | seq, increasing."""

    def __init__(self):
        self.ms = time.time_ns() // 1_000_000
        self.seq = 0

    def __call__(self) -> int:
        self.seq += 1
        return (self.ms << 22) | self.seq


def payload_of(msg_id: int) -> bytes:
    """Message contents are a function of the id (the kill test checks every byte)."""
    rng = random.Random(msg_id)
    return rng.randbytes(rng.choice([0, 10, 100, 300, 1500, 4000]))


class Workload:
    """What the router does to a shard's log, at random: messages to device and
    shared inboxes (some original SENDs with a producer, whose table is kept as
    the router keeps it; receipts, mirrors, group copies), acknowledgements,
    device registrations and last-seen updates, group state; one recipient who
    never reads pins old segments, so maintain() compacts them.

    `single_records`: every operation writes one record (no producers, so no
    checkpoints), so the log passes through exactly one observable state per
    operation: the kill test looks for the replica's state among them."""

    def __init__(self, log, rng: random.Random, single_records: bool = False):
        self.log = log
        self.rng = rng
        self.single = single_records
        self.users = [f"user{i}" for i in range(9)] + ["zoë", "sleeper"]
        self.devices = collections.defaultdict(list)
        self.seqs = collections.Counter()
        self.nid = Ids()
        self.sleeper_first = None          # (msg id, segment it was written to)
        self.producer_keys = set()

    def step(self) -> None:
        r = self.rng.random()
        if r < 0.5:
            self.append()
        elif r < 0.8:
            self.consume()
        elif r < 0.9:
            user = self.rng.choice(self.users)
            if self.devices[user] and self.rng.random() < 0.6:
                self.log.touch_device(user, self.rng.choice(self.devices[user]), int(time.time() * 1000))
            else:
                device = f"dev{self.rng.randrange(3)}"
                if self.log.register_device(user, device, int(time.time() * 1000)):
                    self.devices[user].append(device)
        else:
            value = b"" if self.rng.random() < 0.2 else self.rng.randbytes(self.rng.randrange(1, 400))
            self.log.meta_put(f"g\x00#group{self.rng.randrange(6)}", value)

    def append(self) -> None:
        rng = self.rng
        user = "sleeper" if rng.random() < 0.04 else rng.choice(self.users[:-1])
        device = rng.choice(self.devices[user]) if self.devices[user] and rng.random() < 0.8 else ""
        mid = self.nid()
        ts = mid >> 22
        sender, sdev = rng.choice([("alice", "phone"), ("bob", "laptop"), ("carol", "")])
        kind = rng.random()
        flags, conversation, client_id, producer = 0, "", 0, 0
        if kind < 0.1:
            flags, client_id = 0x01, mid - 1                     # a receipt
        elif kind < 0.2:
            flags, conversation, client_id = 0x02, "peer", mid - 2   # a mirror
        elif kind < 0.3:
            flags, conversation, client_id = 0x04, "#group1", mid - 3  # a group copy
        elif not self.single and kind < 0.7:
            key = f"{sender}\x00{sdev}"
            self.seqs[key] += 1
            client_id, producer = self.seqs[key], PRODUCER
        seg = self.log.active.segment_id if self.log.active is not None else 0
        self.log.append(user, mid, ts, sender, sdev, payload_of(mid), client_id, device=device, flags=flags,
                        conversation=conversation, producer=producer)
        if producer:
            self.log.producers.stored_py(key, producer, client_id, mid, ts, seg or self.log.active.segment_id)
            self.producer_keys.add(key)
        if user == "sleeper" and self.sleeper_first is None:
            self.sleeper_first = (mid, self.log.active.segment_id)

    def consume(self) -> None:
        inboxes = [k for k in self.log.recipients() if not k.startswith("sleeper")]
        if not inboxes:
            return
        key = self.rng.choice(inboxes)
        user, _, device = key.partition("\x00")
        ids = [mid for mid, _loc in self.log.pending_locations(key)]
        if not self.single and self.rng.random() < 0.2:      # (it consumes from two inboxes)
            self.log.consume_through(user, ids[self.rng.randrange(len(ids))], device)
            return
        take = [mid for mid in ids if self.rng.random() < 0.7] or ids[:1]
        self.log.consume(user, take, device)


def observe(log, producer_keys=()) -> dict:
    """Everything a shard's log serves: pending entries per inbox with their
    contents, devices and last seen per user, every META value, the producer
    (idempotent-send) state of the given devices, last_id."""
    pending = {}
    for key in log.recipients():
        items = []
        for mid, loc in log.pending_locations(key):
            _mid, ts, client_id, _r, sender, sdev, payload = log.read_message(loc)
            flags, _s, _d, conversation, _ref, _ = log.read_flags(loc)
            items.append((mid, ts, client_id, sender, sdev, payload, flags, conversation))
        pending[key] = items
    users = {k.split("\x00")[1] for k in log.meta_keys("d\x00")}
    producers = {}
    for key in producer_keys:
        st = log.producers.get(key)
        producers[key] = None if st is None else (st.producer, st.high, st.entries())
    return {"pending": pending, "pending_count": log.pending_count(),
            "devices": {u: log.devices_of(u) for u in users}, "last_seen": {u: log.last_seen(u) for u in users},
            "meta": {k: log.meta_get(k) for k in log.meta_keys()}, "producers": producers,
            "last_id": log.last_id()}


def assert_serves_the_same(directory: Path, owner, producer_keys=()) -> None:
    """Open `directory` as an AppendLog (a takeover) and compare it with the owner."""
    taken = AppendLog(directory, cfg())
    try:
        report = taken.open()
        assert not report.torn_tails and not report.corrupt and not report.bad_headers
        got, want = observe(taken, producer_keys), observe(owner, producer_keys)
        for what in want:
            assert got[what] == want[what], f"{what} differs"
    finally:
        taken.close()


def assert_identical_files(owner, directory: Path) -> None:
    """The replica's segment files are the owner's installed segments, byte for byte
    (over [0, end) and, both being zero past it, whole; past the end of a recycled one
    the owner holds the file's previous use's bytes, which are not shipped, and the
    replica zeros)."""
    want = [segment_name(seg.segment_id) for seg in owner.segments]
    assert sorted(p.name for p in directory.glob("*.seg")) == want
    for seg in owner.segments:
        mine = (directory / segment_name(seg.segment_id)).read_bytes()
        theirs = Path(seg.path).read_bytes()
        assert len(mine) == len(theirs) == seg.size
        assert mine[:seg.end] == theirs[:seg.end], f"segment {seg.segment_id} differs below its end"
        if seg.tag:
            assert mine[seg.end:] == bytes(seg.size - seg.end), f"replica's segment {seg.segment_id} past its end"
        else:
            assert mine == theirs, f"segment {seg.segment_id} differs past its end"


def assert_a_full_copy(replica: ReplicaLog, owner, producer_keys=()) -> None:
    """Everything shipped: the replica's checksums are the owner's; closed, its files
    are the owner's byte for byte, and its directory, opened as a log, serves the same."""
    assert replica.checksums() == log_checksums(owner)
    replica.close()
    assert_identical_files(owner, replica.directory)
    assert_serves_the_same(replica.directory, owner, producer_keys)


def ship_all(tap: LogTap, replica: ReplicaLog, epoch: int = 1, max_bytes: int = 1 << 20) -> collections.Counter:
    kinds = collections.Counter()
    for _ in range(100_000):
        batch = tap.changes(max_bytes)
        kinds.update(type(c).__name__ for c in batch.changes)
        assert replica.apply(batch, epoch) == tap.position() == batch.position
        if batch.complete:
            return kinds
    raise AssertionError("changes() never caught up")


def open_owner(directory: Path, config=None) -> AppendLog:
    owner = AppendLog(directory, config or cfg())
    owner.open()
    owner.start(asyncio.get_running_loop())
    return owner


class Rig:
    """A test's owner log (started on the running loop) with its Workload, and its
    replicas; all closed when the `with` block ends. Make it inside the loop."""

    def __init__(self, tmp_path: Path, rng: random.Random, single_records: bool = False):
        self.tmp = tmp_path
        self.owner = open_owner(tmp_path / "owner")
        self.work = Workload(self.owner, rng, single_records)
        self.replicas = []

    def replica(self, name: str = "replica") -> ReplicaLog:
        """A ReplicaLog on tmp_path/name, opened (again, for a restart)."""
        replica = ReplicaLog(self.tmp / name)
        replica.open()
        self.replicas.append(replica)
        return replica

    async def run(self, steps: int, *feeds) -> None:
        """`steps` operations, maintenance every 50, the worker thread's results (spare
        segments) let in after each; every feed (every, tap, replica) is shipped to
        every `every` operations."""
        for step in range(steps):
            self.work.step()
            if step % 50 == 49:
                self.owner.maintain()
            for every, tap, replica in feeds:
                if step % every == 0:
                    replica.apply(tap.changes(), 1)
            await asyncio.sleep(0)

    def __enter__(self) -> "Rig":
        return self

    def __exit__(self, *exc) -> None:
        for replica in self.replicas:
            replica.close()
        self.owner.close()


# -- the randomized workload ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_replica_serves_what_the_owner_had_under_a_mixed_workload(tmp_path, seed):
    rng = random.Random(seed)
    steps = 4000
    checks = set(rng.sample(range(500, steps - 500), 3))

    async def main():
        with Rig(tmp_path, rng) as rig:
            owner, work = rig.owner, rig.work
            tap = LogTap(owner)
            replica = rig.replica()
            assert replica.position() == (0, 0)
            kinds = collections.Counter()
            for step in range(steps):
                await rig.run(1)
                if rng.random() < 0.2:                     # ship after every few operations
                    batch = tap.changes(rng.choice([4096, 65536, 1 << 20]))
                    if rng.random() < 0.3:
                        batch = decode(encode(batch))       # as it would travel
                    kinds.update(type(c).__name__ for c in batch.changes)
                    assert replica.apply(batch, 1) == batch.position
                if step % 50 == 49:
                    owner.maintain()
                if step in checks:
                    kinds += ship_all(tap, replica)
                    assert replica.checksums() == log_checksums(owner)
                    replica.close()
                    copy = tmp_path / f"check{step}"       # opening it as a log may change it (a takeover):
                    shutil.copytree(tmp_path / "replica", copy)   # the replica goes on from the original
                    assert_serves_the_same(copy, owner, work.producer_keys)
                    replica = rig.replica()
                    assert replica.position() == tap.position()
            kinds += ship_all(tap, replica)
            assert_a_full_copy(replica, owner, work.producer_keys)
            # the workload did what it is for: rolls, front deletions, compaction, checkpoints
            assert kinds["Created"] >= 5 and kinds["Removed"] >= 2 and kinds["Header"] == 0, kinds
            sleeper_id, first_segment = work.sleeper_first
            (loc,) = [loc for key in owner.recipients() if key.startswith("sleeper")
                      for mid, loc in owner.pending_locations(key) if mid == sleeper_id]
            assert loc >> 32 != first_segment and first_segment not in [s.segment_id for s in owner.segments]
            assert owner.meta_keys("\x00seq\x00"), "no producer checkpoint was written"

    asyncio.run(main())


# -- snapshots --------------------------------------------------------------------------------------

def test_a_snapshot_of_a_running_log_and_the_changes_after_it_equal_shipping_from_the_start(tmp_path):
    async def main():
        with Rig(tmp_path, random.Random(11)) as rig:
            owner = rig.owner
            first, tap_first = rig.replica("first"), LogTap(owner)
            late, tap_late = rig.replica("late"), LogTap(owner)
            await rig.run(2500, (7, tap_first, first))      # history: rolls, deletions, compaction
            assert owner.segments[0].segment_id > 1         # the log's first segments are gone
            # the late replica catches up from a snapshot while the owner keeps going
            kinds = collections.Counter()
            chunks = 0
            for batch in tap_late.snapshot(chunk_bytes=8 << 10):
                chunks += 1
                assert batch.nbytes <= 8 << 10
                kinds.update(type(c).__name__ for c in batch.changes)
                late.apply(decode(encode(batch)), 1)
                if not batch.complete:
                    assert late.position() == (0, 0)    # staged: it holds its old copy (none) until the end
                    assert (tmp_path / "late" / STAGING_NAME).is_dir()
                    assert not list((tmp_path / "late").glob("*.seg"))
                await rig.run(3)
                if chunks % 10 == 0:
                    owner.maintain()                    # front segments go while the snapshot runs
            assert chunks >= 10 and kinds["SnapshotBegin"] == kinds["SnapshotEnd"] == 1
            assert not (tmp_path / "late" / STAGING_NAME).exists()
            assert late.position() == tap_late.position()
            await rig.run(1500, (5, tap_late, late), (9, tap_first, first))
            ship_all(tap_first, first)
            ship_all(tap_late, late)
            assert first.checksums() == late.checksums()
            for replica in (first, late):
                assert_a_full_copy(replica, owner, rig.work.producer_keys)

    asyncio.run(main())


def test_a_snapshot_replaces_an_old_copy_and_one_never_completed_leaves_it(tmp_path):
    async def main():
        with Rig(tmp_path, random.Random(5)) as rig:
            owner = rig.owner
            replica, tap = rig.replica(), LogTap(owner)
            await rig.run(300)
            ship_all(tap, replica)
            old = replica.position()
            old_sums = replica.checksums()
            await rig.run(2500)                         # the replica falls far behind: its segments go
            assert old[0] not in [s.segment_id for s in owner.segments]
            with pytest.raises(ReplicaDiverged, match="newest segment"):
                LogTap(owner).resume(replica.holdings())
            # a snapshot abandoned half-way: the replica keeps its old copy, the tap refuses to go on
            snap = tap.snapshot(chunk_bytes=8 << 10)
            for _ in range(3):
                replica.apply(next(snap), 1)
            snap.close()
            with pytest.raises(ReplicaError, match="abandoned"):
                tap.changes()
            replica.close()
            replica = rig.replica()
            assert replica.position() == old and replica.checksums() == old_sums
            assert not (tmp_path / "replica" / STAGING_NAME).exists()
            for batch in tap.snapshot(chunk_bytes=64 << 10):
                replica.apply(batch, 1)
            assert replica.position() == tap.position()
            assert_a_full_copy(replica, owner, rig.work.producer_keys)

    asyncio.run(main())


def test_a_restarted_install_is_finished(tmp_path):
    """A replica killed between recording an install and moving every staged file
    into place finishes the install when it opens again."""
    async def main():
        with Rig(tmp_path, random.Random(8)) as rig:
            await rig.run(1500)
            replica = ReplicaLog(tmp_path / "replica")
            replica.open()
            batches = list(LogTap(rig.owner).snapshot())
            original = ReplicaLog._finish_install

            def cut_short(self, segment_ids):       # the process dies after the first rename
                src = self._staging / segment_name(sorted(segment_ids)[0])
                src.rename(self.directory / src.name)
                raise KeyboardInterrupt("killed")
            ReplicaLog._finish_install = cut_short
            try:
                with pytest.raises(KeyboardInterrupt):
                    for batch in batches:
                        replica.apply(batch, 1)
            finally:
                ReplicaLog._finish_install = original
            replica._close_files()
            replica._lock.release()
            state = json.loads((tmp_path / "replica" / STATE_NAME).read_text())
            assert state["installing"]
            again = rig.replica()
            assert again.position() == batches[-1].position
            assert again.checksums() == log_checksums(rig.owner)
            again.close()
            assert_identical_files(rig.owner, tmp_path / "replica")

    asyncio.run(main())


# -- resuming ---------------------------------------------------------------------------------------

def test_a_restarted_replica_resumes_from_what_it_holds(tmp_path):
    async def main():
        with Rig(tmp_path, random.Random(3)) as rig:
            owner = rig.owner
            replica, tap = rig.replica(), LogTap(owner)
            snapshots = 0
            kinds = collections.Counter()
            for round_ in range(6):
                for step in range(400):
                    await rig.run(1)
                    if step % 13 == 0:
                        replica.apply(tap.changes(8 << 10), 1)   # small batches: cut inside records
                    if step % 50 == 49:
                        owner.maintain()
                replica.sync()
                held = replica.position()
                replica.close()                      # restarted: the owner's tap starts afresh
                for _ in range(150):
                    rig.work.step()
                    await asyncio.sleep(0)
                owner.maintain()
                replica = rig.replica()
                assert replica.position() == held
                tap = LogTap(owner)
                try:
                    tap.resume(replica.holdings(digests="all" if round_ % 2 else "newest"))
                except ReplicaDiverged:          # its newest segment was deleted meanwhile: too far behind
                    for batch in tap.snapshot():
                        replica.apply(batch, 1)
                    snapshots += 1
                else:
                    assert tap.position() == held
                    kinds += ship_all(tap, replica)
            assert_a_full_copy(replica, owner, rig.work.producer_keys)
            assert snapshots <= 2 and kinds["Removed"] > 0, (snapshots, kinds)   # deleted while it was down

    asyncio.run(main())


def test_an_owner_restart_rewrites_an_empty_segments_header(tmp_path):
    """An installed segment that never got a record is installed again (its header
    rewritten: another creation time) when the owner reopens: a Header change."""
    async def first():
        owner = open_owner(tmp_path / "owner")     # installs segment 1, makes its reserve
        replica = ReplicaLog(tmp_path / "replica")
        replica.open()
        ship_all(LogTap(owner), replica)
        owner.close()
        replica.close()

    async def second():
        await asyncio.sleep(0.01)                  # another millisecond in the header
        owner = open_owner(tmp_path / "owner")
        replica = ReplicaLog(tmp_path / "replica")
        replica.open()
        try:
            tap = LogTap(owner)
            tap.resume(replica.holdings())
            kinds = ship_all(tap, replica)
            assert kinds["Header"] == 1, kinds
            nid = Ids()
            mid = nid()
            owner.append("bob", mid, mid >> 22, "s", "d", b"hello")
            ship_all(tap, replica)
            replica.close()
            assert_identical_files(owner, tmp_path / "replica")
            assert_serves_the_same(tmp_path / "replica", owner)
        finally:
            replica.close()
            owner.close()

    asyncio.run(first())
    asyncio.run(second())


# -- refusals ---------------------------------------------------------------------------------------

def test_changes_that_do_not_follow_are_refused_and_nothing_is_applied(tmp_path):
    async def main():
        owner = open_owner(tmp_path / "owner")
        nid = Ids()
        replica = ReplicaLog(tmp_path / "replica")
        replica.open()
        tap = LogTap(owner)
        try:
            for _ in range(100):
                mid = nid()
                owner.append("bob", mid, mid >> 22, "s", "d", b"x" * 50)
            replica.apply(tap.changes(), 3)
            sid, end = replica.position()
            extra = owner.active.read(end, 8)

            def files():
                # not the spare segment a thread makes ahead (it is no part of the copy until installed)
                return {p.name: p.read_bytes() for p in (tmp_path / "replica").iterdir()
                        if p.name != "LOCK" and not p.name.startswith(".spare-")}
            before = (replica.position(), replica.checksums(), files())
            good = Bytes(sid, end, extra)
            header = owner.active.header()
            refused = {
                "a gap": [Bytes(sid, end + 8, extra)],
                "an overlap": [Bytes(sid, end - 8, extra)],
                "does not hold": [Bytes(999, HEADER_SIZE, extra)],
                "do not fit": [Bytes(sid, end, b"\1" * SEG)],
                "exist here already": [good, Created(sid, SEG, owner.active.nonce, header)],
                "does not describe it": [good, Created(sid + 1, SEG, 1234, header)],
                "another segment": [Header(sid, header[:20] + b"\0" + header[21:])],
                "newest segment is never removed": [good, Removed(sid, False)],
                "no snapshot was begun": [good, SnapshotEnd(1)],
                "staged": [SnapshotBegin(1), SnapshotEnd(1)],
            }
            for reason, changes in refused.items():
                position = (sid, end + 8) if changes[0] is good else (sid, end)
                with pytest.raises(ChangeRefused, match=reason):
                    replica.apply(Batch(changes, position, True), 3)
                assert (replica.position(), replica.checksums(), files()) == before, reason
            with pytest.raises(ChangeRefused, match="leaves this replica at"):
                replica.apply(Batch([good], (sid, end), True), 3)
            with pytest.raises(EpochFenced, match="epoch 2 refused"):
                replica.apply(Batch([good], (sid, end + 8), True), 2)
            with pytest.raises(ChangeRefused, match="malformed"):
                decode(encode(Batch([good], (sid, end + 8), True))[:-3])
            assert (replica.position(), replica.checksums(), files()) == before
            # a newer epoch fences the older one, across a restart
            replica.apply(Batch([good], (sid, end + 8), True), 4)
            replica.close()
            replica = ReplicaLog(tmp_path / "replica")
            replica.open()
            assert replica.epoch == 4 and replica.position() == (sid, end + 8)
            with pytest.raises(EpochFenced):
                replica.apply(Batch([], (sid, end + 8), True), 3)
            with pytest.raises(EpochFenced):
                replica.fence(2)
            with pytest.raises(DataDirInUse):
                ReplicaLog(tmp_path / "replica").open()
        finally:
            replica.close()
            owner.close()
        with pytest.raises(ReplicaError, match="not a replica directory"):
            ReplicaLog(tmp_path / "owner").open()     # an owner's log is never taken for a replica's

    asyncio.run(main())


def test_resume_refuses_a_copy_that_is_not_a_prefix(tmp_path):
    async def main():
        owner = open_owner(tmp_path / "owner")
        nid = Ids()
        try:
            for _ in range(50):
                mid = nid()
                owner.append("bob", mid, mid >> 22, "s", "d", b"y" * 80)
            (seg,) = owner.segments
            sid, header = seg.segment_id, seg.header()
            tap = LogTap(owner)
            tap.resume({sid: Held(seg.end - 8 * 13, header, None)})      # behind: fine
            with pytest.raises(ReplicaDiverged, match="lost"):
                tap.resume({sid: Held(seg.end + 8, header, None)})       # ahead of the owner
            other = header[:16] + struct.pack("!Q", seg.nonce ^ 1) + header[24:]
            with pytest.raises(ReplicaDiverged, match="another file"):
                tap.resume({sid: Held(HEADER_SIZE, other, None)})
            with pytest.raises(ReplicaDiverged, match="differ"):
                tap.resume({sid: Held(seg.end, header, "0" * 32)})
            with pytest.raises(ReplicaDiverged, match="not in this log"):
                tap.resume({sid + 5: Held(HEADER_SIZE, header, None)})
        finally:
            owner.close()

    asyncio.run(main())


def test_segment_files_are_made_ahead_and_left_to_no_one(tmp_path):
    async def main():
        owner = open_owner(tmp_path / "owner")
        replica = ReplicaLog(tmp_path / "replica")
        replica.open()
        nid = Ids()
        tap = LogTap(owner)
        try:
            mid = nid()
            owner.append("bob", mid, mid >> 22, "s", "d", b"z")
            batch = tap.changes()
            assert batch.next_size == owner.next_segment_size > 0
            replica.apply(batch, 1)
            replica._spare.join()
            (spare,) = (tmp_path / "replica").glob(".spare-*.seg.tmp")
            assert spare.stat().st_size == batch.next_size
            for _ in range(20_000):                  # until the owner rolls
                if len(owner.segments) > 1:
                    break
                mid = nid()
                owner.append("bob", mid, mid >> 22, "s", "d", b"z" * 500)
                await asyncio.sleep(0)
            replica.apply(tap.changes(), 1)
            assert not spare.exists()                # it became the new segment's file
            replica._spare.join()
        finally:
            owner.close()
        # killed with a spare made: recovery (a takeover, or the replica reopening) removes it
        replica._close_files()
        replica._lock.release()
        taken = AppendLog(tmp_path / "replica", cfg())
        taken.open()
        taken.close()
        assert not list((tmp_path / "replica").glob(".*.tmp"))

    asyncio.run(main())


# -- kill -9 of the applying process ----------------------------------------------------------------

class ReplicaChild(ChildProcess):
    def __init__(self, directory: Path, stderr_path: Path, epoch: int = 1):
        import subprocess
        super().__init__([sys.executable, str(CHILD), str(directory), str(epoch)], stderr_path, ROOT,
                         stdin=subprocess.PIPE)

    def send(self, data: bytes) -> None:
        self.proc.stdin.write(struct.pack("!I", len(data)) + data)
        self.proc.stdin.flush()


def quick_state(log) -> tuple:
    """The observable state, cheaply: pending (inbox, id) pairs and META values."""
    return (frozenset((key, mid) for key in log.recipients() for mid, _loc in log.pending_locations(key)),
            frozenset((k, log.meta_get(k)) for k in log.meta_keys()))


def test_kill9_while_applying_leaves_a_prefix_and_resyncing_completes_it(tmp_path):
    rng = random.Random(2024)
    rdir = tmp_path / "replica"
    counts = collections.Counter()

    async def main():
        owner = open_owner(tmp_path / "owner")
        work = Workload(owner, rng, single_records=True)
        # the owner's state after each operation, from operation `base` on: states[0] is
        # one the replica's copy is known to have reached (what it recorded)
        states = [quick_state(owner)]
        base = 0
        tap = LogTap(owner)

        def op() -> int:
            return base + len(states) - 1

        try:
            for cycle in range(21):
                child = ReplicaChild(rdir, tmp_path / f"child{cycle}.err")
                sent = []                      # per batch: the operation the copy reaches once applied
                try:
                    line = child.readline()
                    assert line.startswith("READY ")
                    holdings = {int(k): Held(v[0], bytes.fromhex(v[1]), v[2])
                                for k, v in json.loads(line[6:]).items()}
                    snapshot = []
                    try:
                        tap.resume(holdings)
                    except ReplicaDiverged:    # its newest segment was deleted here meanwhile
                        snapshot = list(tap.snapshot(chunk_bytes=rng.choice([16 << 10, 128 << 10])))
                    if cycle % 5 == 4:         # a snapshot even where resuming would do
                        snapshot = list(tap.snapshot(chunk_bytes=32 << 10))
                    counts["snapshots"] += bool(snapshot)
                    for batch in snapshot:     # staged: the copy stays where it was until the last
                        child.send(encode(batch))
                        sent.append(op() if batch.complete else base)
                    last = cycle == 20
                    in_snapshot = bool(snapshot) and not last and rng.random() < 0.7   # kill it there
                    for _ in range(200 if last else 0 if in_snapshot else rng.randrange(5, 60)):
                        for _ in range(rng.randrange(1, 25)):
                            work.step()
                            if op() % 40 == 39:
                                owner.maintain()       # compaction copies and deletions change nothing seen
                            states.append(quick_state(owner))
                        batch = tap.changes(rng.choice([4 << 10, 64 << 10, 1 << 20]))
                        child.send(encode(batch))
                        # a batch cut short by its budget leaves the copy between operations
                        sent.append(op() if batch.complete else sent[-1] if sent else base)
                        await asyncio.sleep(0)
                    if last:
                        while True:
                            batch = tap.changes()
                            child.send(encode(batch))
                            sent.append(op())
                            if batch.complete:
                                break
                        child.send(b"")
                        lines = [child.readline() for _ in sent]
                        assert all(line.startswith("APPLIED") for line in lines), lines[-3:]
                        assert child.proc.wait(20) == 0
                        break
                    time.sleep(rng.random() * (0.02 if in_snapshot else 0.05))   # somewhere in its batches
                    status, lines = child.kill9()
                    assert status == -signal.SIGKILL
                    counts["kills"] += 1
                finally:
                    child.cleanup()
                assert all(line.startswith("APPLIED") for line in lines), lines
                applied = len(lines)
                counts["inside a snapshot"] += applied < len(snapshot)
                low = sent[applied - 1] if applied else base     # applied and recorded, at least
                # what any recovery finds in the replica's directory: a state the owner had
                taken = AppendLog(rdir, cfg())
                try:
                    report = taken.open()
                    assert not report.bad_headers and not report.corrupt, report
                    counts["torn tails"] += len(report.torn_tails)
                    got = quick_state(taken)
                    for key in taken.recipients():
                        for mid, loc in taken.pending_locations(key):
                            assert taken.read_message(loc)[6] == payload_of(mid)
                finally:
                    taken.close()
                assert any(states[i] == got for i in range(low - base, len(states))), \
                    f"cycle {cycle}: the replica holds no state the owner had since operation {low}"
                del states[:low - base]       # a restarted replica goes back at most to `low`
                base = low
            assert_identical_files(owner, rdir)
            assert_serves_the_same(rdir, owner)
        finally:
            owner.close()

    asyncio.run(main())
    assert counts["kills"] == 20 and counts["snapshots"] >= 4, counts
    print(dict(counts))          # "inside a snapshot": kills that landed there (timing: usually 1-5)
