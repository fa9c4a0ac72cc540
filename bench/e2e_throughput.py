"""Routed 1:1 messages/s through the gateway (1, 2, 4... workers), with a
bare-uvloop echo baseline measured by the same load client in the same run.

    python bench/e2e_throughput.py --pairs 100 --window 8 --size 32 --duration 5
    python bench/e2e_throughput.py --targets echo,switchboard --workers 1,2,4 --clients 2

Each pair is a sender and a recipient connection. Senders keep `window`
SENDs in flight (a new one per ACK); recipients acknowledge DELIVERs with one
RECEIVED per read. Latency is send -> DELIVER, from a timestamp in the payload.
At the end every ACKed message must have been delivered exactly once.
"""
import argparse
import asyncio
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _core import frames  # noqa: E402
from _core._codec import Decoder, decode_body, encode  # noqa: E402
from _core.protocol import FrameType  # noqa: E402

_TS = struct.Struct("!Q")
_ID = struct.Struct("!Q")


def start(cmd):
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"listening on tcp://([\d.]+):(\d+)", line)
        if m:
            return proc, int(m.group(2))
        if not line:
            break
    proc.kill()
    raise SystemExit(f"server did not start: {' '.join(cmd)}")


def cpu_seconds(pid):
    """CPU time of `pid` and its children (a supervisor and its workers)."""
    total = 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        return total
    return total + sum(cpu_seconds(c) for c in children)


class Stats:
    def __init__(self):
        self.sent = self.acked = self.delivered = self.dupes = 0
        self.latencies = []
        self.stop = False


class Peer(asyncio.BufferedProtocol):
    """One connection of the load client; `role` is 'sender', 'recipient' or 'echo'."""

    def __init__(self, role, stats, frame, window, sample_every=8):
        self.role, self.stats, self.frame, self.window = role, stats, frame, window
        self.decoder = Decoder(self.on_frame, 1 << 24)
        self.welcome = asyncio.get_running_loop().create_future()
        self.ids = []
        self.seen = set() if role == "recipient" else None
        self.sample_every = sample_every
        self.k = 0

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, n):
        return self.decoder.get_buffer(n)

    def buffer_updated(self, n):
        self.ids = []
        self.decoder.buffer_updated(n)
        if self.ids:
            self.transport.write(encode(frames.Received(tuple(self.ids))))

    def send_more(self, n):
        if self.stats.stop or n <= 0:
            return
        payload_ts = _TS.pack(time.perf_counter_ns())
        self.transport.write(self.frame(payload_ts) * n if n == 1 else b"".join(self.frame(payload_ts) for _ in range(n)))
        self.stats.sent += n

    def on_frame(self, ftype, flags, body):
        st = self.stats
        if ftype == FrameType.ACK:
            st.acked += 1
            self.send_more(1)
        elif ftype == FrameType.DELIVER:
            msg_id = _ID.unpack_from(body, 0)[0]
            if msg_id in self.seen:
                st.dupes += 1
            self.seen.add(msg_id)
            self.ids.append(msg_id)
            st.delivered += 1
            self.k += 1
            if self.k % self.sample_every == 0:
                # payload is at the end: its first 8 bytes are the send timestamp
                sender_len = body[16]
                dev_len = body[17 + sender_len]
                ts = _TS.unpack_from(body, 18 + sender_len + dev_len)[0]
                st.latencies.append(time.perf_counter_ns() - ts)
        elif ftype == FrameType.SEND:        # echo baseline: our own frame came back
            st.acked += 1
            st.delivered += 1
            self.k += 1
            if self.k % self.sample_every == 0:
                to_len = body[8]
                st.latencies.append(time.perf_counter_ns() - _TS.unpack_from(body, 9 + to_len)[0])
            self.send_more(1)
        elif ftype == FrameType.WELCOME:
            self.welcome.set_result(decode_body(ftype, flags, body))
        elif ftype == FrameType.ERROR:
            raise SystemExit(f"server error: {decode_body(ftype, flags, body)}")


async def connect_all(target, port, data_dir, pairs, window, size, first_pair=0):
    loop = asyncio.get_running_loop()
    stats = Stats()
    pad = b"x" * max(0, size - 8)
    senders, recipients = [], []
    authority = None
    if target == "switchboard":
        from gateway.auth import TokenAuthority, load_secret
        authority = TokenAuthority(load_secret(data_dir))
    for i in range(first_pair, first_pair + pairs):
        to = f"r{i}"

        def frame(ts, to=to, cid=[0]):
            cid[0] += 1
            return encode(frames.Send(cid[0], to, ts + pad))
        _, s = await loop.create_connection(lambda: Peer("sender" if target == "switchboard" else "echo",
                                                         stats, frame, window), "127.0.0.1", port)
        senders.append(s)
        if authority:
            s.transport.write(encode(frames.Hello(1, authority.issue(f"s{i}"), "load", 0)))
            _, r = await loop.create_connection(lambda: Peer("recipient", stats, None, 0), "127.0.0.1", port)
            r.transport.write(encode(frames.Hello(1, authority.issue(to), "load", 0)))
            recipients.append(r)
    if authority:
        await asyncio.gather(*(p.welcome for p in senders + recipients))
    return stats, senders, recipients


