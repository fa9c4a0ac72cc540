"""The durable offline store (_core/log.py, _core/_log.pyx) on real files:
reopen, rollover, deletion and compaction of front segments, expiry, quota,
torn tails, bit flips, stale bytes, a really full disk (tmpfs), injected
sync failures and group commit. Crash tests with kill -9 are in test_log_crash.py."""
import asyncio
import collections
import errno
import os
import random
import shutil
import struct
import subprocess
import time
from pathlib import Path

import picologging
import pytest

from _core._codec import Decoder, WriteBuffer, decode_body
from _core._log import CopyWindow, crc32c
from _core.codec import encode
from _core.errors import StoreError
from _core.frames import Ack, Deliver, Error, Send
from _core.log import HEADER, HEADER_SIZE, MAGIC, AppendLog, LogConfig, now_ms
from _core.protocol import ErrorCode
from router import Router

SEG = 1 << 20
REC = struct.Struct("!IIBBH")          # length, crc, type, flags, reserved
MSG_FIXED = struct.Struct("!IQQQ")     # payload length, msg_id, ts, client_id (after REC)
REC_MESSAGE, REC_CONSUME, REC_MESSAGE_P = 1, 2, 4     # and 3, 5: META with a u8 / u16 key length


def cfg(**kw) -> LogConfig:
    kw.setdefault("segment_size", SEG)
    return LogConfig(**kw)


class Ids:
    """Router-shaped ids: (ms << 22) | seq, increasing."""

    def __init__(self, ms: int | None = None):
        self.ms = now_ms() if ms is None else ms
        self.seq = 0

    def __call__(self) -> int:
        self.seq += 1
        return (self.ms << 22) | self.seq


@pytest.fixture
def logs():
    """Opens AppendLogs and closes every one at teardown (close is idempotent)."""
    opened = []

    def make(directory, config=None, **kw):
        log = AppendLog(directory, config or cfg(), **kw)
        opened.append(log)
        return log

    yield make
    for log in opened:
        log.close()


def spare_ready(log) -> bool:
    """A prepared spare segment has been handed to the log (the worker's result arrived)."""
    return bool(log._spares)


def roll_ready(log) -> bool:
    """Messages can roll to a new segment without a stall: a spare to roll into,
    and one more kept as the reserve."""
    return len(log._spares) >= 2


def seg_files(directory) -> list[Path]:
    return sorted(Path(directory).glob("*.seg"))


Msg = collections.namedtuple("Msg", "msg_id timestamp_ms sender sender_device payload")


def pending_map(log) -> dict:
    """{recipient: [Msg...]} for every recipient with pending plain messages (the
    StoredMessage fields these tests write; mirror/receipt fields are all unset here)."""
    return {r: [Msg(*tuple(m)[:5]) for m in log.pending(r)] for r in log.recipients() if log.pending(r)}


def bounded(limit: int, what: str):
    """range(limit) for loops that stop on a condition; running out is a failure."""
    yield from range(limit)
    raise AssertionError(f"{what}: no result after {limit} steps")


