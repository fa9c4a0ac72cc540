"""A shard's log directory as a stream of chunks, and its installation at the
receiving node.

A shard moves as files: its segments hold every message, CONSUME, device,
group, privacy and producer (dedup) record, so the new owner's recovery
rebuilds exactly the state the old one had. The old owner quiesces the shard
(`ShardedLog.quiesce`: the files are final), `export_shard` streams them, the
new owner writes them into `shard-NNNN.incoming/` (`ShardImport`), checks every
byte against the manifest's digests, fsyncs, and renames the directory into
place in one step; then `ShardedLog.adopt` opens it. A receiver killed at any
point leaves either no `shard-NNNN` (the `.incoming` leftover is removed at the
next start) or a complete one; the sender keeps its copy until the new owner has
adopted it (`ShardedLog.drop`).

Chunks are self-describing (each names its file and offset), so a receiver
refuses one out of order, repeated or lost instead of writing a wrong file.

    manifest  MAGIC, version, kind 0, u32 shard, u32 chunk size, JSON
              {"files": [{"name", "size", "xxh3_128"}]}
    data      MAGIC, version, kind 1, u32 file index, u64 offset, bytes
    zeros     MAGIC, version, kind 2, u32 file index, u64 offset, u32 length
              (a run of zeros: most of an active segment past its last record)

Segments made ahead and never used (spares: no record, no id floor in their
header) are not sent: up to two segments of zeros per shard (128 MiB at the
default segment size); the new owner makes its own.
"""
import json
import os
import re
import secrets
import shutil
import struct
from pathlib import Path

import xxhash

from _core.dirlock import DirLock
from _core.log import HEADER, HEADER_SIZE, MAGIC as SEGMENT_MAGIC, fsync_dir, shard_dir_name

MAGIC = b"SBSC"
VERSION = 1
KIND_MANIFEST, KIND_DATA, KIND_ZEROS = 0, 1, 2
_HEAD = struct.Struct("!4sBB")                 # magic, version, kind
_MANIFEST = struct.Struct("!II")               # shard, chunk size
_DATA = struct.Struct("!IQ")                   # file index, offset
_ZEROS = struct.Struct("!IQI")                 # file index, offset, length
DEFAULT_CHUNK = 512 << 10
MIN_CHUNK = 4096
_SEGMENT_NAME = re.compile(r"^[0-9]{20}\.seg$")
_SHARD_DIR = re.compile(r"^shard-([0-9]{4,})$")


class ShardCopyError(ValueError):
    """A chunk or a finished import does not match what was sent: nothing is installed."""


def _unused_spare(fd: int, size: int) -> bool:
    """A segment made ahead and never installed: no record and no id floor (the
    header of an installed segment records the highest id; that must travel)."""
    raw = os.pread(fd, HEADER_SIZE + 4, 0)
    if size < HEADER_SIZE + 4 or len(raw) < HEADER_SIZE + 4 or raw[:8] != SEGMENT_MAGIC:
        return False
    id_floor = HEADER.unpack_from(raw)[6]
    return id_floor == 0 and raw[HEADER_SIZE:HEADER_SIZE + 4] == b"\0\0\0\0"


