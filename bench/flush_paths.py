"""Flush paths on this disk: msync vs fdatasync vs pwrite+fdatasync of 64 x 100-byte records.

    python bench/flush_paths.py   (writes a 64 MiB file under the current directory)
"""
import os
import time
import statistics

from bench.segfile import prepared

path = "flushtest.seg"
fd, m = prepared(path)
rec = b"r" * 100
batch = 64
def run(method, n=400):
    pos = 0 if method == "warm" else run.pos
    times = []
    for i in range(n):
        data = rec * batch
        start = pos
        m[pos:pos + len(data)] = data
        pos += len(data)
        t = time.perf_counter()
        if method == "msync":
            pg = start & ~4095
            m.flush(pg, ((pos - pg + 4095) & ~4095))
        elif method == "fdatasync":
            os.fdatasync(fd)
        elif method == "pwrite+fdatasync":
            os.pwrite(fd, data, start)
            os.fdatasync(fd)
        elif method == "sync_file_range":
            os.sync_file_range(fd, start, pos - start, os.SYNC_FILE_RANGE_WAIT_BEFORE | os.SYNC_FILE_RANGE_WRITE | os.SYNC_FILE_RANGE_WAIT_AFTER) if hasattr(os, "sync_file_range") else None
            os.fdatasync(fd)
        times.append(time.perf_counter() - t)
    run.pos = pos
    return times
run.pos = 0
for method in ["msync", "fdatasync", "pwrite+fdatasync", "msync", "fdatasync", "pwrite+fdatasync"]:
    t = run(method)
    t.sort()
    print(f"{method:18s} mean {statistics.mean(t)*1e3:.3f} ms  p50 {t[len(t)//2]*1e3:.3f}  p99 {t[int(len(t)*.99)]*1e3:.3f}  -> {batch/statistics.mean(t):,.0f} rec/s")
m.close(); os.close(fd); os.unlink(path)
