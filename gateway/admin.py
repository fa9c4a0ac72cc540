"""The admin HTTP listener, a thread of the supervisor (which runs no event
loop): /metrics, /healthz, /readyz, and POST /drain.

The thread asks every worker for its snapshot over the worker's Unix socket
(gateway/metrics.py) when scraped, and every `metrics_refresh` seconds
between scrapes so that a worker's counts are recent when it dies.

The supervisor forks workers while this thread runs, so the thread takes no
lock a child could inherit held: it never logs and never writes to stdout or
stderr (the request log is off), and the child closes the listening socket.
"""
import json
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlsplit

from . import metrics

#: how long the thread waits for one worker's answer
ASK_TIMEOUT = 0.5


class _Server(HTTPServer):
    allow_reuse_address = True

    def __init__(self, addr, admin: "Admin"):
        self.admin = admin
        self.address_family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        super().__init__(addr, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server_version = "switchboard-admin"
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):          # no stderr writes from this thread (see the module doc)
        pass

    def _reply(self, status: int, body: str, ctype: str = "text/plain; charset=utf-8") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        admin = self.server.admin
        path = urlsplit(self.path).path
        if path == "/metrics":
            self._reply(200, admin.metrics_text(), "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/healthz":
            self._reply(200, "ok\n")
        elif path == "/readyz":
            ready, why = admin.readiness()
            self._reply(200 if ready else 503, why + "\n")
        elif path == "/cluster":
            status, answer = admin.cluster_status()
            self._reply(status, json.dumps(answer) + "\n", "application/json")
        else:
            self._reply(404, "not found: /metrics, /healthz, /readyz, /cluster, POST /drain\n")

    def do_POST(self):
        admin = self.server.admin
        url = urlsplit(self.path)
        if url.path != "/drain":
            self._reply(404, "not found\n")
            return
        q = parse_qs(url.query)
        cfg = admin.sup.config
        try:
            batch = int(q.get("batch", [cfg.drain_batch])[0])
            pause = float(q.get("pause", [cfg.drain_pause])[0])
            if batch < 1 or not 0 <= pause <= 3600:
                raise ValueError
        except ValueError:
            self._reply(400, "batch must be a positive integer and pause 0..3600 seconds\n")
            return
        status, answer = admin.drain(batch, pause)
        self._reply(status, json.dumps(answer) + "\n", "application/json")


class Admin:
    """Owned by the Supervisor: `bind()` in the supervisor before the workers
    exist, `start()` once signals are blocked (the thread inherits the mask)."""

    def __init__(self, supervisor):
        self.sup = supervisor
        cfg = supervisor.config
        self.agg = metrics.Aggregator(cfg.workers)
        self.server: _Server | None = None
        self.thread: threading.Thread | None = None
        self.stopped = False
        self.drain_done = threading.Event()
        self.drain_answer = None

    def bind(self) -> tuple[str, int]:
        cfg = self.sup.config
        self.server = _Server((cfg.admin_host, cfg.admin_port), self)
        self.server.timeout = cfg.metrics_refresh
        return self.server.server_address[:2]

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="admin", daemon=True)
        self.thread.start()

    def close_in_child(self) -> None:
        """In a freshly forked worker: let go of the admin port."""
        if self.server is not None:
            self.server.socket.close()

    def stop(self) -> None:
        self.stopped = True

    def _run(self) -> None:
        refresh = self.sup.config.metrics_refresh
        last = 0.0
        while not self.stopped:
            self.server.handle_request()           # returns after one request or `refresh` seconds
            if time.monotonic() - last >= refresh:
                self.refresh()
                last = time.monotonic()

    # -- the workers' numbers --------------------------------------------------------------
    def _live(self) -> dict[int, int]:
        """worker index -> pid of its live process (a consistent copy of the supervisor's map)."""
        return {k: pid for pid, k in list(self.sup.workers.items())}

    def refresh(self) -> dict[int, int]:
        live = self._live()
        for k, pid in sorted(live.items()):
            snap = metrics.ask(self.sup.cluster, k, "stats", ASK_TIMEOUT)
            if snap is not None and snap.get("pid") != pid:
                snap = None                         # an answer from a process the supervisor has reaped
            self.agg.update(k, snap)
        for k in range(self.sup.config.workers):
            if k not in live:
                self.agg.fresh[k] = False
        self.agg.restarts = dict(self.sup.restarts)
        return live

    def metrics_text(self) -> str:
        live = self.refresh()
        per = {k: self.agg.per_worker(k, k in live) for k in range(self.sup.config.workers)}
        ready, _ = self._ready(live)
        return metrics.render(per, {
            "ready": ("1 when every worker is up and ready and the gateway is not draining", int(ready)),
            "draining": ("1 from the start of a drain or shutdown", int(self.sup.stopping)),
            "workers": ("configured worker processes", self.sup.config.workers),
        })

    def _ready(self, live) -> tuple[bool, str]:
        if self.sup.stopping:
            return False, "draining"
        down = []
        for k in range(self.sup.config.workers):
            cur = self.agg.current.get(k)
            if k not in live or not self.agg.fresh.get(k) or cur is None or cur.get("pid") != live[k]:
                down.append(f"worker {k} is not up")
            elif cur.get("not_serving"):
                down.append(f"worker {k}: {cur['not_serving']}")
            elif not cur.get("ready") or cur.get("draining"):
                down.append(f"worker {k} is not ready")
        return not down, "; ".join(down) or "ready"

    def readiness(self) -> tuple[bool, str]:
        if self.sup.stopping:                       # no need to ask anyone
            return False, "draining"
        return self._ready(self.refresh())

    def cluster_status(self) -> tuple[int, dict]:
        """`switchboard cluster status`: each worker's view of the cluster (worker 0's
        holds the lease), fresh from this request."""
        if not self.sup.config.cluster:
            return 404, {"error": "this gateway is not a cluster node (no --cluster)"}
        self.refresh()
        views = {k: snap.get("cluster") for k, snap in self.agg.current.items() if snap and snap.get("cluster")}
        return 200, {"workers": views}

    # -- drain -------------------------------------------------------------------------------
    def drain(self, batch: int, pause: float) -> tuple[int, dict]:
        """Hand the request to the supervisor's main thread (it owns the workers)
        and wait for its answer."""
        if self.sup.stopping:
            return 409, {"error": "already draining or stopping"}
        self.drain_done.clear()
        self.sup.drain_request = (batch, pause)
        os.kill(os.getpid(), signal.SIGUSR2)       # blocked in every thread: the main loop's sigtimedwait takes it
        if not self.drain_done.wait(10):
            return 504, {"error": "the supervisor did not answer"}
        return 202, self.drain_answer