def export_shard(shard_dir, chunk_size: int = DEFAULT_CHUNK):
    """Chunks (bytes, each at most `chunk_size`) carrying the shard's segments:
    the manifest first, then every file's bytes in order. The shard must be
    quiesced (its files final) for the whole iteration; a file that changed
    anyway fails the receiver's digest check."""
    if chunk_size < MIN_CHUNK:
        raise ValueError(f"chunk size must be at least {MIN_CHUNK} bytes")
    shard_dir = Path(shard_dir)
    m = _SHARD_DIR.match(shard_dir.name)
    if m is None:
        raise ValueError(f"{shard_dir} is not a shard log directory (shard-NNNN)")
    files = []
    fds = []
    try:
        for path in sorted(shard_dir.glob("*.seg")):
            if not _SEGMENT_NAME.match(path.name):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            size = os.fstat(fd).st_size
            if _unused_spare(fd, size):
                os.close(fd)
                continue
            fds.append(fd)
            h = xxhash.xxh3_128()
            for off in range(0, size, 1 << 20):
                h.update(os.pread(fd, min(1 << 20, size - off), off))
            files.append({"name": path.name, "size": size, "xxh3_128": h.hexdigest()})
        manifest = (_HEAD.pack(MAGIC, VERSION, KIND_MANIFEST) + _MANIFEST.pack(int(m.group(1)), chunk_size)
                    + json.dumps({"files": files}).encode())
        if len(manifest) > chunk_size:
            raise ValueError(f"the manifest of {len(files)} files ({len(manifest)} bytes) exceeds the chunk size")
        yield manifest
        room = chunk_size - _HEAD.size - _DATA.size
        for index, (fd, f) in enumerate(zip(fds, files)):
            for off in range(0, f["size"], room):
                block = os.pread(fd, min(room, f["size"] - off), off)
                if block.count(0) == len(block):
                    yield _HEAD.pack(MAGIC, VERSION, KIND_ZEROS) + _ZEROS.pack(index, off, len(block))
                else:
                    yield _HEAD.pack(MAGIC, VERSION, KIND_DATA) + _DATA.pack(index, off) + block
    finally:
        for fd in fds:
            os.close(fd)


