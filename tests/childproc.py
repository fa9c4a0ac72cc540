"""A child process for kill -9 tests (test_log_crash.py, test_replica.py): lines
read with a deadline, never a blocking read, and SIGKILL that returns what the
child wrote before it died."""
import os
import select
import signal
import subprocess
import time
from pathlib import Path


class ChildProcess:
    def __init__(self, argv: list, stderr_path: Path, cwd: Path, stdin=None):
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=cwd, stdin=stdin, stdout=subprocess.PIPE, stderr=self._stderr)
        self._buf = b""

    def readline(self, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"child sent no line in {timeout}s; stderr:\n{self.stderr()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"child exited ({self.proc.wait(10)}) early; stderr:\n{self.stderr()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def kill9(self) -> tuple[int, list[str]]:
        """SIGKILL, reap, and return the exit status and the complete lines the
        child wrote before it died that were not read yet."""
        os.kill(self.proc.pid, signal.SIGKILL)
        status = self.proc.wait(timeout=10)
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            chunk = os.read(fd, 65536)          # the writer is dead: EOF comes right after the data
            if not chunk:
                break
            self._buf += chunk
        else:
            raise AssertionError("no EOF from a dead child's stdout")
        lines = self._buf.decode().split("\n")[:-1]   # a line cut by the kill is dropped
        self._buf = b""
        return status, lines

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except BrokenPipeError:
                    pass
        self._stderr.close()
