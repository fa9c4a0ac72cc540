"""`switchboard bench soak`: kill -9 loops under pipelined load, and what the
application saw (issue 12's acceptance: 0 lost, 0 duplicates, 0 reorderings).

S sending devices each pipeline numbered messages to R recipients (SDK clients,
one process); every `--every` ACKs the gateway is killed with SIGKILL — the
whole process group (`--kill gateway`, then restarted on the same port and
data dir) or one worker (`--kill worker`, restarted by the supervisor). At the
end every ACKed message must have reached its recipient's application exactly
once, and each (sender, recipient) pair's messages in the order sent. The
unavailability after each kill is the time from the kill to the first ACK
after it.

`--kill node` runs a 3-node cluster with `--replicas` copies of each shard
(bench/failover.py) and kills one node per cycle: its shards fail over to
their replicas. The failover time is from the last ACK for a recipient of the
killed node's shards before the kill to the first ACK for one of them after it
(a SEND issued after the kill, so it was ACKed by the new owner).
"""
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from .peers import READY, ROOT, free_port

WORKER_STARTED = re.compile(r"event=worker_started worker=(\d+) pid=(\d+)")


class Gateway:
    """The gateway under test, in its own process group, restartable in place."""

    def __init__(self, args, data_dir: str):
        self.args, self.data_dir = args, data_dir
        self.port = free_port()
        self.proc = None
        self.lines: list[str] = []
        self.workers: dict[int, int] = {}

    def start(self) -> None:
        a = self.args
        cmd = [sys.executable, "-m", "gateway", "serve", "--port", str(self.port), "--data-dir", self.data_dir,
               "--workers", str(a.workers), "--durability", a.durability, "--segment-size", "4M",
               "--max-pending", str(10**6), "--msg-rate", "0", "--ws-port", "off", "--admin-port", "off",
               "--log-level", "INFO"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self._seen(line)
            if READY.search(line):
                loop = asyncio.get_running_loop()
                loop.run_in_executor(None, self._drain, self.proc)
                return
        self.kill()
        raise RuntimeError("the gateway did not start:\n" + "".join(self.lines[-20:]))

    def _seen(self, line: str) -> None:
        if len(self.lines) < 100_000:
            self.lines.append(line)
        m = WORKER_STARTED.search(line)
        if m:
            self.workers[int(m.group(1))] = int(m.group(2))

    def _drain(self, proc) -> None:
        for line in proc.stdout:
            self._seen(line)

    def kill(self) -> None:
        """SIGKILL to every process of the gateway (supervisor and workers)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def kill_worker(self, index: int) -> int:
        pid = self.workers[index]
        os.kill(pid, signal.SIGKILL)
        return pid

    def token(self, user: str) -> str:
        from gateway.auth import TokenAuthority, load_secret
        return TokenAuthority(load_secret(self.data_dir)).issue(user, ttl=86400)


def _recipients(prefix: str, n: int, workers: int) -> list:
    """`n` recipient names, the first min(n, workers) on distinct workers: after a
    worker's kill the run waits for an ACK to one of that worker's users, so each
    worker must have one (with random names all three landed on one worker of two
    in 1 run of 8, and the run waited for an ACK that could not come)."""
    from router.sharding import shard_of
    names, taken, j = [], set(), 0
    while len(names) < min(n, workers):
        name = f"{prefix}{j}"
        j += 1
        if shard_of(name) % workers not in taken:
            taken.add(shard_of(name) % workers)
            names.append(name)
    while len(names) < n:
        name = f"{prefix}{j}"
        j += 1
        names.append(name)
    return names


async def soak(args) -> dict:
    if args.kill == "worker" and args.recipients < args.workers:
        raise SystemExit(f"switchboard bench soak: --kill worker needs --recipients >= --workers ({args.workers}): "
                         "each kill waits for an ACK to a user of the killed worker")
    from gateway.client import Client

    from .cli import stop_on_sigterm
    stop_on_sigterm()
    tmp = tempfile.TemporaryDirectory(prefix="sb-soak-")
    loop = asyncio.get_running_loop()
    nodes = args.kill == "node"
    if nodes:
        from .failover import NODES, ClusterTarget
        gw = await loop.run_in_executor(None, ClusterTarget, args)
        host, port = gw.seeds, 0
    else:
        gw = Gateway(args, tmp.name)
        gw.start()
        host, port = "127.0.0.1", gw.port
    tag = os.urandom(3).hex()
    senders = [f"soak{tag}s{i}" for i in range(args.senders)]
    recipients = _recipients(f"soak{tag}r", args.recipients, args.workers if args.kill == "worker" else 1)
    acked: dict[tuple, int] = {}               # (sender, k) -> msg id
    seen: dict[tuple, list] = {(s, r): [] for s in senders for r in recipients}
    seen_sets: dict[tuple, set] = {key: set() for key in seen}
    duplicates = 0
    kills: list[float] = []                    # when each kill happened (loop time)
    first_ack_after: list[float | None] = []
    victim: list[int] = []                     # the worker killed (worker mode)
    reconnects_at_kill: dict = {}
    from router.sharding import shard_of
    stop = asyncio.Event()
    affected: list[set] = []                   # node mode: recipients whose shard the killed node owned
    last_ack: dict = {}                        # recipient -> loop time of its latest ACK
    last_before: list[float] = []
    send_errors: dict = {}
    phase = ["connecting"]                     # what the killer waits for: named if the run times out

    def client(user, device):
        return Client(host, port, gw.token(user), device, max_backoff=0.5, connect_timeout=60)

    clients = []

    async def sender(name: str) -> None:
        c = client(name, "phone")
        clients.append(c)
        await c.connect()
        k = 0
        pending = set()
        while not stop.is_set():
            while len(pending) >= args.window:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            to = recipients[k % len(recipients)]
            pending.add(asyncio.ensure_future(one(c, name, k, to)))
            k += 1
        await asyncio.gather(*pending)
        await c.close()

    async def one(c, name: str, k: int, to: str) -> None:
        issued = loop.time()
        try:
            r = await c.send(to, f"{name}:{k}", timeout=None)
        except Exception as exc:             # refused for good: counted, never expected here
            send_errors[type(exc).__name__ + ":" + str(exc)[:80]] = send_errors.get(
                type(exc).__name__ + ":" + str(exc)[:80], 0) + 1
            return
        acked[(name, k)] = r.id
        last_ack[to] = loop.time()
        if nodes:
            if kills and first_ack_after[-1] is None and issued > kills[-1] and (to in affected[-1]
                                                                                 or not affected[-1]):
                first_ack_after[-1] = loop.time()
        elif kills and first_ack_after[-1] is None:
            # evidence the killed part serves again (not an ACK read late from the socket):
            # gateway: this client has reconnected since; worker: a SEND issued after the
            # kill to a user of that worker
            if (c.reconnects > reconnects_at_kill.get(c, 0) if args.kill == "gateway" else
                    issued > kills[-1] and shard_of(to) % args.workers == victim[-1]):
                first_ack_after[-1] = loop.time()

    async def receiver(name: str) -> None:
        nonlocal duplicates
        c = client(name, "phone")
        await c.connect()
        try:
            while True:
                m = await c.recv()
                s, k = m.text.rsplit(":", 1)
                if int(k) in seen_sets[(s, name)]:
                    duplicates += 1           # stored twice: a second msg id for one SEND
                seen_sets[(s, name)].add(int(k))
                seen[(s, name)].append(int(k))
                await c.ack(m)
        finally:
            await c.close()

    async def killer() -> None:
        for cycle in range(args.cycles):
            target = len(acked) + args.every
            phase[0] = f"cycle {cycle + 1}: waiting for ACK {target}"
            while len(acked) < target:
                await asyncio.sleep(0.005)
            reconnects_at_kill.update({c: c.reconnects for c in clients})
            victim.append(cycle % args.workers)
            if nodes:
                name = NODES[cycle % len(NODES)]
                owners = await loop.run_in_executor(None, gw.owners, NODES[(cycle + 1) % len(NODES)])
                hit = {r for r in recipients if owners[shard_of(r, args.shards)] == name}
                affected.append(hit)
                last_before.append(max((last_ack.get(r, 0.0) for r in hit), default=loop.time()))
                kills.append(loop.time())
                first_ack_after.append(None)
                phase[0] = f"cycle {cycle + 1}: killing {name}"
                await loop.run_in_executor(None, gw.kill, name)
                phase[0] = f"cycle {cycle + 1}: waiting for an ACK to {sorted(hit) or 'anyone'} after killing {name}"
                while first_ack_after[-1] is None:
                    await asyncio.sleep(0.005)
                phase[0] = f"cycle {cycle + 1}: starting {name} again"
                await loop.run_in_executor(None, gw.start, name)
                phase[0] = f"cycle {cycle + 1}: waiting for every shard in sync"
                await loop.run_in_executor(None, gw.wait_in_sync, 180)
                print(f"\rsoak: {cycle + 1}/{args.cycles} node kills, {len(acked)} ACKed", end="", file=sys.stderr)
                continue
            kills.append(loop.time())
            first_ack_after.append(None)
            if args.kill == "gateway":
                gw.kill()
                gw.start()
            else:
                old = gw.kill_worker(cycle % args.workers)
                while gw.workers.get(cycle % args.workers) == old:     # the supervisor restarts it
                    await asyncio.sleep(0.005)
            print(f"\rsoak: {cycle + 1}/{args.cycles} kills, {len(acked)} ACKed", end="", file=sys.stderr)
        phase[0] = "waiting for an ACK after the last kill"
        while first_ack_after[-1] is None:
            await asyncio.sleep(0.005)
        phase[0] = "waiting for the senders' last ACKs"
        stop.set()

    started = time.monotonic()
    recv_tasks = [asyncio.ensure_future(receiver(r)) for r in recipients]
    stuck = None
    try:
        try:
            await asyncio.wait_for(asyncio.gather(killer(), *(sender(s) for s in senders)), args.timeout)
        except asyncio.TimeoutError:
            # bounded: a run that stops making progress says where, instead of being killed from outside
            stuck = (f"no progress in {args.timeout:g} s: {phase[0]}; {len(acked)} ACKed; senders "
                     + ", ".join(f"{c.address}{'' if c.connected else ' (disconnected)'} outbox={len(c._outbox)} "
                                 f"reconnects={c.reconnects}" for c in clients))
        deadline = loop.time() + (60 if stuck is None else 5)     # every ACKed message to its application
        while sum(len(v) for v in seen.values()) < len(acked) and loop.time() < deadline:
            await asyncio.sleep(0.05)
    finally:
        for t in recv_tasks:
            t.cancel()
        failures = [repr(r) for r in await asyncio.gather(*recv_tasks, return_exceptions=True)
                    if not isinstance(r, asyncio.CancelledError)]
        gw.stop() if nodes else gw.kill()
        tmp.cleanup()
    print(file=sys.stderr)
    delivered = {(s, k) for (s, r), ks in seen.items() for k in ks}
    lost = [key for key in acked if key not in delivered]
    reorderings = sum(1 for ks in seen.values() for x, y in zip(ks, ks[1:]) if x > y)
    gaps = [t - k for k, t in zip(last_before if nodes else kills, first_ack_after) if t is not None]
    return {"kill": args.kill, "durability": args.durability, "workers": args.workers, "cycles": args.cycles,
            "senders": args.senders, "recipients": args.recipients, "window": args.window,
            "acked": len(acked), "delivered": sum(len(v) for v in seen.values()), "lost": len(lost),
            "duplicates": duplicates, "reorderings": reorderings, "seconds": round(time.monotonic() - started, 1),
            "lost_sample": [f"{s}:{k} -> {recipients[k % len(recipients)]} id {acked[(s, k)]}"
                            for s, k in sorted(lost)[:10]],
            "lost_all": [f"{s}:{k + 1}:{recipients[k % len(recipients)]}:{acked[(s, k)]}" for s, k in sorted(lost)],
            "receiver_failures": failures, "send_errors": send_errors, "stuck": stuck,
            "unavailable_s": {"min": round(min(gaps), 3), "median": round(statistics.median(gaps), 3),
                              "p99": round(sorted(gaps)[min(len(gaps) - 1, int(0.99 * len(gaps)))], 3),
                              "max": round(max(gaps), 3)} if gaps else None,
            "replicas": getattr(args, "replicas", None) if nodes else None}


def run(args) -> int:
    import uvloop
    result = uvloop.run(soak(args))
    u = result["unavailable_s"] or {}
    print(f"{result['cycles']} kill -9 of the {result['kill']} ({result['durability']}, {result['workers']} workers, "
          f"{result['senders']} senders x {result['window']} in flight): {result['acked']} ACKed, "
          f"{result['delivered']} delivered, lost {result['lost']}, duplicates {result['duplicates']}, "
          f"reorderings {result['reorderings']}; {'failover' if args.kill == 'node' else 'unavailable after a kill'} "
          f"{u.get('min')}/{u.get('median')}/{u.get('p99')}/{u.get('max')} s (min/median/p99/max); "
          f"{result['seconds']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if result["stuck"]:
        print(f"soak: {result['stuck']}", file=sys.stderr)
        return 1
    return 0 if result["lost"] == result["duplicates"] == result["reorderings"] == 0 else 1
