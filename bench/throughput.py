"""`switchboard bench throughput`: routed messages per second, end-to-end
latency and server CPU, with every message checked to arrive exactly once.

Flows (a sender and its receivers: one for 1:1 pairs, the members for group
fan-out) run in load processes built on a C hot path (bench/_loadgen.pyx).
Closed loop keeps `window` messages in flight per flow; open loop (--rate)
sends at a fixed total rate. After a warm-up, a measured window; then the
senders stop and the run waits until everything sent has been delivered."""
import json
import secrets
import subprocess
import sys
import time

from . import peers, procstat, report


def _split(n: int, k: int) -> list[int]:
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


_runs = iter(range(1, 1 << 30))
#: this invocation's mark in user and group names: a second `bench throughput
#: --port P` against the same gateway must not meet the first one's groups (GROUP_EXISTS)
_INVOCATION = secrets.token_hex(3)


def measure(server, args, size: int) -> dict:
    procs, first = [], 0
    tag = f"t{_INVOCATION}{next(_runs)}x"     # fresh users and groups for every run against the same server
    k = min(args.clients, args.pairs)
    for n in _split(args.pairs, k):
        cmd = [sys.executable, "-m", "bench.throughput_client", "--dialect", server.dialect,
               "--host", server.host, "--port", str(server.port), "--mode", args.mode,
               "--group-size", str(args.group_size), "--first", str(first), "--flows", str(n), "--tag", tag,
               "--window", str(args.window), "--size", str(size), "--rate", str((args.rate or 0) / k),
               "--duration", str(args.duration), "--warmup", str(args.warmup),
               "--receipts", "1" if args.receipts == "on" else "0"]
        if server.data_dir:
            cmd += ["--data-dir", server.data_dir]
        cmd += getattr(server, "client_args", [])       # a cluster: where each user connects (bench/cluster.py)
        procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      cwd=peers.ROOT))
        first += n
    try:
        for p in procs:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"a load process failed to set up against {server.name} "
                                   f"(exit {p.wait()}; its error is above)")
            if not line.startswith('{"ready"'):
                raise RuntimeError(f"a load process against {server.name} said {line.strip()!r} instead of ready")
        pids = server.pids()
        t0 = time.perf_counter()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        time.sleep(args.warmup)
        cpu1, lcpu1 = procstat.cpu_seconds(pids), procstat.cpu_seconds([p.pid for p in procs])
        t1 = time.perf_counter()
        time.sleep(args.duration)
        cpu2, lcpu2 = procstat.cpu_seconds(pids), procstat.cpu_seconds([p.pid for p in procs])
        t2 = time.perf_counter()
        parts = []
        for p in procs:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"a load process against {server.name} died (exit {p.wait()})")
            parts.append(json.loads(line))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    elapsed = max(x["elapsed"] for x in parts)
    total = lambda key: sum(x[key] or 0 for x in parts)  # noqa: E731
    sent, delivered, expected = total("sent"), total("delivered"), total("expected_deliveries")
    acked = total("acked") if server.dialect == "switchboard" else None
    exactly_once = (delivered == expected and total("duplicates") == 0 and total("gaps") == 0
                    and (acked is None or acked == sent))
    lat = [x for x in parts if x["p50_ms"] is not None]
    return {
        "server": server.name, "mode": args.mode, "pairs": args.pairs, "window": args.window,
        "payload_bytes": size, "rate": args.rate or None, "load_processes": k,
        "group_size": args.group_size if args.mode == "group" else None,
        "msgs_per_s": round(total("delivered_in_window") / elapsed),
        "sends_per_s": round(total("sent_in_window") / elapsed),
        "p50_ms": max((x["p50_ms"] for x in lat), default=None),
        "p99_ms": max((x["p99_ms"] for x in lat), default=None),
        "p999_ms": max((x["p999_ms"] for x in lat), default=None),
        "server_cpu_pct": round(100 * (cpu2 - cpu1) / (t2 - t1), 1),
        "load_cpu_pct": round(100 * (lcpu2 - lcpu1) / (t2 - t1), 1),
        "sent": sent, "acked": acked, "delivered": delivered, "expected": expected,
        "receipts": total("receipts") if server.dialect == "switchboard" else None,
        "duplicates": total("duplicates"), "gaps": total("gaps"), "errors": total("errors"),
        "last_error": next((x["last_error"] for x in parts if x["last_error"]), None),
        "exactly_once": exactly_once, "seconds": round(t2 - t0, 1),
    }


COLUMNS = [("server", "server", ""), ("payload_bytes", "bytes", ","), ("msgs_per_s", "msgs/s", ","),
           ("p50_ms", "p50 ms", ".2f"), ("p99_ms", "p99 ms", ".2f"), ("p999_ms", "p99.9 ms", ".2f"),
           ("server_cpu_pct", "server CPU%", ".0f"), ("load_cpu_pct", "load CPU%", ".0f"),
           ("delivered", "delivered", ","), ("exactly_once", "exactly once", "")]


def label(name: str, args) -> str:
    if name != "switchboard":
        return name
    if getattr(args, "port", 0):
        return f"switchboard (running on port {args.port})"    # its settings are its own
    return f"switchboard ({args.workers}w, {args.durability}{', no receipts' if args.receipts == 'off' else ''})"


def run_all(args, names: list[str]) -> list[dict]:
    rows = []
    sizes = [int(s) for s in str(args.size).split(",")]
    for name in names:
        server = peers.open_server(name, args)
        try:
            for size in sizes:
                r = measure(server, args, size)
                r["server"] = label(name, args)
                rows.append(r)
                print(f"{r['server']}: {r['msgs_per_s']:,} msgs/s at {size} B "
                      f"(exactly once: {r['exactly_once']})", file=sys.stderr, flush=True)
        finally:
            server.stop()
    return rows


def run(args) -> int:
    names = args.against.split(",")
    rows = run_all(args, names)
    print(report.table(rows, COLUMNS))
    if args.json:
        report.write_json(args.json, {"command": " ".join(sys.argv), "results": rows})
    return 0 if all(r["exactly_once"] and not r["errors"] for r in rows) else 1
