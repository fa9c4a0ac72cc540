"""Microbenchmarks of replication (_core/replica.py) beside the plain append, in
one run:

    .venv/bin/python -m pytest bench/test_replica_bench.py --benchmark-only

Each round appends 10,000 100-byte records (64 recipients, the C path with the
index, as bench/test_log_bench.py) into one resident 256 MiB segment. The
append test times that; the shipping tests time only LogTap.changes() and
ReplicaLog.apply() of those records (pwrite into the replica's file, page
cache): in one batch, in batches of 50 (a loop turn's worth), encoded and
decoded as they would travel, and with the replica's sync() (its fdatasync and
record) per batch of 10,000. extra_info: ns per record, records/s, MB/s of
records shipped.
"""
import asyncio
import time

import pytest

from _core._log import bench_append
from _core.log import AppendLog, LogConfig
from _core.replica import LogTap, ReplicaLog, decode, encode

from bench.test_log_bench import IDS, N, PAYLOAD, _run

GROUP = "replicate 100-byte records x10000"
TURN = 50


class Pair:
    def __init__(self, root):
        self.loop = asyncio.new_event_loop()
        # one 256 MiB segment holds every round: no roll (a new file) inside a timed region
        self.owner = AppendLog(root / "owner", LogConfig(segment_size=256 << 20, max_record=64 << 20,
                                                         max_pending=10**9))
        self.owner.open()
        self.owner.start(self.loop)
        self.replica = ReplicaLog(root / "replica", prepare_ahead=False)
        self.replica.open()
        self.tap = LogTap(self.owner)
        self.replica.apply(self.tap.changes(), 1)     # the segment's file, made before timing
        self.shipped = 0

    def ship(self, encoded: bool = False) -> None:
        batch = self.tap.changes(1 << 30)
        if encoded:
            batch = decode(encode(batch))
        self.replica.apply(batch, 1)
        self.shipped += batch.nbytes

    def close(self) -> None:
        self.replica.close()
        self.owner.close()
        self.loop.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    p = Pair(tmp_path_factory.mktemp("replicabench"))
    yield p
    p.close()


def _rates(benchmark, pair, shipped_before: int, rounds: int) -> None:
    ns = benchmark.extra_info["ns_per_record"]
    benchmark.extra_info["records_per_s"] = round(1e9 / ns)
    per_record = (pair.shipped - shipped_before) / (rounds * N) if pair.shipped > shipped_before else 0
    benchmark.extra_info["MB_per_s"] = round(per_record * 1e9 / ns / 1e6, 1)


def test_append_with_index(benchmark, pair):
    _run(benchmark, lambda: bench_append(pair.owner, N, PAYLOAD, IDS.take(N), index=True), GROUP)
    benchmark.extra_info["records_per_s"] = round(1e9 / benchmark.extra_info["ns_per_record"])


def _ship_in(pair, per_batch: int, encoded: bool = False, sync: bool = False):
    def run():
        spent = 0.0
        for first in range(0, N, per_batch):
            bench_append(pair.owner, per_batch, PAYLOAD, IDS.take(per_batch), index=True)
            t = time.perf_counter()
            pair.ship(encoded)
            if sync:
                pair.replica.sync()
            spent += time.perf_counter() - t
        return spent
    return run


@pytest.mark.parametrize("per_batch,encoded,sync", [(N, False, False), (TURN, False, False), (TURN, True, False),
                                                    (N, False, True)],
                         ids=["one-batch", "batches-of-50", "batches-of-50-encoded", "one-batch-synced"])
def test_changes_and_apply(benchmark, pair, per_batch, encoded, sync):
    before = pair.shipped
    _run(benchmark, _ship_in(pair, per_batch, encoded, sync), GROUP)
    _rates(benchmark, pair, before, 30)
