"""Idempotent, ordered sends (PROTOCOL.md section 6, "Sequences"): every SEND
carries the next seq of its producer; the server stores each seq once, in
order, across retries, restarts and deleted segments (issue 12, defects 1-3)."""
import asyncio
import os
import signal
import time

from _core import frames as F
from _core.codec import encode
from _core.log import HEADER
from _core.protocol import ErrorCode
from rawclient import Raw
from router.sharding import shard_of
from test_workers import users_on


def _acks(raw: Raw, n: int) -> list:
    out = [raw.frame() for _ in range(n)]
    assert all(isinstance(f, F.Ack) for f in out), [f for f in out if not isinstance(f, F.Ack)][:3]
    return out


async def _drain(gw, user: str, n: int, device: str = "main", timeout: float = 10) -> list:
    """Receive and acknowledge n messages, then check nothing else is waiting."""
    async with gw.client(user, device) as c:
        got = [await c.recv(timeout=timeout) for _ in range(n)]
        await c.ack(*got)
        await c.ping()           # a PONG comes after every backlog entry on this stream
        extra = []
        try:
            while True:
                extra.append(await c.recv(timeout=0.2))
        except asyncio.TimeoutError:
            pass
        return got + extra


def _send_until_taken(r: Raw, seq: int, to: str, payload: bytes) -> F.Ack:
    """Resend one SEND while the rate limit refuses it (one token per second)."""
    deadline = time.monotonic() + 10
    while True:
        r.send(encode(F.Send(seq, to, payload)))
        f = r.frame()
        if isinstance(f, F.Ack):
            return f
        assert f.code == ErrorCode.RATE_LIMITED and time.monotonic() < deadline, f
        time.sleep(0.3)                # the bucket refills with time; nothing to wait on


def test_s6_fresh_producers_start_again_at_seq_1(gateway_proc):
    """A client with no state (HELLO producer 0) gets a new producer in WELCOME and
    numbers from 1 again: nothing it sends is taken for a retry of an older
    client's SENDs (a CLI run after a CLI run, a restarted bot)."""
    gw = gateway_proc
    producers = []
    for i in range(3):
        with Raw(gw) as r:
            w = r.hello(gw.token("bot"), device="cli", send_only=True)
            producers.append(w.producer)
            r.send(encode(F.Send(1, "fresh-bob", b"run %d" % i)))
            assert isinstance(r.frame(), F.Ack)
    assert producers == sorted(producers) and len(set(producers)) == 3 and producers[0] > 0
    got = asyncio.run(_drain(gw, "fresh-bob", 3))
    assert [m.text for m in got] == ["run 0", "run 1", "run 2"]


def test_s6_a_gap_is_out_of_order_and_nothing_is_stored_out_of_turn(gateway_proc):
    gw = gateway_proc
    with Raw(gw) as r:
        r.hello(gw.token("gap-a"), device="raw")
        r.send(encode(F.Send(1, "gap-b", b"one")))
        assert isinstance(r.frame(), F.Ack)
        r.send(encode(F.Send(3, "gap-b", b"three")))
        err = r.frame()
        assert isinstance(err, F.Error) and (err.code, err.ref, err.fatal) == (ErrorCode.OUT_OF_ORDER, 3, False)
        r.send(encode(F.Send(2, "gap-b", b"two")) + encode(F.Send(3, "gap-b", b"three")))
        assert [a.seq for a in _acks(r, 2)] == [2, 3]
        r.send(encode(F.Send(0, "gap-b", b"zero")))            # seqs start at 1
        frames, closed = r.until_eof()
        assert closed and isinstance(frames[-1], F.Error) and frames[-1].code == ErrorCode.MALFORMED_FRAME
    assert [m.text for m in asyncio.run(_drain(gw, "gap-b", 3))] == ["one", "two", "three"]