async def drive(stats, senders, recipients, window, duration):
    """Run the load for `duration` seconds, then drain: every ACKed message must arrive."""
    t0 = time.perf_counter()
    for s in senders:
        s.send_more(window)
    await asyncio.sleep(duration)
    stats.stop = True
    elapsed = time.perf_counter() - t0
    delivered_at_stop = stats.delivered
    deadline = time.monotonic() + 10
    while (stats.acked < stats.sent or stats.delivered < stats.sent) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for p in senders + recipients:
        p.transport.close()
    return {"elapsed": elapsed, "delivered_at_stop": delivered_at_stop, "sent": stats.sent, "acked": stats.acked,
            "delivered": stats.delivered, "dupes": stats.dupes, "latencies": stats.latencies}


def summarize(target, parts, cpu, elapsed, pairs, window, size):
    lat = sorted(x for p in parts for x in p["latencies"]) or [0]
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6  # noqa: E731
    sent, acked, delivered = (sum(p[k] for p in parts) for k in ("sent", "acked", "delivered"))
    dupes = sum(p["dupes"] for p in parts)
    return {
        "target": target, "pairs": pairs, "window": window, "payload_bytes": size,
        "duration_s": round(elapsed, 2), "msgs_per_s": round(sum(p["delivered_at_stop"] for p in parts) / elapsed),
        "p50_ms": round(pct(0.50), 3), "p99_ms": round(pct(0.99), 3), "p999_ms": round(pct(0.999), 3),
        "server_cpu_pct": round(100 * cpu / elapsed, 1),
        "sent": sent, "acked": acked, "delivered": delivered, "duplicates": dupes,
        "exactly_once": sent == acked == delivered and dupes == 0,
    }


async def run_load(target, port, data_dir, pairs, window, size, duration):
    stats, senders, recipients = await connect_all(target, port, data_dir, pairs, window, size)
    cpu0 = cpu_seconds(SERVER_PID[0])
    part = await drive(stats, senders, recipients, window, duration)
    cpu = cpu_seconds(SERVER_PID[0]) - cpu0
    return summarize(target, [part], cpu, part["elapsed"], pairs, window, size)


def client_part(args) -> None:
    """One load process of several (--clients): connect, say ready, wait for go, run."""
    async def main():
        stats, senders, recipients = await connect_all(args.part_target, args.port, args.data_dir, args.pairs,
                                                       args.window, args.size, args.first_pair)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        part = await drive(stats, senders, recipients, args.window, args.duration)
        print(json.dumps(part), flush=True)
    uvloop.run(main())


def run_multi(target, port, data_dir, args):
    k = args.clients
    share = [args.pairs // k + (1 if i < args.pairs % k else 0) for i in range(k)]
    procs, first = [], 0
    for n in share:
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--part-target", target, "--port", str(port), "--data-dir", data_dir,
             "--pairs", str(n), "--first-pair", str(first), "--window", str(args.window), "--size", str(args.size),
             "--duration", str(args.duration)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT))
        first += n
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise SystemExit("a load process failed to connect")
        cpu0 = cpu_seconds(SERVER_PID[0])
        t0 = time.perf_counter()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        parts = [json.loads(p.stdout.readline()) for p in procs]
        elapsed = max(p["elapsed"] for p in parts)
        cpu = cpu_seconds(SERVER_PID[0]) - cpu0 - 0 * t0
        return summarize(target, parts, cpu * elapsed / max(time.perf_counter() - t0, elapsed), elapsed,
                         args.pairs, args.window, args.size)
    finally:
        for p in procs:
            p.kill()
            p.wait()


SERVER_PID = [0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--targets", default="echo,switchboard",
                    help="comma list of: echo, switchboard (durable log), switchboard-memory")
    ap.add_argument("--durability", default="interval", choices=["always", "interval", "never"])
    ap.add_argument("--workers", default="1", help="comma list of gateway worker counts to measure")
    ap.add_argument("--clients", type=int, default=1, help="load-generator processes")
    ap.add_argument("--json", help="also write results here")
    # internal: one load process of several
    ap.add_argument("--part-target", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    ap.add_argument("--first-pair", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.size = max(args.size, 8)
    args.duration = min(args.duration, 60)
    if args.part_target:
        return client_part(args)
    results = []
    runs = [("echo", None)] if "echo" in args.targets.split(",") else []
    runs += [(t, int(w)) for t in args.targets.split(",") if t != "echo" for w in args.workers.split(",")]
    for target, workers in runs:
        with tempfile.TemporaryDirectory() as data_dir:
            if target == "echo":
                proc, port = start([sys.executable, "bench/echo_server.py"])
            else:
                store = "memory" if target.endswith("-memory") else "log"
                proc, port = start([sys.executable, "-m", "gateway", "serve", "--port", "0",
                                    "--data-dir", data_dir, "--log-level", "WARNING",
                                    "--max-pending", str(10**6), "--msg-rate", "0", "--store", store,
                                    "--durability", args.durability, "--workers", str(workers)])
            SERVER_PID[0] = proc.pid
            try:
                kind = "echo" if target == "echo" else "switchboard"
                if args.clients > 1:
                    r = run_multi(kind, port, data_dir, args)
                else:
                    r = uvloop.run(run_load(kind, port, data_dir, args.pairs, args.window, args.size, args.duration))
                r["target"] = target if target == "echo" else f"{target} ({args.durability}, {workers} workers)"
                r["clients"] = args.clients
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        results.append(r)
        print(json.dumps(r), flush=True)
    if results and results[0]["target"] == "echo":
        base = results[0]
        for r in results[1:]:
            print(f"{r['target']} / echo baseline: {r['msgs_per_s'] / max(base['msgs_per_s'], 1):.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
