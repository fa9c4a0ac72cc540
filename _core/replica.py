"""A shard log's changes, shipped and applied: physical replication.

A replica keeps a byte-identical copy of the owner's shard directory (the same
segment files, ids, nonces, headers, records at the same offsets). `LogTap`
is the owner's side: what changed in an AppendLog's files since the last call,
as a `Batch` of changes. `ReplicaLog` is the replica's side: it applies them,
in order, to its own directory. A replica taking over opens that directory
with the ordinary recovery, `AppendLog(directory).open()`, exactly as after a
kill -9 of the owner: torn tails, CRCs and all are handled there.

Why it works this way:
- Every write to a log's files is one of: a segment installed (a spare's
  64-byte header rewritten with the id floor when it becomes active), bytes
  appended at the active segment's `end`, a front segment deleted or moved to
  quarantine/, and, in recovery only, zeros over a torn tail past `end`. So
  copying needs no knowledge of records (`Created`, `Header`, `Bytes`,
  `Removed`); spares are not part of the feed until installed.
- The feed diffs rather than hooking appends: a tap remembers per segment how
  far it shipped and, when asked, copies [shipped, seg.end) out of the mapping.
  Only the active segment grows and it is always the newest, so walking the
  segments in id order gives the appends in the order they were made: a
  replica killed part-way through a batch holds a state the owner had (a
  record cut in half is a torn tail, which recovery zeroes).
- Removals come last, and only in a batch that caught up with everything: a
  front segment is deleted after the records that supersede it (CONSUMEs,
  compaction copies, producer checkpoints) were written at the head. A replica
  deleting it before it holds those would serve consumed messages again or
  lose compacted ones; one holding it longer is a log whose deletion came late.
- The replica refuses what does not follow (ChangeRefused: a gap, an unknown
  segment, an offset that is not its end), checking the whole batch before it
  writes anything, and a batch of an older epoch (EpochFenced: a deposed owner).
- What a replica records (REPLICA: its epoch and each segment's end) is written
  only after the data it describes was fdatasynced, so it never claims more
  than its files hold after a crash; a restart drops what lies past it and the
  owner sends it again (`holdings()` -> `LogTap.resume()`).
- A snapshot (an empty or diverged replica catching up) is staged in
  snapshot.incoming/ and installed when complete: the current files copied
  part-way are not a state the owner ever had (a compacted message's old
  segment is gone, its copy at the head not yet there), so the old copy stays
  until the new one is whole.
"""
import json
import os
import shutil
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import xxhash

from ._log import crc32c
from .dirlock import DirLock
from .errors import ChangeRefused, EpochFenced, ReplicaDiverged, ReplicaError
from .log import HEADER, HEADER_SIZE, MAGIC, flush_files, fsync_dir, install_file, reserve_file, segment_name

STATE_NAME = "REPLICA"
STAGING_NAME = "snapshot.incoming"
QUARANTINE_NAME = "quarantine"
#: bytes of records one batch carries at most (a replica far behind catches up in many)
DEFAULT_CHUNK = 1 << 20
_READ = 1 << 20                       # digests and zeroing read this much at a time
STATE_VERSION = 1


# -- changes ---------------------------------------------------------------------------

class Created(NamedTuple):
    """A segment was installed at the owner: make its file, `size` bytes of zeros
    under this 64-byte header."""
    segment_id: int
    size: int
    nonce: int
    header: bytes


class Header(NamedTuple):
    """A held segment's header was rewritten (an empty segment installed again
    after the owner restarted)."""
    segment_id: int
    header: bytes


class Bytes(NamedTuple):
    """Bytes appended at `offset`, the replica's end of that segment, which must be its newest."""
    segment_id: int
    offset: int
    data: bytes


class Removed(NamedTuple):
    """A front segment was deleted (or, `quarantine`, moved to quarantine/)."""
    segment_id: int
    quarantine: bool


class SnapshotBegin(NamedTuple):
    """What follows, up to SnapshotEnd, replaces the replica's copy whole (staged,
    then installed at once). `segments`: how many the owner held at the start."""
    segments: int


class SnapshotEnd(NamedTuple):
    """The snapshot is complete: `segments` files were staged; install them."""
    segments: int


