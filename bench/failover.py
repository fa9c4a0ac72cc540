"""The cluster `switchboard bench soak --kill node` kills: three gateway nodes
(127.0.0.11-13, each its own data dir and fixed ports) with `--replicas` copies
of every shard on a 3-server NATS cluster. Each cycle kills one node with
SIGKILL (its whole process group), waits until its shards serve again from
their replicas, starts it again and waits until every shard is back in sync, so
every cycle begins with R copies of everything."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from . import peers

NODES = ["n1", "n2", "n3"]


class ClusterTarget:
    def __init__(self, args):
        from gateway.auth import load_or_create_secret
        from gateway.cluster.natsd import NatsCluster
        self.args = args
        self.tmp = tempfile.TemporaryDirectory(prefix="sb-failover-")
        self.root = Path(self.tmp.name)
        self.nats = NatsCluster(self.root / "nats", size=3).start()
        load_or_create_secret(self.root / NODES[0])
        self.data_dir = str(self.root / NODES[0])
        self.ports = {n: (peers.free_port(), peers.free_port()) for n in NODES}     # tcp, admin
        self.procs: dict = {}
        self.lines: dict = {n: [] for n in NODES}
        for i, n in enumerate(NODES):
            (self.root / n).mkdir(exist_ok=True)
            if i:
                shutil.copy(self.root / NODES[0] / "secret", self.root / n / "secret")
        for n in NODES:
            self.start(n)
        self.wait_in_sync(120)

    def host(self, n: str) -> str:
        return f"127.0.0.{11 + NODES.index(n)}"

    @property
    def seeds(self) -> str:
        return ",".join(f"{self.host(n)}:{self.ports[n][0]}" for n in NODES)

    def start(self, n: str) -> None:
        a = self.args
        tcp, admin = self.ports[n]
        cmd = [sys.executable, "-m", "gateway", "serve", "--host", self.host(n), "--admin-host", self.host(n),
               "--port", str(tcp), "--admin-port", str(admin), "--ws-port", "off", "--workers", str(a.workers),
               "--data-dir", str(self.root / n), "--durability", a.durability, "--segment-size", "4M",
               "--max-pending", str(10**6), "--msg-rate", "0", "--log-level", "INFO",
               "--cluster", self.nats.url, "--node", n, "--bootstrap", ",".join(NODES),
               "--cluster-shards", str(a.shards), "--lease-ttl", str(a.lease_ttl), "--replicas", str(a.replicas)]
        self.lines[n].append(f"--- start {time.time():.3f}\n")
        proc = subprocess.Popen(cmd, cwd=peers.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        peers._wait_line(proc, peers.READY, 120, f"node {n}")
        self.procs[n] = proc
        lines = self.lines[n]
        threading.Thread(target=lambda: [lines.append(x) for x in proc.stdout if len(lines) < 50_000],
                         daemon=True).start()

    def kill(self, n: str) -> None:
        self.lines[n].append(f"--- kill -9 {time.time():.3f}\n")
        proc = self.procs.pop(n, None)
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)

    def status(self, n: str) -> dict:
        host, admin = self.host(n), self.ports[n][1]
        with urllib.request.urlopen(f"http://{host}:{admin}/cluster", timeout=5) as r:
            return json.loads(r.read())["workers"]["0"]

    def owners(self, via: str) -> list:
        return self.status(via)["shard_owner"]

    def in_sync(self, via: str) -> bool:
        w = self.status(via)
        if self.args.replicas < 2:
            return True
        live = [n for n, i in w["nodes"].items() if i.get("alive")]
        return (not w["catching"] and len(w["replicas"]) == self.args.shards and len(live) == len(NODES)
                and all(len(r) == self.args.replicas - 1 for r in w["replicas"].values()))

    def wait_in_sync(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if all(self.in_sync(n) for n in self.procs):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the cluster did not get every shard in sync")

    def token(self, user: str) -> str:
        from gateway.auth import TokenAuthority, load_secret
        return TokenAuthority(load_secret(self.data_dir)).issue(user, ttl=86400)

    def stop(self) -> None:
        for n in list(self.procs):
            self.kill(n)
        keep = os.environ.get("SWITCHBOARD_BENCH_NODE_LOGS")      # where to keep the nodes' logs
        if keep:
            for n, lines in self.lines.items():
                Path(keep, f"{n}.log").write_text("".join(lines))
        self.nats.stop_all()
        self.tmp.cleanup()
