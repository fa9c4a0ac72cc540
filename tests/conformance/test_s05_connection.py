"""docs/PROTOCOL.md section 5: the connection state machine and its rules
(HELLO first, pipelining, the hello timeout, the order of HELLO's checks,
replacement, ACKs before a fatal ERROR, connection limits, end of stream)."""
import re
import socket
import time
import urllib.request

import pytest

from _core import frames as F
from _core.protocol import ErrorCode, GoawayCode
from _core.pycodec import encode
from gateway.auth import load_secret

from .kit import Wire, doc_token, fatal, hello, run, session, uid, users_on, wait_for


@pytest.mark.parametrize("first", ["ping", "send", "subscribe", "received"])
def test_s5_hello_must_be_the_first_frame(gw1, first):
    """Section 5, rule 1: "The client MUST send HELLO as its first frame": anything
    else first is UNEXPECTED_FRAME, fatal, and nothing of it is served."""
    frame = {"ping": F.Ping(1), "send": F.Send(1, uid("x"), b"no"), "subscribe": F.Subscribe(("x",), True),
             "received": F.Received((1,))}[first]
    with Wire(gw1) as w:
        w.send(encode(frame) + hello(gw1.token(uid("late"))))
        fatal(w, ErrorCode.UNEXPECTED_FRAME)


def test_s5_a_second_hello_is_unexpected(gw1):
    """Section 5, OPEN: HELLO after WELCOME is UNEXPECTED_FRAME, fatal."""
    user = uid("twice")
    with session(gw1, user) as w:
        w.send(hello(gw1.token(user)))
        fatal(w, ErrorCode.UNEXPECTED_FRAME)


def _handoffs_in(gw) -> int:
    with urllib.request.urlopen(f"http://{gw.host}:{gw.admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(int(float(v)) for v in re.findall(r'^switchboard_handoffs_total\{[^}]*direction="in"[^}]*\} (\S+)',
                                                 text, re.M))


@pytest.mark.parametrize("workers", [1, 2])
def test_s5_frames_pipelined_behind_hello_are_served_in_order(gw1, gw2, workers):
    """Section 5, rule 1: frames sent right behind the HELLO, before WELCOME, are
    served in order as frames of the session under max_frame (one here is larger
    than the 4096 allowed before WELCOME); with two workers also when the
    connection is handed to the worker that owns the user (answers that take a
    trip to another worker, PRESENCE here, may then come after later ones)."""
    gw = gw1 if workers == 1 else gw2
    watched = tuple(uid("w" * 40) for _ in range(90))           # SUBSCRIBE of ~4.7 KB
    big = encode(F.Subscribe(watched, True))
    assert len(big) > 4096
    before = _handoffs_in(gw) if workers == 2 else 0
    for i in range(12 if workers == 2 else 1):
        user = users_on(1, 2, 1, "pipe")[0] if workers == 2 else uid("pipe")
        with Wire(gw) as w:
            w.send(hello(gw.token(user)) + big + encode(F.Ping(i)) + encode(F.Ping(i + 100)))
            assert isinstance(w.frame(), F.Welcome)
            got = [w.frame() for _ in range(len(watched) + 2)]
            if workers == 1:
                assert got == [F.Presence(u, False, 0) for u in watched] + [F.Pong(i), F.Pong(i + 100)]
            else:       # answers that come from the other worker may come after the PONGs
                assert sorted(f.user for f in got if isinstance(f, F.Presence)) == sorted(watched)
                assert [f for f in got if isinstance(f, F.Pong)] == [F.Pong(i), F.Pong(i + 100)]
        if workers == 2 and _handoffs_in(gw) > before:
            break
    if workers == 2:
        assert _handoffs_in(gw) > before, "no connection was handed over in 12 tries"


def test_s5_frames_behind_a_rejected_hello_are_discarded(gw1):
    """Section 5, rule 1: after a rejected HELLO only the fatal ERROR comes; what
    was pipelined behind it is not served (the SEND below is never stored)."""
    bob = uid("disc-b")
    with Wire(gw1) as w:
        w.send(hello("sb1.not.valid") + encode(F.Send(1, bob, b"never")) + encode(F.Ping(1)))
        fatal(w, ErrorCode.AUTH_FAILED)

    async def main():
        async with gw1.client(uid("disc-s")) as s, gw1.client(bob) as b:
            sent = await s.send(bob, "marker", timeout=5)
            m = await b.recv(timeout=5)
            assert (m.id, m.text) == (sent.id, "marker")      # the first thing bob ever gets
    run(main())


