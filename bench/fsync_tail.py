"""Tail latency of fdatasync on this disk (8,000 flushes of 45 records), mmap- vs pwrite-dirtied.

    python bench/fsync_tail.py   (writes a 64 MiB file under the current directory)
"""
import os
import time

from bench.segfile import prepared

path = "fsynctail.seg"
fd, m = prepared(path)
def run(kind, n=8000):
    pos = 0; times = []
    for i in range(n):
        data = b"r" * (104 * 45)
        if kind == "mmap":
            m[pos:pos + len(data)] = data
        else:
            os.pwrite(fd, data, pos)
        pos += len(data)
        t = time.perf_counter()
        os.fdatasync(fd)
        times.append(time.perf_counter() - t)
    times.sort()
    q = lambda x: times[int(x * len(times))] * 1e3
    print(f"{kind:6s} n={n} p50 {q(.5):.3f} p99 {q(.99):.3f} p999 {q(.999):.3f} max {times[-1]*1e3:.1f} ms")
run("mmap"); run("pwrite"); run("mmap")
m.close(); os.close(fd); os.unlink(path)
