"""The servers the benchmarks measure, started and stopped the same way:
Switchboard itself and its peers on the same workload.

- floor: a bare uvloop `asyncio.Protocol` that echoes what it reads. Nothing
  can hold an idle connection for less; every ratio is taken against it.
- websockets: a minimal relay on the `websockets` library (what many Python
  chat servers are built on).
- nats: nats-server (Debian's), the routing anchor for throughput.
- redis: redis-server, a well-known C server, for connection density.

`python -m bench.peers floor|websockets --port P` runs the Python peers."""
import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import procstat

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"listening on tcp://([\d.]+):(\d+)")
DIALECT = {"switchboard": "switchboard", "floor": "floor", "websockets": "websockets", "nats": "nats",
           "redis": "redis"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process (and its children) under measurement."""

    def __init__(self, name: str, proc: subprocess.Popen, port: int, data_dir: str | None, tmp=None):
        self.name, self.proc, self.port, self.data_dir = name, proc, port, data_dir
        self.host = "127.0.0.1"
        self.dialect = DIALECT[name]
        self._tmp = tmp
        self.output: list[str] = []
        self._reader = None

    def drain_output(self) -> None:
        """Keep reading the server's output so it never blocks on a full pipe."""
        def run():
            for line in self.proc.stdout:
                if len(self.output) < 10_000:
                    self.output.append(line)
        self._reader = threading.Thread(target=run, daemon=True)
        self._reader.start()

    def pids(self) -> list[int]:
        return procstat.tree(self.proc.pid)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (a gateway drains), SIGKILL after `timeout`; a server the
        benchmark did not start (attached by port) is left running."""
        if self.proc is None:
            return
        procstat.stop(self.proc, timeout)
        if self._reader is not None:
            self._reader.join(5)
        if self._tmp is not None:
            self._tmp.cleanup()


def _wait_line(proc, pattern, timeout: float, what: str) -> re.Match:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        m = pattern.search(line)
        if m:
            return m
    proc.kill()
    proc.wait()
    raise RuntimeError(f"{what} did not start:\n" + "".join(seen[-20:]))


def start(name: str, *, workers: int = 1, durability: str = "interval", store: str = "log",
          segment_size: str = "64M", extra: tuple = ()) -> Server:
    """Start `name` on a free port on 127.0.0.1 and wait until it accepts."""
    popen = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    if name == "switchboard":
        tmp = tempfile.TemporaryDirectory(prefix="sb-bench-")
        cmd = [sys.executable, "-m", "gateway", "serve", "--port", "0", "--workers", str(workers),
               "--data-dir", tmp.name, "--log-level", "WARNING", "--durability", durability, "--store", store,
               "--segment-size", segment_size, "--max-pending", str(10**6), "--msg-rate", "0", *extra]
        proc = subprocess.Popen(cmd, **popen)
        m = _wait_line(proc, READY, 120, "switchboard")
        server = Server(name, proc, int(m.group(2)), tmp.name, tmp)
    elif name in ("floor", "websockets"):
        proc = subprocess.Popen([sys.executable, "-m", "bench.peers", name, "--port", "0"], **popen)
        m = _wait_line(proc, READY, 30, name)
        server = Server(name, proc, int(m.group(2)), None)
    elif name == "nats":
        exe = shutil.which("nats-server")
        if exe is None:
            raise RuntimeError("nats-server is not installed (apt-get install nats-server)")
        port = free_port()
        proc = subprocess.Popen([exe, "-a", "127.0.0.1", "-p", str(port)], **popen)
        _wait_line(proc, re.compile(r"Server is ready"), 30, "nats-server")
        server = Server(name, proc, port, None)
    elif name == "redis":
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        port = free_port()
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--maxclients", "19000", "--protected-mode", "no"], **popen)
        _wait_line(proc, re.compile(r"Ready to accept connections"), 30, "redis-server")
        server = Server(name, proc, port, None)
    else:
        raise ValueError(f"unknown server {name!r}")
    server.drain_output()
    return server


def open_server(name: str, args) -> Server:
    """The server a benchmark measures: the gateway already on --port, or one it starts."""
    if name == "switchboard" and getattr(args, "port", 0):
        return attach(args)
    return start(name, workers=args.workers, durability=args.durability)


def attach(args) -> Server:
    """A gateway that is already running: its processes are found by the listening port."""
    pids = procstat.listening_pids(args.port)
    if not pids:
        raise SystemExit(f"nothing listens on port {args.port}")
    server = Server("switchboard", None, args.port, args.data_dir)
    server.host = args.host
    server.pids = lambda: pids
    return server


# -- the Python peers -------------------------------------------------------------

class Floor(asyncio.Protocol):
    """Echo: the least a server can hold per connection (a transport and this)."""
    __slots__ = ("transport",)

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


async def _floor(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Floor, "127.0.0.1", port, backlog=4096)
    print(f"listening on tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


async def _websockets(port: int) -> None:
    """A relay: connect to /ws/USER; a binary message [len][to][payload] goes to
    `to` as [len][from][payload]. Keepalive pings off: the clients ping."""
    from websockets.asyncio.server import serve
    users = {}

    async def handler(ws):
        me = ws.request.path.rsplit("/", 1)[-1]
        mine = me.encode()
        users[me] = ws
        try:
            async for msg in ws:
                if isinstance(msg, bytes) and msg:
                    to = msg[1:1 + msg[0]].decode()
                    peer = users.get(to)
                    if peer is not None:
                        await peer.send(bytes([len(mine)]) + mine + msg[1 + msg[0]:])
        finally:
            if users.get(me) is ws:
                del users[me]

    async with serve(handler, "127.0.0.1", port, ping_interval=None, max_size=1 << 20, backlog=4096) as server:
        sock = next(iter(server.sockets))
        print(f"listening on tcp://127.0.0.1:{sock.getsockname()[1]}", flush=True)
        await server.serve_forever()


def main(argv=None) -> None:
    import uvloop
    ap = argparse.ArgumentParser(description="Run a Python peer server for the benchmarks.")
    ap.add_argument("kind", choices=["floor", "websockets"])
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    uvloop.run(_floor(args.port) if args.kind == "floor" else _websockets(args.port))


if __name__ == "__main__":
    main()
