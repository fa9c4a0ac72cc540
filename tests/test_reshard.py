"""`switchboard reshard`: a data dir's 64 shards split offline into 1,024
(gateway/reshard.py, docs/cluster.md "Carrying a data dir over"). Real files
and processes: a Router on a ShardedLog in this process for the producer state,
`switchboard serve` and `switchboard reshard` as processes for the rest, kill -9
of the reshard at random moments, and a real NATS cluster for the last test."""
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _core import frames as F
from _core.log import PRODUCER_META, AppendLog, LogConfig, ShardedLog
from _core.protocol import GroupOp
from conftest import ROOT, start_gateway
from gateway.reshard import Reshard
from rawclient import Raw
from router import Router
from router.sharding import ShardMap, check_layout, shard_of
from test_shard_move import Peer, on_shard

OLD, NEW = 64, 1024


def reshard(data: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "gateway", "reshard", "--data-dir", str(data), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


class Stack:
    """One worker's stack on a data dir: a ShardedLog owning every shard and a Router
    (what test_shard_move's Node is, on a data dir with layout.json)."""

    def __init__(self, data: Path, shards: int = OLD, segment_size: int = 1 << 20):
        check_layout(data, shards)
        self.log = ShardedLog(data / "log", LogConfig(segment_size=segment_size, durability="never",
                                                      max_pending=100_000), ShardMap(shards, 1, 0))
        self.log.open()
        self.log.start(asyncio.get_running_loop())
        self.router = Router(self.log, loop=asyncio.get_running_loop())

    def close(self) -> None:
        self.log.close()


async def _until(pred, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_every_child_answers_each_send_as_its_parent_did(tmp_path):
    """The producer (dedup) state of one shard, split 16 ways: for every SEND ever
    stored (to recipients all over one old shard; some consumed and their segments
    deleted, so checkpoints hold their answers; a device that started a new producer
    half-way), the child of its recipient answers a retry exactly as the parent
    did (the original msg_id, or duplicate without one past the window), a new seq
    is new and the old producer stays fenced."""
    data = tmp_path / "d"
    k = 7
    # kept: in two of the 16 children, they read nothing; gone: in the other children, they read
    # everything, so their records are deleted (and a checkpoint is all that says where seqs went)
    both = on_shard(k, "u", 400)
    kept = [u for u in both if shard_of(u, NEW) in (k, k + OLD)][:24]
    gone = [u for u in both if shard_of(u, NEW) not in (k, k + OLD)][:24]
    assert len({shard_of(u, NEW) for u in gone}) >= 10 and len(kept) == 24
    young = on_shard(9, "young", 24)           # a shard that never deleted a record

    async def build():
        st = Stack(data)
        try:
            for u in gone + kept[:8]:
                Peer(st, u, "phone").leave()     # registered devices (the rest: the shared inbox)
            senders = [Peer(st, f"sender{i}", "dev") for i in range(3)]
            sent = {}                            # (device key, producer, seq) -> (recipient, msg_id)
            seqs = [0] * len(senders)

            async def burst(recipients, n, pad):
                for i in range(n):
                    j = i % len(senders)
                    seqs[j] += 1
                    to = recipients[(i // len(senders)) % len(recipients)]
                    senders[j].feed(F.Send(seqs[j], to, b"%d:" % seqs[j] + b"x" * pad))
                    sent[(f"sender{j}\x00dev", senders[j].session.producer, seqs[j])] = to
                for j, p in enumerate(senders):
                    await p.answers(F.Ack, seqs[j])
            await burst(gone, 900, 3000)          # about 3 segments of 1 MiB
            for u in gone:                        # read and acknowledged: their segments can go
                r = Peer(st, u, "phone")
                got = await r.answers(F.Deliver, sum(1 for v in sent.values() if v == u))
                r.feed(F.Received(tuple(d.msg_id for d in got)))
                r.leave()
            # another device fills the segment up to a roll (also read): every record of the
            # three senders to `gone` is then in segments that can be deleted
            lg = st.log.logs[k]
            filler, reader = Peer(st, "filler", "dev"), Peer(st, gone[0], "phone")
            first = lg.active.segment_id
            for seq in range(1, 2000):
                filler.feed(F.Send(seq, gone[0], b"f" * 8000))
                await filler.answers(F.Ack, seq)
                if lg.active.segment_id != first:
                    break
            got = await reader.answers(F.Deliver, seq)
            reader.feed(F.Received(tuple(d.msg_id for d in got)))
            reader.leave()
            await burst(kept + young, 300, 100)
            # sender0 restarts with no state: a new producer; its old one's records stay
            senders[0].leave()
            old = senders[0]
            senders[0] = Peer(st, "sender0", "dev")
            seqs[0] = 0
            await burst(kept + young, 30, 100)
            front = [seg.path for seg in lg.segments[:-1]]
            lg.maintain()
            await _until(lambda: not any(os.path.exists(p) for p in front), "front segments deleted")
            assert lg.meta_keys(PRODUCER_META), "no checkpoint was written"
            acks = {key: next(a for a in p.frames if isinstance(a, F.Ack) and a.seq == key[2])
                    for key in sent for p in [old, *senders] if p.session.producer == key[1]}
            return sent, {key: (a.msg_id, a.timestamp_ms) for key, a in acks.items()}
        finally:
            st.close()
    sent, acked = asyncio.run(build())

    last = {}
    for key, producer, seq in sent:
        last[(key, producer)] = max(seq, last.get((key, producer), 0))

    def answers(open_log) -> dict:
        """The verdict on a retry of every SEND, and on each device's next seq, at the
        log `open_log(recipient)` gives."""
        out = {}
        for (key, producer, seq), to in sent.items():
            lg = open_log(to)
            out[(key, producer, seq)] = lg.producers.admit_py(key, producer, seq)
            out[(key, producer, "next", to)] = lg.producers.admit_py(key, producer, last[(key, producer)] + 1)
        return out

    cfg = LogConfig(max_pending=100_000)
    parents = {s: AppendLog(data / "log" / f"shard-{s:04d}", cfg) for s in (k, 9)}
    for lg in parents.values():
        lg.open()
    assert not parents[9].meta_keys(PRODUCER_META)
    before = answers(lambda to: parents[shard_of(to, OLD)])
    for lg in parents.values():
        lg.close()
    # what the parents say: every stored SEND a duplicate, new seqs new, the old producer fenced
    # where the new one stored something
    old_producer = min(p for (key, p, _seq) in sent if key == "sender0\x00dev")
    replaced_in = {shard_of(to, OLD) for (key, p, _seq), to in sent.items()
                   if key == "sender0\x00dev" and p != old_producer}
    for (key, producer, seq), to in sent.items():
        verdict, msg_id, ts = before[(key, producer, seq)]
        if (key, producer) == ("sender0\x00dev", old_producer) and shard_of(to, OLD) in replaced_in:
            assert verdict == "fenced"
            continue
        assert verdict == "duplicate" and msg_id in (0, acked[(key, producer, seq)][0])
        assert before[(key, producer, "next", to)][0] == "new"

    Reshard(data, NEW, say=lambda line: None).run()
    children = {}

    def child(to):
        c = shard_of(to, NEW)
        if c not in children:
            children[c] = AppendLog(data / "log" / f"shard-{c:04d}", cfg)
            children[c].open()
        return children[c]
    after = answers(child)
    try:
        assert after == before
        # answers whose records were deleted (only a checkpoint proves them) kept their msg_id too
        from_checkpoints = sum(1 for (key, producer, seq), to in sent.items()
                               if to in gone and after[(key, producer, seq)][0] == "duplicate"
                               and after[(key, producer, seq)][1])
        assert from_checkpoints >= 100, from_checkpoints
    finally:
        for lg in children.values():
            lg.close()


def test_a_fan_out_resumed_after_the_split_copies_nothing_twice(tmp_path):
    """A group message whose fan-out was unfinished at the stop (a member's shard
    refused it for now) while another member had already read and acknowledged
    its copy: after the split the fan-out resumes, the waiting member gets its
    copy and the one who read it does not get it again (the consumed copy is
    carried, with no payload, for the dedup)."""
    data = tmp_path / "d"
    reader, = on_shard(7, "reader")
    waiting, = on_shard(9, "waiting")
    group, = on_shard(11, "team", group=True)

    async def before():
        st = Stack(data)
        try:
            Peer(st, waiting, "phone").leave()
            admin = Peer(st, "admin", "main")
            admin.feed(F.Group(1, GroupOp.CREATE, group, json.dumps({"members": [reader, waiting]})))
            await admin.answers(F.GroupInfo, 1)
            r = Peer(st, reader, "phone")
            await st.log.quiesce(9)                       # the waiting member's shard refuses for now
            admin.feed(F.Send(1, group, b"hello team"))
            await admin.answers(F.Ack, 1)
            copy, = await r.answers(F.Deliver, 1)
            r.feed(F.Received((copy.msg_id,)))
            r.leave()
            assert st.log.pending_count(reader, "phone") == 0 and st.log.pending_count(group) == 1
            return copy
        finally:
            st.close()
    copy = asyncio.run(before())
    Reshard(data, NEW, say=lambda line: None).run()

    async def after():
        st = Stack(data, NEW)
        try:
            assert st.log.pending_count(group) == 1       # still to fan out
            st.router.groups.recover()
            await _until(lambda: st.log.pending_count(group) == 0, "the fan-out to finish")
            got, = st.log.pending(waiting, "phone")
            assert (got.payload, got.ref, got.conversation) == (b"hello team", copy.origin_id, group)
            assert st.log.pending_count(reader, "phone") == 0 and list(st.log.pending(reader)) == []
        finally:
            st.close()
    asyncio.run(after())