@dataclass(slots=True)
class Batch:
    changes: list
    #: (segment id, end) of the newest data the receiver holds once it applied this
    #: (inside a snapshot: what it has staged)
    position: tuple
    #: it caught up with everything the log held when it was made
    complete: bool
    #: the size of the owner's next segment (a spare made ahead): a replica may prepare a file
    next_size: int = 0

    @property
    def nbytes(self) -> int:
        return sum(len(c.data) for c in self.changes if type(c) is Bytes)


class Held(NamedTuple):
    """What a replica holds of one segment (ReplicaLog.holdings): its end, its
    header, and an xxh3_128 of its records, bytes [64, end) (for the newest, or
    all, or none; the header is compared apart: an install rewrites it)."""
    end: int
    header: bytes
    digest: str | None


def _header_fields(header: bytes) -> tuple:
    """(segment id, nonce, size) of a valid segment header, or None."""
    if len(header) != HEADER_SIZE:
        return None
    magic, sid, nonce, size, _created, _version, _floor, _ = HEADER.unpack_from(header)
    if magic != MAGIC or struct.unpack_from("!I", header, 60)[0] != crc32c(header[:60]):
        return None
    return sid, nonce, size


def digest_fd(fd: int, length: int, start: int = 0) -> str:
    """xxh3_128 (hex) of a file's bytes [start, length)."""
    return _digest(lambda off, n: os.pread(fd, n, off), start, length)


def _digest(read, start: int, stop: int) -> str:
    h = xxhash.xxh3_128()
    for off in range(start, stop, _READ):
        h.update(read(off, min(_READ, stop - off)))
    return h.hexdigest()


def _digest_segment(seg, length: int, start: int = 0) -> str:
    return _digest(seg.read, start, length)


def digest_files(ranges: dict) -> dict:
    """{segment id: xxh3_128 of [0, end)} of {segment id: (fd, end)} — fds the
    caller dup()ed for this (a thread may run it while the loop closes the
    originals); a file that cannot be read gives None. Closes the fds."""
    out = {}
    for sid, (fd, end) in ranges.items():
        try:
            out[sid] = digest_fd(fd, end) if os.fstat(fd).st_size >= end else None
        except OSError:
            out[sid] = None
        finally:
            os.close(fd)
    return out


def record_log_as_copy(directory, segments: list, epoch: int) -> None:
    """Make a closed shard log directory a replica copy in place: write the REPLICA
    record naming its segments ([(segment id, end)], the log's final ends) at
    `epoch`, flushed with the data. A log handed over by a move is then kept as
    the new owner's replica: its stream resumes from it instead of sending a
    whole snapshot back. The caller renames the directory among its copies."""
    d = Path(directory)
    (d / "LOCK").unlink(missing_ok=True)
    newest = max(segments, default=(0, 0))
    state = {"version": STATE_VERSION, "epoch": epoch, "position": list(newest),
             "segments": [[sid, end] for sid, end in sorted(segments)], "installing": None}
    fds = [os.open(d / segment_name(sid), os.O_RDONLY | os.O_CLOEXEC) for sid, _ in segments]
    try:
        _write_record(d, state, fds, durable=True)
    finally:
        for x in fds:
            os.close(x)


def _write_record(directory: Path, state: dict, flush, durable: bool) -> None:
    """Write REPLICA atomically: a temporary file flushed together with `flush`
    (the data it describes: one cache flush for all), then renamed over it;
    `durable` also fsyncs the directory (an epoch, a removal, an install)."""
    tmp = directory / f".{STATE_NAME}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _pwrite_all(fd, json.dumps(state).encode(), 0)
        flush_files([*flush, fd])
    finally:
        os.close(fd)
    os.rename(tmp, directory / STATE_NAME)
    if durable:
        fsync_dir(directory)


def log_checksums(log) -> dict:
    """At the owner: {segment id: xxh3_128 of [0, end)} of every installed segment,
    to compare with ReplicaLog.checksums()."""
    return {seg.segment_id: _digest_segment(seg, seg.end) for seg in log.segments}


# -- the owner's side ------------------------------------------------------------------

class _Mark:
    __slots__ = ("shipped", "header", "seg")

    def __init__(self, shipped: int, header: bytes, seg):
        self.shipped = shipped            # bytes [0, shipped) of the segment were sent
        self.header = header              # the header the replica holds
        self.seg = seg                    # the Segment last seen (None after resume: headers compared once)


