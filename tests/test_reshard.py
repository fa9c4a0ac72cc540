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
from _core.codec import encode
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
            sent = {}                            # (device key, producer, seq) -> recipient
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


# -- a real gateway, stopped, resharded, started again ----------------------------------------

RESHARD_ARGS = ("--segment-size", "256K")         # tests: small first segments for 1,024 shards
SERVE_ARGS = ("--segment-size", "256K", "--log-spares", "0", "--msg-rate", "0")

RECIPIENTS = [f"r{i}" for i in range(200)]
TWO_DEVICES = RECIPIENTS[:20]                     # phone and laptop
READERS = RECIPIENTS[:50]                         # their phones read everything before the stop
MEMBERS = [f"m{i}" for i in range(10)]
PER = 3                                           # messages from alice's bot to each recipient


def _devices(user: str) -> list[str]:
    return ["phone", "laptop"] if user in TWO_DEVICES else ["phone"]


def _sends() -> list[tuple[int, str, bytes]]:
    """(seq, recipient, payload) of every SEND of alice's bot, in seq order."""
    out = []
    for j in range(PER):
        for u in RECIPIENTS:
            out.append((len(out) + 1, u, f"{u}-{j}".encode()))
    return out


def populate(gw) -> dict:
    """A single gateway's life before the split; returns what must survive it."""
    async def main():
        for u in RECIPIENTS + MEMBERS + ["alice", "dave"]:
            for dev in (_devices(u) if u in RECIPIENTS else ["phone"]):
                async with gw.client(u, dev):
                    pass                                            # registered devices, offline
        async with gw.client("carol", "phone") as c:
            await c.set_privacy(hide_last_seen=True)
            await c.ping()
        async with gw.client("bob", "phone") as b:
            await b.group("create", "#team", name="Team", members=MEMBERS)
            group_acks = [await b.send("#team", f"g{i}") for i in (1, 2)]
        for m in MEMBERS[:5]:                                       # half the members read theirs
            async with gw.client(m, "phone") as c:
                got = [await c.recv(timeout=10) for _ in range(2)]
                assert [x.text for x in got] == ["g1", "g2"]
                await c.ack(*got)
                await c.ping()
        async with gw.client("erin", "phone") as e:
            await e.subscribe("dave", "carol")
            seen = {p.user: p for p in [await e.recv_presence(timeout=10) for _ in range(2)]}
        return group_acks, seen
    group_acks, seen = asyncio.run(main())
    # alice's bot: a producer whose SENDs are all ACKed (pipelined, over a raw socket)
    with Raw(gw, timeout=20) as r:
        welcome = r.hello(gw.token("alice"), device="bot", send_only=True)
        sends = _sends()
        r.send(b"".join(encode(F.Send(seq, to, payload)) for seq, to, payload in sends))
        acks = {}
        while len(acks) < len(sends):
            a = r.frame()
            assert isinstance(a, F.Ack), a
            acks[a.seq] = (a.msg_id, a.timestamp_ms)
    # some recipients' phones read everything: their messages are consumed (receipts for alice)
    async def read():
        for u in READERS:
            async with gw.client(u, "phone") as c:
                got = [await c.recv(timeout=10) for _ in range(PER)]
                assert [x.text for x in got] == [f"{u}-{j}" for j in range(PER)]
                await c.ack(*got)
                await c.ping()
    asyncio.run(read())
    assert seen["carol"].last_seen_ms == 0 and seen["dave"].last_seen_ms > 0
    return {"producer": welcome.producer, "acks": acks, "group": [a.id for a in group_acks],
            "dave_seen": seen["dave"].last_seen_ms}


