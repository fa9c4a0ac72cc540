"""Moving a shard between nodes (issue 13): quiesce at the old owner, export its
files, import them at the new one, release, adopt, drop
(`ShardedLog` in _core/log.py, gateway/cluster/shardcopy.py, Router.shard_leaving /
shard_arrived). Two independent stacks (ShardedLog + Router) on two data dirs in
one process, real files; kills of the importing process with SIGKILL."""
import asyncio
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from _core import frames as F
from _core._codec import Decoder, decode_body
from _core._routing import LinkCore
from _core.codec import encode
from _core.log import LogConfig, ShardedLog
from _core.protocol import ErrorCode, GroupOp
from gateway.cluster.shardcopy import ShardCopyError, ShardImport, export_shard
from router import Router
from router.sharding import DEFAULT_SHARDS, ShardMap, shard_of

HERE = Path(__file__).resolve().parent
CHUNK = 64 << 10
LT_FWD, LT_FWD_ACK, LT_FWD_ERR, LT_LAST = 0x41, 0x42, 0x43, 0x48
REDIRECT = 6          # the cluster's GOAWAY code for "reconnect elsewhere" (a parameter here)


def on_shard(shard: int, prefix: str, n: int = 1, group: bool = False) -> list:
    names = (f"{'#' if group else ''}{prefix}{i}" for i in range(100_000))
    out = []
    for name in names:
        if shard_of(name) == shard:
            out.append(name)
            if len(out) == n:
                return out


def not_on(shards: set, prefix: str) -> str:
    return next(f"{prefix}{i}" for i in range(1000) if shard_of(f"{prefix}{i}") not in shards)


class Node:
    """One gateway worker's stack: a ShardedLog on its own data dir and a Router."""

    def __init__(self, root: Path, owned=None, durability: str = "always"):
        loop = asyncio.get_running_loop()
        self.root = root
        self.map = ShardMap(DEFAULT_SHARDS, 1, 0, owned=owned)
        self.log = ShardedLog(root, LogConfig(segment_size=1 << 20, durability=durability), self.map)
        self.log.open()
        self.log.start(loop)
        self.router = Router(self.log, loop=loop)

    def close(self) -> None:
        self.log.close()


class Peer:
    """A session of a Router with its decoded output, awaitable without sleeps."""

    def __init__(self, node: Node, user: str, device: str, **kw):
        self.node = node
        self.frames: list = []
        self.closed = False
        self._sent_at: dict = {}
        self._changed = asyncio.Event()
        reader = Decoder(self._got, 1 << 24)
        self.session = node.router.open_session(user, device, write=reader.feed, close=self._close, **kw)
        self._into = Decoder(self.session, 1 << 24)

    def _got(self, t, f, body) -> None:
        self.frames.append(decode_body(t, f, body))
        self._changed.set()

    def _close(self) -> None:
        self.closed = True
        self._changed.set()

    def feed(self, frame) -> None:
        if isinstance(frame, F.Send):
            self._sent_at[frame.seq] = len(self.frames)        # its answer comes after this
        self._into.feed(encode(frame))

    async def until(self, pred, what: str = "frames"):
        while not pred(self.frames):
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), 10)
        return self.frames

    async def answers(self, kind, n: int) -> list:
        await self.until(lambda fs: sum(isinstance(f, kind) for f in fs) >= n)
        return [f for f in self.frames if isinstance(f, kind)][:n]

    async def answer_to(self, seq: int):
        """The ACK or ERROR answering the last SEND of `seq`."""
        def found(fs):
            return [f for f in fs[self._sent_at[seq]:] if (isinstance(f, F.Ack) and f.seq == seq) or
                    (isinstance(f, F.Error) and f.ref == seq)]
        return (await self.until(found) and found(self.frames))[-1]

    def leave(self) -> None:
        self.node.router.close_session(self.session)