class LogTap:
    """The changes of one AppendLog's files for one replica stream (one tap per
    replica: each has its own marks). Call it on the log's own thread, between
    operations: a record is written in two steps (its body, then CRC and length)
    and is whole only between them.

    A new tap ships everything from scratch: right for a new log (or one whose
    first segment is still there); a log that has deleted segments gives a
    replica a `snapshot()`, or `resume()` from what the replica holds."""

    def __init__(self, log):
        self.log = log
        self._marks: dict = {}            # segment id -> _Mark, ascending
        self._newest = 0
        self._broken = ""                 # why changes() may not go on (an abandoned snapshot)

    def position(self) -> tuple:
        """(segment id, end) of the newest data shipped; (0, 0) before any."""
        if not self._marks:
            return (0, 0)
        return (self._newest, self._marks[self._newest].shipped)

    def changes(self, max_bytes: int = DEFAULT_CHUNK) -> Batch:
        """The changes since the previous call, with at most `max_bytes` of records
        (the rest comes in the next calls: `complete` is False until then)."""
        if self._broken:
            raise ReplicaError(self._broken)
        log = self.log
        if log._closed:
            raise ReplicaError(f"the log in {log.directory} is closed")
        out = []
        budget = max_bytes
        complete = True
        marks = self._marks
        segs = log.segments
        for seg in segs:
            sid = seg.segment_id
            m = marks.get(sid)
            if m is None:
                if sid < self._newest:
                    raise ReplicaDiverged(f"segment {sid} is new but older than segment {self._newest}, shipped")
                header = seg.header()
                out.append(Created(sid, seg.size, seg.nonce, header))
                m = marks[sid] = _Mark(HEADER_SIZE, header, seg)
                self._newest = sid
            elif m.seg is not seg:
                header = seg.header()
                if header != m.header:
                    out.append(Header(sid, header))
                    m.header = header
                m.seg = seg
            n = seg.end - m.shipped
            if n > 0:
                if n > budget:
                    n = budget
                    complete = False
                if n > 0:
                    out.append(Bytes(sid, m.shipped, seg.read(m.shipped, n)))
                    m.shipped += n
                    budget -= n
                if not complete:
                    break
        if complete and len(marks) > len(segs):
            live = {seg.segment_id for seg in segs}
            for sid in [sid for sid in marks if sid not in live]:
                m = marks.pop(sid)
                out.append(Removed(sid, m.seg is not None and m.seg.quarantined))
        return Batch(out, self.position(), complete, log.next_segment_size)

    def snapshot(self, chunk_bytes: int = DEFAULT_CHUNK) -> Iterator[Batch]:
        """Everything a replica needs from scratch, in batches of at most
        `chunk_bytes` of records, read from the mapping as they are made (the log
        keeps running in between; the last batch is caught up and ends with
        SnapshotEnd). Afterwards changes() continues from it. Abandoning it part-way
        leaves the tap refusing changes() until another snapshot() or resume()."""
        self._marks = {}
        self._newest = 0
        self._broken = ""
        first = True
        finished = False
        try:
            while True:
                batch = self.changes(chunk_bytes)
                if first:
                    batch.changes.insert(0, SnapshotBegin(len(self.log.segments)))
                    first = False
                if batch.complete:
                    batch.changes.append(SnapshotEnd(len(self._marks)))
                    finished = True
                    yield batch
                    return
                yield batch
        finally:
            if not finished:
                self._broken = "a snapshot was abandoned part-way: start another, or resume()"

    def resume(self, holdings: dict) -> None:
        """Go on from what a replica holds ({segment id: Held}, ReplicaLog.holdings()):
        the next changes() send what it lacks and remove what was deleted here.
        ReplicaDiverged if its copy is not a prefix of this log (other segments or
        nonces, more bytes than here, a hole, a digest that differs, or its newest
        segment deleted here: what it lacks in between is gone): snapshot then."""
        segs = {seg.segment_id: seg for seg in self.log.segments}
        marks = {}
        if holdings:
            newest = max(holdings)
            if newest not in segs:
                raise ReplicaDiverged(f"the replica's newest segment {newest} is not in this log "
                                      f"(segments {min(segs, default=0)}-{max(segs, default=0)}): snapshot")
            front = min(segs)
            for sid in sorted(holdings):
                held = holdings[sid]
                seg = segs.get(sid)
                if seg is None:
                    if sid > front:
                        raise ReplicaDiverged(f"the replica holds segment {sid}, which this log never had")
                    marks[sid] = _Mark(held.end, held.header, None)      # deleted here: removed next
                    continue
                fields = _header_fields(held.header)
                if fields is None or fields[0] != sid or fields[1] != seg.nonce or fields[2] != seg.size:
                    raise ReplicaDiverged(f"the replica's segment {sid} is another file than this log's")
                if held.end > seg.end:
                    raise ReplicaDiverged(f"the replica holds {held.end} bytes of segment {sid}, this log "
                                          f"{seg.end}: it has data this log lost")
                if sid != newest and held.end != seg.end:
                    raise ReplicaDiverged(f"the replica holds {held.end} of {seg.end} bytes of segment {sid}, "
                                          f"which is not its newest")
                if held.digest is not None and held.digest != _digest_segment(seg, held.end, HEADER_SIZE):
                    raise ReplicaDiverged(f"the replica's bytes of segment {sid} differ from this log's")
                marks[sid] = _Mark(held.end, held.header, None)
            missing = [sid for sid in segs if sid < newest and sid not in holdings]
            if missing:
                raise ReplicaDiverged(f"the replica lacks segments {missing} below its newest {newest}")
        self._marks = marks
        self._newest = max(marks, default=0)
        self._broken = ""