def test_s6_a_refused_seq_holds_the_later_ones_until_it_is_sent_again(gateway_factory):
    """PROTOCOL.md section 4 and section 6: RATE_LIMITED (refused for now): the pipelined SENDs
    behind it get OUT_OF_ORDER, not stored; sent again in order they are stored in order."""
    gw = gateway_factory("--msg-rate", "1", "--msg-burst", "2")
    with Raw(gw) as r:
        r.hello(gw.token("rl-a"), device="raw")
        r.send(b"".join(encode(F.Send(s, "rl-b", b"m%d" % s)) for s in range(1, 6)))
        # (an ACK may come after later answers: the recipient can be on the other worker)
        answers = sorted((r.frame() for _ in range(5)), key=lambda f: f.seq if isinstance(f, F.Ack) else f.ref)
        assert [type(f) for f in answers[:2]] == [F.Ack, F.Ack]
        assert (answers[2].code, answers[2].ref) == (ErrorCode.RATE_LIMITED, 3)
        assert [(f.code, f.ref) for f in answers[3:]] == [(ErrorCode.OUT_OF_ORDER, 4), (ErrorCode.OUT_OF_ORDER, 5)]
        for seq in (3, 4, 5):                  # one token per second: resend each until it is taken
            _send_until_taken(r, seq, "rl-b", b"m%d" % seq)
    assert [m.text for m in asyncio.run(_drain(gw, "rl-b", 5))] == ["m1", "m2", "m3", "m4", "m5"]


def test_s6_a_resend_that_skips_a_refused_seq_is_out_of_order_after_a_restart(gateway_factory, tmp_path):
    """PROTOCOL.md section 6, Order: every SEND refused while an earlier one was held
    must come again, in seq order, before a later one is stored. After a server
    restart it does not know where the stream stands (no gap check), so it remembers
    the seqs it refused: a resend that skips one (a client that resent only the
    refusals it had seen) gets OUT_OF_ORDER. Stored, it would make the skipped seq's
    resend look like a retry of a SEND stored long ago (ACK with msg_id 0): lost."""
    data = tmp_path / "d"
    gw = gateway_factory("--msg-rate", "1", "--msg-burst", "2", data_dir=data)
    with Raw(gw) as r:
        producer = r.hello(gw.token("skip-a"), device="raw").producer
        assert isinstance(_send_until_taken(r, 1, "skip-b", b"m1"), F.Ack)
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait(10)
    gw = gateway_factory("--msg-rate", "1", "--msg-burst", "2", data_dir=data)
    with Raw(gw) as r:                         # the same stream, which this server process never saw
        assert r.hello(gw.token("skip-a"), device="raw", producer=producer).producer == producer
        r.send(b"".join(encode(F.Send(s, "skip-b", b"m%d" % s)) for s in range(2, 7)))
        answers = sorted((r.frame() for _ in range(5)), key=lambda f: f.seq if isinstance(f, F.Ack) else f.ref)
        assert [type(f) for f in answers[:2]] == [F.Ack, F.Ack], answers
        assert (answers[2].code, answers[2].ref) == (ErrorCode.RATE_LIMITED, 4)
        assert [(f.code, f.ref) for f in answers[3:]] == [(ErrorCode.OUT_OF_ORDER, 5), (ErrorCode.OUT_OF_ORDER, 6)]
        _send_until_taken(r, 4, "skip-b", b"m4")
        r.send(encode(F.Send(6, "skip-b", b"m6")))         # skips 5, which was refused too
        f = r.frame()
        assert (f.code, f.ref) == (ErrorCode.OUT_OF_ORDER, 6), f
        assert "resend from seq 5" in f.reason, f.reason
        acks = [_send_until_taken(r, s, "skip-b", b"m%d" % s) for s in (5, 6)]
        assert all(a.msg_id for a in acks), acks           # stored now, not "stored long ago"
    assert [m.text for m in asyncio.run(_drain(gw, "skip-b", 6))] == ["m1", "m2", "m3", "m4", "m5", "m6"]