class Link:
    """The far end of a bus link into a Router: FWD frames in, FWD_ACK/FWD_ERR out."""

    def __init__(self, node: Node):
        self.out = bytearray()
        self._changed = asyncio.Event()
        self.core = LinkCore(node.router, 1, self._write, lambda: None, lambda *a: None)
        self._into = Decoder(self.core, 1 << 24, LT_LAST)

    def _write(self, data: bytes) -> None:
        self.out += data
        self._changed.set()

    def fwd(self, fwd_seq: int, seq: int, producer: int, sender: str, device: str, to: str, payload: bytes):
        def s8(s):
            b = s.encode()
            return bytes([len(b)]) + b
        body = struct.pack("!QQQ", fwd_seq, seq, producer) + s8(sender) + s8(device) + s8(to) + payload
        self._into.feed(struct.pack("!IBB", len(body) + 2, LT_FWD, 0) + body)

    async def answer(self) -> tuple:
        """(type, flags, fwd_seq, code or msg_id) of the next answer."""
        while len(self.out) < 4 or len(self.out) < 4 + struct.unpack_from("!I", self.out)[0]:
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), 10)
        n = struct.unpack_from("!I", self.out)[0]
        t, flags = self.out[4], self.out[5]
        body = bytes(self.out[6:4 + n])
        del self.out[:4 + n]
        if t == LT_FWD_ERR:
            fwd_seq, code = struct.unpack_from("!QH", body)
            return t, flags, fwd_seq, code
        fwd_seq, msg_id, _ts = struct.unpack_from("!QQQ", body)
        return t, flags, fwd_seq, msg_id


def snapshot(log, inboxes) -> dict:
    return {(u, d): list(log.pending(u, d)) for u, d in inboxes}


def leftovers(root: Path) -> list:
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".incoming") or ".tomb-" in p.name)