# -- the replica's side ----------------------------------------------------------------

class _File:
    __slots__ = ("segment_id", "fd", "size", "end", "nonce", "path", "dirty")

    def __init__(self, segment_id: int, fd: int, size: int, end: int, nonce: int, path: Path):
        self.segment_id = segment_id
        self.fd = fd
        self.size = size
        self.end = end
        self.nonce = nonce
        self.path = path
        self.dirty = False


class _Spare(threading.Thread):
    """A segment file reserved and zeroed ahead (reserve_file), off the applying thread."""

    def __init__(self, path: Path, size: int):
        super().__init__(name=f"replica-spare-{path.parent.name}", daemon=True)
        self.path = path
        self.size = size
        self.fd = -1
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.fd = reserve_file(self.path, self.size)
        except BaseException as exc:      # the file is made on the applying thread instead
            self.error = exc

    def take(self) -> int:
        """Its fd once made (waiting for it), or -1 if making it failed."""
        self.join()
        return self.fd

    def discard(self) -> None:
        self.join()
        if self.fd >= 0:
            os.close(self.fd)
            self.path.unlink(missing_ok=True)
            self.fd = -1


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


class ReplicaLog:
    """A replica's copy of one shard log directory. One process at a time (the
    directory's DirLock, as AppendLog). After close(), `AppendLog(directory).open()`
    recovers exactly what the owner had at `position()`.

    Applying stays in order; only making a segment file's zeros may run ahead on a
    thread (`prepare_ahead`: the owner's next segment size comes with each batch).
    An OSError while applying leaves the batch partly applied: the caller treats
    the replica as failed (reopen it: it goes back to what it recorded)."""

    def __init__(self, directory, *, prepare_ahead: bool = True):
        self.directory = Path(directory)
        self.prepare_ahead = prepare_ahead
        self._lock: DirLock | None = None
        self._files: dict = {}            # segment id -> _File, what it holds
        self._staged: dict | None = None  # inside a snapshot: segment id -> _File in snapshot.incoming/
        self._epoch = 0
        self._spare: _Spare | None = None
        self._spares_made = 0
        self.dropped_on_open = 0          # segment files open() removed: made or kept past the record

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def _staging(self) -> Path:
        return self.directory / STAGING_NAME

    # -- opening ----------------------------------------------------------------------
    def open(self) -> tuple:
        """Lock the directory (DataDirInUse if another process has it) and take up
        what it records: a snapshot whose install was cut short is finished, one
        never completed is removed (the old copy stays), segment files not in the
        record are removed and bytes past the newest one's recorded end zeroed.
        Returns position()."""
        lock = DirLock(self.directory).acquire()
        try:
            self._recover()
        except BaseException:
            self._close_files()
            lock.release()
            raise
        self._lock = lock
        return self.position()

    def _recover(self) -> None:
        d = self.directory
        for stray in [*d.glob(".*.seg.tmp"), d / f".{STATE_NAME}.tmp"]:
            stray.unlink(missing_ok=True)     # a segment file being made, a record being written
        state = self._read_state()
        if state is None:
            if any(d.glob("*.seg")):
                raise ReplicaError(f"{d} holds segment files but no {STATE_NAME} record: not a replica "
                                   f"directory (an owner's log?); refusing to change it")
            state = {"epoch": 0, "segments": [], "installing": None}
        self._epoch = state["epoch"]
        recorded = {sid: end for sid, end in state["segments"]}
        if state.get("installing"):
            self._finish_install(state["installing"])
        shutil.rmtree(self._staging, ignore_errors=True)   # a snapshot never completed
        for sid, end in sorted(recorded.items()):
            path = d / segment_name(sid)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue                      # removed by someone else (a recovery that opened it)
            size = os.fstat(fd).st_size
            fields = _header_fields(os.pread(fd, HEADER_SIZE, 0))
            if fields is None or fields[0] != sid or fields[2] != size or end > size:
                os.close(fd)
                raise ReplicaError(f"{path}: not the segment {STATE_NAME} records (header or size differ)")
            self._files[sid] = _File(sid, fd, size, end, fields[1], path)
        self.dropped_on_open = self._drop_unrecorded()
        if self._files:
            self._zero_past_end(self._files[max(self._files)])
        self._write_state(durable=True)

    def _read_state(self) -> dict | None:
        try:
            raw = (self.directory / STATE_NAME).read_bytes()
        except FileNotFoundError:
            return None
        try:
            state = json.loads(raw)
            if state["version"] != STATE_VERSION:
                raise ValueError(f"version {state['version']}")
            return state
        except (ValueError, KeyError, TypeError) as exc:
            raise ReplicaError(f"{self.directory / STATE_NAME} is unreadable ({exc}): snapshot into a new "
                               f"directory") from None

    def _drop_unrecorded(self) -> int:
        """Remove segment files the record does not hold: made after it was written
        (a removal always writes it first, so none holds what a removed segment
        needs), or removed from it and not yet deleted."""
        n = 0
        for path in self.directory.glob("*.seg"):
            try:
                sid = int(path.stem)
            except ValueError:
                continue
            if sid not in self._files:
                path.unlink()
                n += 1
        if n:
            fsync_dir(self.directory)
        return n

    def _zero_past_end(self, f: _File) -> None:
        """Bytes applied past the recorded end (not yet recorded when the process
        died) are zeroed: past its end the file is zeros, as at the owner."""
        zeros = bytes(_READ)
        wrote = False
        for off in range(f.end, f.size, _READ):
            n = min(_READ, f.size - off)
            if os.pread(f.fd, n, off).count(0) != n:
                _pwrite_all(f.fd, zeros[:n], off)
                wrote = True
        if wrote:
            os.fdatasync(f.fd)

    # -- what it holds ----------------------------------------------------------------
    def position(self) -> tuple:
        """(segment id, end) of the newest data held; (0, 0) when empty."""
        if not self._files:
            return (0, 0)
        newest = max(self._files)
        return (newest, self._files[newest].end)

    def holdings(self, digests: str = "newest") -> dict:
        """{segment id: Held(end, header, digest)} for LogTap.resume(). `digests`:
        "newest" (the segment a deposed owner may have written differently), "all"
        (every segment: reads the whole copy on both sides) or "none"."""
        if digests not in ("newest", "all", "none"):
            raise ValueError("digests must be newest, all or none")
        newest = max(self._files, default=0)
        return {sid: Held(f.end, os.pread(f.fd, HEADER_SIZE, 0),
                          digest_fd(f.fd, f.end, HEADER_SIZE)
                          if digests == "all" or (digests == "newest" and sid == newest) else None)
                for sid, f in sorted(self._files.items())}

    def dup_ranges(self, wanted: dict) -> dict:
        """{segment id: (dup'd fd, end)} for each of `wanted` ({segment id: end}) this
        copy holds at least `end` bytes of, for digest_files() on a thread."""
        self._require_open()
        out = {}
        for sid, end in wanted.items():
            f = self._files.get(sid)
            if f is not None and f.end >= end:
                out[sid] = (os.dup(f.fd), end)
        return out

    def checksums(self) -> dict:
        """{segment id: xxh3_128 of bytes [0, end)}, to compare with log_checksums()."""
        return {sid: digest_fd(f.fd, f.end) for sid, f in sorted(self._files.items())}

    # -- applying ---------------------------------------------------------------------
    def fence(self, epoch: int) -> None:
        """Refuse changes of epochs below `epoch` from now on (recorded durably)."""
        self._require_open()
        if epoch < self._epoch:
            raise EpochFenced(f"epoch {epoch} is older than this replica's {self._epoch}")
        if epoch > self._epoch:
            self._epoch = epoch
            self._sync(durable=True)          # the record describes only data already on disk

    def apply(self, batch: Batch, epoch: int) -> tuple:
        """Apply a batch of changes made at `epoch`, in order; returns position().
        ChangeRefused (EpochFenced for an older epoch) if it does not follow what
        this replica holds: then nothing of it was applied."""
        self._require_open()
        if epoch < self._epoch:
            raise EpochFenced(f"changes of epoch {epoch} refused: this replica has seen epoch {self._epoch} "
                              f"(a newer owner)")
        self._check(batch)
        if epoch > self._epoch:
            self.fence(epoch)                 # recorded before anything of the new owner lands
        removed = []
        for change in batch.changes:
            kind = type(change)
            if kind is Bytes:
                f = (self._files if self._staged is None else self._staged)[change.segment_id]
                _pwrite_all(f.fd, change.data, change.offset)
                f.end += len(change.data)
                f.dirty = True
            elif kind is Created:
                self._create(change)
            elif kind is Header:
                f = (self._files if self._staged is None else self._staged)[change.segment_id]
                _pwrite_all(f.fd, change.header, 0)
                f.dirty = True
            elif kind is Removed:
                if self._staged is None:
                    removed.append((self._files.pop(change.segment_id), change.quarantine))
                else:
                    f = self._staged.pop(change.segment_id)
                    os.close(f.fd)
                    f.path.unlink()
            elif kind is SnapshotBegin:
                self._begin_snapshot()
            elif kind is SnapshotEnd:
                self._install_snapshot()
        if removed:
            self._remove(removed)
        if batch.next_size and self.prepare_ahead:
            self._prepare(batch.next_size)
        return self.position()

    def _check(self, batch: Batch) -> None:
        """Raise ChangeRefused unless every change of `batch` follows, in order,
        from what this replica holds (simulated: nothing is written)."""
        main = {sid: [f.end, f.size, f.nonce] for sid, f in self._files.items()}
        staged = None if self._staged is None else {sid: [f.end, f.size, f.nonce] for sid, f in self._staged.items()}
        for i, change in enumerate(batch.changes):
            target = main if staged is None else staged
            kind = type(change)
            where = f"change {i} of the batch ({kind.__name__}"
            if kind in (Bytes, Created, Header, Removed):
                sid = change.segment_id
                where += f" of segment {sid})"
                newest = max(target, default=0)
                if kind is Created:
                    fields = _header_fields(change.header)
                    if sid in target or sid <= newest:
                        raise ChangeRefused(f"{where}: segments up to {newest} exist here already")
                    if fields != (sid, change.nonce, change.size) or change.size <= HEADER_SIZE:
                        raise ChangeRefused(f"{where}: its header does not describe it")
                    target[sid] = [HEADER_SIZE, change.size, change.nonce]
                    continue
                if sid not in target:
                    raise ChangeRefused(f"{where}: this replica does not hold that segment (it holds "
                                        f"{sorted(target) or 'none'})")
                end, size, nonce = target[sid]
                if kind is Bytes:
                    n = len(change.data)
                    if sid != newest:
                        raise ChangeRefused(f"{where}: bytes for a segment behind the newest, {newest}")
                    if change.offset != end:
                        raise ChangeRefused(f"{where}: bytes at offset {change.offset}, but this replica holds "
                                            f"{end} bytes of it ({'a gap' if change.offset > end else 'an overlap'})")
                    if n == 0 or end + n > size:
                        raise ChangeRefused(f"{where}: {n} bytes at {end} do not fit its {size}")
                    target[sid][0] = end + n
                elif kind is Header:
                    if _header_fields(change.header) != (sid, nonce, size):
                        raise ChangeRefused(f"{where}: the header is of another segment")
                else:
                    if sid == newest:
                        raise ChangeRefused(f"{where}: the newest segment is never removed")
                    del target[sid]
            elif kind is SnapshotBegin:
                staged = {}
            elif kind is SnapshotEnd:
                if staged is None:
                    raise ChangeRefused(f"{where}): no snapshot was begun")
                if len(staged) != change.segments:
                    raise ChangeRefused(f"{where}): {len(staged)} segments staged, the owner sent {change.segments}")
                main, staged = staged, None
            else:
                raise ChangeRefused(f"{where}): not a change")
        target = main if staged is None else staged
        newest = max(target, default=0)
        position = (newest, target[newest][0]) if target else (0, 0)
        if tuple(batch.position) != position:
            raise ChangeRefused(f"the batch says it leaves this replica at {tuple(batch.position)}, "
                                f"its changes leave it at {position}")

    def _create(self, change: Created) -> None:
        into = self.directory if self._staged is None else self._staging
        final = into / segment_name(change.segment_id)
        fd = -1
        spare, self._spare = self._spare, None
        if spare is not None:
            if spare.size == change.size:
                fd, tmp = spare.take(), spare.path
            else:
                spare.discard()
        if fd < 0:
            tmp = self.directory / f".{segment_name(change.segment_id)}.tmp"
            fd = reserve_file(tmp, change.size)
        install_file(fd, tmp, final, change.header)
        f = _File(change.segment_id, fd, change.size, HEADER_SIZE, change.nonce, final)
        (self._files if self._staged is None else self._staged)[change.segment_id] = f

    def _prepare(self, size: int) -> None:
        if self._spare is not None:
            if self._spare.size == size:
                return
            self._spare.discard()
        self._spares_made += 1
        self._spare = _Spare(self.directory / f".spare-{self._spares_made}.seg.tmp", size)
        self._spare.start()

    def _remove(self, removed: list) -> None:
        """Record first (durably, after the data it describes), then delete: a
        restart never finds a segment gone whose superseding records it lacks."""
        self._sync(durable=True)
        qdir = self.directory / QUARANTINE_NAME
        for f, quarantine in removed:
            os.close(f.fd)
            if quarantine:
                qdir.mkdir(exist_ok=True)
                os.rename(f.path, qdir / f.path.name)
                fsync_dir(qdir)
            else:
                f.path.unlink()
        fsync_dir(self.directory)

    # -- snapshots --------------------------------------------------------------------
    def _begin_snapshot(self) -> None:
        self._drop_staged()
        self._staging.mkdir()
        fsync_dir(self.directory)
        self._staged = {}

    def _drop_staged(self) -> None:
        for f in (self._staged or {}).values():
            os.close(f.fd)
        self._staged = None
        shutil.rmtree(self._staging, ignore_errors=True)

    def _install_snapshot(self) -> None:
        """The staged copy replaces the held one: made durable, recorded as being
        installed (a restart finishes it), moved into place in id order, then the
        old segments it does not hold are deleted."""
        staged, old = self._staged, self._files
        flush_files([f.fd for f in staged.values()])
        fsync_dir(self._staging)
        self._files, self._staged = staged, None
        self._write_state(durable=True, installing=sorted(staged))
        self._finish_install(sorted(staged))
        for f in staged.values():
            f.path = self.directory / f.path.name
        for f in old.values():
            os.close(f.fd)
        self._drop_unrecorded()
        self._write_state(durable=True)

    def _finish_install(self, segment_ids: list) -> None:
        for sid in sorted(segment_ids):
            src = self._staging / segment_name(sid)
            if src.exists():
                os.rename(src, self.directory / segment_name(sid))
        fsync_dir(self.directory)
        shutil.rmtree(self._staging, ignore_errors=True)

    # -- durability -------------------------------------------------------------------
    def sync(self) -> None:
        """fdatasync what was written since the last sync (one device cache flush
        for all the files), then record the position: what the replica holds
        durably (its ACK in `always` mode)."""
        self._require_open()
        self._sync(durable=False)

    def _sync(self, durable: bool) -> None:
        files = [f for f in (*self._files.values(), *(self._staged or {}).values()) if f.dirty]
        self._write_state(durable, flush=[f.fd for f in files])
        for f in files:
            f.dirty = False

    def _write_state(self, durable: bool, installing: list | None = None, flush: list = ()) -> None:
        """This copy's REPLICA record (`_write_record`)."""
        state = {"version": STATE_VERSION, "epoch": self._epoch, "position": list(self.position()),
                 "segments": [[sid, f.end] for sid, f in sorted(self._files.items())], "installing": installing}
        _write_record(self.directory, state, flush, durable)

    def _require_open(self) -> None:
        if self._lock is None:
            raise ReplicaError(f"the replica in {self.directory} is not open")

    def _close_files(self) -> None:
        for f in (*self._files.values(), *(self._staged or {}).values()):
            os.close(f.fd)
        self._files = {}
        self._staged = None

    def close(self) -> None:
        """Sync, record, close every file and let go of the lock. A snapshot not
        completed is left staged (the next open() removes it)."""
        if self._lock is None:
            return
        if self._spare is not None:
            self._spare.discard()
            self._spare = None
        try:
            self._sync(durable=True)
        finally:
            self._close_files()
            self._lock.release()
            self._lock = None