async def until(pred, timeout=10.0, what="condition"):
    """Wait for the log's worker thread to make `pred` true (bounded)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def parse_segment(path) -> tuple[dict, list]:
    """Read a segment file with this test's own reading of the format: the header
    fields and the records [(offset, length, type, raw bytes)] up to the first
    zero length. Every header and record CRC is checked here too."""
    data = Path(path).read_bytes()
    magic, sid, nonce, size, created, version, _id_floor, _ = HEADER.unpack_from(data)
    assert magic == MAGIC and size == len(data) and version in (2, 3)
    assert struct.unpack_from("!I", data, 60)[0] == crc32c(data[:60])
    # version 3: a recycled file; its records carry the top 16 bits of the nonce (or 1), and
    # the first place that does not is where its previous use's bytes begin
    tag = (nonce >> 48 or 1) if version == 3 else 0
    records = []
    pos = HEADER_SIZE
    while pos + REC.size <= len(data):
        length, crc, rtype, flags, reserved = REC.unpack_from(data, pos)
        if length == 0 or (version == 3 and reserved != tag):
            break
        raw = data[pos:pos + length]
        assert rtype in (REC_MESSAGE, REC_CONSUME, 3, REC_MESSAGE_P, 5) and reserved == tag
        assert crc == crc32c(raw[8:], crc32c(struct.pack("!QQQ", nonce, sid, pos))), f"crc at {pos}"
        records.append((pos, length, rtype, raw))
        pos += (length + 7) & ~7
    return {"id": sid, "nonce": nonce, "size": size, "end": pos, "version": version}, records


def message_fields(raw: bytes) -> tuple:
    """(msg_id, ts, client_id, recipient, sender, sender_device, payload) of a MESSAGE record
    (MESSAGE_P: the producer's u64 follows client_id)."""
    n, msg_id, ts, client_id = MSG_FIXED.unpack_from(raw, 12)
    pos, ids = (48 if raw[8] == REC_MESSAGE_P else 40), []
    for _ in range(5):          # recipient, recipient device, sender, sender device, conversation
        ln = raw[pos]
        ids.append(raw[pos + 1:pos + 1 + ln].decode())
        pos += 1 + ln
    assert pos + n == len(raw)
    return msg_id, ts, client_id, ids[0], ids[2], ids[3], raw[pos:]


def patch(path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


def delivered(log, recipient, now=None) -> list[Deliver]:
    """The DELIVER frames write_pending_into produces, decoded."""
    out = WriteBuffer()
    log.write_pending_into(out, recipient, now_ms() if now is None else now)
    frames = []
    dec = Decoder(lambda t, f, body: frames.append(decode_body(t, f, body)), 1 << 24)
    dec.feed(out.take())
    assert all(isinstance(f, Deliver) for f in frames)
    return frames


# -- crc32c -----------------------------------------------------------------------------------

def test_crc32c_known_vector_and_chaining():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(b"\x00" * 32) == 0x8A9136AA                 # RFC 3720 B.4 test vector
    rng = random.Random(1)
    for _ in range(50):
        a, b = rng.randbytes(rng.randrange(0, 300)), rng.randbytes(rng.randrange(0, 300))
        assert crc32c(b, crc32c(a)) == crc32c(a + b)
        assert crc32c(memoryview(a + b)) == crc32c(bytearray(a + b))


def test_producer_window_keeps_exactly_the_newest_answers_over_many_sends():
    """The send window's oldest answer is dropped in O(1) and its room reclaimed
    now and then (cap/8): across 5,000 in-order SENDs and a late recovery insert,
    every seq in the newest window keeps its own answer, older ones are known
    only as duplicates, and the window never holds more than it should."""
    from _core._producers import ProducerTable
    window = 256
    table = ProducerTable(window)
    key = "alice\x00phone"
    for seq in range(1, 5001):
        assert table.admit_py(key, 9, seq)[0] == "new"
        table.stored_py(key, 9, seq, 1000 + seq, 2000 + seq, 1 + seq // 700)
        entries = table.get(key).entries()
        assert len(entries) == min(seq, window)
        assert entries[0][0] == max(1, seq - window + 1) and entries[-1] == (seq, 1000 + seq, 2000 + seq)
    for seq in range(4745, 5001):
        assert table.admit_py(key, 9, seq) == ("duplicate", 1000 + seq, 2000 + seq)
    for seq in (1, 2000, 4744):
        assert table.admit_py(key, 9, seq) == ("duplicate", 0, 0)
    assert table.admit_py(key, 9, 5001)[0] == "new"
    assert table.get(key).memory <= 2 * window * 32       # the reclaimed room is reused, not grown into


def test_zero_pages_and_flush_files_on_real_files(tmp_path):
    """The log's file primitives: zeros land exactly over the range asked (also a
    range that ends inside a page), and a failed write or sync is an OSError
    that says why, never a silent success."""
    from _core._log import flush_files, zero_pages
    path = tmp_path / "seg"
    path.write_bytes(b"\xff" * 20000)
    fd = os.open(path, os.O_RDWR)
    try:
        zero_pages(fd, 4096, 10000)
        data = os.pread(fd, 20000, 0)
        assert data[:4096] == b"\xff" * 4096 and data[4096:10000] == bytes(5904) and data[10000:] == b"\xff" * 10000
        os.pwrite(fd, b"record", 100)
        flush_files([fd])
        flush_files([])
    finally:
        os.close(fd)
    ro = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as exc:
            zero_pages(ro, 0, 4096)
        assert exc.value.errno == errno.EBADF
    finally:
        os.close(ro)
    closed = os.open(path, os.O_RDWR)
    os.close(closed)
    with pytest.raises(OSError) as exc:
        flush_files([closed, closed])
    assert exc.value.errno == errno.EBADF


# -- reopen -----------------------------------------------------------------------------------

def test_reopen_restores_pending_payloads_last_id_and_producers(tmp_path, logs):
    rng = random.Random(7)
    nid = Ids()
    recipients = ["alice", "bob", "carol", "dave-ü"]
    sent = {r: [] for r in recipients}
    producers, cids = {}, {}
    log = logs(tmp_path)
    assert log.open().segments == 0
    for i in range(400):
        r = rng.choice(recipients)
        mid = nid()
        sender, device = rng.choice([("eve", "phone"), ("frank", "laptop"), ("eve", "")])
        payload = rng.randbytes(rng.choice([0, 1, 7, 100, 3000]))
        seq = i + 1 if i % 4 else 0                   # a seq of producer 77, or no original SEND
        log.append(r, mid, mid >> 22, sender, device, payload, seq, producer=77 if seq else 0)
        sent[r].append((mid, mid >> 22, sender, device, payload))
        cids[mid] = seq
        if seq:
            producers.setdefault(f"{sender}\x00{device}", []).append((seq, mid, mid >> 22))
    last = max(m[0] for v in sent.values() for m in v)
    # consume some: half of alice's, every third of bob's, all of carol's; unknown ids are ignored
    gone = set(m[0] for m in sent["alice"][::2]) | set(m[0] for m in sent["bob"][::3]) \
        | set(m[0] for m in sent["carol"])
    assert log.consume("alice", [m[0] for m in sent["alice"][::2]] + [12345]) == len(sent["alice"][::2])
    assert log.consume("bob", (m[0] for m in sent["bob"][::3])) == len(sent["bob"][::3])   # any iterable
    assert log.consume("carol", {m[0] for m in sent["carol"]}) == len(sent["carol"])
    assert log.consume("nobody", [1, 2]) == 0
    assert log.consume("alice", [sent["alice"][0][0]]) == 0       # already consumed
    left = {r: [m for m in sent[r] if m[0] not in gone] for r in recipients}
    left = {r: v for r, v in left.items() if v}
    assert {r: [tuple(m) for m in v] for r, v in pending_map(log).items()} == left
    log.close()
    # the file, read with this test's own reading of the format (CRCs checked in parse_segment)
    (path,) = seg_files(tmp_path)
    _hdr, records = parse_segment(path)
    messages = [message_fields(raw) for _o, _n, t, raw in records if t in (REC_MESSAGE, REC_MESSAGE_P)]
    assert len(messages) == 400 and sum(t == REC_CONSUME for _o, _n, t, _r in records) == 3
    by_id = {m[0]: m for m in messages}
    for r, msgs in sent.items():
        for mid, ts, sender, device, payload in msgs:
            assert by_id[mid][1:] == (ts, cids[mid], r, sender, device, payload)

    again = logs(tmp_path)
    report = again.open()
    assert report.pending == sum(map(len, left.values())) == again.pending_count()
    assert not report.torn_tails and not report.corrupt and not report.bad_headers
    got = pending_map(again)
    assert {r: [tuple(m) for m in v] for r, v in got.items()} == left
    for r, msgs in got.items():
        assert [m.msg_id for m in msgs] == sorted(m.msg_id for m in msgs)
        assert [(d.msg_id, d.timestamp_ms, d.sender, d.sender_device, bytes(d.payload))
                for d in delivered(again, r)] == [tuple(m) for m in msgs]
    assert again.last_id() == last
    for key, entries in producers.items():         # consumed or not, every seq is remembered
        st = again.producers.get(key)
        assert (st.producer, st.high) == (77, entries[-1][0])
        # the answers of the last `window` seqs (by number: the device's stream, not this shard's part)
        assert st.entries() == [e for e in entries if e[0] + again.producers.window > st.high]
        assert again.producers.admit_py(key, 77, entries[-1][0]) == ("duplicate", entries[-1][1], entries[-1][2])
        assert again.producers.admit_py(key, 77, entries[-1][0] + 1)[0] == "new"

    # consume_through: everything of dave's up to and including his third message
    dave = left["dave-ü"]
    assert again.consume_through("dave-ü", dave[2][0]) == 3
    assert [m.msg_id for m in again.pending("dave-ü")] == [m[0] for m in dave[3:]]
    assert again.consume_through("dave-ü", dave[2][0]) == 0
    again.close()
    third = logs(tmp_path)
    third.open()
    assert [m.msg_id for m in third.pending("dave-ü")] == [m[0] for m in dave[3:]]
    assert third.pending_count() == report.pending - 3


# -- rollover and deletion --------------------------------------------------------------------

def test_rollover_and_consumed_front_segments_deleted(tmp_path, logs):
    nid = Ids()
    payload = bytes(range(256)) * 16              # 4 KiB: ~240 records per 1 MiB segment

    async def main():
        log = logs(tmp_path)
        log.open()
        log.start(asyncio.get_running_loop())
        ids = []
        for _ in bounded(2000, "four segments"):
            if len(log.segments) >= 4:
                break
            if log.active.free < 2 * len(payload):
                await until(lambda: roll_ready(log), what="spare segments")
            mid = nid()
            log.append(f"u{mid % 3}", mid, mid >> 22, "s", "d", payload)
            ids.append(mid)
            await asyncio.sleep(0)
        assert log.stalls == 0                     # every roll found a prepared segment
        on_disk = seg_files(tmp_path)
        assert len(on_disk) >= 4
        assert all(p.stat().st_size == SEG for p in on_disk)
        assert sum(s.messages for s in log.segments) == len(ids)
        for r in ("u0", "u1", "u2"):
            log.consume(r, [i for i in ids if i % 3 == int(r[1])])
        assert log.pending_count() == 0
        active = log.active.segment_id
        log.maintain()
        await until(lambda: [p.name for p in seg_files(tmp_path)][0] >= f"{active:020d}.seg",
                    what="front segments deleted")
        assert len(seg_files(tmp_path)) < len(on_disk)
        assert all(int(p.stem) >= active for p in seg_files(tmp_path))   # only the active one and spares
        assert [s.segment_id for s in log.segments] == [active]
        log.close()
        return active

    active = asyncio.run(main())
    again = logs(tmp_path)
    report = again.open()
    assert report.pending == 0 and again.pending_count() == 0
    assert all(s.segment_id >= active for s in again.segments)


# -- compaction -------------------------------------------------------------------------------

async def fill_three_segments(log, nid) -> list:
    """Append 2,000-byte messages for "busy" until the log has three segments; their ids."""
    ids = []
    for _ in bounded(2000, "three segments"):
        if len(log.segments) >= 3:
            break
        if log.active.free < 4096:
            await until(lambda: roll_ready(log), what="spare segments")
        mid = nid()
        log.append("busy", mid, mid >> 22, "s", "d", b"x" * 2000)
        ids.append(mid)
        await asyncio.sleep(0)
    return ids


def compact_away(log, segment_id: int) -> None:
    """Compact until `segment_id` is gone (its live records moved to the active segment)."""
    for _ in range(50):                        # bounded: each call copies at most 2000 records
        log.maintain()
        if segment_id not in [s.segment_id for s in log.segments]:
            break
    assert segment_id not in [s.segment_id for s in log.segments]

def test_compaction_moves_old_message_and_deletes_front_segment(tmp_path, logs):
    nid = Ids()
    old_payload = b"the one message nobody read " * 10

    async def main():
        log = logs(tmp_path)
        log.open()
        log.start(asyncio.get_running_loop())
        old = nid()
        log.append("sleeper", old, old >> 22, "s", "d", old_payload, 99)
        first = log.active.segment_id
        ids = await fill_three_segments(log, nid)
        assert log.consume("busy", ids) == len(ids)
        front = log.segments[0]
        assert front.segment_id == first and front.live == 1 and front.messages > 100
        front_file = tmp_path / f"{first:020d}.seg"
        compact_away(log, first)
        await until(lambda: not front_file.exists(), what="front segment file deleted")
        (loc,) = [loc for _mid, loc in log.pending_locations("sleeper")]
        assert loc >> 32 != first
        assert [tuple(m)[:5] for m in log.pending("sleeper")] == [(old, old >> 22, "s", "d", old_payload)]
        log.close()
        return old

    old = asyncio.run(main())
    again = logs(tmp_path)
    report = again.open()
    assert report.pending == 1
    assert [tuple(m)[:5] for m in again.pending("sleeper")] == [(old, old >> 22, "s", "d", old_payload)]
    assert again.pending_count("busy") == 0


def test_device_records_are_found_through_compaction_a_delete_and_a_reopen(tmp_path, logs):
    """The device registry's records (indexed by user, the rest of the key read from the
    record): one and three devices per user, re-registered until the front segment is
    compacted away, one device's record deleted; the same devices, last-seen times and
    keys before and after a reopen, and nothing else under the prefix."""
    nid = Ids()

    async def main():
        log = logs(tmp_path)
        log.open()
        log.start(asyncio.get_running_loop())
        first = log.active.segment_id
        users = {f"u{i}": ["phone"] if i % 2 else ["phone", "laptop", "tablet"] for i in range(40)}
        for user, devices in users.items():
            for d in devices:
                assert log.register_device(user, d, 1000)
        assert not log.register_device("u0", "laptop", 1001)          # known: last seen moves on
        seen = {}
        log.consume("busy", await fill_three_segments(log, nid))
        compact_away(log, first)                                   # every device record was moved
        log.meta_put("d\x00u2\x00tablet", b"")                     # u2's tablet forgotten
        users["u2"].remove("tablet")
        for user, devices in users.items():
            seen[user] = log.last_seen(user)
        log.close()
        return users, seen

    users, seen = asyncio.run(main())
    assert seen["u0"] == 1001 and seen["u1"] == 1000
    again = logs(tmp_path)
    again.open()
    want = {f"d\x00{u}\x00{d}" for u, ds in users.items() for d in ds}
    assert set(again.meta_keys("d\x00")) == want and len(again.meta_keys("d\x00")) == len(want)
    assert set(again.meta_keys("d\x00u1\x00")) == {"d\x00u1\x00phone"}
    for user, devices in users.items():
        assert sorted(again.devices_of(user)) == sorted(devices), user
        assert again.last_seen(user) == seen[user]
    assert again.meta_get("d\x00u2\x00tablet") is None
    assert struct.unpack("!Q", again.meta_get("d\x00u0\x00laptop"))[0] == 1001
    assert again.register_device("u2", "tablet", 2000) and not again.register_device("u2", "tablet", 2001)
    again.close()


# -- expiry -----------------------------------------------------------------------------------

def test_expired_messages_are_not_delivered_or_recovered(tmp_path, logs):
    ttl_s = 60
    now = now_ms()
    past = Ids(now - 2 * ttl_s * 1000)
    fresh = Ids(now)
    log = logs(tmp_path, cfg(ttl_s=ttl_s))
    log.open()
    stale_ids = [past() for _ in range(3)]
    for mid in stale_ids:
        log.append("bob", mid, mid >> 22, "s", "d", b"stale")
    fresh_ids = [fresh() for _ in range(2)]
    for mid in fresh_ids:
        log.append("bob", mid, mid >> 22, "s", "d", b"fresh")
    assert [m.msg_id for m in log.pending("bob")] == fresh_ids
    assert [d.msg_id for d in delivered(log, "bob")] == fresh_ids
    assert log.expired == 3                      # write_pending_into dropped them from the index
    assert [mid for mid, _loc in log.pending_locations("bob")] == fresh_ids
    # one that expires between the append and the delivery
    later = Ids(now + 1)
    mid = later()
    log.append("carol", mid, now, "s", "d", b"soon stale")
    assert delivered(log, "carol", now + ttl_s * 1000) == []
    assert log.pending_count("carol") == 0
    log.close()

    again = logs(tmp_path, cfg(ttl_s=ttl_s))
    report = again.open()
    assert report.pending == 3 and again.expired == 3
    assert [m.msg_id for m in again.pending("bob")] == fresh_ids
    assert again.pending_count("carol") == 1      # not expired yet at recovery time
    assert again.expire_prefix("carol", now + ttl_s * 1000) == 1
    assert again.pending_count("carol") == 0


# -- quota ------------------------------------------------------------------------------------

def test_quota_per_recipient(tmp_path, logs):
    nid = Ids()
    log = logs(tmp_path, cfg(max_pending=3))
    log.open()
    bob = [nid() for _ in range(3)]
    for mid in bob:
        log.append("bob", mid, mid >> 22, "s", "d", b"hi")
    with pytest.raises(StoreError) as e:
        log.append("bob", nid(), now_ms(), "s", "d", b"one too many")
    assert e.value.code == ErrorCode.QUOTA_EXCEEDED
    assert [m.msg_id for m in log.pending("bob")] == bob
    for _ in range(3):
        mid = nid()
        log.append("carol", mid, mid >> 22, "s", "d", b"unaffected")
    assert log.pending_count("carol") == 3
    assert log.consume("bob", [bob[0]]) == 1
    mid = nid()
    log.append("bob", mid, mid >> 22, "s", "d", b"room again")
    assert [m.msg_id for m in log.pending("bob")] == bob[1:] + [mid]
    with pytest.raises(StoreError) as e:
        log.append("bob", nid(), now_ms(), "s", "d", b"full again")
    assert e.value.code == ErrorCode.QUOTA_EXCEEDED
    log.close()
    again = logs(tmp_path, cfg(max_pending=3))
    again.open()
    assert [m.msg_id for m in again.pending("bob")] == bob[1:] + [mid]
    with pytest.raises(StoreError) as e:
        again.append("bob", nid(), now_ms(), "s", "d", b"still full after a restart")
    assert e.value.code == ErrorCode.QUOTA_EXCEEDED


# -- torn tails ---------------------------------------------------------------------------------

def write_records(directory, logs, n=20, running=False, payload=b"p" * 300):
    """n messages for 'bob' in a fresh log; returns their ids. Without `running`
    the log never started (no spare segments) and is closed cleanly. With it, the
    log runs on a loop with its spare segments prepared, and `directory` gets a
    copy of its files taken while it runs: what a kill -9 leaves (the mapping's
    writes are in the page cache, which the copy reads)."""
    nid = Ids()
    ids = [nid() for _ in range(n)]

    async def run(log, live):
        log.start(asyncio.get_running_loop())
        for mid in ids:
            log.append("bob", mid, mid >> 22, "s", "d", payload + mid.to_bytes(8, "big"))
        await until(lambda: spare_ready(log) and not log._preparing and len(seg_files(live)) >= 2,
                    what="spare segment files")
        # a spare being prepared meanwhile may come and go as .tmp: a kill leaves it or not
        shutil.copytree(live, directory, ignore=shutil.ignore_patterns(".*.seg.tmp"))

    if running:
        live = Path(str(directory) + "-live")
        log = logs(live)
        log.open()
        asyncio.run(run(log, live))
    else:
        log = logs(directory)
        log.open()
        for mid in ids:
            log.append("bob", mid, mid >> 22, "s", "d", payload + mid.to_bytes(8, "big"))
    log.close()
    return ids


def tear(path, damage: str) -> tuple[int, int]:
    """Damage the last record of `path` as a kill mid-write would; returns (offset, end of record)."""
    _hdr, records = parse_segment(path)
    off, length, _t, raw = records[-1]
    if damage == "length_never_written":          # body written, length (stored last) still zero
        patch(path, off, b"\0\0\0\0")
    elif damage == "body_cut_short":               # length and crc there, the body's end not
        patch(path, off + length - 40, bytes(40))
    elif damage == "half_a_record":                # only the first bytes of the body made it
        patch(path, off, b"\0\0\0\0")
        patch(path, off + 64, bytes(length - 64))
    return off, off + length


@pytest.mark.parametrize("damage", ["length_never_written", "body_cut_short", "half_a_record"])
def test_torn_tail_is_zeroed_and_appending_resumes(tmp_path, logs, damage):
    ids = write_records(tmp_path, logs)
    (path,) = seg_files(tmp_path)
    torn_at, torn_end = tear(path, damage)
    log = logs(tmp_path)
    report = log.open()
    assert not report.corrupt and not report.bad_headers
    ((sid, start, stop),) = report.torn_tails
    assert (sid, start) == (1, torn_at) and torn_at < stop <= torn_end
    assert [m.msg_id for m in log.pending("bob")] == ids[:-1]
    assert [m.payload[-8:] for m in log.pending("bob")] == [i.to_bytes(8, "big") for i in ids[:-1]]
    with open(path, "rb") as f:                   # zeroed on disk, not just in memory
        f.seek(torn_at)
        assert f.read(SEG - torn_at) == bytes(SEG - torn_at)
    nid = Ids(now_ms() + 1)
    new = [nid() for _ in range(5)]
    for mid in new:
        log.append("bob", mid, mid >> 22, "s", "d", b"after recovery")
    _hdr, records = parse_segment(path)
    assert records[len(ids) - 1][0] == torn_at    # appending resumed where the torn record was
    log.close()
    again = logs(tmp_path)
    report = again.open()
    assert not report.torn_tails and not report.corrupt
    assert [m.msg_id for m in again.pending("bob")] == ids[:-1] + new


def test_torn_tail_behind_prepared_spare_is_a_torn_tail(tmp_path, logs):
    d = tmp_path / "crashed"
    ids = write_records(d, logs, running=True)
    first, *spares = seg_files(d)
    assert spares and parse_segment(first)[0]["end"] > HEADER_SIZE
    torn_at, _ = tear(first, "length_never_written")
    log = logs(d)
    report = log.open()
    assert [m.msg_id for m in log.pending("bob")] == ids[:-1]     # holds today
    assert report.corrupt == []
    assert [(sid, start) for sid, start, _stop in report.torn_tails] == [(1, torn_at)]


# -- recycled segments (docs/storage.md, Recycling) ---------------------------------------------

async def until_recycled_active(log, nid, payload=b"x" * 2000) -> tuple[int, list]:
    """Append messages for "busy", consuming each at once, until the active segment is one
    made from a consumed segment's file and holds records; (inode of the first segment's
    file, ids appended)."""
    inode = os.stat(log.active.path).st_ino
    ids = []
    for i in bounded(5000, "a recycled segment in use"):
        if log.active.tag and log.active.end > HEADER_SIZE + 8192:
            break
        if log.active.free < len(payload) + 512:
            await until(lambda: roll_ready(log), what="spare segments")
        mid = nid()
        log.append("busy", mid, mid >> 22, "s", "d", payload)
        ids.append(mid)
        log.consume("busy", [mid])
        if i % 20 == 0:
            log.maintain()                       # deletes (keeps for reuse) consumed front segments
        await asyncio.sleep(0)
    return inode, ids


def test_a_consumed_segment_becomes_the_next_spare_without_zero_filling(tmp_path, logs):
    """The first segment's file, all consumed, comes back as a later segment: the same
    inode, a version-3 header, its old records still past the new ones (nothing was
    zero-filled), and a reopen serves exactly the pending messages: none of the old
    use's comes back."""
    nid = Ids()

    async def main():
        log = logs(tmp_path, cfg(segment_size=256 << 10))
        log.open()
        log.start(asyncio.get_running_loop())
        inode, ids = await until_recycled_active(log, nid)
        assert log.recycled >= 1 and log.stats()["recycled"] == log.recycled
        inodes = {os.stat(s.path).st_ino: s for s in log.segments}
        assert inode in inodes and inodes[inode].tag, "the first segment's file was not reused"
        kept = [mid for mid in (nid() for _ in range(3))]
        for mid in kept:
            log.append("bob", mid, mid >> 22, "s", "d", b"still pending")
        active = log.active
        log.close()
        return ids, kept, active.segment_id, Path(active.path)

    ids, kept, sid, path = asyncio.run(main())
    hdr, records = parse_segment(path)
    assert hdr["version"] == 3 and records
    data = path.read_bytes()
    assert any(data[hdr["end"]:]), "the recycled file was zero-filled"
    log = logs(tmp_path, cfg(segment_size=256 << 10))
    report = log.open()
    assert not report.torn_tails and not report.corrupt and not report.bad_headers
    assert log.pending_count() == len(kept) and not log.pending("busy")
    assert [m.msg_id for m in log.pending("bob")] == kept
    assert {s.segment_id: s.end for s in log.segments}[sid] == hdr["end"]
    more = nid()
    log.append("bob", more, more >> 22, "s", "d", b"after the reopen")
    log.close()
    again = logs(tmp_path, cfg(segment_size=256 << 10))
    again.open()
    assert [m.msg_id for m in again.pending("bob")] == kept + [more]
    assert not list(tmp_path.glob(".*.tmp")), "a kept file was left behind by close()"


def recycled_pristine(tmp_path, logs, n: int = 40) -> tuple[Path, list]:
    """A closed log whose active segment is a recycled file holding `n` pending messages
    for "bob" after its consumed ones; (its path, the ids)."""
    nid = Ids()

    async def main():
        log = logs(tmp_path, cfg(segment_size=256 << 10))
        log.open()
        log.start(asyncio.get_running_loop())
        await until_recycled_active(log, nid)
        ids = []
        for i in range(n):
            mid = nid()
            log.append("bob", mid, mid >> 22, "s", "d", bytes([i]) * 300)
            ids.append(mid)
        path = Path(log.active.path)
        log.close()
        return path, ids

    return asyncio.run(main())


def test_a_torn_record_in_a_recycled_segment_is_cut_and_its_old_bytes_stay(tmp_path, logs):
    """A torn last record (its CRC does not match) of a recycled segment: reported and
    cut, the file's previous use's bytes after it left alone (they can never pass as
    records), and appending resumes where the torn record was."""
    path, ids = recycled_pristine(tmp_path, logs)
    hdr, records = parse_segment(path)
    off, length, _t, raw = records[-1]
    patch(path, off + 4, bytes(b ^ 0xFF for b in raw[4:8]))
    log = logs(tmp_path, cfg(segment_size=256 << 10))
    report = log.open()
    assert not report.corrupt
    assert report.torn_tails == [(hdr["id"], off, off + 12)]
    assert [m.msg_id for m in log.pending("bob")] == ids[:-1]
    assert any(path.read_bytes()[off + 12:]), "the old bytes were zeroed"
    nid = Ids(now_ms() + 1)
    new = nid()
    log.append("bob", new, new >> 22, "s", "d", b"after recovery")
    assert parse_segment(path)[1][len(records) - 1][0] == off
    log.close()
    again = logs(tmp_path, cfg(segment_size=256 << 10))
    report = again.open()
    assert not report.torn_tails and not report.corrupt
    assert [m.msg_id for m in again.pending("bob")] == ids[:-1] + [new]


@pytest.mark.parametrize("where", ["payload", "tag"])
def test_a_bit_flip_in_a_recycled_segment_loses_only_that_record(tmp_path, logs, where):
    """Bit rot inside a recycled segment is told from its previous use's bytes, also
    when it hits a record's tag (which is where recovery looks for the end of this
    use's records): the damaged record is reported, the records after it are still served."""
    path, ids = recycled_pristine(tmp_path, logs)
    hdr, records = parse_segment(path)
    bob = [(off, raw) for off, _len, rtype, raw in records if rtype == REC_MESSAGE and b"\x03bob" in raw]
    off, raw = bob[len(bob) // 2]
    victim = message_fields(raw)[0]
    at = off + len(raw) - 1 if where == "payload" else off + 11
    patch(path, at, bytes([raw[at - off] ^ 0x10]))
    log = logs(tmp_path, cfg(segment_size=256 << 10))
    report = log.open()
    assert [sid for sid, _regions in report.corrupt] == [hdr["id"]]
    assert [m.msg_id for m in log.pending("bob")] == [i for i in ids if i != victim]


def test_recycling_off_deletes_consumed_segments(tmp_path, logs):
    nid = Ids()

    async def main():
        log = logs(tmp_path, cfg(segment_size=256 << 10, recycle=False))
        log.open()
        log.start(asyncio.get_running_loop())
        first = Path(log.active.path)
        for i in bounded(2000, "the first segment deleted"):
            if not first.exists():
                break
            if log.active.free < 2512:
                await until(lambda: roll_ready(log), what="spare segments")
            mid = nid()
            log.append("busy", mid, mid >> 22, "s", "d", b"x" * 2000)
            log.consume("busy", [mid])
            if i % 20 == 0:
                log.maintain()
            await asyncio.sleep(0)
        await until(lambda: log._preparing == 0, what="spares made")
        assert log.recycled == 0 and not any(s.tag for s in log.segments + list(log._spares))
        assert not list(tmp_path.glob(".*.tmp")), "a consumed segment's file was kept"
        log.close()

    asyncio.run(main())
    assert all(parse_segment(p)[0]["version"] == 2 for p in seg_files(tmp_path))


# -- bit flips --------------------------------------------------------------------------------

def test_bit_flips_lose_only_the_damaged_record(tmp_path, logs):
    pristine = tmp_path / "pristine"
    rng = random.Random(20240611)
    nid = Ids()
    log = logs(pristine)
    log.open()
    ids = []
    for i in range(300):
        mid = nid()
        log.append(f"r{i % 4}", mid, mid >> 22, "sender", "dev", rng.randbytes(rng.randrange(1, 600)), i + 1)
        ids.append(mid)
    expect = {m.msg_id: tuple(m) for r in log.recipients() for m in log.pending(r)}
    assert sorted(expect) == ids
    log.close()
    (src,) = seg_files(pristine)
    _hdr, records = parse_segment(src)
    assert len(records) == 300

    for case in range(30):
        d = tmp_path / f"case{case}"
        shutil.copytree(pristine, d)
        k = rng.randrange(len(records) - 1)        # never the last record (that would be a torn tail)
        off, length, _t, raw = records[k]
        pos = off + rng.randrange(length)
        bit = 1 << rng.randrange(8)
        (path,) = seg_files(d)
        patch(path, pos, bytes([raw[pos - off] ^ bit]))
        victim = message_fields(raw)[0]
        log = logs(d)
        report = log.open()                         # never raises
        assert [sid for sid, _regions in report.corrupt] == [1], f"case {case}: flip at {pos} not reported"
        ((region,),) = [regions for _sid, regions in report.corrupt]
        assert region == (off, records[k + 1][0])     # exactly the damaged record
        assert log.pending_count() == len(ids) - 1
        got = {m.msg_id: tuple(m) for r in log.recipients() for m in log.pending(r)}
        assert victim not in got
        assert got == {mid: m for mid, m in expect.items() if mid != victim}
        log.close()

    for case in range(8):                            # the 64-byte segment header
        d = tmp_path / f"header{case}"
        shutil.copytree(pristine, d)
        (path,) = seg_files(d)
        pos = rng.randrange(HEADER_SIZE)
        byte = path.read_bytes()[pos]
        patch(path, pos, bytes([byte ^ (1 << rng.randrange(8))]))
        log = logs(d)
        report = log.open()
        assert report.bad_headers == [path.name]
        assert (d / "quarantine" / path.name).exists() and not path.exists()
        assert log.pending_count() == 0 and report.segments == 0
        nmid = nid()
        log.append("r0", nmid, nmid >> 22, "s", "d", b"the log still works")
        assert [m.msg_id for m in log.pending("r0")] == [nmid]
        log.close()


# -- stale bytes --------------------------------------------------------------------------------

def test_stale_record_bytes_never_pass_as_records(tmp_path, logs):
    pristine = tmp_path / "pristine"
    nid = Ids()
    log = logs(pristine)
    log.open()
    big = b"B" * 200_000
    mid = nid()
    log.append("bob", mid, mid >> 22, "s", "d", b"a small record first")
    for _ in bounded(10, "a second segment"):      # no start(): each roll makes the next file on the spot
        if len(log.segments) >= 2:
            break
        mid = nid()
        log.append("bob", mid, mid >> 22, "s", "d", big)
    for _ in range(2):
        mid = nid()
        log.append("bob", mid, mid >> 22, "s", "d", b"small")
    total = log.pending_count()
    log.close()
    first, second = seg_files(pristine)
    h1, rec1 = parse_segment(first)
    h2, rec2 = parse_segment(second)
    off, length, _t, raw = rec1[-1]                 # a 200 KB record deep in segment 1
    assert off > h2["end"] + 64

    def check(name, path_of, offset, data=raw):
        d = tmp_path / name
        shutil.copytree(pristine, d)
        target = path_of(d)
        patch(target, offset, data)
        log = logs(d)
        report = log.open()
        seg = {s.segment_id: s for s in log.segments}[parse_segment(path_of(pristine))[0]["id"]]
        assert not seg.valid_at(offset), f"{name}: copied record accepted"
        assert log.pending_count() == total, name
        ids = [m for m, _loc in log.pending_locations("bob")]
        assert len(ids) == len(set(ids)) == total
        return report, seg

    # the same offset in the other file: the CRC covers that file's id and nonce
    report, seg = check("other_file_same_offset", lambda d: seg_files(d)[1], off)
    assert [(sid, start) for sid, start, _stop in report.torn_tails] == [(2, h2["end"])]
    assert seg.first_nonzero(seg.end) == -1         # treated as a torn tail and zeroed
    # the next free place in the other file, where a real record would go next
    report, seg = check("other_file_at_end", lambda d: seg_files(d)[1], h2["end"])
    assert [(sid, start) for sid, start, _stop in report.torn_tails] == [(2, h2["end"])]
    # another offset in the same file (the small first record, copied to the free tail of
    # segment 1): the CRC covers the offset
    small_raw = rec1[0][3]
    assert h1["end"] + len(small_raw) <= first.stat().st_size
    report, seg = check("same_file_other_offset", lambda d: seg_files(d)[0], h1["end"], small_raw)
    assert not seg.valid_at(h1["end"])
    # a whole segment file restored under a new id, its header rewritten consistently
    d = tmp_path / "renamed_copy"
    shutil.copytree(pristine, d)
    data = bytearray(first.read_bytes())
    h = list(HEADER.unpack_from(data))
    h[1] = 3
    data[:60] = HEADER.pack(*h)
    data[60:64] = struct.pack("!I", crc32c(bytes(data[:60])))
    (d / f"{3:020d}.seg").write_bytes(bytes(data))
    log = logs(d)
    report = log.open()
    assert not report.bad_headers
    assert log.pending_count() == total
    assert [sid for sid, _s, _e in report.torn_tails] == [3]
    assert log.segments[-1].first_nonzero(HEADER_SIZE) == -1


# -- a really full disk -----------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_enospc_on_a_full_tmpfs(small_tmpfs, logs):
    d = small_tmpfs / "log"
    nid = Ids()
    config = lambda: cfg(max_pending=1_000_000)  # noqa: E731
    payload = bytes(range(250)) * 4

    async def fill():
        log = logs(d, config())
        log.open()
        log.start(asyncio.get_running_loop())
        ids, refused = [], 0

        def settled():           # no reservation in flight, every file on disk is one of the log's
            return not list(d.glob(".*.tmp")) and \
                {int(p.stem) for p in seg_files(d)} == {s.segment_id for s in log.segments + list(log._spares)}

        def free():
            st = os.statvfs(d)
            return st.f_bavail * st.f_frsize

        full = False
        for i in range(20_000):                      # 3 MiB of 1 KB messages is < 3100
            for _ in bounded(100, "a settled full disk"):
                mid = nid()
                try:
                    log.append(f"u{i % 7}", mid, mid >> 22, "s", "d", payload + mid.to_bytes(8, "big"))
                    ids.append(mid)
                    break
                except StoreError as e:
                    assert e.code == ErrorCode.STORAGE_FULL
                    refused += 1
                # Refused. The loop's reservation may have raced the worker's for the last free
                # space (both fail), or a prepared segment may be on its way: the disk is really
                # full only if the log holds every file and there is no room for another
                # (checked on both sides: the worker may start or finish a reservation meanwhile).
                if settled() and free() < SEG and settled():
                    full = True
                    break
                # not yet: after a failed try the log tries again within a maintenance tick
                await until(lambda: settled() and (not log.storage_full or free() < SEG),
                            what="reservations to finish")
            if full:
                break
            if i % 20 == 0:
                await asyncio.sleep(0)               # let spare segments arrive while there is room
        assert full
        assert refused and log.storage_full
        assert isinstance(log.last_full_error, OSError) and log.last_full_error.errno == errno.ENOSPC
        # acknowledgements still work: they are recorded in the reserved space
        eaten = [i for i in ids if i % 7 == 0][:50]
        by_recipient = {}
        for i, mid in enumerate(ids):
            if mid in eaten:
                by_recipient.setdefault(f"u{i % 7}", []).append(mid)
        assert sum(log.consume(r, v) for r, v in by_recipient.items()) == len(eaten)
        assert log.unrecorded_consumes == 0
        log.close()
        return ids, set(eaten)

    ids, eaten = asyncio.run(fill())
    assert len(ids) > 900             # most of the disk held messages (besides the lock, spares and reserve)
    assert not list(d.glob(".*.tmp"))

    async def drain():
        log = logs(d, config())
        report = log.open()                          # recovery on the full disk
        assert not report.torn_tails and not report.corrupt
        assert report.pending == len(ids) - len(eaten)
        got = {m.msg_id: m.payload for r in log.recipients() for m in log.pending(r)}
        assert got == {mid: payload + mid.to_bytes(8, "big") for mid in ids if mid not in eaten}
        with pytest.raises(StoreError) as e:         # still full after a restart
            mid = nid()
            log.append("u1", mid, mid >> 22, "s", "d", payload)
        assert e.value.code == ErrorCode.STORAGE_FULL
        log.start(asyncio.get_running_loop())
        for r in log.recipients():
            log.consume(r, [mid for mid, _loc in log.pending_locations(r)])
        assert log.pending_count() == 0 and log.unrecorded_consumes == 0
        fresh = []
        deadline = time.monotonic() + 10
        while not fresh:                             # maintain() deletes the consumed segments,
            assert time.monotonic() < deadline, "storage stayed full after everything was consumed"
            log.maintain()                           # then a new segment can be reserved
            await asyncio.sleep(0.01)
            mid = nid()
            try:
                log.append("u1", mid, mid >> 22, "s", "d", b"room again")
                fresh.append(mid)
            except StoreError as e:
                assert e.code == ErrorCode.STORAGE_FULL
        assert not log.storage_full
        for _ in range(200):
            mid = nid()
            log.append("u1", mid, mid >> 22, "s", "d", b"room again")
            fresh.append(mid)
        log.close()
        return fresh

    fresh = asyncio.run(drain())
    log = logs(d, config())
    log.open()
    assert [m.msg_id for m in log.pending("u1")] == fresh
    assert log.pending_count() == len(fresh)


def take_all_space(directory: Path) -> Path:
    """A file of real blocks that takes all the free space of `directory`'s filesystem."""
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = bytes(64 << 10)
        for _ in bounded(1 << 16, "a full filesystem"):
            try:
                if os.write(fd, chunk) < len(chunk):
                    break
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    finally:
        os.close(fd)
    return ballast


def test_full_disk_acks_and_new_devices_use_the_reserve_and_consuming_frees_it(small_tmpfs, logs):
    """The disk fills up around a running log. Messages are refused once segment 1
    is full (without a new try at a segment per refusal); new devices register in
    the reserve until only the room for compacting segment 1 is left, then get
    STORAGE_FULL (not an internal error); acknowledgements past that are applied
    at once and written later. Consuming everything makes segment 1 sparse: its
    device record is compacted into the reserve, the segment deleted, and the
    acknowledgements written, all while the disk stays full. Once space comes
    back, messages are taken again, and a restart finds exactly that."""
    d = small_tmpfs / "log"
    nid = Ids()
    conf = cfg(segment_size=256 << 10, spares=0, max_pending=1_000_000)
    long = "x" * 200

    async def main():
        log = logs(d, conf)
        log.open()
        log.start(asyncio.get_running_loop())          # segment 1 and its reserve
        assert log.register_device("bob", "phone", now_ms())
        first, reserve = log.active.segment_id, log._spares[0].segment_id
        ballast = take_all_space(small_tmpfs)
        ids = []
        with pytest.raises(StoreError) as e:
            for _ in bounded(10_000, "segment 1 full"):
                mid = nid()
                log.append("bob", mid, mid >> 22, "alice", "laptop", b"m" * 100)
                ids.append(mid)
        assert e.value.code == ErrorCode.STORAGE_FULL and log.storage_full and log.full_episodes == 1
        assert log.active.segment_id == first and len(ids) > 1000
        tries = log.segment_failures
        for _ in range(1000):                           # refused again and again: not one new try
            with pytest.raises(StoreError) as e:
                mid = nid()
                log.append("bob", mid, mid >> 22, "alice", "laptop", b"m" * 100)
            assert e.value.code == ErrorCode.STORAGE_FULL
        assert log.segment_failures == tries and log.full_episodes == 1

        devices = 0
        with pytest.raises(StoreError) as e:
            for i in bounded(5000, "the reserve used up by new devices"):
                assert log.register_device("bob", f"{i:04d}{long}", now_ms())
                devices += 1
        assert e.value.code == ErrorCode.STORAGE_FULL and devices > 100
        assert log.active.segment_id == reserve and log.keep_for_compaction > 0
        assert not log.register_device("bob", "phone", now_ms())     # a known device: no error
        assert len(log.devices_of("bob")) == devices + 1

        assert log.consume("bob", ids) == len(ids)
        assert log.pending_count() == 0 and log.unrecorded_consumes == len(ids)
        await until(lambda: not (d / f"{first:020d}.seg").exists() and log.unrecorded_consumes == 0,
                    what="segment 1 compacted and deleted, the acknowledgements written")
        assert ballast.exists()
        with pytest.raises(StoreError):                 # the freed room went to the acks: no reserve yet
            log.append("bob", nid(), now_ms(), "alice", "laptop", b"m")

        ballast.unlink()
        await until(lambda: log.reserve_ok and not log.storage_full, what="a new reserve once space is back")
        mid = nid()
        log.append("bob", mid, mid >> 22, "alice", "laptop", b"room again")
        log.close()
        return devices, mid

    devices, mid = asyncio.run(main())
    again = logs(d, conf)
    report = again.open()
    assert not report.torn_tails and not report.corrupt
    assert [m.msg_id for m in again.pending("bob")] == [mid]
    assert len(again.devices_of("bob")) == devices + 1


class LogLines(picologging.Handler):
    """The messages the store's logger writes, as they are written."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def log_lines():
    handler = LogLines()
    logger = picologging.getLogger("switchboard.log")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def test_a_flapping_full_shard_logs_one_pair_of_lines_per_quiet_period(small_tmpfs, logs, log_lines, monkeypatch):
    """Space comes and goes (a ballast file): every episode is counted, but a shard
    logs one storage_full / storage_available pair per quiet period; an episode that
    starts inside it is logged once the period is over if the shard is still full,
    saying how many went unlogged."""
    import _core.log
    monkeypatch.setattr(_core.log, "STORAGE_LOG_QUIET_S", 600.0)
    nid = Ids()

    def fill(log):
        for _ in bounded(10_000, "a refusal"):
            mid = nid()
            try:
                log.append("bob", mid, mid >> 22, "s", "d", b"m" * 1000)
            except StoreError as e:
                assert e.code == ErrorCode.STORAGE_FULL
                return

    def events():
        return [line.split()[0] for line in log_lines if line.startswith("event=storage_")]

    async def main():
        log = logs(small_tmpfs / "log", cfg(segment_size=256 << 10, spares=0, max_pending=100_000))
        log.open()
        log.start(asyncio.get_running_loop())
        for episode in range(3):                        # full, then space again: three times
            ballast = take_all_space(small_tmpfs)
            fill(log)
            assert log.storage_full and log.full_episodes == episode + 1
            ballast.unlink()
            await until(lambda: not log.storage_full, what="space back")
        assert events() == ["event=storage_full", "event=storage_available"]
        take_all_space(small_tmpfs)
        fill(log)                                       # a fourth, still inside the quiet period
        assert log.full_episodes == 4 and len(events()) == 2
        monkeypatch.setattr(_core.log, "STORAGE_LOG_QUIET_S", 0.0)     # the period is over
        await until(lambda: len(events()) == 3, what="the line at the next maintenance")
        assert events()[-1] == "event=storage_full" and "episodes_not_logged=2" in log_lines[-1]
        log.close()

    asyncio.run(main())


def test_a_message_for_two_devices_is_refused_whole_on_a_full_disk(small_tmpfs, logs):
    """A SEND to a user with two devices writes one record per device. On a full disk,
    with room in the active segment for one of them but not both, the SEND is
    refused with nothing stored (it used to be stored for the first device, while
    the sender, told STORAGE_FULL, would send it again)."""
    async def main():
        log = logs(small_tmpfs / "log", cfg(segment_size=256 << 10, spares=0, max_pending=100_000))
        log.open()
        log.start(asyncio.get_running_loop())
        router = Router(log, loop=asyncio.get_running_loop())
        answers = []
        reader = Decoder(lambda t, f, b: answers.append(decode_body(t, f, b)), 1 << 20)
        for device in ("phone1", "phone2"):
            router.open_session("bob", device, write=lambda data: None, close=lambda: None)
        alice = router.open_session("alice", "laptop", write=reader.feed, close=lambda: None)
        take_all_space(small_tmpfs)
        into_alice = Decoder(alice, 1 << 20)

        sent = 0

        def send(size: int):                                   # the SEND's first field counts up from 1
            nonlocal sent
            sent += 1
            into_alice.feed(encode(Send(sent, "bob", b"x" * size)))
            router.flush()
            return answers[-1]

        record = 45 + len("bob") + len("phone1") + len("alice") + len("laptop")   # and the payload
        for _ in bounded(100, "the active segment nearly full"):
            if log.active.free < 90_000:
                break
            assert isinstance(send(40_000), Ack)
        stored = sent
        one = (log.active.free * 2 // 3) & ~7                  # one record fits, two do not
        answer = send(one - record)
        assert isinstance(answer, Error) and answer.code == ErrorCode.STORAGE_FULL and not answer.fatal
        assert log.pending_count("bob", "phone1") == log.pending_count("bob", "phone2") == stored
        log.close()

    asyncio.run(main())


def test_injected_enospc_refuses_senders_but_serves_acks(tmp_path, logs):
    """Segment 1 and its reserve are made while there is room (a running log keeps
    its reserve on disk across close). Then every new segment fails: senders are
    refused once segment 1 is full, and the acknowledgements of everything are
    still recorded, in the reserve."""
    nid = Ids()
    first = nid()

    async def before():
        log = logs(tmp_path)
        log.open()
        log.start(asyncio.get_running_loop())          # segment 1 and its reserve
        log.append("bob", first, first >> 22, "s", "d", b"made before the disk filled")
        log.close()

    asyncio.run(before())
    assert len(seg_files(tmp_path)) == 2               # the reserve stayed

    async def main():
        log = logs(tmp_path, fault="enospc")
        log.open()
        log.start(asyncio.get_running_loop())
        await until(lambda: log.last_full_error is not None, what="the spare segment to fail")
        reserve = log._spares[0].segment_id
        ids = []
        with pytest.raises(StoreError) as e:
            for _ in range(2000):
                mid = nid()
                log.append("bob", mid, mid >> 22, "s", "d", b"z" * 1000)
                ids.append(mid)
        assert e.value.code == ErrorCode.STORAGE_FULL
        assert 500 < len(ids) < 2000                   # segment 1 filled up, the reserve untouched
        assert log.storage_full and log.refused == 1 and log.active.segment_id != reserve
        assert log.consume("bob", [first] + ids) == len(ids) + 1
        assert log.unrecorded_consumes == 0
        assert log.active.segment_id == reserve        # the CONSUME records rolled into it
        with pytest.raises(StoreError):                # and content may not follow them there
            log.append("bob", nid(), now_ms(), "s", "d", b"z")
        assert not list(tmp_path.glob(".*.tmp"))
        log.close()

    asyncio.run(main())
    again = logs(tmp_path)
    again.open()
    assert again.pending_count() == 0


# -- durability ---------------------------------------------------------------------------------

@pytest.mark.parametrize("via", ["argument", "environment"])
def test_injected_eio_on_sync_is_fatal_and_never_acks(tmp_path, logs, monkeypatch, via):
    nid = Ids()
    if via == "environment":
        monkeypatch.setenv("SWITCHBOARD_LOG_FAULT", "eio")

    async def main():
        loop = asyncio.get_running_loop()
        log = logs(tmp_path, cfg(durability="always"), **({"fault": "eio"} if via == "argument" else {}))
        log.open()
        fatal = loop.create_future()
        log.on_fatal = fatal.set_result
        log.start(loop)
        acked = []
        mid = nid()
        log.append("bob", mid, mid >> 22, "s", "d", b"never acknowledged")
        log.commit(acked.append, mid)
        exc = await asyncio.wait_for(fatal, 10)
        assert isinstance(exc, OSError) and exc.errno == errno.EIO
        assert log.failed is exc
        mid2 = nid()
        log.append("bob", mid2, mid2 >> 22, "s", "d", b"after the failure")
        log.commit(acked.append, mid2)
        assert acked == [] and log.syncs == 0
        log.close()

    asyncio.run(main())


def test_always_acks_only_after_a_sync_and_in_order(tmp_path, logs):
    nid = Ids()

    async def main():
        loop = asyncio.get_running_loop()
        log = logs(tmp_path, cfg(durability="always"))
        log.open()
        log.start(loop)
        seen = []
        done = loop.create_future()

        def then(arg):
            seen.append((arg, log.syncs))
            if arg == 5:
                done.set_result(None)

        assert log.syncs == 0
        for k in range(3):                           # one loop turn: the first sync starts
            mid = nid()
            log.append("bob", mid, mid >> 22, "s", "d", b"m")
            log.commit(then, k)
            assert seen == []                        # nothing before its sync
        await asyncio.sleep(0)                       # a later turn, while the first sync may still run
        for k in range(3, 6):
            mid = nid()
            log.append("bob", mid, mid >> 22, "s", "d", b"m")
            log.commit(then, k)
        await asyncio.wait_for(done, 10)
        assert [a for a, _s in seen] == list(range(6))
        assert all(s >= 1 for _a, s in seen)
        assert [s for _a, s in seen] == sorted(s for _a, s in seen)
        assert log.syncs <= 3                        # group commit: six commits, at most three syncs
        # nothing new written and no sync running: the commit is answered at once
        immediate = []
        log.commit(immediate.append, "now")
        assert immediate == ["now"]
        log.close()

    asyncio.run(main())


def dirtied_bytes() -> int:
    """Bytes this process has dirtied in the page cache (/proc/self/io write_bytes:
    Linux counts a whole folio when a write marks it dirty)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no write_bytes in /proc/self/io")


def test_an_always_round_writes_back_a_page_not_a_folio_of_a_young_segment(tmp_path, logs):
    """A shard's first segments used to be zero-filled in 1 MiB writes, which gave
    them 1 MiB page-cache folios (ext4, Linux 6.16+): every `always` round then
    dirtied and wrote back a whole MiB per shard (64 shards: ~25 ms rounds, 11 k
    msgs/s). Each round of one small append must dirty a page or two."""
    nid = Ids()

    async def main():
        loop = asyncio.get_running_loop()
        log = logs(tmp_path, cfg(durability="always"))
        log.open()
        log.start(loop)
        await until(lambda: roll_ready(log), what="spares made")   # no zeroing during the rounds

        async def one_round():
            mid = nid()
            log.append("bob", mid, mid >> 22, "s", "d", b"m" * 40)
            synced = loop.create_future()
            log.commit(synced.set_result, None)
            await asyncio.wait_for(synced, 10)

        await one_round()
        before, rounds = dirtied_bytes(), 50
        for _ in range(rounds):
            await one_round()
        per_round = (dirtied_bytes() - before) / rounds
        assert 0 < per_round <= 8192, f"each round dirtied {per_round:.0f} bytes"
        log.close()

    asyncio.run(main())


def test_a_copy_window_keeps_the_newest_ids_and_the_one_just_added():
    w = CopyWindow()
    for origin in (30, 10, 50, 40, 20):              # out of order: kept sorted
        w.add_py(origin, 4)
    assert list(w) == [20, 30, 40, 50]               # past the window the oldest went
    w.add_py(5, 4)                                   # a late retry of an old fan-out
    assert 5 in w and list(w) == [5, 30, 40, 50]     # remembered: its next retry is a duplicate
    w.add_py(40, 4)
    assert list(w) == [5, 30, 40, 50]                # an id already there changes nothing
    for origin in range(100, 10_100):                # in order, far past the window: steady size
        w.add_py(origin, 4)
    assert list(w) == [10_096, 10_097, 10_098, 10_099] and 99 not in w


def test_group_copies_made_before_a_restart_are_not_made_again_after_it(tmp_path, logs):
    """A resumed fan-out asks again for copies it may have made: the copies a
    member got are read back from the log, so none is stored twice; the window
    keeps the newest ids and the look-up holds for ids out of order."""
    nid = Ids()
    origins = [nid() for _ in range(40)]

    async def main():
        loop = asyncio.get_running_loop()
        log = logs(tmp_path, cfg(durability="never"))
        log.open()
        log.start(loop)
        router = Router(log, loop=loop)
        bob = router.open_session("bob", "phone", write=lambda data: None, close=lambda: None)
        router.close_session(bob)
        copy = lambda r, o: r.store_group_copy("bob", o, o >> 22, "alice", "laptop", "#g", b"hi")  # noqa: E731
        made = [copy(router, o) for o in origins[::2] + origins[10:20]]       # even ids, then some again
        assert made == [True] * 20 + [i % 2 == 1 for i in range(10, 20)]
        log.sync()
        log.close()

        again = logs(tmp_path, cfg(durability="never"))
        again.open()
        again.start(loop)
        router = Router(again, loop=loop)
        before = set(origins[::2]) | set(origins[10:20])                  # 25 made before the restart
        assert [copy(router, o) for o in reversed(origins)] == [o not in before for o in reversed(origins)]
        last = nid()
        assert copy(router, last) is True
        assert sorted(m.ref for m in again.pending("bob", "phone")) == origins + [last]   # each once
        again.close()

    asyncio.run(main())


def test_never_and_interval_ack_at_once(tmp_path, logs):
    nid = Ids()

    async def main():
        for mode in ("never", "interval"):
            log = logs(tmp_path / mode, cfg(durability=mode, interval_ms=20))
            log.open()
            log.start(asyncio.get_running_loop())
            mid = nid()
            log.append("bob", mid, mid >> 22, "s", "d", b"m")
            acked = []
            log.commit(acked.append, 1)
            assert acked == [1]
            if mode == "interval":
                await until(lambda: log.syncs >= 1, what="the interval sync")
            log.close()

    asyncio.run(main())


# -- bugs found ---------------------------------------------------------------------------------

def test_consumes_stick_after_a_burst_outruns_the_spare(tmp_path, logs):
    """Regression: a spare prepared before a stall must not be installed after the
    segment the stall made (it has a lower id; recovery scans in id order, so
    CONSUME records in it would be applied before the messages they consume)."""
    nid = Ids()

    async def main():
        log = logs(tmp_path, cfg(max_pending=100_000))
        log.open()
        log.start(asyncio.get_running_loop())
        ids = []

        def put():
            mid = nid()
            log.append("bob", mid, mid >> 22, "s", "d", b"x" * 1000)
            ids.append(mid)

        for _ in bounded(2000, "a second segment"):  # one loop turn: the spares are not ready yet
            if len(log.segments) >= 2:
                break
            put()
        assert log.stalls >= 1                        # a segment was made on the loop, overtaking the spare
        await until(lambda: spare_ready(log), what="the spare segment")
        active = log.active
        for _ in bounded(2000, "the next segment"):  # fill it: a prepared spare takes over
            if log.active is not active:
                break
            put()
        keep = ids[-1]
        assert log.consume("bob", ids[:-1]) == len(ids) - 1
        assert [m.msg_id for m in log.pending("bob")] == [keep]
        log.close()
        return keep

    keep = asyncio.run(main())
    again = logs(tmp_path, cfg(max_pending=100_000))
    again.open()
    assert [m.msg_id for m in again.pending("bob")] == [keep]


def test_last_id_survives_deleting_consumed_segments(tmp_path, logs):
    nid = Ids()

    async def main():
        log = logs(tmp_path, cfg(max_pending=100_000))
        log.open()
        log.start(asyncio.get_running_loop())
        ids = []
        for _ in bounded(100_000, "segment 1 filled"):
            if log.active.free < 200:
                break
            mid = nid()
            log.append("bob", mid, mid >> 22, "s", "d", b"x" * 16)
            ids.append(mid)
        await until(lambda: spare_ready(log), what="the spare segment")
        log.consume("bob", ids)                      # its CONSUME records roll to segment 2
        assert log.active.segment_id != 1 and log.last_id() == ids[-1]
        log.maintain()
        await until(lambda: not (tmp_path / f"{1:020d}.seg").exists(), what="segment 1 deleted")
        log.close()
        return ids[-1]

    last = asyncio.run(main())
    again = logs(tmp_path, cfg(max_pending=100_000))
    again.open()
    assert again.last_id() == last


def test_close_leaves_only_the_reserve_of_its_spare_segments(tmp_path, logs):
    async def main():
        log = logs(tmp_path)
        log.open()
        log.start(asyncio.get_running_loop())        # makes segment 1 and its reserve, asks for a spare
        mid = Ids()()
        log.append("bob", mid, mid >> 22, "s", "d", b"m")
        reserve = log._spares[0].segment_id
        log.close()                                  # while the spare is being prepared
        return log.segments[0].segment_id, reserve

    first, reserve = asyncio.run(main())
    assert [p.name for p in seg_files(tmp_path)] == [f"{first:020d}.seg", f"{reserve:020d}.seg"]
    assert not list(tmp_path.glob(".*.tmp"))
    again = logs(tmp_path)                           # the reserve is a spare again after a restart
    again.open()
    assert [s.segment_id for s in again._spares] == [reserve] and again.pending_count() == 1
