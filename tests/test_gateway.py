"""End-to-end behaviour of a real gateway process, mostly through the client SDK."""
import asyncio
import os
import time

import pytest

from _core import frames as F
from _core.protocol import PROTOCOL_VERSION, ErrorCode, GoawayCode
from _core.pycodec import encode
from gateway.client import Client, ServerError

MAX_FRAME = 65536
MAX_PAYLOAD = 65536 - 794          # PROTOCOL.md: max_frame - DELIVER_OVERHEAD


from rawclient import Raw  # noqa: E402


async def recv_n(client: Client, n: int, timeout: float = 5.0, ack: bool = True):
    out = []
    for _ in range(n):
        m = await client.recv(timeout=timeout)
        out.append(m)
        if ack:
            await client.ack(m)
    return out


async def next_is_marker(gw, sender: Client, recipient: Client, to: str):
    """Send a fresh marker: the recipient's next message must be it (nothing else pending)."""
    marker = b"marker-" + os.urandom(6)
    sent = await sender.send(to, marker, timeout=5)
    m = await recipient.recv(timeout=5)
    assert (m.id, m.payload) == (sent.id, marker), f"unexpected message before the marker: {m}"
    await recipient.ack(m)


# -- basics ------------------------------------------------------------------------

def test_exchange_both_ways_and_welcome(gateway_proc):
    gw = gateway_proc

    async def main():
        before = time.time() * 1000
        async with gw.client("alice") as alice, gw.client("bob", device="phone") as bob:
            for c, user, device in ((alice, "alice", "main"), (bob, "bob", "phone")):
                w = c.welcome
                assert (w.version, w.user, w.device) == (PROTOCOL_VERSION, user, device)
                assert (w.max_frame, w.max_payload) == (MAX_FRAME, MAX_PAYLOAD)
                assert w.session_id != 0
                assert w.ping_interval_ms > 0
                assert before - 60_000 < w.server_time_ms < time.time() * 1000 + 60_000
            assert alice.welcome.session_id != bob.welcome.session_id

            a1 = await alice.send("bob", "hello bob", timeout=5)
            m = await bob.recv(timeout=5)
            assert (m.id, m.sender, m.sender_device, m.text) == (a1.id, "alice", "main", "hello bob")
            assert m.timestamp_ms == a1.timestamp_ms
            await bob.ack(m)

            b1 = await bob.send("alice", b"\x00hi alice\xff", timeout=5)
            m = await alice.recv(timeout=5)
            assert (m.id, m.sender, m.sender_device, m.payload) == (b1.id, "bob", "phone", b"\x00hi alice\xff")
            await alice.ack(m)
            # ids of messages to different users come from their users' workers: unique, in
            # time order to the millisecond (within one recipient's stream strictly increasing)
            assert b1.id != a1.id and b1.id >> 22 >= a1.id >> 22
            assert a1.id >> 22 == pytest.approx(a1.timestamp_ms, abs=1000)   # id ~ acceptance time in ms

            empty = await alice.send("bob", b"", timeout=5)
            m = await bob.recv(timeout=5)
            assert (m.id, m.payload) == (empty.id, b"")
    asyncio.run(main())


def test_offline_recipient_gets_stored_messages_in_order(gateway_proc):
    gw = gateway_proc

    async def main():
        async with gw.client("alice") as alice:
            acks = [await alice.send("bob", f"offline {i}", timeout=5) for i in range(3)]
            assert len({a.id for a in acks}) == 3
            async with gw.client("bob") as bob:
                got = await recv_n(bob, 3)
                assert [(m.id, m.text, m.sender) for m in got] == \
                    [(a.id, f"offline {i}", "alice") for i, a in enumerate(acks)]
                assert [m.timestamp_ms for m in got] == [a.timestamp_ms for a in acks]
                await next_is_marker(gw, alice, bob, "bob")
    asyncio.run(main())


