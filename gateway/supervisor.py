"""The supervisor: binds the listening socket, forks the workers before any
event loop exists, restarts a worker that dies (with backoff), and forwards
signals. It never runs an event loop itself, so forking stays safe.

Every worker accepts on a listening socket of its own, all bound to the same
port with SO_REUSEPORT: the kernel spreads new connections over them, so one
connection wakes one worker (a socket shared by 64 workers woke all 64). The
supervisor keeps every socket open, so connections that arrive for a worker
while it restarts wait in its queue instead of being refused. After HELLO a
connection whose user lives on another worker's shards is handed to that
worker (gateway/bus.py). Workers watch a pipe from the supervisor and stop at once if
the supervisor dies, so a restarted one can bind the port again.
"""
import errno
import os
import secrets
import signal
import socket
import sys
import time
import traceback

from . import log
from .auth import load_or_create_secret
from .config import GatewayConfig

_log = log.get("switchboard.supervisor")

SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
MAX_BACKOFF = 5.0
STABLE_AFTER = 10.0       # a worker that lived this long resets its backoff


class Supervisor:
    def __init__(self, config: GatewayConfig):
        config.validate()
        self.config = config
        self.cluster = secrets.token_hex(6)
        self.listen_socks: list[socket.socket] = []
        self.ws_socks: list[socket.socket] = []   # the WebSocket listeners (browsers), unless turned off
        self.parent_r = self.parent_w = -1
        self.workers: dict[int, int] = {}        # pid -> worker index
        self.started: dict[int, float] = {}      # worker index -> start time
        self.failures: dict[int, int] = {}
        self.restart_at: dict[int, float] = {}
        self.stopping = False
        self.exit_code = 0

    def _bind(self, port: int) -> list[socket.socket]:
        """One listening socket per worker on `port` (SO_REUSEPORT)."""
        cfg = self.config
        deadline = time.monotonic() + 5
        while True:
            try:
                first = socket.create_server((cfg.host, port), backlog=cfg.backlog, reuse_port=True)
                break
            except OSError as exc:     # a previous instance's workers may still be letting go
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        port = first.getsockname()[1]
        socks = [first] + [socket.create_server((cfg.host, port), backlog=cfg.backlog, reuse_port=True)
                           for _ in range(cfg.workers - 1)]
        for sock in socks:
            sock.set_inheritable(True)
        return socks

    def run(self) -> int:
        from router.sharding import check_layout, DEFAULT_SHARDS
        from .server import banner
        cfg = self.config
        try:
            os.makedirs(cfg.data_dir, exist_ok=True)
            load_or_create_secret(cfg.data_dir)
            check_layout(cfg.data_dir, DEFAULT_SHARDS)
            self.listen_socks = self._bind(cfg.port)
            if cfg.ws_port >= 0:
                self.ws_socks = self._bind(cfg.ws_port)
        except Exception as exc:
            _log.error("event=cannot_start error=%s", log.q(exc))
            return 1
        self.parent_r, self.parent_w = os.pipe()
        self.ready_r, self.ready_w = os.pipe()
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        for k in range(cfg.workers):
            self._spawn(k)
        if not self._wait_ready(cfg.workers, timeout=60):
            self._stop()
            self._loop()
            return self.exit_code or 1
        host, port = self.listen_socks[0].getsockname()[:2]
        ws_port = self.ws_socks[0].getsockname()[1] if self.ws_socks else -1
        _log.info("event=supervisor_ready workers=%d listen=tcp://%s:%d ws=%d pid=%d",
                  cfg.workers, host, port, ws_port, os.getpid())
        print(banner(host, port, cfg.data_dir, ws_port, tls=bool(cfg.tls_cert)), flush=True)
        try:
            self._loop()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        return self.exit_code

    def _wait_ready(self, n: int, timeout: float) -> bool:
        """Announce the gateway only when every worker has recovered its logs and
        joined the bus, so the first clients are never handed to a worker still starting."""
        import select
        seen = 0
        deadline = time.monotonic() + timeout
        while seen < n:
            left = deadline - time.monotonic()
            if left <= 0:
                _log.error("event=workers_not_ready ready=%d of=%d", seen, n)
                return False
            r, _, _ = select.select([self.ready_r], [], [], min(left, 0.5))
            if r:
                seen += len(os.read(self.ready_r, 64))
            self._reap()
            if self.restart_at:          # a worker died while starting
                _log.error("event=worker_failed_to_start")
                return False
        return True

    def _loop(self) -> None:
        deadline = None
        while True:
            timeout = 0.5
            if self.restart_at and not self.stopping:
                timeout = max(0.0, min(self.restart_at.values()) - time.monotonic())
            info = signal.sigtimedwait(SIGNALS, min(timeout, 0.5))
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                self._stop()
                deadline = time.monotonic() + self.config.shutdown_grace + 5
            if info is not None and info.si_signo == signal.SIGHUP and not self.stopping:
                self._forward_sighup()
            self._reap()
            if self.stopping:
                if not self.workers:
                    return
                if time.monotonic() > deadline:
                    for pid in self.workers:
                        _log.error("event=worker_kill pid=%d reason=drain_timeout", pid)
                        os.kill(pid, signal.SIGKILL)
                continue
            now = time.monotonic()
            for k, when in list(self.restart_at.items()):
                if when <= now:
                    del self.restart_at[k]
                    self._spawn(k)

    def _forward_sighup(self) -> None:
        """Each worker reloads the TLS certificate for its new connections."""
        _log.info("event=sighup action=forward workers=%d", len(self.workers))
        for pid in self.workers:
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                pass

    def _stop(self) -> None:
        self.stopping = True
        self.restart_at.clear()
        _log.info("event=draining workers=%d", len(self.workers))
        for pid in self.workers:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _reap(self) -> None:
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            k = self.workers.pop(pid, None)
            if k is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                if code not in (0, -signal.SIGTERM):
                    self.exit_code = code if code > 0 else 1
                _log.info("event=worker_stopped worker=%d pid=%d status=%d", k, pid, code)
                continue
            lived = time.monotonic() - self.started.get(k, 0)
            self.failures[k] = 0 if lived > STABLE_AFTER else self.failures.get(k, 0) + 1
            delay = min(self.config.restart_backoff * 2 ** max(self.failures[k] - 1, 0), MAX_BACKOFF)
            _log.error("event=worker_exited worker=%d pid=%d status=%d restart_in=%.2fs", k, pid, code, delay)
            self.restart_at[k] = time.monotonic() + delay

    def _spawn(self, k: int) -> None:
        cfg = GatewayConfig(**{**self.config.__dict__, "worker_index": k})
        pid = os.fork()
        if pid == 0:                                  # the worker
            code = 1
            try:
                os.close(self.parent_w)
                os.close(self.ready_r)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)   # until the worker's loop handles it (TLS reload)
                signal.pthread_sigmask(signal.SIG_SETMASK, set())
                for socks in (self.listen_socks, self.ws_socks):
                    for i, sock in enumerate(socks):
                        if i != k:
                            sock.close()         # the other workers' queues are theirs
                from .server import run_worker
                code = run_worker(cfg, self.listen_socks[k], self.cluster, self.parent_r, self.ready_w,
                                  self.ws_socks[k] if self.ws_socks else None)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code if isinstance(code, int) else 1)
        self.workers[pid] = k
        self.started[k] = time.monotonic()
        _log.info("event=worker_started worker=%d pid=%d", k, pid)
