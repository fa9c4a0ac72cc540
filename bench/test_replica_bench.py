"""Microbenchmarks of replication (_core/replica.py) beside the plain append, in
one run:

    .venv/bin/python -m pytest bench/test_replica_bench.py --benchmark-only

Each round is 10,000 100-byte records (64 recipients, the C path with the index,
as bench/test_log_bench.py; 104 bytes each, aligned) in one resident 256 MiB
segment. The append test times appending them; the shipping tests time only
LogTap.changes() and ReplicaLog.apply() of them (copied out of the mapping,
pwrite into the replica's file in the page cache; appended in the untimed
setup): in one batch, in batches of 50 (a loop turn's worth, cut by the byte
budget), encoded and decoded as they would travel, and with the replica's
sync() (fdatasync and its record) once per round. extra_info: ns per record
(min and median), records/s and MB/s of records shipped (from the min).
"""
import asyncio

import pytest

from _core._log import bench_append
from _core.log import AppendLog, LogConfig
from _core.replica import LogTap, ReplicaLog, decode, encode

from bench.test_log_bench import IDS, N, PAYLOAD

GROUP = "replicate 100-byte records x10000"
RECORD_BYTES = 104                      # each record as it lies in the segment (8-aligned)
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

    def append(self) -> None:
        bench_append(self.owner, N, PAYLOAD, IDS.take(N), index=True)

    def close(self) -> None:
        self.replica.close()
        self.owner.close()
        self.loop.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    p = Pair(tmp_path_factory.mktemp("replicabench"))
    yield p
    p.close()


def _report(benchmark) -> None:
    st = benchmark.stats.stats
    ns, median = st.min / N * 1e9, st.median / N * 1e9
    benchmark.extra_info.update(ns_per_record=round(ns, 1), ns_per_record_median=round(median, 1),
                                records_per_s=round(1e9 / ns), MB_per_s=round(RECORD_BYTES * 1e3 / ns, 1))


def test_append_with_index(benchmark, pair):
    benchmark.group = GROUP
    benchmark.pedantic(pair.append, rounds=30, iterations=1)
    _report(benchmark)


@pytest.mark.parametrize("per_batch,encoded,sync", [(N, False, False), (TURN, False, False), (TURN, True, False),
                                                    (N, False, True)],
                         ids=["one-batch", "batches-of-50", "batches-of-50-encoded", "one-batch-synced"])
def test_changes_and_apply(benchmark, pair, per_batch, encoded, sync):
    budget = per_batch * RECORD_BYTES

    def ship():
        while True:
            batch = pair.tap.changes(budget)
            if encoded:
                batch = decode(encode(batch))
            pair.replica.apply(batch, 1)
            if batch.complete:
                break
        if sync:
            pair.replica.sync()

    benchmark.group = GROUP
    benchmark.pedantic(ship, setup=pair.append, rounds=30, iterations=1)
    assert pair.replica.position() == pair.tap.position() == (pair.owner.active.segment_id, pair.owner.active.end)
    _report(benchmark)
