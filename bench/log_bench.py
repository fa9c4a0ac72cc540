"""Benchmarks of the durable log (docs/benchmarks.md has the results).

    python bench/log_bench.py [--dir DIR] [--recovery-gib 1.0] [--seconds 5]

1. append: 100-byte records through the C append path, with and without the
   index, against a plain C memcpy loop into the same resident mapping.
2. group commit: loop turns of 64 appends each followed by commit(); ACK
   latency = append -> commit callback; per durability mode.
3. loop stall: duration of every log call made on the event loop (append
   batches, commit, maintenance, segment rolls) under sustained load.
4. recovery: seconds per GiB to open a log of 100-byte records, page cache
   dropped first (cold) when run as root, then warm.
"""
import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _core._log import bench_append, bench_memcpy, crc32c_hardware  # noqa: E402
from _core.log import AppendLog, LogConfig  # noqa: E402

RECORD = 100
PAYLOAD = RECORD - (44 + 8 + 5 + 5)      # fixed part + "userNNNN" + "alice" + "phone"


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def first_id():
    return time.time_ns() // 1_000_000 << 22


async def bench_append_paths(d, n=1_000_000, reps=3):
    log = AppendLog(d, LogConfig(segment_size=1 << 30, max_pending=10**9))
    log.open()
    log.start(asyncio.get_running_loop())
    rows = []
    for rep in range(reps):
        m = bench_memcpy(log.active, n, RECORD)
        base = first_id() + rep * 10 * n
        r = bench_append(log, n, PAYLOAD, base, index=False)
        a = bench_append(log, n, PAYLOAD, base + 3 * n, index=True)
        rows.append({"memcpy_ns": m / n * 1e9, "record_ns": r / n * 1e9, "append_ns": a / n * 1e9})
    log.close()
    best = {k: min(r[k] for r in rows) for k in rows[0]}
    best.update(records_per_s=1e9 / best["append_ns"], record_vs_memcpy=best["record_ns"] / best["memcpy_ns"],
                append_vs_memcpy=best["append_ns"] / best["memcpy_ns"])
    return best


async def bench_group_commit(d, durability, seconds, batch=64, rate=None):
    """Loop turns of appends + commit, as the router does per turn: closed loop
    (`batch` per turn, as fast as it goes) or open loop at `rate` msgs/s."""
    loop = asyncio.get_running_loop()
    log = AppendLog(d, LogConfig(segment_size=64 << 20, durability=durability, max_pending=10**9))
    log.open()
    log.start(loop)
    payload = b"p" * PAYLOAD
    latencies, call_ns = [], []
    acked = 0
    next_id = first_id()
    inflight = 0

    start = time.perf_counter()
    end = start + seconds
    produced = 0

    def done_n(arg):
        nonlocal acked, inflight
        t0, n = arg
        latencies.append(time.perf_counter() - t0)
        acked += n
        inflight -= 1

    while time.perf_counter() < end:
        if inflight > 64:                 # a router would stop reading; don't queue without bound
            await asyncio.sleep(0)
            continue
        t0 = time.perf_counter()
        n = batch if rate is None else min(1024, int((t0 - start) * rate) - produced)
        if n <= 0:
            await asyncio.sleep(0.0001)
            continue
        for i in range(n):
            log.append(f"user{i % 64:04d}", next_id, 0, "alice", "phone", payload)
            next_id += 1
        produced += n
        inflight += 1
        log.commit(done_n, (t0, n))
        call_ns.append(time.perf_counter() - t0)
        await asyncio.sleep(0)
    t_end = time.perf_counter()
    while inflight and time.perf_counter() < t_end + 10:
        await asyncio.sleep(0.001)
    elapsed = seconds
    stats = log.stats()
    log.close()
    return {"durability": durability, "offered_per_s": rate or "max", "acked_per_s": round(acked / elapsed), "ack_p50_ms": pct(latencies, .5) * 1e3,
            "ack_p99_ms": pct(latencies, .99) * 1e3, "ack_p999_ms": pct(latencies, .999) * 1e3,
            "syncs": stats["syncs"], "msgs_per_sync": round(acked / stats["syncs"]) if stats["syncs"] else None,
            "loop_call_p999_ms": pct(call_ns, .999) * 1e3, "loop_call_max_ms": max(call_ns) * 1e3,
            "stalls": stats["stalls"]}