async def _inbox(gw, user: str, device: str, n: int, timeout: float = 20.0) -> list:
    """A fresh session of (user, device) (`gw.client`): its first n messages; then nothing
    else is waiting (a PONG follows every backlog entry). Nothing is acknowledged."""
    async with gw.client(user, device) as c:
        got = []
        for _ in range(n):
            try:
                got.append(await c.recv(timeout=timeout))
            except asyncio.TimeoutError:
                raise AssertionError(f"{user}/{device}: {len(got)} of {n} messages: "
                                     f"{[m.text for m in got]}") from None
        await c.ping()
        with pytest.raises(asyncio.TimeoutError):
            got.append(await c.recv(timeout=0.05))
        return got


async def _gather(coros, at_once: int = 40) -> list:
    out = []
    for i in range(0, len(coros), at_once):
        out += await asyncio.gather(*coros[i:i + at_once])
    return out


def check_after(gw, before: dict, new_seq: bool = True) -> None:
    """Everything `populate` left is there after the split, exactly once and in order;
    a retry of ACKed SENDs gets the original ACKs; the next seq is accepted; the group works."""
    acks, sends = before["acks"], _sends()
    with Raw(gw, timeout=20) as r:
        assert r.hello(gw.token("alice"), device="bot", send_only=True,
                       producer=before["producer"]).producer == before["producer"]
        # the newest seqs (a client resends only its unanswered ones, at most the send window)
        # get their original ACKs; older ones are still known as stored (msg_id 0 past the window)
        n = len(sends)
        retry = [1, 2, n - 250, 2 * len(RECIPIENTS) + 31, n - 100, n - 1, n]      # (the 4th: to r30, read)
        assert sends[retry[3] - 1][1] == "r30" and "r30" in READERS and "r30" not in TWO_DEVICES
        r.send(b"".join(encode(F.Send(*sends[s - 1])) for s in retry))
        answers = {a.seq: (a.msg_id, a.timestamp_ms) for a in (r.frame() for _ in retry)}
        assert {s: answers[s] for s in retry[2:]} == {s: acks[s] for s in retry[2:]}
        assert all(answers[s] in (acks[s], (0, 0)) for s in retry[:2]), answers
        if new_seq:
            nxt = len(sends) + 1
            r.send(encode(F.Send(nxt, "r0", b"after the split")))
            a = r.frame()
            assert isinstance(a, F.Ack) and a.seq == nxt and a.msg_id > max(i for i, _ in acks.values())

    expected = {}
    by_user = {}
    for seq, to, payload in sends:
        by_user.setdefault(to, []).append((acks[seq][0], payload.decode()))
    for u in RECIPIENTS:
        for dev in _devices(u):
            want = [] if (u in READERS and dev == "phone") else list(by_user[u])
            if u == "r0" and new_seq:
                want.append((None, "after the split"))
            expected[(u, dev)] = want

    async def main():
        keys = sorted(expected)
        got = await _gather([_inbox(gw, u, dev, len(expected[(u, dev)])) for u, dev in keys])
        for key, msgs in zip(keys, got):
            assert [(m.id if i is not None else None, m.text) for m, (i, _) in zip(msgs, expected[key])] \
                == expected[key], key
            assert all(a.id < b.id for a, b in zip(msgs, msgs[1:])), key      # in id order
        # alice's phone: a mirror of every SEND once, and the DELIVERED receipts of what was read
        async with gw.client("alice", "phone") as c:
            mirrors = [await c.recv(timeout=20) for _ in range(len(sends) + new_seq)]
            # (in the order they were made: the recipients' workers ACKed in their own order)
            assert sorted((m.origin_id, m.peer, m.text) for m in mirrors[:len(sends)]) == \
                sorted((acks[s][0], to, payload.decode()) for s, to, payload in sends)
            assert all(a.id < b.id for a, b in zip(mirrors, mirrors[1:]))
            receipts = [await c.recv_receipt(timeout=20) for _ in range(len(READERS) * PER)]
            read_ids = {acks[s][0] for s, to, _ in sends if to in READERS}
            assert {(x.msg_id, x.by, x.by_device, x.kind) for x in receipts} == \
                {(i, to, "phone", "delivered") for s, to, _ in sends if to in READERS for i in [acks[s][0]]}
            assert len({x.msg_id for x in receipts}) == len(read_ids)
        # last seen and privacy
        async with gw.client("erin", "phone") as e:
            await e.subscribe("dave", "carol")
            seen = {p.user: p for p in [await e.recv_presence(timeout=10) for _ in range(2)]}
            assert seen["dave"].last_seen_ms == before["dave_seen"] and seen["carol"].last_seen_ms == 0
        # the group: the unread copies, then a new message to everyone
        async with gw.client("bob", "phone") as b:
            info = await b.group("info", "#team")
            assert set(info["members"]) == {"bob", *MEMBERS} and info["name"] == "Team"
            await b.send("#team", "g3")
        got = await _gather([_inbox(gw, m, "phone", 1 if m in MEMBERS[:5] else 3) for m in MEMBERS])
        for m, msgs in zip(MEMBERS, got):
            assert [x.text for x in msgs] == (["g3"] if m in MEMBERS[:5] else ["g1", "g2", "g3"]), m
            assert all(x.group == "#team" for x in msgs)
            assert [x.origin_id for x in msgs[:-1]] == ([] if m in MEMBERS[:5] else before["group"])
    asyncio.run(asyncio.wait_for(main(), 240))


