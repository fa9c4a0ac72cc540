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

One gateway per data dir: the supervisor holds DATA_DIR/LOCK from start to exit
(a second `serve` exits 4 with one line), and each worker holds the locks of the
shard logs it owns (`_core/dirlock.py`), so a killed worker's shards are free for
its successor at once. A drain lets go of the data dir as soon as the listeners
close: the next gateway may start then, and its workers take the shards over as
the draining workers exit.
"""
import errno
import math
import os
import secrets
import signal
import socket
import sys
import time
import traceback

from _core.dirlock import DirLock
from _core.errors import DataDirInUse

from . import log
from .auth import load_or_create_secret
from .cluster.membership import LeaseLost
from .config import GatewayConfig

_log = log.get("switchboard.supervisor")

# SIGUSR2: the admin thread asks the main loop to start a drain (gateway/admin.py)
SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2}
MAX_BACKOFF = 5.0
STABLE_AFTER = 10.0       # a worker that lived this long resets its backoff
EXIT_IN_USE = 4           # the data dir (or a shard log in it) is held by another process
READY_TIMEOUT = 60.0      # seconds workers get to recover their logs and join the bus (plus lock_wait)


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
        self.restarts: dict[int, int] = {}       # worker index -> restarts after a death (metrics)
        self.admin = None                        # the admin HTTP listener (gateway/admin.py), unless off
        self.drain_request = None                # (batch, pause) from the admin thread
        self.draining = False
        self.lock = None                         # DATA_DIR/LOCK, held until exit or a drain
        self.last_status: dict[int, int] = {}    # worker index -> exit status of its last process

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
        from router.sharding import check_layout
        from .server import banner
        cfg = self.config
        try:
            self.lock = DirLock(cfg.data_dir).acquire()     # first: before anything in it is read or made
        except DataDirInUse as exc:
            holder = f" (pid {exc.pid})" if exc.pid else ""
            print(f"switchboard: data dir {os.path.abspath(cfg.data_dir)} is in use by another gateway{holder}; "
                  f"stop or drain it first, or give another --data-dir", file=sys.stderr, flush=True)
            return EXIT_IN_USE
        except OSError as exc:
            print(f"switchboard: cannot lock data dir {os.path.abspath(cfg.data_dir)}: {exc.strerror or exc}",
                  file=sys.stderr, flush=True)
            return 1
        try:
            from .reshard import settle
            settled = settle(cfg.data_dir)     # a reshard killed after its commit is finished; before, removed
            if settled is not None:
                _log.warning("event=reshard_%s data_dir=%s why=%s", settled, cfg.data_dir,
                             "interrupted_after_its_commit" if settled == "finished" else "never_committed")
            load_or_create_secret(cfg.data_dir)
            if not cfg.cluster:            # a node's workers check it against the cluster's map
                check_layout(cfg.data_dir)     # a new dir: 64 shards; an old one keeps its count
            self.listen_socks = self._bind(cfg.port)
            if cfg.ws_port >= 0:
                self.ws_socks = self._bind(cfg.ws_port)
            if cfg.admin_port >= 0:
                from .admin import Admin
                self.admin = Admin(self)
                admin_host, admin_port = self.admin.bind()
                _log.info("event=admin_listening url=http://%s:%d/", admin_host, admin_port)
        except Exception as exc:
            _log.error("event=cannot_start error=%s", log.q(exc))
            return 1
        self.parent_r, self.parent_w = os.pipe()
        self.ready_r, self.ready_w = os.pipe()
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        if self.admin is not None:
            self.admin.start()               # after the mask: signals stay with the main thread
        for k in range(cfg.workers):
            self._spawn(k)
        if not self._wait_ready(cfg.workers, timeout=READY_TIMEOUT + cfg.lock_wait):
            self._stop()
            self._loop()
            if EXIT_IN_USE in self.last_status.values():
                return EXIT_IN_USE
            return self.exit_code or 1
        host, port = self.listen_socks[0].getsockname()[:2]
        ws_port = self.ws_socks[0].getsockname()[1] if self.ws_socks else -1
        _log.info("event=supervisor_ready workers=%d listen=tcp://%s:%d ws=%d pid=%d",
                  cfg.workers, host, port, ws_port, os.getpid())
        admin = self.admin.server.server_address[:2] if self.admin is not None else None
        try:      # one write (print() writes its end apart when unbuffered); nobody reading is no reason to stop
            sys.stdout.write(banner(host, port, cfg.data_dir, ws_port, tls=bool(cfg.tls_cert), admin=admin) + "\n")
            sys.stdout.flush()
        except OSError:
            pass
        try:
            self._loop()
        finally:
            if self.admin is not None:
                self.admin.stop()
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
            elif info is not None and info.si_signo == signal.SIGHUP and not self.stopping:
                self._forward_sighup()
            elif info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT) and self.draining:
                self.draining = False            # SIGTERM during a drain: stop now (GOAWAY to what is left)
                self._stop()
                deadline = time.monotonic() + self.config.shutdown_grace + 5
            elif info is not None and info.si_signo == signal.SIGUSR2 and self.drain_request is not None:
                request, self.drain_request = self.drain_request, None
                if not self.stopping:
                    deadline = self._drain(*request)
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

    def _drain(self, batch: int, pause: float) -> float:
        """`switchboard drain`: refuse new connections (the listening sockets close
        everywhere, so a load balancer or a client moves on at once), tell the workers
        to send their sessions GOAWAY `batch` at a time (split over the workers, at
        least one each) every `pause` seconds, and exit when they are done. Returns
        the deadline after which what is left is killed."""
        self.stopping = self.draining = True
        self.restart_at.clear()
        for sock in (*self.listen_socks, *self.ws_socks):
            sock.close()
        if self.lock is not None:
            # no new clients and no restarts from here: a successor may start now; its
            # workers wait for each shard's lock until ours exit (ShardedLog.open)
            self.lock.release()
            _log.info("event=data_dir_released reason=drain dir=%s", log.q(os.path.abspath(self.config.data_dir)))
        from .metrics import ask
        live = sorted((k, pid) for pid, k in self.workers.items())
        sessions = batches = 0
        for i, (k, pid) in enumerate(live):
            share = max(batch // len(live) + (1 if i < batch % len(live) else 0), 1)
            answer = ask(self.cluster, k, f"drain {share} {pause!r}", 2.0)
            if answer is None or "sessions" not in answer:
                _log.error("event=drain_refused worker=%d pid=%d action=sigterm answer=%r", k, pid, answer)
                os.kill(pid, signal.SIGTERM)
                continue
            sessions += answer["sessions"]
            batches = max(batches, math.ceil(answer["sessions"] / share))
        seconds = max(batches - 1, 0) * pause
        _log.info("event=drain workers=%d sessions=%d batch=%d pause=%.3fs batches=%d seconds=%.1f",
                  len(live), sessions, batch, pause, batches, seconds)
        if self.admin is not None:
            self.admin.drain_answer = {"draining": True, "workers": len(live), "sessions": sessions,
                                       "batch": batch, "pause": pause, "batches": batches, "seconds": seconds}
            self.admin.drain_done.set()
        return time.monotonic() + seconds + self.config.shutdown_grace + 5

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
            self.last_status[k] = code
            if self.stopping:
                if code not in (0, -signal.SIGTERM):
                    self.exit_code = code if code > 0 else 1
                _log.info("event=worker_stopped worker=%d pid=%d status=%d", k, pid, code)
                continue
            self.restarts[k] = self.restarts.get(k, 0) + 1
            lived = time.monotonic() - self.started.get(k, 0)
            # backoff is for a worker that keeps failing by itself (a crash loop); one killed
            # from outside (SIGKILL: an operator, the OOM killer) comes back at the base delay,
            # so a storm of kills does not hide behind growing restarts
            killed = code == -signal.SIGKILL
            self.failures[k] = 0 if lived > STABLE_AFTER or killed else self.failures.get(k, 0) + 1
            delay = min(self.config.restart_backoff * 2 ** max(self.failures[k] - 1, 0), MAX_BACKOFF)
            _log.error("event=worker_exited worker=%d pid=%d status=%d restart_in=%.2fs", k, pid, code, delay)
            self.restart_at[k] = time.monotonic() + delay

    def _spawn(self, k: int) -> None:
        cfg = GatewayConfig(**{**self.config.__dict__, "worker_index": k})
        pid = os.fork()
        if pid == 0:                                  # the worker
            code = 1
            try:
                self.lock.forget()                   # the data dir's lock stays the supervisor's
                if self.admin is not None:
                    self.admin.close_in_child()
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
            except DataDirInUse as exc:
                _log.error("event=cannot_start worker=%d reason=shard_log_in_use dir=%s held_by=%s waited=%gs",
                           k, log.q(exc.directory), exc.pid or "unknown", cfg.lock_wait)
                code = EXIT_IN_USE
            except LeaseLost as exc:
                _log.error("event=cannot_start worker=%d reason=node_name_in_use error=%s", k, log.q(str(exc)))
                print(f"switchboard: {exc}", file=sys.stderr, flush=True)
                code = EXIT_IN_USE
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code if isinstance(code, int) else 1)
        self.workers[pid] = k
        self.started[k] = time.monotonic()
        _log.info("event=worker_started worker=%d pid=%d", k, pid)