def test_order_preserved_500_messages(gateway_proc):
    gw = gateway_proc
    n = 500

    async def main():
        async with gw.client("alice") as alice, gw.client("bob") as bob:
            acks = await asyncio.gather(*(alice.send("bob", f"m{i}", timeout=10) for i in range(n)))
            ids = [a.id for a in acks]
            assert all(x < y for x, y in zip(ids, ids[1:])), "ACKed ids not increasing in send order"
            got = await recv_n(bob, n)
            assert [m.text for m in got] == [f"m{i}" for i in range(n)]
            assert [m.id for m in got] == ids
    asyncio.run(main())


def test_unacked_is_redelivered_acked_is_not(gateway_proc):
    gw = gateway_proc

    async def main():
        async with gw.client("alice") as alice:
            s1 = await alice.send("bob", "first", timeout=5)
            s2 = await alice.send("bob", "second", timeout=5)
            async with gw.client("bob") as bob:
                m1, m2 = await recv_n(bob, 2, ack=False)
                assert (m1.id, m2.id) == (s1.id, s2.id)
                await bob.ack(m1)
                await bob.ping(timeout=5)       # the RECEIVED was processed before the PONG
            async with gw.client("bob", resume_after=0) as bob2:
                m = await bob2.recv(timeout=5)
                assert (m.id, m.text) == (s2.id, "second")
                await bob2.ack(m)
                await next_is_marker(gw, alice, bob2, "bob")
    asyncio.run(main())


def test_resume_after_skips_processed_messages(gateway_proc):
    gw = gateway_proc

    async def main():
        async with gw.client("alice") as alice:
            sent = [await alice.send("bob", f"r{i}", timeout=5) for i in range(3)]
            async with gw.client("bob", resume_after=sent[0].id) as bob:
                got = await recv_n(bob, 2, ack=False)
                assert [(m.id, m.text) for m in got] == [(sent[1].id, "r1"), (sent[2].id, "r2")]
                await bob.ping(timeout=5)
            # resume_after consumed the first one on the server: a fresh start (0) does not get it
            async with gw.client("bob", device="other") as bob2:
                got = await recv_n(bob2, 2)
                assert [m.id for m in got] == [sent[1].id, sent[2].id]
                await next_is_marker(gw, alice, bob2, "bob")
    asyncio.run(main())


def test_s6_send_retry_same_seq_is_stored_once(gateway_proc):
    """PROTOCOL.md section 6: a SEND whose seq this producer already sent gets the
    original ACK and is not stored again, whatever its recipient or payload."""
    gw = gateway_proc
    r = Raw(gw)
    try:
        w = r.hello(gw.token("alice"), device="raw")
        assert w.producer != 0 and w.send_window > 0
        frame = encode(F.Send(1, "bob", b"only once"))
        r.send(frame)
        a1 = r.frame()
        r.send(frame)
        a2 = r.frame()
        assert isinstance(a1, F.Ack) and isinstance(a2, F.Ack)
        assert a1.seq == 1
        assert a2 == a1                      # the original ACK: same msg_id and timestamp
        # same seq, another payload: still the original ACK, nothing stored
        r.send(encode(F.Send(1, "bob", b"something else")))
        assert r.frame() == a1
        r.send(encode(F.Send(2, "bob", b"marker")))
        marker = r.frame()
        assert isinstance(marker, F.Ack) and marker.seq == 2 and marker.msg_id > a1.msg_id
    finally:
        r.close()

    async def main():
        async with gw.client("bob") as bob:
            got = await recv_n(bob, 2)
            assert [(m.id, m.payload, m.sender_device) for m in got] == \
                [(a1.msg_id, b"only once", "raw"), (marker.msg_id, b"marker", "raw")]
        async with gw.client("carol") as carol, gw.client("alice", device="sdk") as alice:
            await next_is_marker(gw, alice, carol, "carol")
    asyncio.run(main())


