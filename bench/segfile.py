"""A scratch file prepared like a log segment (reserved, zero-filled, synced,
mapped), for the disk benchmarks that compare flush paths on this machine."""
import mmap
import os

from _core._log import zero_pages

SIZE = 64 << 20


def prepared(path: str, size: int = SIZE) -> tuple[int, mmap.mmap]:
    """(fd, mapping) of a new `size`-byte file at `path`; the caller closes and unlinks it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.posix_fallocate(fd, 0, size)
    zero_pages(fd, 0, size)          # as the log does: page by page (small page-cache folios)
    os.fsync(fd)
    return fd, mmap.mmap(fd, size)