def test_a_shard_moves_with_its_messages_dedup_devices_and_groups(tmp_path):
    async def main():
        bob, carol = on_shard(shard_of("bob"), "s-user", 2)
        S = shard_of(bob)
        (group,) = on_shard(S, "team", group=True)
        alice = not_on({S}, "alice")
        frank = not_on({S, shard_of(alice)}, "frank")
        dave = not_on({S, shard_of(alice)}, "dave")
        erin = not_on({S, shard_of(alice), shard_of(dave)}, "erin")
        C = shard_of(erin)
        a = Node(tmp_path / "A")                           # a single node today: owns every shard
        b = Node(tmp_path / "B", owned=set())              # a joining node: owns nothing yet
        try:
            for user, device in ((bob, "phone"), (bob, "laptop"), (carol, "main"), (dave, "main"),
                                 (erin, "main")):
                Peer(a, user, device).leave()             # registered devices, offline
            al = Peer(a, alice, "laptop")
            al.feed(F.Group(1, GroupOp.CREATE, group, json.dumps({"name": "Team",
                                                                  "members": [bob, carol, dave, erin]})))
            await al.answers(F.GroupInfo, 1)
            for seq in range(1, 7):
                al.feed(F.Send(seq, bob, b"to bob %d" % seq))
            for seq in (7, 8):
                al.feed(F.Send(seq, carol, b"to carol %d" % seq))
            acks = await al.answers(F.Ack, 8)
            assert [x.seq for x in acks] == list(range(1, 9))
            ids = {x.seq: x.msg_id for x in acks}
            # bob's phone reads and acknowledges the first three
            phone = Peer(a, bob, "phone")
            got = await phone.answers(F.Deliver, 6)
            assert [d.msg_id for d in got] == [ids[s] for s in range(1, 7)]
            phone.feed(F.Received(tuple(ids[s] for s in (1, 2, 3))))
            phone.leave()
            # a group message whose fan-out is unfinished: erin's shard refuses for now
            await a.log.quiesce(C)
            al.feed(F.Send(9, group, b"to the team"))
            ack9 = await al.answer_to(9)
            assert isinstance(ack9, F.Ack)
            job, = a.router.groups.jobs.values()
            assert job["pending"] == {erin} and a.log.pending_count(group) == 1
            state = a.router.groups.get(group)

            inboxes = [(bob, "phone"), (bob, "laptop"), (carol, "main"), (group, "")]
            laptop = Peer(a, bob, "laptop")                # online at A when the shard leaves
            await laptop.answers(F.Deliver, 7)

            # -- the move, at A ----------------------------------------------------------
            left = a.router.shard_leaving(S, REDIRECT, "shard moving", 250)
            await left
            goaway, = await laptop.answers(F.Goaway, 1)
            assert (goaway.code, goaway.reconnect_ms) == (REDIRECT, 250)
            await laptop.until(lambda fs: laptop.closed)
            assert a.router.groups.jobs == {} and a.router.sessions_of(bob) == []
            quiet = a.log.quiesce(S)
            al.feed(F.Send(10, bob, b"too late"))          # refused for now, never stored
            err = await al.answer_to(10)
            assert isinstance(err, F.Error) and (err.code, err.fatal) == (ErrorCode.UNAVAILABLE, False)
            assert "shard moving" in err.reason
            link = Link(a)                                 # a FWD from another worker: refused too
            link.fwd(1, 1, 77, "gina", "tab", bob, b"forwarded")
            assert await link.answer() == (LT_FWD_ERR, 0, 1, ErrorCode.UNAVAILABLE)
            fr = Peer(a, frank, "main")                    # the other shards go on
            fr.feed(F.Send(1, dave, b"hi dave"))
            assert isinstance(await fr.answer_to(1), F.Ack)
            await quiet
            before = snapshot(a.log, inboxes)
            assert [m.msg_id for m in before[(bob, "phone")]][:3] == [ids[s] for s in (4, 5, 6)]
            assert len(before[(bob, "laptop")]) == 7 and len(before[(carol, "main")]) == 3
            chunks = list(export_shard(a.root / f"shard-{S:04d}", CHUNK))
            assert all(len(c) <= CHUNK for c in chunks) and len(chunks) > 2

            # -- at B ---------------------------------------------------------------------
            imp = ShardImport(b.root, S)
            for c in chunks:
                imp.feed(c)
            assert imp.finish() == b.root / f"shard-{S:04d}"
            a.log.release(S)
            a.map.give(S)
            b.log.adopt(S)
            b.map.take(S)
            b.router.shard_arrived(S)
            assert snapshot(b.log, inboxes) == before      # ids, order, payloads, flags, refs
            assert b.log.devices_of(bob) == ("laptop", "phone") and b.log.devices_of(carol) == ("main",)
            assert b.router.groups.get(group) == state == {
                "name": "Team", "members": {alice: "admin", bob: "member", carol: "member", dave: "member",
                                            erin: "member"}}
            # the unfinished fan-out resumed at B: bob and carol had their copies (not made twice);
            # alice, dave and erin are not B's, so they are still pending
            job, = b.router.groups.jobs.values()
            assert job["origin"] == ack9.msg_id and job["pending"] == {alice, dave, erin}
            assert snapshot(b.log, inboxes) == before
            # a retry of a stored seq gets its original answer, locally and as a FWD
            bot = Peer(b, alice, "laptop", send_only=True, producer=al.session.producer)
            bot.feed(F.Send(3, bob, b"to bob 3"))
            dup = await bot.answer_to(3)
            assert isinstance(dup, F.Ack) and dup.msg_id == ids[3]
            blink = Link(b)
            blink.fwd(5, 5, al.session.producer, alice, "laptop", bob, b"to bob 5")
            assert await blink.answer() == (LT_FWD_ACK, 1, 5, ids[5])       # flag DUPLICATE
            bot.feed(F.Send(10, bob, b"at B"))                             # the refused one, again
            ack10 = await bot.answer_to(10)
            assert isinstance(ack10, F.Ack) and ack10.msg_id > max(ids.values())
            assert snapshot(b.log, inboxes)[(bob, "phone")][-1].payload == b"at B"

            a.log.drop(S)
            assert not (a.root / f"shard-{S:04d}").exists() and leftovers(a.root) == []
            fr.feed(F.Send(2, dave, b"still here"))
            assert isinstance(await fr.answer_to(2), F.Ack)
            a.log.resume(C)
        finally:
            a.close()
            b.close()

    asyncio.run(main())


def test_an_abandoned_move_resumes_the_shard(tmp_path):
    """quiesce, then resume (the move was called off): the shard takes writes again."""
    async def main():
        a = Node(tmp_path / "A", durability="interval")
        try:
            bob = "bob"
            S = shard_of(bob)
            al = Peer(a, not_on({S}, "alice"), "main")
            await a.log.quiesce(S)
            al.feed(F.Send(1, bob, b"one"))
            assert (await al.answer_to(1)).code == ErrorCode.UNAVAILABLE
            a.log.resume(S)
            al.feed(F.Send(1, bob, b"one"))
            assert isinstance(await al.answer_to(1), F.Ack)
            assert [m.payload for m in a.log.pending(bob)] == [b"one"]
        finally:
            a.close()

    asyncio.run(main())


