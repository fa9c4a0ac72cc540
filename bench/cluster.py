"""`switchboard bench cluster`: the cluster against a single node, in one run.

Starts a 3-server NATS cluster and three gateway nodes on 127.0.0.11-13 (each
with its own data dir), and a single gateway beside them; then measures, with
the throughput load processes (bench/throughput_client.py, every message
checked to arrive once): 1:1 flows on the single node, flows whose two users
are on one node of the cluster, flows across two nodes, and group fan-out
with members on all nodes. Server CPU counts every gateway and nats-server
process. The NATS bytes per routed message come from the nodes' counters."""
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from . import peers, procstat, report
from .throughput import COLUMNS, measure

NODES = ["n1", "n2", "n3"]


class ClusterUnderTest:
    """Three nodes and their NATS cluster, shaped like peers.Server for measure()."""
    dialect = "switchboard"

    def __init__(self, workers: int, durability: str, shards: int, replicas: int = 1):
        from gateway.auth import load_or_create_secret
        from gateway.cluster.natsd import NatsCluster
        self.tmp = tempfile.TemporaryDirectory(prefix="sb-cluster-bench-")
        root = Path(self.tmp.name)
        self.nats = NatsCluster(root / "nats", size=3).start()
        load_or_create_secret(root / NODES[0])
        self.data_dir = str(root / NODES[0])
        self.procs, self.addr, self.admin = {}, {}, {}
        for i, name in enumerate(NODES):
            d = root / name
            d.mkdir(exist_ok=True)
            if i:
                shutil.copy(root / NODES[0] / "secret", d / "secret")
            host = f"127.0.0.{11 + i}"
            self.admin[name] = peers.free_port()
            cmd = [sys.executable, "-m", "gateway", "serve", "--host", host, "--admin-host", host, "--port", "0",
                   "--workers", str(workers), "--data-dir", str(d), "--log-level", "WARNING",
                   "--durability", durability, "--segment-size", "64M", "--max-pending", str(10**6),
                   "--msg-rate", "0", "--cluster", self.nats.url, "--node", name, "--bootstrap", ",".join(NODES),
                   "--cluster-shards", str(shards), "--admin-port", str(self.admin[name]),
                   "--replicas", str(replicas)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=peers.ROOT)
            m = peers._wait_line(proc, peers.READY, 120, f"node {name}")
            self.procs[name] = proc
            self.addr[name] = (m.group(1), int(m.group(2)))
            threading_drain(proc)
        self.host, self.port = self.addr[NODES[0]]
        self.shards = shards
        self.replicas = replicas
        if replicas > 1:
            self.wait_in_sync(180)
        self.placement = "cross"
        self.name = "cluster"

    @property
    def client_args(self) -> list[str]:
        nodes = ",".join(f"{n}={h}:{p}" for n, (h, p) in self.addr.items())
        return ["--nodes", nodes, "--shards", str(self.shards), "--placement", self.placement]

    def wait_in_sync(self, timeout: float) -> None:
        """Measure only once every shard has its replicas in sync (a snapshot in flight costs CPU)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                host, _ = self.addr[NODES[0]]
                with urllib.request.urlopen(f"http://{host}:{self.admin[NODES[0]]}/cluster", timeout=5) as r:
                    w = json.loads(r.read())["workers"]["0"]
                if not w["catching"] and len(w["replicas"]) == self.shards:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the cluster's replicas did not get in sync")

    def pids(self) -> list[int]:
        out = [pid for p in self.procs.values() for pid in procstat.tree(p.pid)]
        return out + [pid for pid in self.nats.pids if pid]

    def counters(self) -> dict:
        """Sum over nodes of the NATS traffic counters (from /metrics)."""
        total = {"bytes_out": 0, "msgs_out": 0}
        for name, (host, _port) in self.addr.items():
            port = self.admin[name]
            text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
            for line in text.splitlines():
                if line.startswith('switchboard_cluster_bytes_total{direction="out"}'):
                    total["bytes_out"] += float(line.split()[-1])
                if line.startswith('switchboard_cluster_messages_total{direction="out"}'):
                    total["msgs_out"] += float(line.split()[-1])
            with urllib.request.urlopen(f"http://{host}:{port}/cluster", timeout=5) as r:     # replica streams
                for w in json.loads(r.read())["workers"].values():
                    total["bytes_out"] += ((w or {}).get("replication") or {}).get("shipped_bytes_total", 0)
        return total

    def stop(self) -> None:
        for p in self.procs.values():
            procstat.stop(p, 20)
        self.nats.stop_all()
        self.tmp.cleanup()


def threading_drain(proc) -> None:
    import threading
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()


def measure_open(cluster, count: int = 200) -> dict:
    """Session open (connect, HELLO, WELCOME) straight at the user's node and at
    another node that redirects it: the redirect's cost, median and p99 in ms."""
    import asyncio
    from gateway.auth import TokenAuthority, load_secret
    from gateway.client import Client
    from gateway.cluster.shardmap import hrw_owner
    from router.sharding import shard_of
    auth = TokenAuthority(load_secret(cluster.data_dir))
    users = [u for u in (f"open{i}" for i in range(count * 4))
             if hrw_owner(shard_of(u, cluster.shards), NODES) == NODES[1]][:count]

    async def opens(node: str) -> list[float]:
        host, port = cluster.addr[node]
        out = []
        for u in users:
            t0 = time.perf_counter()
            c = Client(host, port, auth.issue(u), "bench", reconnect=False, send_only=True)
            await c.connect()
            out.append((time.perf_counter() - t0) * 1000)
            await c.close()
        return sorted(out)
    direct = asyncio.run(opens(NODES[1]))
    redirected = asyncio.run(opens(NODES[0]))
    q = lambda xs, f: round(xs[min(len(xs) - 1, int(f * len(xs)))], 3)   # noqa: E731
    return {"sessions": len(users), "direct_p50_ms": q(direct, 0.5), "direct_p99_ms": q(direct, 0.99),
            "redirected_p50_ms": q(redirected, 0.5), "redirected_p99_ms": q(redirected, 0.99)}