def test_a_gateway_resharded_to_1024_keeps_everything(tmp_path):
    data = tmp_path / "data"
    gw = start_gateway(data, "--workers", "2", *SERVE_ARGS)
    try:
        before = populate(gw)
    finally:
        assert gw.stop() == 0
    layout = json.loads((data / "layout.json").read_text())
    assert layout["shards"] == OLD
    files = sorted(p.relative_to(data) for p in data.rglob("*"))

    dry = reshard(data, "--shards", str(NEW), "--dry-run", *RESHARD_ARGS)
    assert "dry run" in dry.stdout and sorted(p.relative_to(data) for p in data.rglob("*")) == files
    r = reshard(data, "--shards", str(NEW), "--json", *RESHARD_ARGS)
    summary = json.loads(r.stdout)
    phases = [line.split(":")[0] for line in r.stderr.splitlines()]
    assert phases == ["reshard", "split", "commit", "swap"], r.stderr
    unread = sum(len(_devices(u)) * PER for u in RECIPIENTS) - len(READERS) * PER
    assert summary["shards_in"] == OLD and summary["shards_out"] == NEW
    assert summary["messages"] >= unread and summary["devices"] >= 230 and summary["groups"] == 1
    assert json.loads((data / "layout.json").read_text())["shards"] == NEW
    assert not (data / "reshard.tmp").exists()
    names = {p.name for p in (data / "log").iterdir()}
    assert names and all(int(n[len("shard-"):]) < NEW for n in names) and any(int(n[6:]) >= OLD for n in names)
    again = reshard(data, "--shards", str(NEW))
    assert "nothing to do" in again.stdout

    gw = start_gateway(data, "--workers", "3", *SERVE_ARGS, timeout=60)
    try:
        check_after(gw, before)
    finally:
        assert gw.stop() == 0