def test_s6_retries_after_a_kill_9_get_their_original_acks(gateway_factory, tmp_path):
    """Defect 1: 10,000 SENDs from one device to users on both workers, then kill -9
    of the whole gateway. The device resends its newest window of seqs (and some
    older ones) with its producer: every retry is recognised, nothing is stored
    twice, and each recipient gets its messages once, in order."""
    data = tmp_path / "d"
    gw = gateway_factory("--workers", "2", "--msg-rate", "0", data_dir=data)
    recipients = users_on(0, 2, 4, "r1-") + users_on(1, 2, 4, "r1-x")
    n = 10_000
    with Raw(gw, timeout=20) as r:
        w = r.hello(gw.token("r1-sender"), device="phone")
        window = w.send_window
        acks = {}
        for start in range(1, n + 1, 200):
            batch = range(start, min(start + 200, n + 1))
            r.send(b"".join(encode(F.Send(s, recipients[s % 8], b"%d" % s)) for s in batch))
            for a in _acks(r, len(batch)):
                acks[a.seq] = a
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait(10)
    gw2 = gateway_factory("--workers", "2", "--msg-rate", "0", data_dir=data)
    retry = list(range(n - window + 1, n + 1)) + [1, 2, 500, 5000]
    with Raw(gw2, timeout=20) as r:
        assert r.hello(gw2.token("r1-sender"), device="phone", producer=w.producer).producer == w.producer
        r.send(b"".join(encode(F.Send(s, recipients[s % 8], b"again")) for s in retry))
        answers = {a.seq: a for a in _acks(r, len(retry))}
    for s in retry[:window]:
        assert answers[s] == acks[s], s            # the newest window: the original ACK
    for s in retry[window:]:
        assert answers[s].msg_id in (0, acks[s].msg_id)  # older: recognised (its id may be forgotten)
    for i, user in enumerate(recipients):
        got = asyncio.run(_drain(gw2, user, n // 8))
        assert [m.text for m in got] == [str(s) for s in range(1, n + 1) if s % 8 == recipients.index(user)]


def _recycled_segments(shard_dir) -> list:
    """The shard's segment files made from a consumed segment's file (header version 3)."""
    return [p for p in shard_dir.glob("*.seg") if HEADER.unpack_from(p.read_bytes()[:HEADER.size])[5] == 3]


def test_s6_a_retry_after_its_segment_was_deleted_is_not_stored_again(gateway_factory, tmp_path):
    """Defect 2: the recipient consumed the message and its log segment was deleted;
    after a restart, a late retry of it is still recognised. The deleted segment's
    file is recycled (docs/storage.md, Recycling) and holds later messages when the
    worker is killed: they come back exactly once, in order, and their retries too
    are recognised."""
    data = tmp_path / "d"
    gw = gateway_factory("--workers", "1", "--segment-size", "1M", data_dir=data)
    big = os.urandom(60_000)
    with Raw(gw, timeout=20) as r:
        w = r.hello(gw.token("seg-a"), device="phone", send_only=True)     # (no receipts to read past)
        r.send(encode(F.Send(1, "seg-b", b"the original")))
        first = r.frame()
        assert isinstance(first, F.Ack)
        r.send(b"".join(encode(F.Send(s, "seg-b", big)) for s in range(2, 42)))     # ~2.4 MiB: rolls segments
        _acks(r, 40)
    shard_dir = data / "log" / f"shard-{shard_of('seg-b'):04d}"
    first_segment = min(shard_dir.glob("*.seg"))
    got = asyncio.run(_drain(gw, "seg-b", 41))
    assert got[0].text == "the original" and len(got) == 41
    deadline = time.monotonic() + 15
    while first_segment.exists():                  # maintenance deletes consumed segments about once a second
        assert time.monotonic() < deadline, "the consumed segment was never deleted"
        time.sleep(0.1)
    with Raw(gw, timeout=20) as r:                 # later messages roll into the recycled file
        r.hello(gw.token("seg-a"), device="phone", producer=w.producer, send_only=True)
        seq, after = 42, 0
        while after < 40:                          # 40 more (2.4 MB) once it exists: past the spares before it
            assert seq < 300, "no segment was made from the consumed one's file"
            r.send(b"".join(encode(F.Send(s, "seg-b", s.to_bytes(4, "big") + big)) for s in range(seq, seq + 10)))
            _acks(r, 10)
            seq += 10
            after += 10 if after or _recycled_segments(shard_dir) else 0
        r.send(encode(F.Send(seq, "seg-b", b"last before the kill")))
        last = r.frame()
        assert isinstance(last, F.Ack)
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait(10)
    gw2 = gateway_factory("--workers", "1", "--segment-size", "1M", data_dir=data)
    with Raw(gw2) as r:
        r.hello(gw2.token("seg-a"), device="phone", producer=w.producer, send_only=True)
        r.send(encode(F.Send(1, "seg-b", b"the original")))
        again = r.frame()
        assert isinstance(again, F.Ack) and again == first
        r.send(encode(F.Send(seq, "seg-b", b"last before the kill")))     # its retry: the same answer
        assert r.frame() == last
        r.send(encode(F.Send(seq + 1, "seg-b", b"marker")))
        assert isinstance(r.frame(), F.Ack)
    got = asyncio.run(_drain(gw2, "seg-b", seq - 42 + 2, timeout=20))
    assert [m.text for m in got[-2:]] == ["last before the kill", "marker"] and len(got) == seq - 42 + 2
    assert [int.from_bytes(m.payload[:4], "big") for m in got[:-2]] == list(range(42, seq))   # once each, in order
    assert all(m.payload[4:] == big for m in got[:-2])


def test_s6_pipelined_sends_stay_in_order_across_kills_of_the_recipients_worker(gateway_factory):
    """Defect 3 (PROTOCOL.md section 4 and section 6): 2,000 pipelined SENDs while the recipient's worker is killed three
    times: stored once each, in the order sent; the SDK resends with backoff
    (a bounded number of UNAVAILABLE answers, not a storm)."""
    gw = gateway_factory("--workers", "2", "--durability", "interval")
    sender, recipient = users_on(0, 2, 1, "po-a")[0], users_on(1, 2, 1, "po-b")[0]
    n = 2000
    kills = []

    async def main():
        async with gw.client(sender, "phone", max_backoff=0.3) as a:
            tasks = [asyncio.ensure_future(a.send(recipient, f"m{i}", timeout=120)) for i in range(n)]
            for k in range(3):
                while sum(t.done() for t in tasks) < (k + 1) * n // 5:
                    await asyncio.sleep(0.01)
                pid = gw.worker_pids()[1]
                os.kill(pid, signal.SIGKILL)
                kills.append(pid)
                while gw.worker_pids()[1] == pid:          # the supervisor started its successor
                    await asyncio.sleep(0.01)
            acks = await asyncio.gather(*tasks)
            return acks

    acks = asyncio.run(main())
    assert len(kills) == 3 and len({a.id for a in acks}) == n
    got = asyncio.run(_drain(gw, recipient, n, timeout=30))
    seen = [m.text for m in got]
    assert seen == [f"m{i}" for i in range(n)]
    assert [m.id for m in got] == sorted(m.id for m in got)


def test_s4_fenced_an_older_producer_of_the_device_may_not_send(gateway_factory):
    """PROTOCOL.md section 4, FENCED: once a newer producer of a device has sent, a HELLO
    with the older one is refused (fatal) where the device's stream is known, and a
    SEND of it reaching a shard that saw the newer one is refused (non-fatal)."""
    gw = gateway_factory("--workers", "1")
    with Raw(gw) as r:
        old = r.hello(gw.token("fence-a"), device="phone").producer
        r.send(encode(F.Send(1, "fence-b", b"old 1")))
        assert isinstance(r.frame(), F.Ack)
    with Raw(gw) as r:
        new = r.hello(gw.token("fence-a"), device="phone").producer
        assert new > old
        r.send(encode(F.Send(1, "fence-b", b"new 1")))
        assert isinstance(r.frame(), F.Ack)
    with Raw(gw) as r:
        r.send(encode(F.Hello(2, gw.token("fence-a"), "phone", 0, False, old)))
        frames, closed = r.until_eof()
        assert closed and [(f.code, f.fatal) for f in frames] == [(ErrorCode.FENCED, True)]
    gw.proc.send_signal(signal.SIGKILL)            # the device's stream state is gone; the shard's is not
    gw.proc.wait(10)
    gw2 = gateway_factory("--workers", "1", data_dir=gw.data_dir)
    with Raw(gw2) as r:
        assert r.hello(gw2.token("fence-a"), device="phone", producer=old).producer == old
        r.send(encode(F.Send(2, "fence-b", b"old 2")))
        err = r.frame()
        assert isinstance(err, F.Error) and (err.code, err.ref, err.fatal) == (ErrorCode.FENCED, 2, False)
    assert [m.text for m in asyncio.run(_drain(gw2, "fence-b", 2))] == ["old 1", "new 1"]


def test_s7_receipts_for_a_send_only_user_wait_in_its_shared_inbox(gateway_proc):
    """Defect 5: a bot that only sends (no registered device) still gets the
    DELIVERED receipt when its first device connects."""
    gw = gateway_proc

    async def main():
        async with gw.client("rcpt-bot", "cli", send_only=True) as bot:
            sent = await bot.send("rcpt-bob", "hello from a bot")
        async with gw.client("rcpt-bob") as bob:
            m = await bob.recv(timeout=5)
            await bob.ack(m)
            await bob.ping()
        async with gw.client("rcpt-bot", "phone") as phone:
            r = await phone.recv_receipt(timeout=5)
            assert (r.kind, r.msg_id, r.by) == ("delivered", sent.id, "rcpt-bob")
    asyncio.run(main())


def test_s6_sends_made_while_reconnecting_wait_for_the_outbox(gateway_factory):
    """PROTOCOL.md section 6: after a reconnect the client sends its outbox again before
    any new SEND. The sender's worker is killed with SENDs unanswered, and the
    application keeps sending while the SDK reconnects: every message is stored once,
    in order, none answered as a duplicate that was never stored (ACK msg_id 0)."""
    gw = gateway_factory("--workers", "2", "--msg-rate", "0")
    sender, recipient = users_on(0, 2, 1, "rc-a")[0], users_on(1, 2, 1, "rc-b")[0]

    async def main():
        async with gw.client(sender, "phone", max_backoff=0.2) as a:
            tasks = [asyncio.ensure_future(a.send(recipient, f"m{i}", timeout=60)) for i in range(200)]
            while sum(t.done() for t in tasks) < 50:
                await asyncio.sleep(0.001)
            pid = gw.worker_pids()[0]
            os.kill(pid, signal.SIGKILL)
            i = 200
            deadline = time.monotonic() + 30
            while a.reconnects == 0:              # new SENDs all through the reconnect
                assert time.monotonic() < deadline, "the client never reconnected"
                tasks.append(asyncio.ensure_future(a.send(recipient, f"m{i}", timeout=60)))
                i += 1
                await asyncio.sleep(0.002)
            tasks += [asyncio.ensure_future(a.send(recipient, f"m{j}", timeout=60)) for j in range(i, i + 50)]
            return await asyncio.gather(*tasks)

    acks = asyncio.run(main())
    assert all(r.id for r in acks), [r for r in acks if not r.id][:5]
    got = asyncio.run(_drain(gw, recipient, len(acks), timeout=30))
    assert [m.text for m in got] == [f"m{i}" for i in range(len(acks))]


def test_sdk_sends_given_up_on_leave_no_unretrieved_future_exceptions(gateway_factory):
    """Issue 12, defect 9: a client whose gateway is gone, whose sends time out and which
    is then closed, prints no "Future exception was never retrieved"."""
    import subprocess
    import sys
    from conftest import ROOT
    gw = gateway_factory("--workers", "1")
    script = f"""
import asyncio, gc, os, signal
from gateway.client import Client
async def main():
    c = Client("127.0.0.1", {gw.port}, {gw.token('gone-a')!r}, "phone", max_backoff=0.05, connect_timeout=0.5)
    await c.connect()
    os.kill({gw.proc.pid}, signal.SIGKILL)
    for i in range(20):
        try:
            await c.send("gone-b", "never", timeout=0.05)
        except asyncio.TimeoutError:
            pass
    await asyncio.sleep(0.3)                   # reconnect attempts fail meanwhile
    await c.close()
    gc.collect()
    print("closed", c.pending_sends())
asyncio.run(main())
gc.collect()
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "closed 0", r.stdout + r.stderr
    assert "never retrieved" not in r.stderr, r.stderr