# -- imports that fail -----------------------------------------------------------------------

def source_shard(tmp_path: Path, shard: int = 5, n: int = 40) -> tuple[Path, dict]:
    """A closed shard log with pending messages (its files are final): (dir, pending)."""
    async def main():
        a = Node(tmp_path / "src", durability="interval")
        try:
            (user,) = on_shard(shard, "u")
            al = Peer(a, not_on({shard}, "alice"), "main")
            for seq in range(1, n + 1):
                al.feed(F.Send(seq, user, os.urandom(3000)))
            await al.answers(F.Ack, n)
            return {user: list(a.log.pending(user))}
        finally:
            a.close()
    pending = asyncio.run(main())
    return tmp_path / "src" / f"shard-{shard:04d}", pending


def reopen(root: Path, shard: int) -> tuple[ShardedLog, dict]:
    """B restarts: ShardedLog.open on its root, then adopts the shard if it is there."""
    log = ShardedLog(root, LogConfig(segment_size=1 << 20), ShardMap(DEFAULT_SHARDS, 1, 0, owned=set()))
    log.open()
    return log, leftovers(root)


def die(imp: ShardImport) -> None:
    """What the kernel does when the importing process dies: its descriptors close
    (and with them the incoming directory's lock). Nothing of the import's own
    clean-up runs."""
    for fd in imp._fds + [imp._lock._fd]:
        os.close(fd)