def test_sdk_reconnect_does_not_show_a_message_twice(gateway_proc):
    gw = gateway_proc

    async def main():
        async with gw.client("alice") as alice:
            bob = gw.client("bob", reconnect=True)
            await bob.connect()
            try:
                s1 = await alice.send("bob", "one", timeout=5)
                m1 = await bob.recv(timeout=5)
                assert (m1.id, m1.text) == (s1.id, "one")
                old = bob._proto
                old.transport.abort()                          # not acked
                await asyncio.wait_for(asyncio.shield(old.lost), 5)
                s2 = await alice.send("bob", "two", timeout=5)
                m2 = await bob.recv(timeout=10)
                assert (m2.id, m2.text) == (s2.id, "two"), "message 1 was handed out twice"
                await asyncio.wait_for(asyncio.shield(bob._reconnect_task), 5)
                assert bob.reconnects == 1
                assert bob.connected and bob._proto is not old
                await bob.ack(m2)
                await bob.ping(timeout=5)
            finally:
                await bob.close()
            # message 1 is still held in this device's inbox (it was never acked): the
            # server did redeliver it on the reconnect, the SDK dropped the duplicate
            async with gw.client("bob", device="main") as fresh:
                m = await fresh.recv(timeout=5)
                assert (m.id, m.text) == (s1.id, "one")
                await fresh.ack(m)
                await next_is_marker(gw, alice, fresh, "bob")
    asyncio.run(main())


def test_second_connection_of_same_device_replaces_the_first(gateway_proc):
    gw = gateway_proc
    first = Raw(gw, timeout=3)
    other_device = Raw(gw, timeout=3)
    second = Raw(gw, timeout=3)
    try:
        first.hello(gw.token("carol"), device="phone")
        other_device.hello(gw.token("carol"), device="laptop")
        w2 = second.hello(gw.token("carol"), device="phone")
        assert (w2.user, w2.device) == ("carol", "phone")
        frames, closed = first.until_eof()
        assert len(frames) == 1 and isinstance(frames[0], F.Goaway), frames
        assert (GoawayCode(frames[0].code), frames[0].reconnect_ms) == (GoawayCode.REPLACED, 0)
        assert closed, "replaced connection was not closed"
        # the new connection and the user's other device carry on
        for r, nonce in ((second, 1), (other_device, 2)):
            r.send(encode(F.Ping(nonce)))
            assert r.frame() == F.Pong(nonce)
    finally:
        for r in (first, other_device, second):
            r.close()


def test_ping_pong(gateway_proc):
    gw = gateway_proc

    async def main():
        async with gw.client("alice") as alice:
            for _ in range(3):
                rtt = await alice.ping(timeout=5)
                assert 0 <= rtt < 5
    asyncio.run(main())
    r = Raw(gw)
    try:
        r.hello(gw.token("alice"), device="raw")
        r.send(encode(F.Ping(0xDEADBEEFCAFEF00D)) + encode(F.Ping(0)))
        assert [r.frame(), r.frame()] == [F.Pong(0xDEADBEEFCAFEF00D), F.Pong(0)]
        r.send(encode(F.Pong(5)))                 # the server ignores PONGs it receives
        r.send(encode(F.Ping(6)))
        assert r.frame() == F.Pong(6)
    finally:
        r.close()


def test_payload_too_large(gateway_proc):
    gw = gateway_proc

    async def main():
        async with gw.client("alice") as alice, gw.client("bob") as bob:
            mp = alice.welcome.max_payload
            with pytest.raises(ServerError) as ei:
                await alice.send("bob", b"x" * (mp + 1), timeout=5)
            assert ei.value.code == ErrorCode.PAYLOAD_TOO_LARGE
            assert ei.value.ref != 0
            assert alice.connected
            big = os.urandom(mp)                        # exactly the limit is fine
            ok = await alice.send("bob", big, timeout=5)
            m = await bob.recv(timeout=5)
            assert (m.id, m.payload) == (ok.id, big)    # the rejected one was not stored
            await bob.ack(m)
            small = await alice.send("bob", "after", timeout=5)
            m = await bob.recv(timeout=5)
            assert (m.id, m.text) == (small.id, "after")
    asyncio.run(main())


