"""One writer per directory: an exclusive flock(2) on DIR/LOCK, held for as long
as the directory is open and released by the kernel when the holder dies
(kill -9 included), so a restarted process takes over at once.

Why flock and not fcntl record locks: a record lock is dropped when its process
closes *any* descriptor of the file, and never conflicts within one process, so
a second log opened on the same directory by the same process would not be
refused. A flock belongs to the open file description: every other open
conflicts with it, our own included. A forked child shares the description, so
a child must close an inherited lock's descriptor (`forget`) and never unlock it.

The holder writes its pid into the file for error messages only: the lock, not
the file's content, says who owns the directory."""
import fcntl
import os
from pathlib import Path

from .errors import DataDirInUse

LOCK_NAME = "LOCK"


class DirLock:
    def __init__(self, directory):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def try_acquire(self) -> bool:
        """Take the lock if no other open file holds it (making the directory if
        needed); False if one does."""
        if self._fd >= 0:
            return True
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return True

    def acquire(self) -> "DirLock":
        """Take the lock now or raise DataDirInUse naming the holder."""
        if not self.try_acquire():
            raise self.in_use()
        return self

    def in_use(self) -> DataDirInUse:
        return DataDirInUse(self.directory, self.holder())

    def holder(self) -> int | None:
        """The pid the holder wrote (None if unreadable or not yet written)."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def release(self) -> None:
        """Let go: closing our only descriptor of the open file drops the flock."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            os.ftruncate(fd, 0)          # no stale pid for the next reader
        except OSError:
            pass
        os.close(fd)

    def forget(self) -> None:
        """In a forked child: close the inherited descriptor without unlocking (the
        lock stays the parent's, and dies with it)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