def test_an_import_abandoned_half_way_leaves_nothing_after_a_restart(tmp_path):
    src, _ = source_shard(tmp_path)
    chunks = list(export_shard(src, CHUNK))
    root = tmp_path / "B"
    imp = ShardImport(root, 5)
    for c in chunks[:len(chunks) // 2]:
        imp.feed(c)
    assert (root / "shard-0005.incoming").is_dir()
    die(imp)
    del imp
    log, left = reopen(root, 5)
    try:
        assert left == [] and not (root / "shard-0005").exists()
        assert sorted(p.name for p in root.iterdir()) == []
    finally:
        log.close()


def test_a_corrupted_chunk_is_refused_at_finish_and_nothing_is_installed(tmp_path):
    src, _ = source_shard(tmp_path)
    chunks = list(export_shard(src, CHUNK))
    i = next(i for i, c in enumerate(chunks) if c[5] == 1 and len(c) > 1000)      # a data chunk
    bad = bytearray(chunks[i])
    bad[len(bad) // 2] ^= 0x20
    root = tmp_path / "B"
    imp = ShardImport(root, 5)
    for c in chunks[:i] + [bytes(bad)] + chunks[i + 1:]:
        imp.feed(c)
    with pytest.raises(ShardCopyError, match="digest"):
        imp.finish()
    assert not (root / "shard-0005").exists()
    imp.abort()
    assert sorted(p.name for p in root.iterdir()) == []


def test_chunks_out_of_order_lost_foreign_or_missing_are_refused(tmp_path):
    src, _ = source_shard(tmp_path)
    chunks = list(export_shard(src, CHUNK))
    root = tmp_path / "B"
    cases = {
        "swapped": (chunks[:2] + [chunks[3], chunks[2]], "out of order"),
        "lost": (chunks[:2] + chunks[3:4], "out of order or a chunk was lost"),
        "repeated": (chunks[:3] + chunks[2:3], "out of order"),
        "data first": (chunks[1:2], "before the manifest"),
        "garbage": ([b"hello world, not a chunk"], "not a shard copy chunk"),
    }
    for name, (feed, error) in cases.items():
        imp = ShardImport(root, 5)
        with pytest.raises(ShardCopyError, match=error):
            for c in feed:
                imp.feed(c)
        imp.abort()
    with pytest.raises(ShardCopyError, match="of shard 5, this import is of shard 6"):
        ShardImport(root, 6).feed(chunks[0])
    imp = ShardImport(root, 5)                  # a stream that stops early
    for c in chunks[:-1]:
        imp.feed(c)
    with pytest.raises(ShardCopyError, match="incomplete"):
        imp.finish()
    imp.abort()
    assert not (root / "shard-0005").exists()


def write_chunks(path: Path, chunks: list) -> None:
    path.write_bytes(b"".join(struct.pack("!I", len(c)) + c for c in chunks))


@pytest.mark.parametrize("point", ["half", "tomb", "installed"])
def test_kill9_of_the_importing_process(tmp_path, point):
    """A child imports the shard and is SIGKILLed at POINT (it says when it is
    there). B then starts: no half copy and no leftovers, and where the copy was
    installed, it holds exactly what the sender had. `tomb`: B had a stale copy
    from an earlier abandoned move, and the kill came between its removal and
    the installation: B has no shard (the sender still does, the move is redone)."""
    src, pending = source_shard(tmp_path)
    chunks = list(export_shard(src, CHUNK))
    file = tmp_path / "chunks"
    write_chunks(file, chunks)
    root = tmp_path / "B"
    if point == "tomb":                          # a stale copy of the shard, from an earlier try
        stale = ShardImport(root, 5)
        for c in chunks:
            stale.feed(c)
        stale.finish()
    child = subprocess.Popen([sys.executable, str(HERE / "shard_import_child.py"), str(root), "5", str(file), point],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == f"AT {point}\n"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    log, left = reopen(root, 5)
    try:
        assert left == []
        assert not (root / "shard-0005.incoming").exists()
        if point == "installed":
            log.adopt(5)
            (user,) = pending
            assert list(log.pending(user)) == pending[user]
        else:
            assert not (root / "shard-0005").exists()
    finally:
        log.close()


def test_a_send_refused_before_its_shard_arrived_holds_the_later_ones(tmp_path):
    """A FWD reaches the shard's next owner before the shard does (its map said so
    first) and is refused; the FWD pipelined behind it on the same link arrives once
    the shard is there. It must not be stored ahead: it gets OUT_OF_ORDER until the
    refused one comes again (else that one's resend would be answered as a retry of
    something stored, with msg_id 0: lost)."""
    async def main():
        bob, = on_shard(shard_of("bob"), "h-user")
        S = shard_of(bob)
        a = Node(tmp_path / "A")
        b = Node(tmp_path / "B", owned=set())
        try:
            al = Peer(a, "alice", "laptop")
            for seq in (1, 2, 3):
                al.feed(F.Send(seq, bob, b"m%d" % seq))
            assert [x.seq for x in await al.answers(F.Ack, 3)] == [1, 2, 3]
            producer = al.session.producer
            await a.log.quiesce(S)
            chunks = list(export_shard(a.root / f"shard-{S:04d}", CHUNK))
            link = Link(b)
            link.fwd(1, 4, producer, "alice", "laptop", bob, b"m4")           # before the shard is here
            assert await link.answer() == (LT_FWD_ERR, 0, 1, ErrorCode.UNAVAILABLE)
            imp = ShardImport(b.root, S)
            for c in chunks:
                imp.feed(c)
            imp.finish()
            a.log.release(S)
            a.map.give(S)
            b.log.adopt(S)
            b.map.take(S)
            b.router.shard_arrived(S)
            link.fwd(2, 5, producer, "alice", "laptop", bob, b"m5")           # pipelined behind seq 4
            assert await link.answer() == (LT_FWD_ERR, 0, 2, ErrorCode.OUT_OF_ORDER)
            link.fwd(3, 4, producer, "alice", "laptop", bob, b"m4")           # the client resends from 4
            link.fwd(4, 5, producer, "alice", "laptop", bob, b"m5")
            (t4, f4, _, id4), (t5, f5, _, id5) = await link.answer(), await link.answer()
            assert (t4, f4, t5, f5) == (LT_FWD_ACK, 0, LT_FWD_ACK, 0) and 0 < id4 < id5
            assert [m.payload for m in b.log.pending(bob, "main")] == [b"m1", b"m2", b"m3", b"m4", b"m5"]
        finally:
            a.close()
            b.close()

    asyncio.run(main())