def test_s5_hello_timeout_from_accept(gw1):
    """Section 5, rule 2 and section 4 (HELLO_TIMEOUT): the HELLO must be complete
    and accepted within the hello timeout (1 s on this server) from the accept; a
    HELLO cut in half does not stop the clock."""
    for data in (b"", hello(gw1.token(uid("slow")))[:10]):
        with Wire(gw1, timeout=5) as w:
            t0 = time.monotonic()
            if data:
                w.send(data)
            fatal(w, ErrorCode.HELLO_TIMEOUT)
            took = time.monotonic() - t0
            assert 0.9 <= took < 3.0, took


def _order_cases(secret: bytes, user: str, past: int) -> list:
    """HELLOs breaking two of the rules of section 5, rule 3, and the code each must get."""
    return [
        (hello("sb1.garbage", version=0), ErrorCode.UNSUPPORTED_VERSION),
        (hello("sb1.garbage", device="two words"), ErrorCode.MALFORMED_FRAME),
        (hello(doc_token(b"another secret 0123456789", user, "", past)), ErrorCode.AUTH_FAILED),
        (hello(doc_token(secret, "two words", "", past)), ErrorCode.AUTH_FAILED),
        (hello(doc_token(secret, user, "phone", past), device="laptop"), ErrorCode.TOKEN_EXPIRED),
        (hello(doc_token(secret, user, "phone", past + 3600), device="laptop"), ErrorCode.AUTH_FAILED),
    ]


def test_s5_hello_checks_keep_their_order_on_two_workers(gw2):
    """The same order when the accepting worker hands the HELLO to the user's owner
    before the token is checked (the owner checks it): users of both workers."""
    from router.sharding import shard_of
    secret = load_secret(gw2.data_dir)
    past = int(time.time()) - 60
    users = [uid(f"order2-{i}") for i in range(40)]
    users = [next(u for u in users if shard_of(u) % 2 == k) for k in (0, 1)]
    for user in users:
        for data, code in _order_cases(secret, user, past):
            for _ in range(3):                  # either worker may accept the connection
                with Wire(gw2) as w:
                    w.send(data)
                    fatal(w, code)


def test_s5_hello_checks_run_in_the_documented_order(gw1):
    """Section 5, rule 3: version, the id rule on `device`, the token's format,
    signature and user, its expiry, its device binding, then the device limit:
    a HELLO breaking two of them gets the earlier one's code (UNSUPPORTED_VERSION,
    MALFORMED_FRAME, AUTH_FAILED, TOKEN_EXPIRED, AUTH_FAILED, DEVICE_LIMIT)."""
    secret = load_secret(gw1.data_dir)
    past = int(time.time()) - 60
    user = uid("order")
    for data, code in _order_cases(secret, user, past):
        with Wire(gw1) as w:
            w.send(data)
            fatal(w, code)
    # the device limit (3 here) comes after the token: an expired token is told so first
    online = [session(gw1, user, f"dev{i}") for i in range(3)]
    try:
        with Wire(gw1) as w:
            w.send(hello(doc_token(secret, user, "", past), device="dev9"))
            fatal(w, ErrorCode.TOKEN_EXPIRED)
        with Wire(gw1) as w:
            w.send(hello(gw1.token(user), device="dev9"))
            fatal(w, ErrorCode.DEVICE_LIMIT)
    finally:
        for s in online:
            s.close()


def test_s5_device_limit_counts_other_registered_devices_online(gw1):
    """Section 4, DEVICE_LIMIT (fatal, at HELLO only): with 3 devices online (the
    limit here) a 4th is refused; a device already online reconnecting replaces
    itself instead, and send-only sessions are not counted."""
    user = uid("limit")
    online = [session(gw1, user, f"d{i}") for i in range(3)]
    try:
        with Wire(gw1) as w:
            w.send(hello(gw1.token(user), device="d3"))
            fatal(w, ErrorCode.DEVICE_LIMIT)
        bot = session(gw1, user, "bot", send_only=True)
        again = session(gw1, user, "d0")                 # replaces d0: no limit in the way
        assert online[0].until_eof()[0][-1].code == GoawayCode.REPLACED
        online[0].close()
        online[0] = again
        bot.close()
    finally:
        for s in online:
            s.close()


