"""`switchboard bench density`: how many idle authenticated sessions a server
holds, and what each one costs.

Sessions are opened in steps by many client processes (a process may hold
20,000 files, and each binds its own 127.0.0.x source address so ports never
run out). After each step: server memory (RSS and USS summed over its
processes, minus the baseline before any session), kernel memory (slab, TCP
buffer pages; both ends of loopback connections count), connect rate, failed
connects with reasons, server CPU while the sessions sit idle sending
keepalive PINGs, and a round-trip check on a sample of sessions. At the end
every session is PINGed and must answer."""
import json
import math
import queue
import subprocess
import sys
import threading
import time

from . import peers, procstat, report

PER_CLIENT = 19_000            # under the 20,000 open-files cap, with room for the process's own files


class ClientProcs:
    """The density client processes, driven by JSON lines."""

    def __init__(self, server, count: int, args):
        self.procs = []
        self.replies: queue.Queue = queue.Queue()
        self.progress = [0] * count
        for i in range(count):
            src = f"127.0.{1 + (i + 1) // 250}.{1 + (i + 1) % 250}"
            cmd = [sys.executable, "-m", "bench.density_client", "--dialect", server.dialect,
                   "--host", server.host, "--port", str(server.port), "--src", src, "--prefix", f"c{i}u",
                   "--ping-interval", str(args.ping_interval), "--concurrency", str(args.concurrency)]
            if server.data_dir:
                cmd += ["--data-dir", server.data_dir]
            p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=peers.ROOT)
            self.procs.append(p)
            threading.Thread(target=self._read, args=(i, p), daemon=True).start()
        self.collect(lambda i: None, timeout=60)        # each says it is ready

    def _read(self, i, p):
        for line in p.stdout:
            msg = json.loads(line)
            if "progress" in msg:
                self.progress[i] = msg["progress"]
            else:
                self.replies.put((i, msg))
        self.replies.put((i, {"error": f"client {i} exited with {p.wait()}"}))

    def collect(self, on_progress, timeout: float) -> list[dict]:
        out = [None] * len(self.procs)
        deadline = time.monotonic() + timeout
        while any(r is None for r in out):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("density clients did not answer in time")
            try:
                i, msg = self.replies.get(timeout=min(left, 0.25))
            except queue.Empty:
                on_progress(sum(self.progress))
                continue
            if "error" in msg:
                raise RuntimeError(msg["error"])
            out[i] = msg
        return out

    def command(self, per_client: list[dict], on_progress=lambda n: None, timeout: float = 600) -> list[dict]:
        for p, cmd in zip(self.procs, per_client):
            p.stdin.write(json.dumps(cmd) + "\n")
            p.stdin.flush()
        return self.collect(on_progress, timeout)

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.write('{"op": "exit"}\n')
                p.stdin.flush()
            except OSError:
                pass
        deadline = time.monotonic() + 30
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _steps(target: int, step: int) -> list[int]:
    out, n = [], 0
    while n < target:
        n = min(target, n + step)
        out.append(n)
    return out


def _split(n: int, k: int) -> list[int]:
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _settled_memory(pids, timeout: float = 30.0) -> dict:
    """Server memory once it stops moving (the log prepares spare segments on
    a thread after the first appends): two samples 0.5 s apart within 0.5%."""
    deadline = time.monotonic() + timeout
    prev = procstat.memory(pids)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        cur = procstat.memory(pids)
        if abs(cur["rss"] - prev["rss"]) <= 0.005 * prev["rss"]:
            return cur
        prev = cur
    return prev