def _tree(root: Path) -> dict:
    """Every file under `root`: its bytes' digest (of a LOCK file only that it is there: the
    pid in it is a note for error messages, written by whoever takes the lock)."""
    import xxhash
    return {str(p.relative_to(root)): "" if p.name == "LOCK" else xxhash.xxh3_64_hexdigest(p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode == 1 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in line and line.startswith("switchboard reshard: "), r.stderr
    for w in words:
        assert w in line, line
    return line


def test_refusals_leave_the_data_dir_untouched(tmp_path):
    data = tmp_path / "data"
    gw = start_gateway(data, "--workers", "1", *SERVE_ARGS)
    try:
        async def main():
            async with gw.client("alice", "phone") as a:
                for i in range(20):
                    await a.send(f"bob{i}", f"hi {i}")
        asyncio.run(main())
        # the gateway holds the data dir
        _refused(reshard(data, "--shards", str(NEW), check=False), "in use by a gateway", f"pid {gw.proc.pid}",
                 "stop it first")
        assert not (data / "reshard.tmp").exists()
        assert json.loads((data / "layout.json").read_text())["shards"] == OLD
    finally:
        assert gw.stop() == 0
    before = _tree(data)
    for n, words in ((1000, ("not a power of two",)), (96, ("not a power of two",)),
                     (32, ("fewer than", "64 shards", "merged")), (131072, ("must be from 1 to 65536",))):
        _refused(reshard(data, "--shards", str(n), check=False), *words)
    assert _tree(data) == before
    # a worker of a gateway that is going away still holds a shard
    from _core.dirlock import DirLock
    held = DirLock(next((data / "log").iterdir())).acquire()
    try:
        _refused(reshard(data, "--shards", str(NEW), check=False), "in use by another process", str(os.getpid()))
    finally:
        held.release()
    assert _tree(data) == before
    # not a data dir
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(reshard(empty, "--shards", str(NEW), check=False), "has no layout.json")
    assert list(empty.iterdir()) == []
    _refused(reshard(tmp_path / "nowhere", "--shards", str(NEW), check=False), "no data dir")
    # a node of a 1,024-shard cluster is refused this data dir with the command that splits it
    from router.sharding import LayoutError
    with pytest.raises(LayoutError, match=f"split them first with `switchboard reshard --data-dir {data} "
                                          f"--shards {NEW}`"):
        check_layout(data, NEW)
    with pytest.raises(LayoutError, match="can only be split into a power-of-two multiple"):
        check_layout(data, 32)
    # the count it has: nothing to do
    r = reshard(data, "--shards", str(OLD))
    assert "nothing to do" in r.stdout and r.stderr == ""
    assert _tree(data) == before


# -- kill -9 at any moment: the old data dir or the new one ---------------------------------------

def contents(data: Path) -> tuple[int, dict, dict]:
    """(shard count, every inbox's entries, state) of a stopped data dir, read with the log's
    recovery: inbox (user, device) -> [(msg_id, ts, sender, device, payload, ref, flags,
    conversation)]; state: group and privacy records, and which devices are registered."""
    shards = json.loads((data / "layout.json").read_text())["shards"]
    inboxes, state = {}, {}
    for d in sorted((data / "log").glob("shard-*")):
        s = int(d.name[len("shard-"):])
        if not any(d.glob("*.seg")):
            continue
        lg = AppendLog(d, LogConfig(max_pending=1 << 30))
        lg.open()
        try:
            for key in lg.recipients():
                user, _, dev = key.partition("\x00")
                assert shard_of(user, shards) == s, (key, s)
                rows = [lg.message_at(loc) for _, loc in lg.inbox_entries(key)]
                inboxes[(user, dev)] = [(r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9]) for r in rows]
            for key in lg.meta_keys(""):
                if key.startswith(("g\x00", "p\x00")):
                    state[key] = lg.meta_get(key)
                elif key.startswith("d\x00"):
                    state[key] = "registered"
        finally:
            lg.close()
    return shards, inboxes, state


def build_data_dir(data: Path, users: int = 1500, messages: int = 30_000, size: int = 300) -> None:
    """A single gateway's data dir, made by its stack in this process (faster than over
    sockets): devices, messages (some read), a group, privacy."""
    async def main():
        st = Stack(data)
        try:
            names = [f"k{i}" for i in range(users)]
            for u in names[:users // 3]:
                Peer(st, u, "phone").leave()
            for u in names[:50]:
                Peer(st, u, "laptop").leave()
            senders = [Peer(st, f"ks{i}", "dev") for i in range(10)]
            seqs = [0] * len(senders)
            for i in range(messages):
                j = i % len(senders)
                seqs[j] += 1
                senders[j].feed(F.Send(seqs[j], names[(i * 7) % users], os.urandom(size)))
                if i % 2000 == 1999 or i == messages - 1:
                    for p, n in zip(senders, seqs):
                        await p.answers(F.Ack, n)
            for u in names[:40]:                  # some read theirs
                r = Peer(st, u, "phone")
                await r.until(lambda fs: st.log.pending_count(u, "phone") == sum(isinstance(f, F.Deliver) for f in fs))
                r.feed(F.Received(tuple(f.msg_id for f in r.frames if isinstance(f, F.Deliver))))
                r.leave()
            admin = senders[0]
            admin.feed(F.Group(1, GroupOp.CREATE, "#kteam", json.dumps({"members": names[:30]})))
            await admin.answers(F.GroupInfo, 1)
            admin.feed(F.Send(seqs[0] + 1, "#kteam", b"to the team"))
            await admin.answer_to(seqs[0] + 1)
            privacy = Peer(st, names[5], "phone")
            privacy.feed(F.Privacy(True))
            await _until(lambda: st.log.meta_get_for(names[5], f"p\x00{names[5]}") is not None, "privacy")
            privacy.leave()
        finally:
            st.close()
    asyncio.run(main())


def _same(data: Path, expected: tuple, shards: int) -> None:
    got = contents(data)
    assert got[0] == shards
    assert got[1] == expected[1]
    assert got[2] == expected[2]


def _sample_via_gateway(data: Path, expected: tuple, users: list) -> None:
    """A real gateway on the dir (it finishes a committed reshard first): the sampled
    users' devices get exactly their stored messages, in order (nothing acknowledged)."""
    gw = start_gateway(data, "--workers", "2", *SERVE_ARGS, timeout=60)
    try:
        async def main():
            keys = [k for k in sorted(expected[1]) if k[0] in users and k[1]]
            got = await _gather([_inbox(gw, u, dev, len(expected[1][(u, dev)])) for u, dev in keys])
            for key, msgs in zip(keys, got):
                assert [(m.id, m.payload) for m in msgs] == [(r[0], r[4]) for r in expected[1][key]], key
        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        assert gw.stop() == 0
    return gw.text


def test_kill_9_at_random_moments_leaves_the_old_or_the_new_data_dir(tmp_path):
    pristine = tmp_path / "pristine"
    build_data_dir(pristine, users=600, messages=10_000)       # (each run reads it back twice)
    expected = contents(pristine)
    assert expected[0] == OLD and sum(map(len, expected[1].values())) > 8_000
    sample = [f"k{i}" for i in range(0, 600, 37)] + ["k0", "k45"]       # (k0-k39 read theirs)
    # one run to time it
    data = tmp_path / "timed"
    import shutil
    shutil.copytree(pristine, data)
    t0 = time.monotonic()
    reshard(data, "--shards", str(NEW), *RESHARD_ARGS)
    duration = time.monotonic() - t0
    _same(data, expected, NEW)
    rng = random.Random(int(os.environ.get("SWITCHBOARD_TEST_SEED", "20240")))
    outcomes = []
    for i in range(4):
        data = tmp_path / f"kill{i}"
        shutil.copytree(pristine, data)
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "reshard", "--data-dir", str(data), "--shards",
                                 str(NEW), *RESHARD_ARGS], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if i < 3:
            delay = rng.uniform(0.1, 0.7) * duration       # a random moment of its run (mostly the split)
            try:
                proc.wait(delay)
            except subprocess.TimeoutExpired:
                pass
        else:                                              # as soon as it committed: in its renames
            deadline = time.monotonic() + 60
            while b'"shards": 1024' not in (data / "layout.json").read_bytes() and proc.poll() is None:
                assert time.monotonic() < deadline, "no commit"
            delay = -1.0
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        layout = json.loads((data / "layout.json").read_text())
        outcomes.append((round(delay, 2), proc.returncode, layout["shards"], "reshard" in layout))
        # the gateway works on what the kill left: the old shards, or the new ones (a committed
        # reshard's renames finished at its start)
        text = _sample_via_gateway(data, expected, sample)
        now = json.loads((data / "layout.json").read_text())["shards"]
        assert now == layout["shards"] and not (data / "reshard.tmp").exists(), (outcomes[-1], text[-2000:])
        _same(data, expected, now)
        # and a rerun ends with the new ones
        r = reshard(data, "--shards", str(NEW), *RESHARD_ARGS)
        assert ("nothing to do" in r.stdout) == (now == NEW), r.stdout
        _same(data, expected, NEW)
    print("kill outcomes (delay s, exit, shards, mark):", outcomes, "full run", round(duration, 2), "s")
    # (a run faster than the timed one may end before its moment comes: the machine is shared)
    assert sum(o[1] == -signal.SIGKILL for o in outcomes) >= 2, outcomes


def test_each_state_a_kill_can_leave_is_settled_by_the_gateway_or_a_rerun(tmp_path):
    """The states between the phases, made with the phases themselves (Reshard.check,
    split, commit) and left as a kill leaves them: an uncommitted split (a gateway's start
    removes it: its copies would go stale), a commit with no rename done, and a commit
    with the first rename done (the gateway's start, or a rerun, finishes it)."""
    import shutil
    pristine = tmp_path / "pristine"
    build_data_dir(pristine, users=300, messages=3000)
    expected = contents(pristine)

    def left_by(name: str, phase: str) -> Path:
        """A copy of the data dir, with the phases up to `phase` run on it, then stopped."""
        data = tmp_path / name
        shutil.copytree(pristine, data)
        job = Reshard(data, NEW, segment_size=256 << 10, say=lambda line: None)
        try:
            assert job.check()
            job.split()
            if phase == "commit":
                job.commit()
        finally:
            job.close()                  # what the kernel does for a killed process: the locks go
        assert ("reshard" in json.loads((data / "layout.json").read_text())) == (phase == "commit")
        assert (data / "reshard.tmp" / "done").is_dir()
        return data

    for name, phase, settled, shards in (("uncommitted", "split", "abandoned", OLD),
                                         ("committed", "commit", "finished", NEW)):
        data = left_by(name, phase)
        text = _sample_via_gateway(data, expected, ["k1", "k77", "k200"])
        assert f"event=reshard_{settled}" in text and not (data / "reshard.tmp").exists()
        _same(data, expected, shards)

    data = left_by("half-renamed", "commit")
    os.rename(data / "log", data / "reshard.tmp" / "old-log")       # the first of the two renames
    r = reshard(data, "--shards", str(NEW))
    assert "finish: completed the reshard to 1024 shards" in r.stdout and "nothing to do" in r.stdout, r.stdout
    assert json.loads((data / "layout.json").read_text()) == {"version": 1, "hash": "xxh3_64", "seed": 0,
                                                                 "shards": NEW}
    _same(data, expected, NEW)

    # a rerun after an uncommitted split resumes it: only the parents not marked done are split again
    data = left_by("resumed", "split")
    for marker in sorted((data / "reshard.tmp" / "done").iterdir())[OLD // 2:]:
        marker.unlink()                                             # as if killed half-way
    r = reshard(data, "--shards", str(NEW), *RESHARD_ARGS)
    assert f"({OLD // 2} shards done by an earlier run)" in r.stdout, r.stdout
    _same(data, expected, NEW)


# -- into a cluster --------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_resharded_data_dir_starts_a_1024_shard_cluster_and_a_joining_node_takes_its_share(
        nats_cluster, tmp_path):
    """docs/cluster.md, Carrying a data dir over: a single gateway's data dir split to
    1,024 shards starts a cluster as its first node (it owns every shard); a second node
    joins and takes its share, with the messages, devices and producer state of those
    shards: every unread message reaches its device exactly once, in order, wherever
    its shard now is, and a retry of an ACKed SEND gets its original ACK there."""
    from types import SimpleNamespace

    from clusternodes import Nodes
    from gateway.cluster.shardmap import hrw_owner
    nodes = Nodes(tmp_path, nats_cluster.url, ["n1", "n2"], shards=NEW, bootstrap=["n1"],
                  extra=("--segment-size", "256K", "--log-spares", "0", "--msg-rate", "0"))
    users = [f"c{i}" for i in range(80)]
    readers = users[:10]
    gw = start_gateway(nodes.dir("n1"), "--workers", "2", *SERVE_ARGS)     # one gateway, 64 shards
    try:
        async def before():
            for u in users:
                async with gw.client(u, "phone"):
                    pass
            async with gw.client("cbot", "main", send_only=True) as bot:
                acks = [await bot.send(u, f"{u}-{j}") for j in range(3) for u in users]
            for u in readers:
                async with gw.client(u, "phone") as c:
                    await c.ack(*[await c.recv(timeout=10) for _ in range(3)])
                    await c.ping()
            return bot.producer, acks
        producer, acks = asyncio.run(before())
    finally:
        assert gw.stop() == 0
    try:
        with pytest.raises(RuntimeError, match=f"--shards {NEW}`"):      # 64 shards in a 1,024-shard cluster
            nodes.start("n1")
        reshard(nodes.dir("n1"), "--shards", str(NEW), *RESHARD_ARGS)
        nodes.start("n1")
        assert nodes.owned("n1") == NEW
        nodes.start("n2")
        deadline = time.monotonic() + 240
        while not (nodes.owned("n2") == sum(hrw_owner(s, ["n1", "n2"]) == "n2" for s in range(NEW))
                   and not nodes.status("n1")["workers"]["0"]["moving"]):
            assert time.monotonic() < deadline, nodes.status("n1")["workers"]["0"]
            time.sleep(0.2)
        moved = [u for u in users if hrw_owner(shard_of(u, NEW), ["n1", "n2"]) == "n2"]
        assert len(moved) >= 20, moved
        want = {u: [(a.id, f"{u}-{j}") for j, a in enumerate(acks[i::len(users)])] for i, u in enumerate(users)}

        async def after():
            # the bot retries its newest SENDs at the node of its own shard: original ACKs
            host, port = nodes.address(hrw_owner(shard_of("cbot", NEW), ["n1", "n2"]))
            with Raw(SimpleNamespace(host=host, port=port), timeout=20) as r:
                assert r.hello(nodes.token("cbot", "main"), device="main", send_only=True,
                               producer=producer).producer == producer
                retry = list(range(len(acks) - 20, len(acks) + 1))
                r.send(b"".join(encode(F.Send(s, users[(s - 1) % len(users)],
                                              f"{users[(s - 1) % len(users)]}-{(s - 1) // len(users)}".encode()))
                                for s in retry))
                got = {}
                while len(got) < len(retry):
                    f = r.frame()
                    assert isinstance(f, F.Ack), f
                    got[f.seq] = f.msg_id
                assert got == {s: acks[s - 1].id for s in retry}
            got = await _gather([_inbox(SimpleNamespace(client=nodes.any_client), u, "phone",
                                        0 if u in readers else 3) for u in users])
            for u, msgs in zip(users, got):
                assert [(m.id, m.text) for m in msgs] == ([] if u in readers else want[u]), u
        asyncio.run(asyncio.wait_for(after(), 180))
        for name in ("n1", "n2"):
            assert "event=reshard" not in nodes.procs[name].text
        assert "event=shard_adopted" in nodes.procs["n2"].text
    finally:
        nodes.stop_all()
