"""Gateway nodes of a cluster for tests: each its own "machine" (a 127.0.0.x
address and data dir), all sharing one token secret, on a real NATS."""
import asyncio
import json
import os
import shutil
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import start_gateway

from gateway.auth import TokenAuthority, load_or_create_secret
from gateway.cluster.shardmap import hrw_owner
from router.sharding import shard_of


class Nodes:
    """`Nodes(tmp_path, nats_url, ["n1", "n2", "n3"])`: start(name) / kill(name) /
    restart(name) real `switchboard serve --cluster` processes; the map is made
    over every name given (--bootstrap), so `owner(user)` is known up front."""

    def __init__(self, root: Path, nats_url: str, names, workers: int = 1, shards: int = 64, extra=(),
                 bootstrap=None):
        self.root, self.nats_url, self.names = Path(root), nats_url, list(names)
        self.bootstrap = list(bootstrap or names)
        if "--replicas" not in extra:
            extra = ("--replicas", "1", *extra)      # the tests of one copy per shard say so (default: 2)
        self.workers, self.shards, self.extra = workers, shards, tuple(extra)
        self.procs = {}
        self.ports = {}               # name -> (tcp, ws, admin): a restart keeps them
        secret = load_or_create_secret(self.root / "secret-src")
        for name in self.names:
            d = self.dir(name)
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.root / "secret-src" / "secret", d / "secret")
        self.auth = TokenAuthority(secret)

    def dir(self, name: str) -> Path:
        return self.root / name

    def host(self, name: str) -> str:
        return f"127.0.0.{11 + self.names.index(name)}"

    def start(self, name: str, *args: str):
        host = self.host(name)
        ports = []
        if name in self.ports:
            tcp, ws, admin = self.ports[name]
            ports = ["--port", str(tcp), "--ws-port", str(ws), "--admin-port", str(admin)]
        gw = start_gateway(self.dir(name), "--host", host, "--admin-host", host, "--workers", str(self.workers),
                           "--cluster", self.nats_url, "--node", name, "--bootstrap", ",".join(self.bootstrap),
                           "--cluster-shards", str(self.shards), "--lease-ttl", "3", *self.extra, *ports, *args,
                           timeout=60)
        if ports:
            # start_gateway put --port 0 first; ours come later and win
            assert gw.port == self.ports[name][0], (gw.port, self.ports[name])
        self.ports[name] = (gw.port, gw.ws_port, gw.admin_port)
        self.procs[name] = gw
        return gw

    def start_all(self):
        for name in self.names:
            self.start(name)
        return self

    def kill(self, name: str) -> None:
        gw = self.procs[name]
        gw.proc.kill()
        gw.proc.wait(10)
        # kill -9 of the supervisor leaves its workers to notice the closed pipe and exit
        for pid in gw.worker_pids().values():
            _wait_gone(pid)

    def kill9(self, name: str) -> None:
        """kill -9 of the whole node: its workers, then its supervisor (kill() leaves
        the workers to notice the closed pipe and exit on their own)."""
        gw = self.procs[name]
        pids = list(gw.worker_pids().values())
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        gw.proc.kill()
        gw.proc.wait(10)
        for pid in pids:
            _wait_gone(pid)

    def signal_all(self, name: str, sig) -> None:
        """`sig` (SIGSTOP, SIGCONT) to every process of the node."""
        gw = self.procs[name]
        for pid in [*gw.worker_pids().values(), gw.proc.pid]:
            os.kill(pid, sig)

    def stop_all(self) -> None:
        for gw in self.procs.values():
            if gw.alive():
                gw.stop()
        dump = os.environ.get("SWITCHBOARD_TEST_NODE_LOGS")      # where to keep the nodes' logs, to read a failure
        if dump:
            for name, gw in self.procs.items():
                Path(dump, f"{name}.log").write_text(gw.text)

    # -- who serves whom -------------------------------------------------------------
    def owner(self, user: str) -> str:
        """The user's node in the map as bootstrapped (before any move)."""
        return hrw_owner(shard_of(user, self.shards), self.bootstrap)

    def users_on(self, name: str, count: int, prefix: str = "u") -> list[str]:
        out, i = [], 0
        while len(out) < count:
            u = f"{prefix}{i}"
            if self.owner(u) == name:
                out.append(u)
            i += 1
        return out

    def address(self, name: str) -> tuple[str, int]:
        return self.host(name), self.ports[name][0]

    def seeds(self) -> str:
        return ",".join(f"{self.host(n)}:{self.ports[n][0]}" for n in self.names if n in self.ports)

    def token(self, user: str, device: str = "main") -> str:
        return self.auth.issue(user, device, ttl=3600)

    def client(self, user: str, device: str = "main", node: str | None = None, **kw):
        """A client connected straight to `node` (default: the user's own)."""
        from gateway.client import Client
        host, port = self.address(node or self.owner(user))
        return Client(host, port, self.token(user, device), device, **kw)

    def any_client(self, user: str, device: str = "main", **kw):
        """A client with every node as a seed: it lands anywhere and is redirected."""
        from gateway.client import Client
        return Client(self.seeds(), 0, self.token(user, device), device, **kw)

    def owned(self, name: str) -> int:
        """How many shards `name` owns in its own view of the map."""
        return self.status(name)["workers"]["0"]["owners"].get(name, 0)

    def admin(self, name: str, path: str):
        url = f"http://{self.host(name)}:{self.ports[name][2]}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def status(self, name: str) -> dict:
        code, body = self.admin(name, "/cluster")
        assert code == 200, body
        return json.loads(body)


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    import os
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    os.kill(pid, 9)