def measure(server, args, progress_label: str | None = None) -> dict:
    """Ramp `server` to args.sessions idle sessions; one row per step."""
    clients_needed = max(args.clients or 0, math.ceil(args.sessions / PER_CLIENT))
    pids = server.pids()
    start_mem = procstat.memory(pids)
    clients = ClientProcs(server, clients_needed, args)
    rows, failed_total = [], {}
    have = 0
    try:
        # Warm-up: a few sessions per client touch every shard's log once (a
        # worker maps its first segments then). The baseline is taken after them
        # so that per-session numbers are per session; the fixed cost is reported.
        warm = clients.command([{"op": "open", "n": args.warmup // clients_needed or 1}] * clients_needed)
        warm_n = sum(r["live"] for r in warm)
        mem0 = _settled_memory(pids)
        kern0 = procstat.kernel()
        bar = report.Progress(args.sessions, progress_label or server.name)
        have = 0
        for target in _steps(args.sessions, args.step):
            want = target - have
            t0 = time.perf_counter()
            replies = clients.command([{"op": "open", "n": k} for k in _split(want, clients_needed)],
                                      on_progress=lambda n: bar.update(max(0, n - warm_n)), timeout=args.step_timeout)
            secs = time.perf_counter() - t0
            opened = sum(r["opened"] for r in replies)
            live = sum(r["live"] for r in replies) - warm_n
            failed = {}
            for r in replies:
                for reason, c in r["failed"].items():
                    failed[reason] = failed.get(reason, 0) + c
                    failed_total[reason] = failed_total.get(reason, 0) + c
            bar.update(live)
            cpu0 = procstat.cpu_seconds(pids)
            t_idle = time.perf_counter()
            checks = clients.command([{"op": "check", "pairs": max(1, args.check // clients_needed), "timeout": 10}
                                      for _ in range(clients_needed)])
            time.sleep(max(0.0, args.idle_window - (time.perf_counter() - t_idle)))
            idle_cpu = (procstat.cpu_seconds(pids) - cpu0) / (time.perf_counter() - t_idle)
            mem, kern = procstat.memory(pids), procstat.kernel()
            rtts = sorted(x for c in checks for x in c["rtt_ms"])
            lost = {}
            for r in replies:
                for reason, c in r["lost"].items():
                    lost[reason] = lost.get(reason, 0) + c
            row = {
                "sessions": live, "opened": opened, "failed": sum(failed.values()), "failed_reasons": failed,
                "lost": sum(lost.values()), "lost_reasons": lost,
                "connect_secs": round(secs, 3), "connects_per_s": round(opened / secs) if secs else None,
                "server_rss_delta": mem["rss"] - mem0["rss"], "server_uss_delta": mem["uss"] - mem0["uss"],
                "server_anon_delta": mem["anon"] - mem0["anon"], "server_file_delta": mem["file"] - mem0["file"],
                "anon_per_session": (mem["anon"] - mem0["anon"]) / max(live, 1),
                "file_per_session": (mem["file"] - mem0["file"]) / max(live, 1),
                "rss_per_session": (mem["rss"] - mem0["rss"]) / max(live, 1),
                "uss_per_session": (mem["uss"] - mem0["uss"]) / max(live, 1),
                "kernel_delta": kern["slab_bytes"] - kern0["slab_bytes"] + kern["tcp_mem_bytes"] - kern0["tcp_mem_bytes"],
                "tcp_sockets": kern["tcp_inuse"], "mem_available": kern["mem_available"],
                "idle_cpu_pct": round(100 * idle_cpu, 1),
                "check_ok": sum(c["ok"] for c in checks), "check_failed": sum(c["failed"] for c in checks),
                "check_rtt_p50_ms": rtts[len(rtts) // 2] if rtts else None,
            }
            row["kernel_per_session"] = row["kernel_delta"] / max(live, 1)
            if rows:
                prev = rows[-1]
                grown = live - prev["sessions"]
                row["marginal_anon_per_session"] = ((row["server_anon_delta"] - prev["server_anon_delta"]) / grown
                                                    if grown > 0 else None)
            rows.append(row)
            have = target
        bar.close()
        pinged = clients.command([{"op": "ping_all", "timeout": 60} for _ in range(clients_needed)], timeout=120)
    finally:
        clients.close()
    return {
        "server": server.name, "server_processes": len(pids), "client_processes": clients_needed,
        "start_rss": start_mem["rss"], "warmup_sessions": warm_n,
        "baseline_rss": mem0["rss"], "baseline_uss": mem0["uss"], "steps": rows,
        "failed_reasons": failed_total,
        "final_sessions": sum(p["sessions"] for p in pinged) - warm_n,
        "final_answered": sum(p["answered"] for p in pinged) - warm_n,
    }


COLUMNS = [("sessions", "sessions", ","), ("connects_per_s", "conn/s", ","), ("failed", "failed", ","),
           ("lost", "lost", ","),
           ("anon_per_session", "heap B/sess", ",.0f"), ("marginal_anon_per_session", "marginal", ",.0f"),
           ("file_per_session", "mapped B/sess", ",.0f"), ("uss_per_session", "USS B/sess", ",.0f"),
           ("kernel_per_session", "kernel B", ",.0f"),
           ("idle_cpu_pct", "idle CPU%", ".1f"), ("check_ok", "checks ok", ","),
           ("check_rtt_p50_ms", "rtt p50 ms", ".2f")]


def summary(result: dict) -> str:
    lines = [f"{result['server']}: {result['server_processes']} server processes, "
             f"{result['client_processes']} client processes",
             report.table(result["steps"], COLUMNS),
             f"final PING: {result['final_answered']:,} of {result['final_sessions']:,} sessions answered"]
    if result["failed_reasons"]:
        lines.append("failed connects: " + ", ".join(f"{k} x{v}" for k, v in result["failed_reasons"].items()))
    lost = result["steps"][-1].get("lost_reasons") if result["steps"] else None
    if lost:
        lines.append("sessions closed by the server: " + ", ".join(f"{k} x{v}" for k, v in lost.items()))
    return "\n".join(lines)


def run(args) -> int:
    """The `bench density` command."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = map(int, f.read().split())
        if hi - lo < 30_000:
            print(f"note: ephemeral ports {lo}-{hi}; each client uses its own source address, so this is enough "
                  "for 19,000 sessions per client", file=sys.stderr)
    except OSError:
        pass
    results = []
    targets = args.against.split(",") if args.against else ["switchboard"]
    for name in targets:
        server = peers.open_server(name, args)
        try:
            results.append(measure(server, args, name))
        finally:
            server.stop()
        print(summary(results[-1]), flush=True)
    base = next((r for r in results if r["server"] == "floor"), None)
    if base and len(results) > 1:
        b = base["steps"][-1]["anon_per_session"]
        for r in results:
            print(f"{r['server']:>12}: {r['steps'][-1]['anon_per_session'] / b:5.2f}x the floor's heap bytes per session")
    if args.json:
        report.write_json(args.json, {"command": " ".join(sys.argv), "results": results})
    if args.plot:
        why = report.plot_density(args.plot, {r["server"]: r["steps"] for r in results})
        if why:
            print(f"no plot: {why}", file=sys.stderr)
    ok = all(r["final_answered"] >= r["final_sessions"] == args.sessions and r["failed_reasons"] == {}
             for r in results)
    return 0 if ok else 1
