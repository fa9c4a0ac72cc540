"""The durable offline store: one append log per shard, a directory of fixed-size
memory-mapped segment files (records and recovery scan in `_log.pyx`).

Why it is built this way:
- Segments are reserved (posix_fallocate) *and* zero-filled before they are
  mapped: writing into a sparse mapping on a full disk kills the process with
  SIGBUS, and the first write to an unwritten extent stalls for tens of ms.
  A spare segment is prepared on a background thread before it is needed.
- Records go into the mapping, which lives in the page cache: a killed process
  (kill -9) loses nothing that was appended, in every durability mode.
- Durability against a machine crash is the flush policy: `always` (group
  commit: ACKs of a loop turn's appends go out after one fdatasync; while it
  runs, the next turn's appends gather for the next one), `interval` (an
  fdatasync every N ms: a crash loses at most that window), `never` (the
  kernel's writeback, about 30 s).
- A failed fdatasync is fatal (Linux reports a writeback error only once, so
  a retry that "succeeds" proves nothing): the log refuses further work, ACKs
  waiting on it are never sent, and the owner is told to stop; recovery on
  restart keeps exactly the records whose CRCs check out.
- Segments leave the log only from the front: a CONSUME record is never
  deleted while the message it consumed is still on disk to come back.
  Old sparse segments are compacted (live messages copied to the head) so one
  long-offline recipient does not pin the disk.
"""
import bisect
import collections
import errno
import os
import secrets
import shutil
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import picologging
from ._log import PRODUCER_META, RECORD_HEADER, LogCore, Segment, crc32c, crc32c_hardware, flush_files, merge_copies, zero_pages
from .dirlock import DirLock
from .errors import LogNotOpen, StoreError
from .logfmt import q
from .protocol import ErrorCode

_log = picologging.getLogger("switchboard.log")

MAGIC = b"SBSEG001"
HEADER = struct.Struct("!8sQQQQIQ8s")       # 60 bytes, then the header's CRC32C
# fields: magic, segment id, nonce, size, created ms, format version, id floor
# (the highest message id when the segment became active), reserved
HEADER_SIZE = 64
FORMAT_VERSION = 2                           # 2: per-device inboxes, conversation field, META
#: a recycled segment file (docs/storage.md, Recycling): version 2's records, each tagged with
#: `record_tag(nonce)` in its reserved u16, and past them the file's previous use's bytes
RECYCLED_VERSION = 3
#: a consumed segment a shard keeps for its next roll is deleted after this long unused (an idle
#: shard gives its disk space back)
RECYCLE_KEEP_S = 30.0
ZERO_CHUNK = 1 << 20
#: a shard's first segment (segments then double up to the configured size)
MIN_SEGMENT = 1 << 20
#: the smallest configurable segment: it must hold the largest record
MIN_SEGMENT_SIZE = 256 << 10
MAX_SPARES = 8
#: while a shard's disk is full, a new segment is tried at most this often (and after a deletion)
FULL_RETRY_S = 1.0
#: at most one storage_full / storage_available pair is logged per shard in this many seconds
STORAGE_LOG_QUIET_S = 60.0
DURABILITY_MODES = ("always", "interval", "never")
LOCK_POLL_S = 0.05                           # how often a shard held by another process is tried again


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def record_tag(nonce: int) -> int:
    """The tag the records of a recycled segment with `nonce` carry (never 0, which is a fresh one's)."""
    return (nonce >> 48) or 1


def recycled_nonce(old_tag: int) -> int:
    """A nonce for a file's next use whose tag differs from its previous use's: every old
    record then fails on its tag, before its CRC is even computed."""
    while True:
        nonce = secrets.randbits(64)
        if record_tag(nonce) != old_tag:
            return nonce


@dataclass
class _Recyclable:
    """A consumed segment's file kept for a shard's next roll: open, unmapped, under a
    temporary name (a restart deletes it like any unfinished segment)."""
    fd: int
    path: Path
    size: int
    tag: int
    kept_at: float


@dataclass
class LogConfig:
    segment_size: int = 64 << 20
    durability: str = "interval"
    interval_ms: int = 1000
    ttl_s: float = 30 * 86400
    max_pending: int = 10_000
    #: compact the front segment when fewer than this fraction of its messages are live
    compact_below: float = 0.5
    #: a device's SENDs whose answers each shard remembers (the send window, PROTOCOL.md section 6)
    dedup_window: int = 256
    #: segments each shard keeps made ahead for rolls (more, up to 2x+1, after a stall);
    #: besides them it always holds a reserve that only acknowledgements, first device
    #: registrations and compaction may roll into (0: only the reserve, every roll
    #: makes its segment on the loop)
    spares: int = 1
    #: the largest record a SEND can make (about max_frame): a shard's first segment
    #: is made big enough for four of them, so no record outgrows a young shard's segment
    max_record: int = 0
    #: a consumed front segment's file becomes the shard's next spare instead of a new
    #: zero-filled one (docs/storage.md, Recycling); off: deleted, as before version 3
    recycle: bool = True

    def first_segment(self) -> int:
        """A shard's first segment: 1 MiB (or the segment size if smaller), larger for
        large frames (a power of two holding four of the largest record)."""
        first = MIN_SEGMENT
        while first < 4 * self.max_record:
            first *= 2
        return min(first, self.segment_size)

    def validate(self) -> None:
        if self.durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {', '.join(DURABILITY_MODES)}, not {self.durability!r}")
        if not (MIN_SEGMENT_SIZE <= self.segment_size <= 1 << 31) or self.segment_size % 4096:
            raise ValueError("segment size must be a multiple of 4096 between 256 KiB and 2 GiB")
        if not (0 <= self.spares <= MAX_SPARES):
            raise ValueError(f"spare segments must be between 0 (only the reserve) and {MAX_SPARES}, "
                             f"got {self.spares}")
        if self.interval_ms <= 0 or self.ttl_s <= 0 or self.max_pending <= 0:
            raise ValueError("interval, ttl and max pending must be positive")


@dataclass
class RecoveryReport:
    segments: int = 0
    bytes_scanned: int = 0
    seconds: float = 0.0
    pending: int = 0
    torn_tails: list = field(default_factory=list)       # (segment_id, start, stop) zeroed
    corrupt: list = field(default_factory=list)          # (segment_id, regions) quarantined
    bad_headers: list = field(default_factory=list)      # file names moved to quarantine/

    @property
    def seconds_per_gib(self) -> float:
        return self.seconds / (self.bytes_scanned / (1 << 30)) if self.bytes_scanned else 0.0


def segment_name(segment_id: int) -> str:
    return f"{segment_id:020d}.seg"