async def bench_loop_stall(d, seconds, rate=300_000, batch=64):
    """Sustained appends with consumption, small segments (many rolls, deletes,
    compaction): how long does any single log call hold the loop?"""
    loop = asyncio.get_running_loop()
    log = AppendLog(d, LogConfig(segment_size=16 << 20, durability="interval", interval_ms=100,
                                 max_pending=10**9, compact_below=0.5))
    log.open()
    log.start(loop)
    payload = b"p" * PAYLOAD
    calls = []
    next_id = first_id()
    sent = []
    end = time.perf_counter() + seconds
    turn = batch / rate
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for i in range(batch):
            log.append(f"user{i % 1024:04d}", next_id, time.time_ns() // 1_000_000, "alice", "phone", payload)
            sent.append((f"user{i % 1024:04d}", next_id))
            next_id += 1
        if len(sent) > 50_000:                     # recipients acknowledge what is older
            for user, mid in sent[:batch]:
                log.consume(user, (mid,))
            del sent[:batch]
        calls.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        log.maintain()
        calls.append(time.perf_counter() - t1)
        await asyncio.sleep(max(0.0, turn - (time.perf_counter() - t0)))
    stats = log.stats()
    log.close()
    return {"calls": len(calls), "p50_ms": pct(calls, .5) * 1e3, "p99_ms": pct(calls, .99) * 1e3,
            "p999_ms": pct(calls, .999) * 1e3, "max_ms": max(calls) * 1e3, "segments_rolled": stats["segments"],
            "stalls": stats["stalls"], "batch": batch}


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


async def bench_recovery(d, gib):
    loop = asyncio.get_running_loop()
    seg = 256 << 20
    log = AppendLog(d, LogConfig(segment_size=seg, max_pending=10**9, durability="never"))
    log.open()
    log.start(loop)
    n = int(gib * (1 << 30) / 104)
    done = 0
    while done < n:
        step = min(200_000, n - done)
        bench_append(log, step, PAYLOAD, first_id() + done, index=True)
        done += step
        await asyncio.sleep(0)       # let the worker prepare the next segment
    log.close()
    out = {"records": n}
    for label in ("cold", "warm"):
        dropped = drop_caches() if label == "cold" else None
        log = AppendLog(d, LogConfig(segment_size=seg, max_pending=10**9))
        t = time.perf_counter()
        report = log.open()
        elapsed = time.perf_counter() - t
        out[label] = {"seconds": round(elapsed, 3), "seconds_per_gib": round(report.seconds_per_gib, 3),
                      "gib": round(report.bytes_scanned / (1 << 30), 3), "pending": report.pending,
                      **({"page_cache_dropped": dropped} if dropped is not None else {})}
        log.close()
    return out


async def main(args):
    base = Path(args.dir or tempfile.mkdtemp(prefix="sb-logbench-"))
    results = {"crc32c_hardware": crc32c_hardware()}

    def fresh(name):
        p = base / name
        shutil.rmtree(p, ignore_errors=True)
        return p
    try:
        results["append"] = await bench_append_paths(fresh("append"))
        print(json.dumps({"append": results["append"]}), flush=True)
        results["group_commit"] = []
        for mode, rate in (("always", None), ("always", 100_000), ("always", 200_000),
                           ("interval", None), ("never", None)):
            r = await bench_group_commit(fresh(f"gc-{mode}"), mode, args.seconds, rate=rate)
            results["group_commit"].append(r)
            print(json.dumps(r), flush=True)
        results["loop_stall"] = await bench_loop_stall(fresh("stall"), args.seconds)
        print(json.dumps({"loop_stall": results["loop_stall"]}), flush=True)
        if args.recovery_gib > 0:
            results["recovery"] = await bench_recovery(fresh("recovery"), args.recovery_gib)
            print(json.dumps({"recovery": results["recovery"]}), flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", help="where to write (default: a temporary directory, removed after)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--recovery-gib", type=float, default=1.0)
    ap.add_argument("--json")
    asyncio.run(main(ap.parse_args()))