def test_pure_python_codec_server(gateway_factory):
    gw = gateway_factory("--hello-timeout", "1", env={"SWITCHBOARD_CODEC": "python"})

    async def main():
        async with gw.client("alice") as alice, gw.client("bob") as bob:
            assert (alice.welcome.max_frame, alice.welcome.max_payload) == (MAX_FRAME, MAX_PAYLOAD)
            big = os.urandom(60 * 1024)
            sent = [await alice.send("bob", "py 1", timeout=5),
                    await alice.send("bob", big, timeout=5),
                    await alice.send("bob", "py 3", timeout=5)]
            got = await recv_n(bob, 3)
            assert [(m.id, m.payload) for m in got] == list(zip([s.id for s in sent], [b"py 1", big, b"py 3"]))
            back = await bob.send("alice", big[::-1], timeout=5)
            m = await alice.recv(timeout=5)
            assert (m.id, m.sender, m.payload) == (back.id, "bob", big[::-1])
            assert await alice.ping(timeout=5) >= 0
    asyncio.run(main())


def test_large_payload_and_burst_of_small_messages(gateway_proc):
    gw = gateway_proc
    n = 1000
    big = os.urandom(60 * 1024)
    payloads = [f"small {i}".encode() for i in range(n)]
    payloads.insert(n // 2, big)

    async def main():
        async with gw.client("alice") as alice, gw.client("bob") as bob:
            acks = await asyncio.gather(*(alice.send("bob", p, timeout=15) for p in payloads))
            got = await recv_n(bob, len(payloads), timeout=10)
            assert [m.payload for m in got] == payloads
            assert [m.id for m in got] == [a.id for a in acks]
            await next_is_marker(gw, alice, bob, "bob")
    asyncio.run(main())


def test_s6_send_window_answers_retries_and_older_ones_without_an_id(gateway_factory):
    """PROTOCOL.md section 6: the server keeps the answers of the last `send_window`
    seqs of a device: retries within it get the original ACK; an older retry is
    still recognised (ACK with msg_id 0) and nothing is ever stored twice."""
    gw = gateway_factory("--workers", "1", "--dedup-window", "4")
    r = Raw(gw)
    try:
        assert r.hello(gw.token("alice"), device="raw").send_window == 4
        acks = {}
        for seq in range(1, 13):
            r.send(encode(F.Send(seq, "bob", b"m%d" % seq)))
            acks[seq] = r.frame()
            assert isinstance(acks[seq], F.Ack) and acks[seq].seq == seq
        for seq in range(9, 13):                     # the newest 4: retries, answered as before
            r.send(encode(F.Send(seq, "bob", b"again")))
            assert r.frame() == acks[seq]
        r.send(encode(F.Send(3, "bob", b"again")))   # older than the window: known, id forgotten
        old = r.frame()
        assert isinstance(old, F.Ack) and (old.seq, old.msg_id) == (3, 0)
    finally:
        r.close()

    async def main():
        async with gw.client("bob") as bob:
            got = await recv_n(bob, 12)
            assert [m.payload for m in got] == [b"m%d" % i for i in range(1, 13)]
            async with gw.client("alice", device="sdk") as alice:
                await next_is_marker(gw, alice, bob, "bob")     # and no "again" behind them
    asyncio.run(main())


def test_a_message_near_a_large_max_frame_fits_a_new_shards_first_segment(gateway_factory):
    """With --max-frame 4 MiB, a shard's first segment is made big enough for the
    largest record (it was 1 MiB, and a 3 MiB message got fatal INTERNAL)."""
    gw = gateway_factory("--max-frame", str(4 << 20), "--segment-size", "16M")
    payload = os.urandom(3 << 20)

    async def main():
        async with gw.client("bigsender") as a, gw.client("bigreceiver") as b:
            ack = await a.send("bigreceiver", payload, timeout=30)
            m = await b.recv(timeout=30)
            assert (m.id, m.payload) == (ack.id, payload)
    asyncio.run(asyncio.wait_for(main(), 60))
