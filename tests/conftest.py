"""Real gateway processes for end-to-end tests.

`gateway_proc` starts `python -m gateway serve --port 0` in a fresh data dir and
waits for its "listening on" line (a real readiness signal, not a sleep); it is
stopped by PID at teardown.
"""
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"listening on tcp://([\d.]+):(\d+)")
WS_READY = re.compile(r"wss?://[\d.]+:(\d+)/ws")
ADMIN = re.compile(r"event=admin_listening url=http://([\d.]+):(\d+)/")


@dataclass
class GatewayProcess:
    proc: subprocess.Popen
    host: str
    port: int
    data_dir: Path
    output: list = field(default_factory=list)
    reader: threading.Thread | None = None
    ws_port: int = -1          # the WebSocket listener (-1: off)
    admin_port: int = -1       # the admin listener: /metrics, /healthz, /readyz, POST /drain (-1: off)

    def token(self, user: str, device: str = "", ttl: float = 3600, now: float | None = None) -> str:
        from gateway.auth import TokenAuthority, load_secret
        return TokenAuthority(load_secret(self.data_dir)).issue(user, device, ttl=ttl, now=now)

    def client(self, user: str, device: str = "main", **kw):
        from gateway.client import Client
        return Client(self.host, self.port, self.token(user), device, **kw)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        from bench.procstat import stop
        stop(self.proc, timeout)
        if self.reader is not None:
            self.reader.join(5)
        return self.proc.returncode

    @property
    def text(self) -> str:
        """Everything the server printed so far."""
        return "".join(self.output)

    def worker_pids(self) -> dict:
        """worker index -> pid of its current process, from the supervisor's log."""
        pids = {}
        for m in re.finditer(r"event=worker_started worker=(\d+) pid=(\d+)", self.text):
            pids[int(m.group(1))] = int(m.group(2))
        return pids


def start_gateway(data_dir: Path, *args: str, env: dict | None = None, timeout: float = 20.0,
                  on_line=None) -> GatewayProcess:
    """`on_line(line)` sees every line printed before the banner (the test can act
    on what the starting gateway reports)."""
    if "--segment-size" not in args:
        args = ("--segment-size", "2M", *args)      # tests don't need 64 MiB of zeros per server
    cmd = [sys.executable, "-m", "gateway", "serve", "--port", "0", "--data-dir", str(data_dir), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if on_line is not None:
            on_line(line)
        m = READY.search(line)
        if m:
            ws = WS_READY.search(line)
            admin = ADMIN.search("".join(lines))
            gw = GatewayProcess(proc, m.group(1), int(m.group(2)), data_dir, lines,
                                ws_port=int(ws.group(1)) if ws else -1,
                                admin_port=int(admin.group(2)) if admin else -1)
            gw.reader = threading.Thread(target=_drain, args=(proc, lines), daemon=True)
            gw.reader.start()
            return gw
    proc.kill()
    proc.wait()
    raise RuntimeError("gateway did not start:\n" + "".join(lines))


def _drain(proc, lines: list) -> None:
    """Keep reading the server's output so it never blocks on a full pipe."""
    for line in proc.stdout:
        lines.append(line)


@pytest.fixture
def gateway_factory(tmp_path):
    started = []

    def factory(*args, env=None, data_dir=None, on_line=None):
        gw = start_gateway(data_dir or tmp_path / f"data{len(started)}", *args, env=env, on_line=on_line)
        started.append(gw)
        return gw

    yield factory
    for gw in started:
        gw.stop()


@pytest.fixture
def gateway_proc(gateway_factory):
    return gateway_factory("--hello-timeout", "1")


# -- NATS clusters for the cluster tests (gateway/cluster/natsd.py) -----------------------------

def _nats_server_or_skip() -> None:
    """Skip only when no nats-server >= 2.11 exists (CI installs the cluster extra, which has one)."""
    from gateway.cluster.natsd import NatsServerNotFound, nats_server_binary
    try:
        nats_server_binary()
    except NatsServerNotFound as e:
        pytest.skip(str(e))


@pytest.fixture
def nats_factory(tmp_path):
    """factory(size=3, extra_config="", name="sb") -> a started NatsCluster under tmp_path;
    every cluster it made is stopped by PID at teardown."""
    _nats_server_or_skip()
    from gateway.cluster.natsd import NatsCluster
    started = []

    def factory(size: int = 3, extra_config: str = "", name: str = "sb"):
        cluster = NatsCluster(tmp_path / f"nats{len(started)}", size=size, name=name,
                              extra_config=extra_config)
        started.append(cluster)
        return cluster.start()

    yield factory
    for cluster in started:
        cluster.stop_all()


@pytest.fixture
def nats_cluster(nats_factory):
    """Three routed nats-servers with JetStream; an R3 KV bucket can be made at once."""
    return nats_factory(3)


@pytest.fixture
def nats_single(nats_factory):
    """One nats-server with JetStream and no cluster."""
    return nats_factory(1)