class ShardImport:
    """Receives one shard's chunks into `LOG_ROOT/shard-NNNN.incoming/` and
    installs it as `shard-NNNN` on finish(). The incoming directory holds a lock
    while the import runs, so a restarting worker of the same data dir never
    removes a live import (only leftovers of a dead one)."""

    def __init__(self, log_root, shard: int):
        self.root = Path(log_root)
        self.shard = shard
        self.final = self.root / shard_dir_name(shard)
        self.incoming = self.root / f"{shard_dir_name(shard)}.incoming"
        self.root.mkdir(parents=True, exist_ok=True)
        if self.incoming.exists():
            leftover = DirLock(self.incoming)
            if not leftover.try_acquire():
                raise leftover.in_use()      # another import of this shard is under way
            leftover.release()
            shutil.rmtree(self.incoming)     # a dead import's
        self.incoming.mkdir()
        self._lock = DirLock(self.incoming).acquire()
        fsync_dir(self.root)
        self.files: list | None = None       # the manifest's entries
        self._fds: list = []
        self._hashes: list = []
        self._index = 0                      # the next chunk's file and offset
        self._offset = 0
        self._done = False
        self.chunks = 0
        self.bytes = 0

    # -- receiving ---------------------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        """Write one chunk; ShardCopyError for a chunk that is not the next one."""
        if self._done:
            raise ShardCopyError("this import is finished or aborted")
        chunk = memoryview(chunk)
        if len(chunk) < _HEAD.size:
            raise ShardCopyError(f"chunk {self.chunks}: {len(chunk)} bytes is too short")
        magic, version, kind = _HEAD.unpack_from(chunk)
        if magic != MAGIC or version != VERSION:
            raise ShardCopyError(f"chunk {self.chunks}: not a shard copy chunk of version {VERSION}")
        body = chunk[_HEAD.size:]
        if kind == KIND_MANIFEST:
            self._manifest(body)
        elif kind in (KIND_DATA, KIND_ZEROS):
            if self.files is None:
                raise ShardCopyError(f"chunk {self.chunks}: data before the manifest")
            if kind == KIND_DATA:
                if len(body) < _DATA.size:
                    raise ShardCopyError(f"chunk {self.chunks}: short data chunk")
                index, offset = _DATA.unpack_from(body)
                data = body[_DATA.size:]
                length = len(data)
            else:
                if len(body) != _ZEROS.size:
                    raise ShardCopyError(f"chunk {self.chunks}: bad zeros chunk")
                index, offset, length = _ZEROS.unpack_from(body)
                data = bytes(length)
            self._write(index, offset, length, data)
        else:
            raise ShardCopyError(f"chunk {self.chunks}: unknown kind {kind}")
        self.chunks += 1

    def _manifest(self, body) -> None:
        if self.files is not None:
            raise ShardCopyError("a second manifest")
        if len(body) < _MANIFEST.size:
            raise ShardCopyError("short manifest")
        shard, _chunk_size = _MANIFEST.unpack_from(body)
        if shard != self.shard:
            raise ShardCopyError(f"the chunks are of shard {shard}, this import is of shard {self.shard}")
        try:
            files = json.loads(bytes(body[_MANIFEST.size:]))["files"]
            names = set()
            for f in files:
                if not (isinstance(f["name"], str) and _SEGMENT_NAME.match(f["name"]) and f["name"] not in names
                        and isinstance(f["size"], int) and f["size"] >= 0
                        and isinstance(f["xxh3_128"], str) and len(f["xxh3_128"]) == 32):
                    raise ValueError(f"bad file entry {f!r}")
                names.add(f["name"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ShardCopyError(f"bad manifest: {exc}") from None
        self.files = files
        for f in files:
            self._fds.append(os.open(self.incoming / f["name"], os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                     0o600))
            self._hashes.append(xxhash.xxh3_128())
        self._skip_complete()

    def _skip_complete(self) -> None:
        while self._index < len(self.files) and self._offset == self.files[self._index]["size"]:
            self._index += 1
            self._offset = 0

    def _write(self, index: int, offset: int, length: int, data) -> None:
        if index >= len(self.files):
            raise ShardCopyError(f"chunk {self.chunks}: file {index} is not in the manifest")
        if (index, offset) != (self._index, self._offset):
            raise ShardCopyError(f"chunk {self.chunks} is out of order or a chunk was lost: it is file {index} "
                                 f"offset {offset}, expected file {self._index} offset {self._offset}")
        if length == 0 or offset + length > self.files[index]["size"]:
            raise ShardCopyError(f"chunk {self.chunks}: {length} bytes at {offset} do not fit file {index} "
                                 f"of {self.files[index]['size']} bytes")
        fd = self._fds[index]
        view = memoryview(data)
        done = 0
        while done < length:
            done += os.pwrite(fd, view[done:], offset + done)
        self._hashes[index].update(data)
        self._offset += length
        self.bytes += length
        self._skip_complete()

    # -- installing ----------------------------------------------------------------------
    def finish(self) -> Path:
        """Check every file against the manifest (size, xxh3_128), make them and
        the directory durable, then rename the directory into place. A stale
        `shard-NNNN` (a copy from an earlier abandoned move) is replaced: safe
        because the shard map says who owns a shard and a node installs only a
        shard it is about to own, so nobody serves that copy (its lock is taken
        first to prove it: DataDirInUse if this process or another has it open).
        Returns the installed directory; ShardCopyError (nothing installed) if
        anything does not match."""
        if self._done:
            raise ShardCopyError("this import is finished or aborted")
        if self.files is None:
            raise ShardCopyError("no manifest was received")
        if self._index < len(self.files):
            raise ShardCopyError(f"the copy is incomplete: file {self._index} ({self.files[self._index]['name']}) "
                                 f"has {self._offset} of {self.files[self._index]['size']} bytes")
        for f, fd, h in zip(self.files, self._fds, self._hashes):
            if os.fstat(fd).st_size != f["size"]:
                raise ShardCopyError(f"{f['name']}: {os.fstat(fd).st_size} bytes on disk, {f['size']} sent")
            if h.hexdigest() != f["xxh3_128"]:
                raise ShardCopyError(f"{f['name']}: digest {h.hexdigest()} does not match the manifest's "
                                     f"{f['xxh3_128']}: a chunk was corrupted")
            os.fsync(fd)
        self._close_files()
        fsync_dir(self.incoming)
        tomb = None
        if self.final.exists():
            stale = DirLock(self.final).acquire()
            tomb = self.root / f"{self.final.name}.tomb-{secrets.token_hex(4)}"
            try:
                os.rename(self.final, tomb)
                fsync_dir(self.root)
            finally:
                stale.release()
        os.rename(self.incoming, self.final)
        fsync_dir(self.root)
        self._done = True
        self._lock.release()                 # its file is shard-NNNN/LOCK now: adopt() takes it
        if tomb is not None:
            shutil.rmtree(tomb)
            fsync_dir(self.root)
        return self.final

    def abort(self) -> None:
        """Remove the partial copy (the move was abandoned, or a chunk was refused)."""
        if self._done:
            return
        self._done = True
        self._close_files()
        self._lock.release()
        shutil.rmtree(self.incoming, ignore_errors=True)
        fsync_dir(self.root)

    def _close_files(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)