def wait(what, check, timeout: float = 60.0, detail=None):
    """Poll `check()` until it is truthy (returned), or fail naming `what` (and `detail()`)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f": {detail()}" if detail else ""))
        time.sleep(0.05)


_EVENTS = ("deposed", "unquiesced", "taken_over", "adopted", "nats_", "redirect", "goaway", "session", "Error",
           "error", "refus")


def stream_report(nodes, rc, sc, got, acked) -> str:
    """What a stalled stream's two ends and the nodes saw: the failure message of a
    hang (a timeout alone says nothing about where the message stopped)."""
    def side(c):
        return (f"address={c.address} connected={c.connected} reconnects={c.reconnects} redirects={c.redirects} "
                f"goaway={c.goaway!r} outbox={len(c._outbox)} seen_hwm={c._seen_hwm} acked_hwm={c._acked_hwm}")
    lines = [f"acked={acked} received={len(got)} last={got[-3:]}", "recipient: " + side(rc), "sender: " + side(sc)]
    for name, proc in nodes.procs.items():
        events = [ln for ln in proc.text.splitlines() if any(e in ln for e in _EVENTS)]
        lines.append(f"--- {name} ({len(events)} lines of interest, the last 25):")
        lines.extend(ln[:300] for ln in events[-25:])
    return "\n".join(lines)


async def paced_stream(nodes, sender: str, recipient: str, fault, count: int = 600, pad: int = 0,
                       window: int = 1, ack_at_end: bool = False):
    """`sender` streams `count` numbered messages to `recipient` (online throughout,
    both with every node as a seed) while `fault()` runs in a thread after the first
    100 are ACKed; returns what the recipient got, in order (and checks that nothing
    more comes: nothing twice). `ack_at_end`: the recipient acknowledges only once
    it has all of them, so no segment is consumed (and deleted) during the fault."""
    loop = asyncio.get_running_loop()
    async with nodes.any_client(recipient) as rc, nodes.any_client(sender) as sc:
        got, sent = [], [0]

        async def send():
            gate = asyncio.Semaphore(window)             # `window` SENDs in flight (the SDK keeps their order)

            async def one(i):
                try:
                    try:
                        await sc.send(recipient, f"m{i}".ljust(pad, "."), timeout=120)
                    except asyncio.TimeoutError:
                        raise AssertionError(f"m{i} got no ACK in 120 s: " + stream_report(nodes, rc, sc, got,
                                                                                           sent[0]))
                    sent[0] += 1
                finally:
                    gate.release()
            tasks = []
            for i in range(count):
                await gate.acquire()
                tasks.append(asyncio.ensure_future(one(i)))
                await asyncio.sleep(0.003)
            await asyncio.gather(*tasks)

        async def receive():
            held = []
            while len(got) < count:
                try:
                    m = await rc.recv(timeout=120)
                except asyncio.TimeoutError:
                    raise AssertionError("the recipient waited 120 s: " + stream_report(nodes, rc, sc, got, sent[0]))
                got.append(m.text.rstrip("."))
                if ack_at_end:
                    held.append(m)
                else:
                    await rc.ack(m)
            for m in held:
                await rc.ack(m)
        writer, reader = asyncio.ensure_future(send()), asyncio.ensure_future(receive())
        while sent[0] < 100:
            await asyncio.sleep(0.01)
        await loop.run_in_executor(None, fault)
        await asyncio.gather(writer, reader)
        with pytest.raises(asyncio.TimeoutError):
            await rc.recv(timeout=0.3)                      # nothing twice
        return got