def test_s5_replacement_and_send_only_sessions(gw1):
    """Section 5, rule 5: a second connection of the same user and device gets the
    first GOAWAY REPLACED (reconnect_ms 0), closed; other devices are untouched; a
    send-only HELLO replaces the registered session of its device id; send-only
    sessions are never replaced."""
    user = uid("repl")
    old, other = session(gw1, user, "phone"), session(gw1, user, "laptop")
    new = session(gw1, user, "phone")
    frames, closed = old.until_eof()
    assert closed and frames[-1] == F.Goaway(GoawayCode.REPLACED, 0, frames[-1].reason), frames
    assert other.ping(1) == [] and new.ping(2) == []
    bot1 = session(gw1, user, "phone", send_only=True)
    frames, closed = new.until_eof()
    assert closed and frames[-1].code == GoawayCode.REPLACED
    bot2 = session(gw1, user, "phone", send_only=True)
    assert bot1.ping(3) == [] and bot2.ping(4) == [] and other.ping(5) == []
    for s in (old, other, new, bot1, bot2):
        s.close()


def test_s5_a_fatal_error_follows_the_acks_already_queued(gw1):
    """Section 5, rule 6: SENDs in the same read as a frame that is fatal are ACKed
    before the fatal ERROR, and stored."""
    bob = uid("acks-b")
    with session(gw1, uid("acks-a")) as w:
        w.send(encode(F.Send(1, bob, b"one")) + encode(F.Send(2, bob, b"two")) + encode(F.Ack(1, 2, 3)))
        acks = fatal(w, ErrorCode.UNEXPECTED_FRAME, preceding=2)
        assert [type(a) for a in acks] == [F.Ack, F.Ack]

    async def main():
        async with gw1.client(bob) as b:
            got = [await b.recv(timeout=5) for _ in range(2)]
            assert [(m.id, m.text) for m in got] == [(acks[0].msg_id, "one"), (acks[1].msg_id, "two")]
    run(main())


def test_s5_connection_limits_refuse_before_hello(gw_fast):
    """Section 5, rule 8 and section 4 (RATE_LIMITED and UNAVAILABLE before WELCOME,
    fatal): past 3 connections from one address the next gets RATE_LIMITED at once;
    past 8 in all (from other addresses), UNAVAILABLE. Closing one makes room."""
    held = [Wire(gw_fast, source="127.0.0.61") for _ in range(3)]
    try:
        with Wire(gw_fast, source="127.0.0.61") as w:
            fatal(w, ErrorCode.RATE_LIMITED)
        for i in range(5):                              # 8 in all, from addresses of their own
            held.append(session(gw_fast, uid("full"), source=f"127.0.0.{70 + i}"))
        with Wire(gw_fast, source="127.0.0.80") as w:
            fatal(w, ErrorCode.UNAVAILABLE)
    finally:
        for w in held:
            w.close()

    def admitted():
        with Wire(gw_fast, source="127.0.0.61") as w:
            w.send(hello(gw_fast.token(uid("room"))))
            return isinstance(w.frame(), F.Welcome)
    wait_for(admitted, "a connection to be admitted once the others closed", timeout=10, every=0.1)


def test_s5_end_of_stream_inside_a_frame(gw1):
    """Section 5, rule 9: a client that half-closes inside a frame gets no ERROR for
    it; the complete frames before it were served (the SEND is stored), then the
    connection closes."""
    bob = uid("eof-b")
    with session(gw1, uid("eof-a")) as w:
        half = encode(F.Send(2, bob, b"never complete"))[:-5]
        w.send(encode(F.Send(1, bob, b"complete")) + encode(F.Ping(3)) + half)
        w.sock.shutdown(socket.SHUT_WR)
        frames, closed = w.until_eof()
        assert closed and not any(isinstance(f, F.Error) for f in frames), frames
        assert F.Pong(3) in frames

    async def main():
        async with gw1.client(uid("eof-marker")) as s, gw1.client(bob) as b:
            marker = await s.send(bob, "marker", timeout=5)
            got = [await b.recv(timeout=5) for _ in range(2)]
            assert [m.text for m in got] == ["complete", "marker"] and got[1].id == marker.id  # not the cut one
    run(main())