# -- on the wire -----------------------------------------------------------------------
# A batch as bytes (for a network or a pipe): its head, then each change as a kind
# byte and its fields, big-endian.
#   batch    "SBRP", u8 version, u8 flags (1: complete), u16 0, u64 position segment,
#            u64 position end, u64 next size, u32 changes
#   Created  1, u64 segment, u64 size, u64 nonce, 64 header bytes
#   Header   2, u64 segment, 64 header bytes
#   Bytes    3, u64 segment, u64 offset, u32 length, the bytes
#   Removed  4, u64 segment, u8 quarantine
#   SnapshotBegin 5 / SnapshotEnd 6, u32 segments

WIRE_MAGIC = b"SBRP"
WIRE_VERSION = 1
_BATCH = struct.Struct("!4sBBHQQQI")
_CREATED = struct.Struct("!BQQQ")
_HEADER = struct.Struct("!BQ")
_BYTES = struct.Struct("!BQQI")
_REMOVED = struct.Struct("!BQB")
_SNAPSHOT = struct.Struct("!BI")
_KINDS = {Created: 1, Header: 2, Bytes: 3, Removed: 4, SnapshotBegin: 5, SnapshotEnd: 6}


def encode(batch: Batch) -> bytes:
    parts = [_BATCH.pack(WIRE_MAGIC, WIRE_VERSION, int(batch.complete), 0, batch.position[0], batch.position[1],
                         batch.next_size, len(batch.changes))]
    for c in batch.changes:
        kind = type(c)
        if kind is Bytes:
            parts += (_BYTES.pack(3, c.segment_id, c.offset, len(c.data)), c.data)
        elif kind is Created:
            parts += (_CREATED.pack(1, c.segment_id, c.size, c.nonce), c.header)
        elif kind is Header:
            parts += (_HEADER.pack(2, c.segment_id), c.header)
        elif kind is Removed:
            parts.append(_REMOVED.pack(4, c.segment_id, int(c.quarantine)))
        else:
            parts.append(_SNAPSHOT.pack(_KINDS[kind], c.segments))
    return b"".join(parts)


