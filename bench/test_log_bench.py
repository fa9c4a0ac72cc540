"""Microbenchmarks of the durable log, side by side with a C memcpy floor.

    .venv/bin/python -m pytest bench/test_log_bench.py --benchmark-only

Each round appends 10,000 100-byte records (64 recipients) into one resident
segment; extra_info carries ns per record.
"""
import asyncio
import time

import pytest

from _core._log import bench_append, bench_memcpy, crc32c
from _core.log import AppendLog, LogConfig

N = 10_000
RECORD = 100
PAYLOAD = RECORD - (44 + 8 + 5 + 5)


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    loop = asyncio.new_event_loop()
    lg = AppendLog(tmp_path_factory.mktemp("logbench"), LogConfig(segment_size=1 << 30, max_pending=10**9))
    lg.open()
    lg.start(loop)
    yield lg
    lg.close()
    loop.close()


class Ids:
    def __init__(self):
        self.next = time.time_ns() // 1_000_000 << 22

    def take(self, n):
        first, self.next = self.next, self.next + n
        return first


IDS = Ids()


def _run(benchmark, fn, group):
    benchmark.group = group
    seconds = []

    def once():
        seconds.append(fn())
    benchmark.pedantic(once, rounds=30, iterations=1)
    benchmark.extra_info["ns_per_record"] = round(min(seconds) / N * 1e9, 1)


def test_memcpy_floor(benchmark, log):
    _run(benchmark, lambda: bench_memcpy(log.active, N, RECORD), "append 100-byte records x10000")


def test_append_record_only(benchmark, log):
    _run(benchmark, lambda: bench_append(log, N, PAYLOAD, IDS.take(N), index=False), "append 100-byte records x10000")


def test_append_with_index(benchmark, log):
    _run(benchmark, lambda: bench_append(log, N, PAYLOAD, IDS.take(N), index=True), "append 100-byte records x10000")


def test_append_python_api(benchmark, log):
    payload = b"p" * PAYLOAD
    users = [f"user{i:04d}" for i in range(64)]

    def run():
        first = IDS.take(N)
        t = time.perf_counter()
        for i in range(N):
            log.append(users[i & 63], first + i, 0, "alice", "phone", payload)
        return time.perf_counter() - t
    _run(benchmark, run, "append 100-byte records x10000")


def test_crc32c_100_bytes(benchmark):
    data = b"r" * 100
    benchmark.group = "crc32c"
    benchmark(crc32c, data)
