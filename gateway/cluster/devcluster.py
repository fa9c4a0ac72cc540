"""`make serve-cluster`: a 3-server NATS cluster and three gateway nodes on one machine,
each node on its own loopback address (127.0.0.11-13) as if on its own machine.

Everything lives under ./switchboard-cluster (nats/ for the NATS servers, nK/ and nK.log
per node). The nodes share one token secret, made once in n1 and copied to n2 and n3, so
a token issued from any data dir works on every node. Ctrl-C or SIGTERM stops the nodes
(SIGTERM, so they leave the cluster cleanly), then NATS; all by PID.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gateway.auth import SECRET_FILE, load_or_create_secret
from gateway.cluster.natsd import NatsCluster, NatsServerNotFound

NODES = ("n1", "n2", "n3")
TCP_PORT, WS_PORT, ADMIN_PORT = 7400, 7401, 7402
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


@dataclass
class Node:
    name: str
    host: str
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def switchboard_command() -> list[str]:
    """The venv's `switchboard` script beside this Python, else `python -m gateway`."""
    script = Path(sys.executable).parent / "switchboard"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "gateway"]


def make_nodes(root: Path) -> list[Node]:
    return [Node(name, f"127.0.0.{11 + i}", root / name, root / f"{name}.log") for i, name in enumerate(NODES)]


def share_secret(nodes: list[Node]) -> None:
    """One secret for all nodes: created (or kept) in the first, copied to the others."""
    for node in nodes:
        node.data_dir.mkdir(parents=True, exist_ok=True)
    secret = load_or_create_secret(nodes[0].data_dir)
    for node in nodes[1:]:
        path = node.data_dir / SECRET_FILE
        if path.exists() and path.read_bytes() == secret:
            continue
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
        os.replace(tmp, path)


def ports_in_use(nodes: list[Node]) -> list[str]:
    """Addresses a node would listen on that something else holds: its /readyz could
    answer for our node, so refuse to start instead."""
    taken = []
    for node in nodes:
        for port in (TCP_PORT, WS_PORT, ADMIN_PORT):
            with socket.socket() as s:
                try:
                    s.bind((node.host, port))
                except OSError:
                    taken.append(f"{node.host}:{port}")
    return taken


def node_command(node: Node, nats_url: str, nodes: list[Node]) -> list[str]:
    return [*switchboard_command(), "serve",
            "--host", node.host, "--port", str(TCP_PORT), "--ws-port", str(WS_PORT),
            "--admin-host", node.host, "--admin-port", str(ADMIN_PORT),
            "--data-dir", str(node.data_dir),
            "--cluster", nats_url, "--node", node.name, "--advertise", f"{node.host}:{TCP_PORT}",
            "--bootstrap", ",".join(n.name for n in nodes), "--workers", "1"]


def start_node(node: Node, nats_url: str, nodes: list[Node]) -> None:
    with open(node.log_path, "ab") as log:
        # own session: Ctrl-C reaches only us, and we stop the nodes before NATS
        node.proc = subprocess.Popen(node_command(node, nats_url, nodes), stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def ready(node: Node) -> bool:
    try:
        with urllib.request.urlopen(f"http://{node.host}:{ADMIN_PORT}/readyz", timeout=1) as r:
            return r.status == 200
    except (OSError, urllib.error.HTTPError):
        return False


def wait_ready(nodes: list[Node], timeout: float = READY_TIMEOUT) -> Node | None:
    """None when every node answers /readyz 200; else the first node that died or was not
    ready by the deadline."""
    deadline = time.monotonic() + timeout
    waiting = list(nodes)
    delay = 0.05
    while waiting:
        for node in list(waiting):
            if not node.alive():
                return node
            if ready(node):
                waiting.remove(node)
        if waiting and time.monotonic() >= deadline:
            return waiting[0]
        if waiting:
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
    return None


def stop_nodes(nodes: list[Node]) -> None:
    """SIGTERM to all (they shut down in parallel), SIGKILL what is left after the grace."""
    for node in nodes:
        if node.alive():
            node.proc.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT
    for node in nodes:
        if node.proc is None:
            continue
        try:
            node.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()


def how_to_connect(nodes: list[Node], root: Path) -> str:
    hosts = ",".join(n.host for n in nodes)
    sb = ".venv/bin/switchboard"
    first = nodes[0]
    return "\n".join([
        "switchboard cluster: " + ", ".join(f"{n.name} tcp://{n.host}:{TCP_PORT}" for n in nodes),
        f"  token:    {sb} token issue alice --data-dir {first.data_dir}",
        f"  receive:  {sb} recv --as bob --host {hosts} --data-dir {first.data_dir}",
        f"  send:     {sb} send --as alice --to bob hi --host {hosts} --data-dir {first.data_dir}",
        "  web chat: " + ", ".join(f"http://{n.host}:{WS_PORT}/" for n in nodes),
        "  admin:    " + ", ".join(f"http://{n.host}:{ADMIN_PORT}/metrics" for n in nodes),
        f"  logs:     {root}/nK.log, NATS in {root}/nats/nK.log",
        "Ctrl-C stops everything.",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gateway.cluster.devcluster", description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path("switchboard-cluster"))
    ap.add_argument("--nats-only", action="store_true", help="start only the NATS cluster")
    args = ap.parse_args(argv)
    root = args.root
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())

    root.mkdir(parents=True, exist_ok=True)
    nodes = [] if args.nats_only else make_nodes(root)
    taken = ports_in_use(nodes)
    if taken:
        print(f"error: in use by another process: {', '.join(taken)} (another serve-cluster?)",
              file=sys.stderr)
        return 1
    if nodes:
        share_secret(nodes)
    try:
        nats = NatsCluster(root / "nats", size=3).start()
    except (NatsServerNotFound, RuntimeError, TimeoutError) as e:
        print(f"error: NATS did not start: {e}", file=sys.stderr)
        return 1
    status = 0
    try:
        print(f"nats: {nats.url}", flush=True)
        for node in nodes:
            start_node(node, nats.url, nodes)
        failed = wait_ready(nodes) if nodes else None
        if failed is not None:
            state = f"exited with {failed.proc.returncode}" if not failed.alive() else "not ready in time"
            print(f"error: node {failed.name} {state}; {failed.log_path}:\n{failed.log_tail()}",
                  file=sys.stderr, flush=True)
            return 1
        print(how_to_connect(nodes, root) if nodes else "NATS only. Ctrl-C stops it.", flush=True)
        while not stopping.wait(1.0):
            for node in nodes:
                if node.proc.poll() is not None and not getattr(node, "reported", False):
                    node.reported = True
                    print(f"node {node.name} exited with {node.proc.returncode}; {node.log_path}:\n"
                          f"{node.log_tail()}", file=sys.stderr, flush=True)
                    status = 1
    finally:
        stop_nodes(nodes)
        nats.stop_all()
    return status


if __name__ == "__main__":
    sys.exit(main())