def shard_dir_name(shard: int) -> str:
    """A shard's log directory under the log root (and the name a moved shard is installed as)."""
    return f"shard-{shard:04d}"


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def reserve_file(path: Path, size: int, pause=lambda: None, fault: str = "") -> int:
    """Create `path` (it must not exist) as `size` bytes of real, zeroed blocks and
    return its fd: posix_fallocate reserves them (a full disk fails here, with
    ENOSPC, not later with SIGBUS inside a mapping), then zeros are written a chunk
    at a time with an fdatasync each, so an ACK's fdatasync never queues behind
    64 MiB of zeros (and they are never written back later by an fdatasync meant
    for records). A page per write (`zero_pages`), for small page-cache folios:
    a sync writes back whole folios. On failure nothing is left behind."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if fault == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        os.posix_fallocate(fd, 0, size)
        for off in range(0, size, ZERO_CHUNK):
            zero_pages(fd, off, min(off + ZERO_CHUNK, size))     # page by page: small folios (see there)
            pause()
    except BaseException:
        _discard(fd, path)
        raise
    return fd


def install_file(fd: int, tmp: Path, final: Path, header: bytes) -> None:
    """Give a reserved segment file (`reserve_file`) its header and its name: write
    the header, fsync, rename `tmp` to `final`, fsync the directory. On failure the
    fd is closed and `tmp` removed."""
    try:
        os.pwrite(fd, header, 0)
        os.fsync(fd)
        os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        _discard(fd, tmp)
        raise


def _discard(fd: int, path: Path) -> None:
    os.close(fd)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Worker(threading.Thread):
    """One thread for everything that blocks: fdatasync first, then file work
    (reserving, zeroing, deleting segments), so a sync never waits long behind
    a segment being prepared. Results come back on the event loop."""

    def __init__(self, name: str):
        super().__init__(name=name, daemon=True)
        self._urgent = collections.deque()
        self._background = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self.loop = None

    def submit(self, fn, done=None, urgent=False) -> None:
        with self._cv:
            (self._urgent if urgent else self._background).append((fn, done))
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self.is_alive():
            self.join()

    def run(self) -> None:
        while True:
            with self._cv:
                while not self._urgent and not self._background and not self._stopping:
                    self._cv.wait()
                if self._urgent:
                    fn, done = self._urgent.popleft()
                elif self._background:
                    fn, done = self._background.popleft()
                else:
                    return
            try:
                result, exc = fn(self._yield_to_urgent), None
            except BaseException as e:      # handed to the loop, never lost
                result, exc = None, e
            if done is not None and self.loop is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(done, result, exc)

    def _yield_to_urgent(self) -> None:
        """Long background jobs call this between steps: run pending syncs now."""
        while True:
            with self._cv:
                if not self._urgent:
                    return
                fn, done = self._urgent.popleft()
            try:
                result, exc = fn(self._yield_to_urgent), None
            except BaseException as e:
                result, exc = None, e
            if done is not None and self.loop is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(done, result, exc)


#: upper bounds (seconds) of the fdatasync latency histogram's buckets (Prometheus `le`)
SYNC_BOUNDS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class GroupCommit:
    """The durability policy over a set of segments (one log, or all the shard
    logs of a worker): `commit(then, arg)` runs `then(arg)` once the appends made
    so far are as durable as the mode promises. In `always` mode fdatasync runs
    on the worker thread; commits that arrive meanwhile wait for the next one, so
    the batch grows with the load."""

    def __init__(self, worker: "_Worker", durability: str, interval_ms: int, dirty_segments, name: str,
                 fault: str = ""):
        self.worker = worker
        self.durability = durability
        self.interval_ms = interval_ms
        self.dirty_segments = dirty_segments
        self.name = name
        self.fault = fault
        self.loop = None
        self.failed: BaseException | None = None
        self.on_fatal = None
        self.syncs = 0
        self.sync_seconds = 0.0
        #: fdatasync rounds per SYNC_BOUNDS bucket (not cumulative; the last is +Inf)
        self.sync_buckets = [0] * (len(SYNC_BOUNDS) + 1)
        self._waiting: list = []
        self._inflight = False
        self._timer = None
        self._stopped = False

    def start(self, loop) -> None:
        self.loop = loop
        if self.durability == "interval":
            self._timer = loop.call_later(self.interval_ms / 1000, self._interval_sync)

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def commit(self, then, arg) -> None:
        if self.failed is not None:
            return                        # never ACK what may not be on disk
        if self.durability != "always" or self.loop is None:
            then(arg)
            return
        if not self._inflight and not self.dirty_segments(peek=True):
            then(arg)
            return
        self._waiting.append((then, arg))
        if not self._inflight:
            self._start_sync()

    def _start_sync(self) -> None:
        segs = self.dirty_segments()
        batch, self._waiting = self._waiting, []
        self._inflight = True
        fault = self.fault

        def sync(pause):
            # One fdatasync per dirty segment cost a device cache flush each: a
            # worker owning 64 shards touches 64 segments per round, which made
            # `always` ~10x slower than with one shard. Segments are reserved and
            # zero-filled before use (no metadata changes when records land), so
            # it is enough to write every segment's pages out and then flush the
            # device once, with the last fdatasync.
            t = time.perf_counter()
            if fault == "eio" and segs:
                raise OSError(errno.EIO, f"Input/output error (injected) syncing {segs[0].path}")
            flush_files([s.fd for s in segs])
            return time.perf_counter() - t

        self.worker.submit(sync, lambda r, e: self._synced(batch, r, e), urgent=True)

    def _synced(self, batch, seconds, exc) -> None:
        self._inflight = False
        if exc is not None:
            self._fail(exc)
            return
        self.syncs += 1
        self.sync_seconds += seconds
        self.sync_buckets[bisect.bisect_left(SYNC_BOUNDS, seconds)] += 1
        for then, arg in batch:
            then(arg)
        if self._waiting:
            self._start_sync()

    def _interval_sync(self) -> None:
        self._timer = None
        if self._stopped or self.failed is not None:
            return
        if not self._inflight and self.dirty_segments(peek=True):
            self._start_sync()
        self._timer = self.loop.call_later(self.interval_ms / 1000, self._interval_sync)

    def _fail(self, exc: BaseException) -> None:
        self.failed = exc
        self._waiting.clear()
        _log.critical("event=log_sync_failed dir=%s error=%s action=stop_without_acking "
                      "why=\"a writeback error is reported once; retrying would hide lost data\"", self.name, q(repr(exc)))
        if self.on_fatal is not None:
            self.on_fatal(exc)


class _Committed:
    """What a store that commits through a GroupCommit (`self.committer`) offers."""

    def commit(self, then, arg) -> None:
        """Run `then(arg)` (write ACKs and DELIVERs) once the appends so far are as
        durable as the policy promises."""
        self.committer.commit(then, arg)

    @property
    def failed(self):
        return self.committer.failed

    @property
    def on_fatal(self):
        return self.committer.on_fatal

    @on_fatal.setter
    def on_fatal(self, fn):
        self.committer.on_fatal = fn

    @property
    def syncs(self):
        return self.committer.syncs


def _with_device(devs, device: str):
    """An index entry (None, one name, or a sorted tuple) with `device` added."""
    if devs is None:
        return device
    have = (devs,) if type(devs) is str else devs
    return devs if device in have else tuple(sorted((*have, device)))


class _DeviceRegistry:
    """Registered devices per user, kept as META records (key d NUL user NUL device,
    value: u64 last seen ms), with an in-memory index by user.

    The index holds the device name itself for a user with one device (the
    common case: no container at all) and a sorted tuple for several: it is
    per registered user, so every byte counts a million times."""

    def _device_index(self) -> dict:
        idx = getattr(self, "_devidx", None)
        if idx is None:
            idx = self._devidx = {}
            for key in self.meta_keys("d\x00"):
                _, user, device = key.split("\x00", 2)
                idx[user] = _with_device(idx.get(user), device)
        return idx

    def devices_of(self, user: str) -> tuple:
        devs = self._device_index().get(user)
        return (devs,) if type(devs) is str else (devs or ())

    def register_device(self, user: str, device: str, now: int) -> bool:
        """Record that `device` of `user` connected; True if it is new. A new device's
        record may use the log's reserve; if even that is full, StoreError
        (STORAGE_FULL) and nothing changed. A known device's last-seen update is
        skipped on a full disk (it is a hint)."""
        idx = self._device_index()
        devs = idx.get(user)
        new = devs != device if type(devs) is str else (devs is None or device not in devs)
        if not new:
            try:
                self.meta_put(f"d\x00{user}\x00{device}", struct.pack("!Q", now), user=user)
            except StoreError:
                pass                  # last seen stays at the previous value
            return False
        self.meta_put(f"d\x00{user}\x00{device}", struct.pack("!Q", now), True, user=user)
        idx[user] = _with_device(devs, device)
        return True

    def touch_device(self, user: str, device: str, now: int) -> None:
        if device in self.devices_of(user):
            self.meta_put(f"d\x00{user}\x00{device}", struct.pack("!Q", now), user=user)

    def last_seen(self, user: str) -> int:
        seen = [self.meta_get(f"d\x00{user}\x00{d}") for d in self.devices_of(user)]
        return max((struct.unpack("!Q", v)[0] for v in seen if v), default=0)

    def meta_get_for(self, user: str, key: str):
        return self.meta_get(key)

    def meta_put_for(self, user: str, key: str, value: bytes) -> None:
        self.meta_put(key, value)

    def meta_keys_local(self, prefix: str) -> list:
        return self.meta_keys(prefix)


class AppendLog(_Committed, _DeviceRegistry, LogCore):
    """The durable OfflineStore of one shard.

    One process at a time: open() takes the directory's lock (`_core/dirlock.py`)
    before it reads anything, and nothing is written before open() has
    recovered the directory: a writer that has not scanned the segments would
    number its first segment 1 and rename it over the stored one."""

    def __init__(self, directory, config: LogConfig | None = None, *, fault: str | None = None,
                 worker: "_Worker | None" = None, committer: GroupCommit | None = None, lazy: bool = False,
                 lock: DirLock | None = None):
        """`worker` and `committer` are shared when one process holds several
        logs (one per shard); `lazy` creates the first segment on first append;
        `lock` is the directory's lock when the caller already holds it (the
        caller then releases it), else open() takes one and close() releases it."""
        config = config or LogConfig()
        config.validate()
        super().__init__(config.max_pending, int(config.ttl_s * 1000))
        self.producers.window = config.dedup_window
        self.directory = Path(directory)
        self.config = config
        self.loop = None
        self.recovered_dedup: dict = {}
        self.report = RecoveryReport()
        self._fault = fault if fault is not None else os.environ.get("SWITCHBOARD_LOG_FAULT", "")
        self._own_worker = worker is None
        self._worker = worker or _Worker(f"log-{self.directory.name}")
        self._own_committer = committer is None
        self.committer = committer or GroupCommit(self._worker, config.durability, config.interval_ms,
                                                  self._dirty_segments, str(self.directory), self._fault)
        self.lazy = lazy
        self._spares = collections.deque()  # prepared segments, in id order
        self._unclaimed: set = set()         # made by the worker, not yet taken by the loop
        self._claim_lock = threading.Lock()
        self._preparing = 0
        self.spares_target = config.spares + 1   # with the reserve; grows after a stall (spares up to twice)
        self._next_id = 1
        self._maint = None
        self._compact_pos = None
        self._expiry_cursor: list = []
        self.stalls = 0                      # rolls that had to prepare a segment on the loop
        self.recycled = 0                    # spares made from a consumed segment's file, not zero-filled
        self._recyclable: list = []          # [_Recyclable], at most one (guarded by _claim_lock)
        self.cold_starts = 0                 # first segments of lazy logs, made on first append
        self.last_full_error = None
        self.full_episodes = 0               # times this shard ran out of disk space
        self.refused = 0                     # records refused for lack of space (SENDs get STORAGE_FULL)
        self.segment_failures = 0            # tries to make a segment that found no space
        self._retry_at = 0.0                 # monotonic time of the next try at a segment while full
        self._storage_logged_at = -STORAGE_LOG_QUIET_S
        self._storage_logged = False         # the current episode's storage_full line was written
        self._quiet_episodes = 0             # episodes not logged (inside the quiet period)
        self._full_cause = ""                # what the episode's first refusal was: message or state
        self._compactable_key = None         # (front segment, its live count, bytes freed) last judged
        self._keep_key = None                # (front segment, its live count, compactable) of keep_for_compaction
        self._compactable_now = False
        self._closed = False
        self._lock = lock
        self._own_lock = False
        self._recovered = False              # open() has scanned the directory: writes are allowed
        self.reserve_ok = True               # until start(): no reserve is kept without a loop
        #: the shard is moving to another node (ShardedLog.quiesce): its files must not change, so
        #: maintenance, spare preparation and deferred CONSUMEs stop, and rolls are refused
        self.quiesced = False
        self._held: list = []                # spares to delete that came back while quiesced

    # -- files ----------------------------------------------------------------------
    def _header(self, segment_id: int, nonce: int, id_floor: int = 0, size: int = 0, recycled: bool = False) -> bytes:
        body = HEADER.pack(MAGIC, segment_id, nonce, size or self.config.segment_size, now_ms(),
                           RECYCLED_VERSION if recycled else FORMAT_VERSION, id_floor, b"")
        return body + struct.pack("!I", crc32c(body))

    def _next_size(self) -> int:
        """A shard's first segments are 1 MiB (or the segment size if smaller); each
        new one is twice the active one, up to the configured size: an idle shard
        costs little disk, a busy one soon gets full-size segments."""
        first = self.config.first_segment()
        if self.active is None:
            return first
        return min(self.config.segment_size, max(first, 2 * self.active.size))

    def _create_segment(self, segment_id: int, pause=lambda: None, size: int | None = None) -> Segment:
        """Reserve, zero-fill (see reserve_file), header, fsync, rename, fsync dir, map."""
        size = size or self.config.segment_size
        final = self.directory / segment_name(segment_id)
        tmp = self.directory / f".{segment_name(segment_id)}.tmp"
        fd = reserve_file(tmp, size, pause, self._fault)
        nonce = secrets.randbits(64)
        install_file(fd, tmp, final, self._header(segment_id, nonce, size=size))
        return Segment.map(str(final), fd, segment_id, nonce, size)

    def _create_fitting(self, segment_id: int, size: int, pause=lambda: None) -> Segment:
        """A segment of `size`, or on a nearly full disk the largest smaller one
        (halving down to the first segment's size) that there is room for."""
        first = self.config.first_segment()
        while True:
            try:
                return self._create_segment(segment_id, pause, size)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or size <= first:
                    raise
                size = max(first, (size // 2) & ~4095)

    def _make_segment(self, segment_id: int, size: int, pause=lambda: None) -> Segment:
        """A new segment: a consumed one's file if one is kept (`_reuse`), else a zero-filled one."""
        return self._reuse(segment_id, size) or self._create_fitting(segment_id, size, pause)

    def _keep_for_reuse(self, seg: Segment) -> bool:
        """Keep a consumed segment's file (unmapped, renamed to a temporary name, the
        rename made durable as a deletion would be) for `_reuse`, unless recycling is
        off, the log is closing, or one is kept already."""
        if not self.config.recycle or seg.size < self.config.first_segment():
            return False
        with self._claim_lock:
            if self._closed or self._recyclable:
                return False
            seg.close()
            path = Path(seg.path)
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                os.rename(path, tmp)
            except OSError:
                os.close(seg.fd)
                raise
            self._recyclable.append(_Recyclable(seg.fd, tmp, seg.size, seg.tag, time.monotonic()))
        fsync_dir(self.directory)
        return True

    def _reuse(self, segment_id: int, size: int) -> Segment | None:
        """The kept file of a consumed segment (`_keep_for_reuse`) as segment
        `segment_id`, if it is no larger than `size`: a new header (a new nonce, a new
        record tag), fsync, rename, fsync the dir, its pages read ahead. No zeros are
        written and no blocks allocated (docs/storage.md, Recycling). None when there is
        none to use (or it failed: the caller makes a new one)."""
        with self._claim_lock:
            if not self._recyclable or self._recyclable[0].size > size:
                return None
            r = self._recyclable.pop()
        nonce = recycled_nonce(r.tag)
        final = self.directory / segment_name(segment_id)
        try:
            install_file(r.fd, r.path, final, self._header(segment_id, nonce, size=r.size, recycled=True))
        except OSError as exc:                    # install_file closed and removed it
            _log.warning("event=segment_recycle_failed error=%s action=new_segment", q(repr(exc)))
            return None
        try:                                      # its pages, if evicted, read now rather than on the loop
            os.posix_fadvise(r.fd, 0, r.size, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass                                  # a hint only
        self.recycled += 1
        return Segment.map(str(final), r.fd, segment_id, nonce, r.size, record_tag(nonce))

    def _drop_recyclable(self, older_than: float = 0.0) -> None:
        """Delete the kept file (on the worker, or at close): all of them, or those kept longer than `older_than` s."""
        now = time.monotonic()
        with self._claim_lock:
            gone = [r for r in self._recyclable if now - r.kept_at >= older_than]
            self._recyclable = [r for r in self._recyclable if r not in gone]
        for r in gone:
            _discard(r.fd, r.path)

    def _close_segment(self, seg: Segment) -> None:
        seg.close()
        try:
            os.close(seg.fd)
        except OSError:
            pass

    def _retire(self, seg: Segment, quarantine: bool) -> None:
        """Runs on the worker: unmap, close, delete (or move aside, or keep its file
        for the next roll: `_keep_for_reuse`), fsync the dir."""
        if not quarantine and self._keep_for_reuse(seg):
            return
        self._close_segment(seg)
        path = Path(seg.path)
        if quarantine:
            qdir = self.directory / "quarantine"
            qdir.mkdir(exist_ok=True)
            os.rename(path, qdir / path.name)
            fsync_dir(qdir)
        else:
            os.unlink(path)
        fsync_dir(self.directory)

    # -- recovery -------------------------------------------------------------------
    def open(self) -> RecoveryReport:
        """Lock the directory (DataDirInUse if another process has it), scan every
        segment and rebuild the index (before the loop serves anyone)."""
        if self._closed:
            raise LogNotOpen(f"the log in {self.directory} was closed; make a new AppendLog")
        if self._lock is None or not self._lock.held:
            self._lock = DirLock(self.directory).acquire()
            self._own_lock = True
        for stray in self.directory.glob(".*.seg.tmp"):
            stray.unlink()
        report = self.report
        start = time.perf_counter()
        now = now_ms()
        paths = sorted(self.directory.glob("*.seg"))
        good = []
        for path in paths:
            seg = self._open_existing(path, report)
            if seg is not None:
                good.append(seg)
        # After a crash the newest files may be prepared spares that never got a
        # record: the segment being written when the process died is the last
        # one holding data, and only there can a torn tail be repaired.
        scans = []
        for seg in good:
            self._add_segment(seg)
            status, end, regions = self._apply_segment(seg, now, self.recovered_dedup, self.config.dedup_window)
            report.bytes_scanned += end
            scans.append((seg, status, regions))
            self._next_id = seg.segment_id + 1
        data_last = max((i for i, (seg, status, _) in enumerate(scans)
                         if status != "clean" or seg.end > HEADER_SIZE), default=-1)
        for i, (seg, status, regions) in enumerate(scans):
            if status == "torn" and i == data_last:
                bad_start, bad_stop = regions[-1]
                if seg.tag:
                    # past a recycled file's records lie its previous use's, which can never
                    # pass as records of this use: only the torn record's own tag is cleared
                    bad_stop = min(bad_stop, bad_start + RECORD_HEADER)
                seg.zero(bad_start, bad_stop)
                seg.set_end(bad_start)
                os.fdatasync(seg.fd)
                report.torn_tails.append((seg.segment_id, bad_start, bad_stop))
                _log.warning("event=torn_tail segment=%d zeroed=%d-%d", seg.segment_id, bad_start, bad_stop)
            elif status != "clean":
                seg.quarantined = True
                report.corrupt.append((seg.segment_id, regions))
                _log.error("event=corrupt_segment segment=%d bad_regions=%s action=quarantine_after_compaction "
                           "records_outside_the_bad_regions=served", seg.segment_id, q(regions))
            seg.sealed = i != data_last or seg.quarantined
        for seg in good:
            # nothing read back from the page cache is acknowledged again (as a
            # deduplicated retry) until a sync has covered it: after a failed
            # fsync and a restart, the page cache is not proof of anything
            seg.dirty = True
        for seg, _, _ in scans[data_last + 1:]:      # empty, prepared: use them as spares
            self._remove_segment(seg.segment_id)
            seg.sealed = False
            self._spares.append(seg)
        report.segments = len(good)
        self._finish_recovery()
        report.pending = self.pending_count()
        report.seconds = time.perf_counter() - start
        if data_last >= 0 and not scans[data_last][0].sealed:
            self._set_active(scans[data_last][0])
        elif self._spares:
            self._install(self._spares.popleft())
        self._recovered = True
        self.reserve_ok = bool(self._spares) or self.loop is None
        _log.info("event=recovered dir=%s segments=%d bytes=%d pending=%d seconds=%.3f s_per_gib=%.2f crc32c_hw=%s",
                  self.directory, report.segments, report.bytes_scanned, report.pending, report.seconds,
                  report.seconds_per_gib, crc32c_hardware())
        return report

    def _require_recovered(self) -> None:
        if not self._recovered:
            raise LogNotOpen(f"the log in {self.directory} was written to before open() recovered it "
                             f"(new segments would be made over the stored ones): call open() first")

    def _open_existing(self, path: Path, report: RecoveryReport) -> Segment | None:
        try:
            segment_id = int(path.stem)
        except ValueError:
            return None
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        size = os.fstat(fd).st_size
        raw = os.pread(fd, HEADER_SIZE, 0)
        reason = None
        if len(raw) < HEADER_SIZE:
            reason = "short file"
        else:
            magic, sid, nonce, hsize, _created, version, id_floor, _ = HEADER.unpack_from(raw)
            if magic != MAGIC or struct.unpack_from("!I", raw, 60)[0] != crc32c(raw[:60]):
                reason = "bad header"
            elif sid != segment_id or hsize != size or version not in (FORMAT_VERSION, RECYCLED_VERSION):
                reason = f"header says id {sid} size {hsize} version {version}"
        if reason is not None:
            os.close(fd)
            qdir = self.directory / "quarantine"
            qdir.mkdir(exist_ok=True)
            os.rename(path, qdir / path.name)
            fsync_dir(self.directory)
            report.bad_headers.append(path.name)
            _log.error("event=bad_segment_file file=%s reason=%s action=quarantined", path.name, q(reason))
            return None
        self._raise_last_id(id_floor)     # ids never go backwards, even after deletions
        return Segment.map(str(path), fd, segment_id, nonce, size,
                           record_tag(nonce) if version == RECYCLED_VERSION else 0)

    # -- running --------------------------------------------------------------------
    def start(self, loop) -> None:
        """Start the worker thread (if this log owns it), the durability policy (if
        it owns that) and maintenance; call from the event loop, after open()."""
        self._require_recovered()
        self.loop = loop
        if self._own_worker:
            self._worker.loop = loop
            self._worker.start()
        if self.active is not None or not self.lazy:
            # before anyone is served (not a stall): the first segment and the reserve
            try:
                self._make_now(1 + (self.active is None) - len(self._spares), stall=False)
                if self.active is None:
                    self._install(self._spares.popleft())
            except StoreError:
                pass                          # the first refused SEND logs storage_full
        self.reserve_ok = bool(self._spares)
        if self.active is not None:
            self._prepare_spare()
        if self._own_committer:
            self.committer.start(loop)
        self._maint = loop.call_later(1.0, self.maintain)

    # -- space: spare segments, the reserve, a full disk ------------------------------
    # Segments are made ahead (on the worker thread) and kept as spares: as many as
    # the config says, plus one, the reserve. Content (messages, receipts, mirrors,
    # group state, last-seen updates) never takes the last spare without making a
    # replacement first, so on a full disk the shard still has a whole segment for
    # what frees space: acknowledgements (CONSUME), first device registrations and
    # compaction.
    # Consuming then lets front segments be deleted, and the next try makes a
    # new segment. After a failed try, the next one waits FULL_RETRY_S (or a
    # deletion): a full shard refuses SENDs without touching the disk.

    def _make_room(self, content: bool, roll: bool) -> None:
        """Called by LogCore._place: with `roll` the active segment (if any) has no
        room, install the next; for `content` keep a reserve spare besides.
        Raises StoreError (STORAGE_FULL: nothing was placed)."""
        self._require_recovered()
        if self.failed is not None:
            raise StoreError("storage failed; see the server log", ErrorCode.INTERNAL)
        if self.quiesced:
            raise StoreError("shard moving", ErrorCode.UNAVAILABLE)
        # a log used without a loop (tools, tests) makes no reserve, but keeps one it has
        keep = self.loop is not None or bool(self._spares)
        if roll and self.active is None:
            want = 1 + keep                   # a shard's first segment comes with its reserve
        else:
            want = int(roll) + (content and keep)      # the segment to write in, and the reserve to keep
        try:
            if len(self._spares) < want:
                self._make_now(want - len(self._spares))
        except StoreError:
            if content or not self._spares:
                self._refused(content)
                raise
        if roll:
            self._install(self._spares.popleft())
        self._spares_changed()

    def _make_now(self, n: int, stall: bool = True) -> None:
        """Make `n` spare segments on the event loop (a stall: the worker thread had
        not made them in time). Within FULL_RETRY_S of a failed try this does not
        try at all."""
        if n <= 0:
            return
        if self._retry_at and time.monotonic() < self._retry_at:
            raise StoreError("storage full: cannot reserve a new log segment", ErrorCode.STORAGE_FULL)
        if stall and not self._retry_at:       # (a retry on a full disk is no stall: nothing outran it)
            if self.active is None:
                self.cold_starts += 1
            else:
                self.stalls += 1
                # no spares but the reserve (small disks) stays so: each roll then makes its segment
                grown = min(self.spares_target + 1, 2 * self.config.spares + 1)
                if grown > self.spares_target:    # appends outran preparation: look further ahead
                    self.spares_target = grown
                    _log.warning("event=log_stall reason=no_spare_segment dir=%s spares_target=%d",
                                 self.directory, self.spares_target)
        # Page by page even on a shard's cold start (its first segment and its reserve, 1 MiB
        # each), although large writes would make them 2.6 ms faster: a large write gets a large
        # page-cache folio, and each sync then writes the whole folio back. In `always` mode that
        # was a MiB per shard per round (64 shards: 25 ms rounds).
        try:
            for _ in range(n):
                self._spares.append(self._make_segment(self._take_id(), self._next_size()))
        except OSError as exc:
            self._no_space(exc)
            raise StoreError("storage full: cannot reserve a new log segment", ErrorCode.STORAGE_FULL) from None
        self._space_returned()

    def _spares_changed(self) -> None:
        self.reserve_ok = bool(self._spares) or self.loop is None
        if not self.reserve_ok:
            self._keep_for_compaction()
        self._prepare_spare()

    def _front(self) -> Segment | None:
        """The oldest segment if it is not the active one: the one compaction frees."""
        segs = self.segments
        return segs[0] if segs and segs[0] is not self.active else None

    def _keep_for_compaction(self) -> None:
        """While the reserve is in use, state records leave room for copying the
        front segment's live records forward: its META records (which must move
        before it can go), and its pending messages once it is worth compacting.
        Then it can be deleted when consumption (or expiry) allows, and the
        space comes back. A front of live META alone is not worth copying."""
        front = self._front()
        if front is None or (not front.messages and not self._compactable(front)):
            self.keep_for_compaction = 0
            return
        key = (front.segment_id, front.live, self._compactable(front))
        if key != self._keep_key:                # a walk over the segment: only when it changed
            self._keep_key = key
            self.keep_for_compaction = self._live_bytes(front, key[2])

    def _compactable(self, seg: Segment) -> bool:
        """Whether copying the live records of the front segment `seg` forward
        frees space: it is quarantined, or few of its messages are pending, or
        (state records only: META, CONSUME) its live META records are less than
        half of what deleting it, and the consumed segments right behind it,
        gives back. A front of live META alone is left alone: copying it frees
        nothing (it used to be copied forward again and again)."""
        if seg.quarantined:
            return True
        if seg.messages:
            return seg.live < self.config.compact_below * seg.messages
        freed = seg.end
        for other in self.segments[1:]:
            if other is self.active or other.live > 0:
                break
            freed += other.end
        key = (seg.segment_id, seg.live, freed)
        if key != self._compactable_key:
            self._compactable_key = key
            self._compactable_now = self._live_bytes(seg, False) < self.config.compact_below * freed
        return self._compactable_now

    def _take_id(self) -> int:
        i = self._next_id
        self._next_id += 1
        return i

    def _newest_id(self) -> int:
        if self._spares:
            return self._spares[-1].segment_id
        return self.active.segment_id if self.active is not None else 0

    def _install(self, seg: Segment) -> None:
        # record the id floor in its header: when older segments are deleted,
        # this is what keeps last_id() from going backwards
        seg.write_header(self._header(seg.segment_id, seg.nonce, self.last_id(), seg.size, seg.tag != 0))
        seg.dirty = True
        self._add_segment(seg)
        self._set_active(seg)

    @property
    def next_segment_size(self) -> int:
        """The size of the segment the next roll installs: the first spare made ahead,
        else the one it would make (a replica prepares its file ahead from this)."""
        return self._spares[0].size if self._spares else self._next_size()

    def _no_space(self, exc: OSError) -> None:
        """A try at a segment failed: no new try before FULL_RETRY_S (or a deletion)."""
        self.last_full_error = exc
        self.segment_failures += 1
        self._retry_at = time.monotonic() + FULL_RETRY_S

    def _refused(self, content: bool) -> None:
        """Something could not be placed for lack of space: the shard is full. One
        line per episode (at most one pair per STORAGE_LOG_QUIET_S) and a counter."""
        self.refused += 1
        if self.storage_full:
            return
        self.storage_full = True
        self.full_episodes += 1
        self._full_cause = "message" if content else "state"
        self._log_full()

    def _log_full(self) -> None:
        """The storage_full line of this episode, unless one was written less than
        STORAGE_LOG_QUIET_S ago; then maintenance writes it once that has passed
        if the shard is still full, so the last line always tells the truth."""
        now = time.monotonic()
        if self._storage_logged or now - self._storage_logged_at < STORAGE_LOG_QUIET_S:
            return
        self._storage_logged_at = now
        self._storage_logged = True
        _log.error("event=storage_full dir=%s error=%s reserve=%s refused=%s senders_get=STORAGE_FULL "
                   "acks=%s episodes_not_logged=%d", self.directory, q(repr(self.last_full_error)),
                   "held" if self._spares else "used" if self.active is not None else "none", self._full_cause,
                   "recorded_in_reserve" if self._spares else "recorded_when_space_returns", self._quiet_episodes)
        self._quiet_episodes = 0

    def _space_returned(self) -> None:
        """A segment was made: the shard takes content again; deferred CONSUMEs are written."""
        self._retry_at = 0.0
        if not self.storage_full:
            return
        self.storage_full = False
        if self._storage_logged:
            self._storage_logged = False
            _log.warning("event=storage_available dir=%s refused=%d", self.directory, self.refused)
        else:
            self._quiet_episodes += 1             # an episode that began and ended unlogged
        if self.unrecorded_consumes and self.loop is not None:
            self.loop.call_soon(self._write_deferred)     # not from inside a placement

    def _write_deferred(self) -> None:
        if not self._closed and not self.quiesced and self.unrecorded_consumes:
            self.record_deferred()

    def _prepare_spare(self, retry: bool = False) -> None:
        """Keep `spares_target` segments made ahead on the worker thread (making one
        takes 0.1-0.2 s for 64 MiB here and can wait behind a long fdatasync).
        After a failed try only `retry` (maintenance, a deletion) tries again, at
        most once per FULL_RETRY_S."""
        if self.loop is None or self._closed or self.quiesced:
            return
        if self._retry_at:
            if not retry or time.monotonic() < self._retry_at:
                return
            self._retry_at = time.monotonic() + FULL_RETRY_S
        # a full shard also wants the segment its next roll takes besides the reserve
        while len(self._spares) + self._preparing < self.spares_target + self.storage_full:
            self._preparing += 1
            segment_id = self._take_id()
            size = self._next_size()
            self._worker.submit(lambda pause, i=segment_id, n=size: self._prepare_on_worker(i, n, pause),
                                self._spare_ready)

    def _prepare_on_worker(self, segment_id: int, size: int, pause):
        seg = self._make_segment(segment_id, size, pause)
        with self._claim_lock:
            closed = self._closed
            if not closed:
                self._unclaimed.add(seg)     # until the loop takes it (or close() retires it)
        if closed:                           # closed meanwhile: leave nothing behind
            self._retire(seg, False)
            return None
        return seg

    def _spare_ready(self, seg, exc) -> None:
        self._preparing -= 1
        if seg is None and exc is None:
            return
        if seg is not None:
            with self._claim_lock:
                if seg not in self._unclaimed:   # close() already retired it
                    return
                self._unclaimed.discard(seg)
        if exc is not None:
            if isinstance(exc, OSError):
                self._no_space(exc)
            else:
                _log.error("event=segment_prepare_failed error=%s", q(repr(exc)))
            return
        if self._closed:
            self._retire(seg, False)
            return
        if self.quiesced and seg.segment_id < self._newest_id():
            self._held.append(seg)           # deleting it now would change the files being exported
            return
        if seg.segment_id < self._newest_id():
            # a roll on the loop overtook it: segments must be used in id order
            self._worker.submit(lambda pause, s=seg: self._retire(s, False))
            self._prepare_spare()
            return
        self._spares.append(seg)
        self._spares_changed()
        self._space_returned()

    def _state_room(self) -> int:
        """Bytes state records can still be written into: the active segment's rest and the spares."""
        a = self.active
        return (a.free if a is not None else 0) + sum(s.size - HEADER_SIZE for s in self._spares)

    # -- durability -----------------------------------------------------------------
    def _dirty_segments(self, peek=False) -> list:
        dirty = [s for s in self.segments if s.dirty]
        if not peek:
            for s in dirty:
                s.dirty = False
        return dirty

    def sync(self) -> None:
        """Synchronous flush of everything (shutdown, tests)."""
        for s in self._dirty_segments():
            os.fdatasync(s.fd)

    # -- maintenance ------------------------------------------------------------------
    def maintain(self, expire_budget: int = 500, compact_budget: int = 500) -> None:
        """Expire, delete consumed segments from the front, compact a sparse front
        segment; bounded work per call so the loop never stalls."""
        self._maint = None
        if self._closed or self.quiesced:
            return
        now = now_ms()
        if not self._expiry_cursor:
            self._expiry_cursor = self.recipients()
        for _ in range(min(expire_budget, len(self._expiry_cursor))):
            self.expire_prefix(self._expiry_cursor.pop(), now)
        more = self._collect_front() or self._compact_front(compact_budget)
        if not self.reserve_ok:
            self._keep_for_compaction()
        if self.storage_full:
            self._log_full()
        self._write_deferred()
        if self.storage_full or len(self._spares) + self._preparing < self.spares_target:
            self._prepare_spare(retry=True)
        kept = self._recyclable[:1]              # (a copy: the worker thread takes from the list)
        if kept and time.monotonic() - kept[0].kept_at >= RECYCLE_KEEP_S:
            self._worker.submit(lambda pause: self._drop_recyclable(RECYCLE_KEEP_S))
        if self.loop is not None and not self._closed:
            self._maint = self.loop.call_later(0 if more else 1.0, self.maintain)

    def _collect_front(self) -> bool:
        segs = self.segments
        removed = False
        for seg in segs:
            if seg is self.active or seg.live > 0:
                break
            if not self._checkpoint_producers(seg):
                break
            self._remove_segment(seg.segment_id)
            quarantine = seg.quarantined
            self._worker.submit(lambda pause, s=seg, q=quarantine: self._retire(s, q))
            _log.info("event=segment_%s segment=%d", "quarantined" if quarantine else "deleted", seg.segment_id)
            removed = True
        if removed and self._retry_at:
            self._retry_at = time.monotonic()    # space was freed: the next maintenance tries at once
        return removed

    def _checkpoint_producers(self, seg) -> bool:
        """Before `seg` is deleted: every device whose highest stored seq is
        proven only by a record in it gets a checkpoint (a META record at the
        head), so its retries are still recognised after a restart. False if
        there is no room for them (the segment stays, and is tried again)."""
        try:
            for key in self.producers.in_segment(seg.segment_id):
                # frees space: may use the reserve
                self.meta_put(PRODUCER_META + key, self.producers.checkpoint(key, seg.segment_id), True)
        except StoreError:
            return False
        return True

    def _compact_front(self, budget: int) -> bool:
        segs = self.segments
        if not segs or segs[0] is self.active:
            return False
        front = segs[0]
        if not self._compactable(front):
            self._compact_pos = None
            return False
        if self._compact_pos is None or self._compact_pos[0] != front.segment_id:
            self._compact_pos = (front.segment_id, HEADER_SIZE)
        pos = self._compact_pos[1]
        # On a full disk compaction is what frees a segment pinned by a few live
        # records (every front segment holds META records), so it may copy into
        # the reserve, but only when all of them fit: half a copy would use the
        # reserve up for nothing. Once started, state records leave it the room
        # for the rest (keep_for_compaction).
        use_reserve = self.storage_full or not self.reserve_ok
        if use_reserve and pos == HEADER_SIZE and self._state_room() < self._live_bytes(front):
            return False
        try:
            nxt = self._compact_step(front, pos, budget, use_reserve)
        except StoreError:
            return False                     # no room to copy into; try again later
        if nxt < 0:
            self._compact_pos = None
            return True                      # done: the next call deletes it
        self._compact_pos = (front.segment_id, nxt)
        return True

    # -- OfflineStore extras ------------------------------------------------------------
    def pending(self, recipient, device=""):
        from router.store import StoredMessage
        out = []
        now = now_ms()
        for _msg_id, loc in self.pending_locations(recipient, device):
            msg_id, ts, _cid, _r, sender, sdev, payload = self.read_message(loc)
            flags, _s, _d, conversation, ref, _ = self.read_flags(loc)
            if ts + self.ttl_ms > now:
                out.append(StoredMessage(msg_id, ts, sender, sdev, payload, flags, conversation, ref))
        return out

    def stats(self) -> dict:
        segs = self.segments
        return {
            "segments": len(segs), "bytes": sum(s.end for s in segs), "pending": self.pending_count(),
            "appended": self.appended, "consumed": self.consumed, "expired": self.expired,
            "syncs": self.committer.syncs, "sync_seconds": self.committer.sync_seconds, "stalls": self.stalls,
            "storage_full": self.storage_full, "unrecorded_consumes": self.unrecorded_consumes,
            "quarantined": sum(1 for s in segs if s.quarantined), "spares": len(self._spares),
            "full_episodes": self.full_episodes, "refused": self.refused,
            "segment_failures": self.segment_failures, "recycled": self.recycled,
        }

    def raise_id_floor(self, floor: int) -> None:
        """Ids here never go below `floor`, though no record holds it: call before the
        first record of a log made from another's records (gateway/reshard.py); the
        first segment's header keeps it, as every segment's header keeps the highest
        id when it became active."""
        self._raise_last_id(floor)

    def quiesce(self) -> None:
        """Stop everything that changes the files (the shard is being copied):
        maintenance (deletion, compaction, checkpoints), spare preparation,
        deferred CONSUMEs, rolls. Jobs already on the worker thread still run:
        ShardedLog.quiesce waits for them."""
        self.quiesced = True
        if self._maint is not None:
            self._maint.cancel()
            self._maint = None

    def resume(self) -> None:
        """Undo quiesce (a move was abandoned): maintenance and spares start again."""
        if not self.quiesced:
            return
        self.quiesced = False
        held, self._held = self._held, []
        for seg in held:
            self._worker.submit(lambda pause, s=seg: self._retire(s, False))
        if self.loop is not None and not self._closed:
            self._maint = self.loop.call_later(0, self.maintain)
            self._prepare_spare()

    def close(self) -> None:
        if self._closed:
            return
        with self._claim_lock:
            self._closed = True
            unclaimed, self._unclaimed = self._unclaimed, set()
        if self._maint is not None:
            self._maint.cancel()
        if self._own_committer:
            self.committer.stop()
        if self._own_worker:
            self._worker.stop()
        if self.failed is None:
            self.sync()
        for seg in self.segments:
            self._close_segment(seg)
        if self._spares:                     # the reserve stays for the next start (a full disk
            self._close_segment(self._spares.popleft())   # must not lose it to a restart)
        while self._spares:                  # other unused ones: leave no empty segments behind
            self._retire(self._spares.popleft(), False)
        for seg in unclaimed:                # finished by the worker, never handed over
            self._retire(seg, False)
        for seg in self._held:               # came back while quiesced
            self._retire(seg, False)
        self._held = []
        self._drop_recyclable()
        if self._own_lock:                   # last: every file is closed and synced
            self._lock.release()


class ShardedLog(_Committed):
    """One worker process's offline store: an AppendLog per shard it owns (made
    on the shard's first message), sharing one worker thread and one group
    commit, so a loop turn's ACKs wait for a single round of fdatasyncs however
    many shards it touched. Implements the OfflineStore interface by routing
    each call to the recipient's shard.

    It holds the lock of every shard it owns from open() to close(), logs or
    not yet: a shard's log may only be created by the process that will write it.

    Shards move between nodes while it runs (gateway/cluster/shardcopy.py):
    at the old owner quiesce -> (export) -> release -> drop, or resume if the
    move is abandoned; at the new one (import) -> adopt. A shard that is
    quiesced or released refuses every write with StoreError(UNAVAILABLE,
    "shard moving"): senders retry, in order, and reach the new owner."""

    def __init__(self, root, config: LogConfig, shard_map, *, fault: str | None = None, lock_wait: float = 0.0):
        """`lock_wait`: seconds open() waits for shards another process holds (a
        draining predecessor about to exit) before it raises DataDirInUse."""
        config.validate()
        self.root = Path(root)
        self.config = config
        self.map = shard_map
        self.fault = fault if fault is not None else os.environ.get("SWITCHBOARD_LOG_FAULT", "")
        self._worker = _Worker("log")
        self.committer = GroupCommit(self._worker, config.durability, config.interval_ms, self._dirty_segments,
                                     str(self.root), self.fault)
        self.logs: dict[int, AppendLog] = {}
        self.recovered_dedup: dict = {}
        self.loop = None
        self.reports: dict[int, RecoveryReport] = {}
        self.lock_wait = lock_wait
        self.locks: dict[int, DirLock] = {}
        #: the logs writes may go to: `logs` minus the quiesced ones (log_for's one look-up)
        self._writers: dict[int, AppendLog] = {}
        #: shards moving away: "quiesced" (still readable here) or "released" (closed, unlocked)
        self.moving: dict[int, str] = {}
        #: shard -> why new SENDs to it are refused (a cluster's replication: too few copies), set on
        #: each of its logs as `refuse_sends`, also on one made later
        self.refusing_sends: dict[int, str] = {}
        self._opened = False

    def _dir(self, shard: int) -> Path:
        return self.root / shard_dir_name(shard)

    def _new_log(self, shard: int) -> AppendLog:
        if shard in self.moving:
            raise StoreError("shard moving", ErrorCode.UNAVAILABLE)
        if self._opened and shard not in self.locks:
            # not ours (any more, or not yet adopted): a log made here would take a lock of its own
            raise StoreError("shard not open here", ErrorCode.UNAVAILABLE)
        lg = AppendLog(self._dir(shard), self.config, fault=self.fault, worker=self._worker,
                       committer=self.committer, lazy=True, lock=self.locks.get(shard))
        try:
            self.reports[shard] = lg.open()
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # a shard's first use on a full disk: refused like any content, tried again next time
            raise StoreError("storage full: cannot create the shard's log", ErrorCode.STORAGE_FULL) from None
        merge_copies(self.recovered_dedup, lg.recovered_dedup, self.config.dedup_window)
        self.logs[shard] = self._writers[shard] = lg
        lg.refuse_sends = self.refusing_sends.get(shard)
        if self.loop is not None:
            lg.start(self.loop)
        return lg

    def open(self, cancelled=None) -> RecoveryReport:
        """Lock every owned shard and recover each that has a log as soon as its
        lock is ours (before anyone is served). `cancelled()` True ends a wait for
        held shards early (the worker's supervisor is gone: give the shards back)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        self._opened = True
        total = RecoveryReport()
        for shard in self._lock_shards(cancelled or (lambda: False)):
            if any(self._dir(shard).glob("*.seg")):
                r = self._new_log(shard).report
                total.segments += r.segments
                total.bytes_scanned += r.bytes_scanned
                total.seconds += r.seconds
                total.pending += r.pending
                total.torn_tails += [(shard, *t) for t in r.torn_tails]
                total.corrupt += [(shard, *c) for c in r.corrupt]
                total.bad_headers += r.bad_headers
        _log.info("event=recovered_shards dir=%s shards=%d segments=%d pending=%d seconds=%.3f",
                  self.root, len(self.logs), total.segments, total.pending, total.seconds)
        return total

    def _lock_shards(self, cancelled):
        """Yield each owned shard once its lock is ours: free ones at once, held
        ones as their holders let go (a drained predecessor's workers exit one by
        one), polled since a blocking flock cannot time out; past `lock_wait`
        seconds, release everything and raise DataDirInUse."""
        waiting = {shard: DirLock(self._dir(shard)) for shard in self.map.owned_shards()}
        start = time.monotonic()
        waited = 0
        while True:
            for shard, lock in list(waiting.items()):
                if lock.try_acquire():
                    del waiting[shard]
                    self.locks[shard] = lock
                    yield shard
            if not waiting:
                if waited:
                    _log.info("event=shard_locks_taken dir=%s shards=%d waited=%.2fs",
                              self.root, waited, time.monotonic() - start)
                return
            if not waited:
                waited = len(waiting)
                holders = sorted({str(lock.holder() or "unknown") for lock in waiting.values()})
                _log.warning("event=shard_lock_wait dir=%s shards=%d held_by=%s wait_up_to=%gs",
                             self.root, waited, ",".join(holders), self.lock_wait)
            if time.monotonic() - start >= self.lock_wait or cancelled():
                self.close()
                raise next(iter(waiting.values())).in_use()
            time.sleep(LOCK_POLL_S)

    def start(self, loop) -> None:
        self.loop = loop
        self._worker.loop = loop
        self._worker.start()
        for lg in self.logs.values():
            lg.start(loop)
        self.committer.start(loop)

    @property
    def writers(self) -> dict:
        """The live dict shard -> log that writes may go to (log_for's hit path,
        which the router reads in C; never rebound, only changed in place)."""
        return self._writers

    def log_for(self, user: str) -> AppendLog:
        """The log a write for `user` goes to (made on first use); StoreError
        (UNAVAILABLE) if the shard is moving or not open here."""
        shard = self.map.shard(user)
        lg = self._writers.get(shard)
        return lg if lg is not None else self._new_log(shard)

    def _remove_leftovers(self) -> None:
        """At start: what a move killed half-way left behind (`shard-NNNN.incoming`,
        an import never installed; `shard-NNNN.tomb-*`, a shard dropped or replaced
        but not yet deleted). Only this worker's shards (s % workers == me): another
        worker of the data dir may be importing one of its own right now."""
        for path in self.root.glob("shard-*.*"):
            name, _, kind = path.name.partition(".")
            try:
                shard = int(name[len("shard-"):])
            except ValueError:
                continue
            if shard % self.map.workers != self.map.me or not (kind == "incoming" or kind.startswith("tomb-")):
                continue
            lock = DirLock(path)
            if kind == "incoming" and (path / "LOCK").exists() and not lock.try_acquire():
                continue                     # an import under way in a process still alive
            lock.release()
            _log.warning("event=shard_leftover_removed dir=%s why=%s", path,
                         "import_not_finished" if kind == "incoming" else "tombstone")
            shutil.rmtree(path, ignore_errors=True)
            fsync_dir(self.root)

    # -- shards moving between nodes -----------------------------------------------------
    def quiesce(self, shard: int):
        """From now on every write to `shard` (appends, consumes, device and META
        records, new segments, maintenance) is refused with StoreError(UNAVAILABLE,
        "shard moving"); reads still work. Returns an asyncio Future that resolves
        (to None) once the shard's files are final: the ACKs of everything appended
        before the call have been released through the group commit (ours and the
        router's batch of this loop turn, which is committed first), the worker
        thread's file jobs for it (spares being made, segments being deleted) are
        done, and its segments are fdatasynced. Export after it resolves."""
        if self.loop is None:
            raise RuntimeError("quiesce needs a started log (start(loop))")
        if self.moving.get(shard) == "released":
            raise ValueError(f"shard {shard} was released")
        self.moving[shard] = "quiesced"
        self._writers.pop(shard, None)
        lg = self.logs.get(shard)
        if lg is not None:
            lg.quiesce()
        done = self.loop.create_future()

        def files_final(_arg) -> None:
            segs = list(lg.segments) if lg is not None and not lg._closed else []

            def barrier(pause):      # behind every file job queued before it (one FIFO queue)
                for seg in segs:
                    if seg.mapped:
                        os.fdatasync(seg.fd)

            def finished(_r, exc):
                if not done.done():
                    done.set_exception(exc) if exc is not None else done.set_result(None)
            self._worker.submit(barrier, finished)

        def commit() -> None:
            if self.committer.failed is not None:        # nothing will ever be committed again
                if not done.done():
                    done.set_exception(StoreError("storage failed; see the server log", ErrorCode.INTERNAL))
                return
            self.committer.commit(files_final, None)
        # call_soon: behind the router's flush of this turn, so its ACKs are released first
        self.loop.call_soon(commit)
        return done

    def resume(self, shard: int) -> None:
        """Undo quiesce (the move was abandoned before release): writes are taken again."""
        if self.moving.get(shard) != "quiesced":
            raise ValueError(f"shard {shard} is not quiesced")
        del self.moving[shard]
        lg = self.logs.get(shard)
        if lg is not None:
            self._writers[shard] = lg
            lg.resume()

    def release(self, shard: int) -> None:
        """After the export: close the shard's log and let go of its lock. The files
        stay (until drop) and the shard stays refused (UNAVAILABLE) here."""
        if self.moving.get(shard) is None:
            raise ValueError(f"shard {shard} is not quiesced: quiesce it first")
        self.moving[shard] = "released"
        self._writers.pop(shard, None)
        lg = self.logs.pop(shard, None)
        if lg is not None:
            lg.close()
        self.reports.pop(shard, None)
        lock = self.locks.pop(shard, None)
        if lock is not None:
            lock.release()

    def adopt(self, shard: int) -> RecoveryReport:
        """A shard directory was just installed here (ShardImport.finish): lock it,
        recover it as open() does at start, and start it. Raises DataDirInUse if
        another process holds it. The caller then takes the shard in the ShardMap
        and tells the router (Router.shard_arrived)."""
        if shard in self.locks:
            raise ValueError(f"shard {shard} is already open here")
        lock = DirLock(self._dir(shard))
        if not lock.try_acquire():
            raise lock.in_use()
        self.locks[shard] = lock
        self.moving.pop(shard, None)
        if not any(self._dir(shard).glob("*.seg")):
            return RecoveryReport()          # nothing stored yet: made on first use, as at start
        try:
            return self._new_log(shard).report
        except BaseException:
            self.locks.pop(shard, None)
            lock.release()
            raise

    def drop(self, shard: int) -> None:
        """After a completed move (the new owner adopted the shard): delete the
        shard's directory here. Renamed to a tombstone first (one atomic step), so
        a crash part-way leaves a tombstone that open() removes, never a
        half-deleted shard that recovery would open."""
        if shard in self.locks:
            raise ValueError(f"shard {shard} is open here: release it first")
        path = self._dir(shard)
        if not path.exists():                # moved away whole (kept as a replica's copy)
            self.moving.pop(shard, None)
            return
        lock = DirLock(path).acquire()       # nobody else may have it open
        tomb = self.root / f"{path.name}.tomb-{secrets.token_hex(4)}"
        try:
            os.rename(path, tomb)
            fsync_dir(self.root)
        finally:
            lock.release()
        shutil.rmtree(tomb)
        fsync_dir(self.root)
        self.moving.pop(shard, None)
        _log.info("event=shard_dropped shard=%d", shard)

    def log_of_shard(self, shard: int) -> "AppendLog | None":
        """The open log of `shard` (quiesced ones too), or None."""
        return self.logs.get(shard)

    def _dirty_segments(self, peek=False) -> list:
        dirty = [s for lg in self.logs.values() for s in lg.segments if s.dirty]
        if not peek:
            for s in dirty:
                s.dirty = False
        return dirty

    # -- OfflineStore -------------------------------------------------------------------
    def append(self, recipient, msg_id, timestamp_ms, sender, sender_device, payload, client_id=0, **kw):
        self.log_for(recipient).append(recipient, msg_id, timestamp_ms, sender, sender_device, payload,
                                       client_id, **kw)

    def pending(self, recipient, device=""):
        lg = self.logs.get(self.map.shard(recipient))
        return lg.pending(recipient, device) if lg is not None else []

    def write_pending_into(self, out, recipient, now, device="", min_id=0, max_bytes=0):
        lg = self.logs.get(self.map.shard(recipient))
        return lg.write_pending_into(out, recipient, now, device, min_id, max_bytes) if lg is not None else 0

    def _writer(self, user: str) -> "AppendLog | None":
        """The log to change for `user`, None if it has none yet; StoreError
        (UNAVAILABLE) while its shard is moving."""
        shard = self.map.shard(user)
        lg = self._writers.get(shard)
        if lg is None and shard in self.moving:
            raise StoreError("shard moving", ErrorCode.UNAVAILABLE)
        return lg

    def consume(self, recipient, msg_ids, device=""):
        lg = self._writer(recipient)
        return lg.consume(recipient, msg_ids, device) if lg is not None else 0

    def consume_through(self, recipient, msg_id, device=""):
        lg = self._writer(recipient)
        return lg.consume_through(recipient, msg_id, device) if lg is not None else 0

    def pending_count(self, recipient=None, device=""):
        if recipient is not None:
            lg = self.logs.get(self.map.shard(recipient))
            return lg.pending_count(recipient, device) if lg is not None else 0
        return sum(lg.pending_count() for lg in self.logs.values())

    def devices_of(self, user):
        lg = self.logs.get(self.map.shard(user))
        return lg.devices_of(user) if lg is not None else ()

    def register_device(self, user, device, now):
        return self.log_for(user).register_device(user, device, now)

    def touch_device(self, user, device, now):
        self.log_for(user).touch_device(user, device, now)

    def last_seen(self, user):
        lg = self.logs.get(self.map.shard(user))
        return lg.last_seen(user) if lg is not None else 0

    def meta_get_for(self, user, key):
        lg = self.logs.get(self.map.shard(user))
        return lg.meta_get(key) if lg is not None else None

    def meta_put_for(self, user, key, value):
        self.log_for(user).meta_put(key, value)

    def meta_keys_local(self, prefix, shard=None):
        """META keys with `prefix` in every open shard (or in `shard` only)."""
        logs = self.logs.values() if shard is None else [self.logs[shard]] if shard in self.logs else []
        return [k for lg in logs for k in lg.meta_keys(prefix)]

    def last_id(self) -> int:
        return max((lg.last_id() for lg in self.logs.values()), default=0)

    def sync(self) -> None:
        for lg in self.logs.values():
            lg.sync()

    def stats(self) -> dict:
        per = [lg.stats() for lg in self.logs.values()]
        out = {k: sum(p[k] for p in per) for k in ("segments", "bytes", "pending", "appended", "consumed",
                                                     "expired", "stalls", "unrecorded_consumes", "quarantined",
                                                     "spares", "full_episodes", "refused", "segment_failures",
                                                     "recycled")}
        out.update(shards=len(self.logs), syncs=self.committer.syncs, sync_seconds=self.committer.sync_seconds,
                   storage_full=any(p["storage_full"] for p in per),
                   shards_full=sum(1 for p in per if p["storage_full"]))
        return out

    def close(self) -> None:
        self.committer.stop()
        for lg in self.logs.values():
            lg.close()
        self._writers.clear()
        self._worker.stop()
        for lock in self.locks.values():     # last: a successor may take the shards now
            lock.release()
        self.locks.clear()