def run(args) -> int:
    rows, extra = [], {}
    sizes = [int(s) for s in str(args.size).split(",")]
    single = peers.start("switchboard", workers=args.workers, durability=args.durability)
    try:
        for size in sizes:
            r = measure(single, args, size)
            r["server"] = f"single node ({args.workers}w)"
            rows.append(r)
    finally:
        single.stop()
    for i, copies in enumerate(int(r) for r in str(args.replicas).split(",")):
        cluster_part(args, sizes, rows, extra, copies, first=i == 0)
    cols = COLUMNS + [("nats_bytes_per_msg", "NATS B/msg", ","), ("nats_msgs_per_msg", "NATS msgs/msg", ".3f")]
    print(report.table(rows, cols))
    if args.json:
        report.write_json(args.json, {"command": " ".join(sys.argv), "results": rows, **extra})
    return 0 if all(r["exactly_once"] and not r["errors"] for r in rows) else 1


def cluster_part(args, sizes, rows, extra, copies: int, first: bool) -> None:
    """The cluster's rows with `copies` copies of each shard (group fan-out and session
    open only in the first part)."""
    cluster = ClusterUnderTest(args.workers, args.durability, args.shards, copies)
    try:
        for placement in ("local", "cross"):
            cluster.placement = placement
            for size in sizes:
                before = cluster.counters()
                r = measure(cluster, args, size)
                after = cluster.counters()
                r["server"] = (f"cluster R={copies}, {'within a node' if placement == 'local' else 'across nodes'} "
                               f"({args.workers}w)")
                sent = max(1, r["sent"])
                r["nats_bytes_per_msg"] = round((after["bytes_out"] - before["bytes_out"]) / sent)
                r["nats_msgs_per_msg"] = round((after["msgs_out"] - before["msgs_out"]) / sent, 3)
                rows.append(r)
        if args.group_size and first:
            cluster.placement = "cross"
            mode, pairs = args.mode, args.pairs
            args.mode, args.pairs = "group", max(1, args.pairs // args.group_size)
            try:
                r = measure(cluster, args, sizes[0])
            finally:
                args.mode, args.pairs = mode, pairs
            r["server"] = f"cluster, group fan-out to {args.group_size} on 3 nodes"
            rows.append(r)
        if not first:
            return
        extra["nodes"] = {n: f"{h}:{p}" for n, (h, p) in cluster.addr.items()}
        extra["session_open"] = measure_open(cluster)
        o = extra["session_open"]
        print(f"session open: direct p50 {o['direct_p50_ms']} ms (p99 {o['direct_p99_ms']}), redirected p50 "
              f"{o['redirected_p50_ms']} ms (p99 {o['redirected_p99_ms']})", file=sys.stderr)
    finally:
        cluster.stop()


if __name__ == "__main__":
    print(json.dumps({"usage": "switchboard bench cluster --help"}))