def decode(data: bytes) -> Batch:
    """A batch from encode()'s bytes (Bytes.data are views of `data`); ChangeRefused if malformed."""
    view = memoryview(bytes(data) if not isinstance(data, bytes) else data)
    try:
        magic, version, flags, _, psid, pend, next_size, count = _BATCH.unpack_from(view, 0)
        if magic != WIRE_MAGIC or version != WIRE_VERSION:
            raise ValueError("not a replication batch of this version")
        pos = _BATCH.size
        changes = []
        for _ in range(count):
            kind = view[pos]
            if kind == 3:
                _, sid, off, n = _BYTES.unpack_from(view, pos)
                pos += _BYTES.size
                if pos + n > len(view):
                    raise ValueError("truncated bytes")
                changes.append(Bytes(sid, off, view[pos:pos + n]))
                pos += n
            elif kind == 1:
                _, sid, size, nonce = _CREATED.unpack_from(view, pos)
                pos += _CREATED.size
                changes.append(Created(sid, size, nonce, bytes(view[pos:pos + HEADER_SIZE])))
                pos += HEADER_SIZE
            elif kind == 2:
                _, sid = _HEADER.unpack_from(view, pos)
                pos += _HEADER.size
                changes.append(Header(sid, bytes(view[pos:pos + HEADER_SIZE])))
                pos += HEADER_SIZE
            elif kind == 4:
                _, sid, quarantine = _REMOVED.unpack_from(view, pos)
                pos += _REMOVED.size
                changes.append(Removed(sid, bool(quarantine)))
            elif kind in (5, 6):
                _, segments = _SNAPSHOT.unpack_from(view, pos)
                pos += _SNAPSHOT.size
                changes.append((SnapshotBegin if kind == 5 else SnapshotEnd)(segments))
            else:
                raise ValueError(f"unknown change kind {kind}")
        if pos != len(view):
            raise ValueError(f"{len(view) - pos} bytes after the last change")
    except (struct.error, ValueError, IndexError) as exc:
        raise ChangeRefused(f"malformed batch: {exc}") from None
    return Batch(changes, (psid, pend), bool(flags & 1), next_size)
