"""docs/PROTOCOL.md sections 3 (frame types: the rules in their tables) and 4
(error codes: each code the server sends, fatal or not, and what it leaves)."""
import os
import resource
import signal
import time

import pytest

from _core import frames as F
from _core.errors import ServerError
from _core.protocol import PROTOCOL_VERSION, ErrorCode, FrameType, GoawayCode, GroupOp
from _core.pycodec import encode

from .kit import Wire, fatal, hello, patched, resized, run, session, uid, users_on, wait_for

# -- section 3: the rules in the frame tables ------------------------------------------------

@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, 0xFFFF])
def test_s3_hello_version_must_be_the_protocol_version(gw1, version):
    """Section 3, HELLO (`version` MUST be the protocol version) and section 11: any
    other version is UNSUPPORTED_VERSION, fatal, whatever the rest of the HELLO holds."""
    with Wire(gw1) as w:
        w.send(hello(gw1.token(uid("ver")), version=version))
        fatal(w, ErrorCode.UNSUPPORTED_VERSION)


@pytest.mark.parametrize("frame", ["received", "read"])
@pytest.mark.parametrize("delta", [-8, -1, 1, 8])
def test_s3_received_and_read_body_must_match_their_count(gw1, frame, delta):
    """Section 3, RECEIVED and READ: "The body length MUST be exactly" 2 + 8 x count
    (READ: 1 + len(peer) + 2 + 8 x count); a missing or extra byte is MALFORMED_FRAME."""
    good = encode(F.Received((1, 2)) if frame == "received" else F.Read(uid("peer"), (1, 2)))
    bad = resized(good, delta) if delta < 0 else resized(good, b"\x00" * delta)
    with session(gw1, uid("count")) as w:
        w.send(bad)
        fatal(w, ErrorCode.MALFORMED_FRAME)


def test_s3_privacy_undefined_bits_are_ignored(gw1):
    """Section 3, PRIVACY: other bits "MUST be 0 and are ignored": 0x81 hides last
    seen like 0x01, and 0x80 alone shows it, as 0x00 does."""
    user, watcher = uid("priv"), uid("priv-w")
    privacy = encode(F.Privacy(True))
    with session(gw1, user) as u, session(gw1, watcher) as w:
        w.send(encode(F.Subscribe((user,), True)))
        assert w.frame().last_seen_ms > 0
        u.send(patched(privacy, 6, 0x81))
        assert w.frame() == F.Presence(user, True, 0)
        u.send(patched(privacy, 6, 0x80))
        p = w.frame()
        assert p.user == user and p.online and p.last_seen_ms > 0, p


def test_s3_group_id_must_start_with_hash(gw1):
    """Section 3, GROUP (`group` MUST start with `#`): any op on an id without it is
    BAD_REQUEST, not fatal, with ref = request_id."""
    with session(gw1, uid("nohash")) as w:
        for req, op in enumerate((GroupOp.CREATE, GroupOp.INFO, GroupOp.ADD), start=11):
            w.send(encode(F.Group(req, op, uid("team"), "{}")))
            err = w.frame()
            assert (err.code, err.ref, err.fatal) == (ErrorCode.BAD_REQUEST, req, False), err
        assert w.ping(3) == []


def test_s3_the_server_answers_every_ping_with_its_nonce(gw1):
    """Section 3, PING/PONG: the server MUST answer every PING with a PONG echoing
    its nonce, in order, any u64 included; the PONGs a client sends get no answer."""
    nonces = [0, 1, 2 ** 63, 2 ** 64 - 1, 42]
    with session(gw1, uid("ping")) as w:
        w.send(b"".join(encode(F.Pong(n)) for n in nonces) + b"".join(encode(F.Ping(n)) for n in nonces))
        assert [w.frame() for _ in nonces] == [F.Pong(n) for n in nonces]
        assert w.ping(5) == []


SERVER_ONLY = {
    "WELCOME": F.Welcome(PROTOCOL_VERSION, 1, "x", "y", 65536, 64742, 30000, 0),
    "ACK": F.Ack(1, 2, 3),
    "DELIVER": F.Deliver(1, 2, "x", "y", b"p"),
    "ERROR": F.Error(20, 1, "no"),
    "GOAWAY": F.Goaway(GoawayCode.SHUTTING_DOWN, 0, "bye"),
    "RECEIPT": F.Receipt(1, 1, 2, "x", "y", 3),
    "PRESENCE": F.Presence("x", True, 0),
    "GROUP_INFO": F.GroupInfo(1, "{}"),
}


@pytest.mark.parametrize("name", list(SERVER_ONLY))
def test_s3_a_server_only_type_from_a_client_is_unexpected(gw1, name):
    """Section 3: a client that sends an S->C-only type gets UNEXPECTED_FRAME, fatal."""
    with session(gw1, uid("s2c")) as w:
        w.send(encode(SERVER_ONLY[name]))
        fatal(w, ErrorCode.UNEXPECTED_FRAME)


def test_s3_received_from_a_send_only_session_is_unexpected(gw1):
    """Section 3, HELLO (send-only) and RECEIVED: a RECEIVED from a send-only
    session is UNEXPECTED_FRAME, fatal."""
    with session(gw1, uid("so"), send_only=True) as w:
        w.send(encode(F.Received((1,))))
        fatal(w, ErrorCode.UNEXPECTED_FRAME)


def test_s3_error_reason_is_for_logs_the_code_is_the_contract(gw1):
    """Section 3, ERROR: "clients MUST NOT parse" the reason: two refusals of the same
    kind carry the same code and ref semantics but different text."""
    async def main():
        async with gw1.client(uid("reason")) as c:
            n = c.welcome.max_payload
            errors = []
            for extra in (1, 2):
                with pytest.raises(ServerError) as e:
                    await c.send(uid("to"), b"x" * (n + extra), timeout=5)
                errors.append(e.value)
            return errors
    a, b = run(main())
    assert a.code == b.code == ErrorCode.PAYLOAD_TOO_LARGE and a.reason != b.reason, (a, b)


# -- section 4: error codes ------------------------------------------------------------------

def test_s4_the_fatal_flag_says_whether_the_connection_ends(gw1):
    """Section 4: "A client MUST decide whether an error is fatal from the FATAL flag"
    (and treat any code as a failure of the SEND named by `ref`; section 11 says the
    same of codes it does not know): every non-fatal
    ERROR leaves the connection serving, a fatal one (ref 0) closes it."""
    with session(gw1, uid("flag")) as w:
        w.send(encode(F.Group(21, GroupOp.INFO, f"#{uid('nope')}", "{}"))
               + encode(F.Group(22, GroupOp.CREATE, f"#{uid('bad')}", "[]")))
        errors = [w.frame(), w.frame()]
        assert [(e.code, e.ref, e.fatal) for e in errors] == [(ErrorCode.NO_SUCH_GROUP, 21, False),
                                                              (ErrorCode.BAD_REQUEST, 22, False)]
        assert w.ping(4) == []                       # still serving
        w.send(encode(F.Ack(1, 2, 3)))
        fatal(w, ErrorCode.UNEXPECTED_FRAME)
    assert [flags for t, flags, _ in w.wire if t == FrameType.ERROR] == [0, 0, 0x01]


def test_s4_payload_too_large_fails_only_that_send(gw1):
    """Section 4, PAYLOAD_TOO_LARGE: not fatal; nothing stored, the next SEND works."""
    alice, bob = uid("ptl-a"), uid("ptl-b")

    async def main():
        async with gw1.client(alice) as a, gw1.client(bob) as b:
            with pytest.raises(ServerError) as e:
                await a.send(bob, b"x" * (a.welcome.max_payload + 1), timeout=5)
            assert e.value.code == ErrorCode.PAYLOAD_TOO_LARGE and e.value.ref != 0
            sent = await a.send(bob, "small", timeout=5)
            m = await b.recv(timeout=5)
            assert (m.id, m.text) == (sent.id, "small")      # the refused one was never stored
    run(main())


def test_s4_rate_limited_sends_are_not_stored_and_may_be_retried(gw_fast):
    """Section 4, RATE_LIMITED (not fatal after WELCOME): past the per-session bucket
    (burst 5, 20/s here) a SEND is refused for now and not stored, and the ones behind
    it get OUT_OF_ORDER; sent again with the same seqs, in order, each is stored once.
    The recipient gets every message exactly once, in the order sent."""
    alice, bob = uid("rl-a"), uid("rl-b")
    with session(gw_fast, alice) as a:
        a.send(b"".join(encode(F.Send(seq, bob, b"m%d" % seq)) for seq in range(1, 11)))   # one burst
        answers = {}
        while len(answers) < 10:
            f = a.frame()
            answers[f.seq if isinstance(f, F.Ack) else f.ref] = f
        refused = sorted(s for s, f in answers.items() if isinstance(f, F.Error))
        assert refused and all(not answers[s].fatal for s in refused), answers
        first = answers[refused[0]]
        assert first.code == ErrorCode.RATE_LIMITED
        assert all(answers[s].code == ErrorCode.OUT_OF_ORDER for s in refused[1:])
        deadline = time.monotonic() + 10
        for seq in refused:                       # sent again, in order, as section 6 says
            while True:
                a.send(encode(F.Send(seq, bob, b"m%d" % seq)))
                f = a.frame()
                if isinstance(f, F.Ack):
                    break
                assert f.code == ErrorCode.RATE_LIMITED and time.monotonic() < deadline, f
                time.sleep(0.1)                   # the client's backoff; the bucket refills with time

    async def main():
        async with gw_fast.client(bob) as b:
            got = [await b.recv(timeout=5) for _ in range(10)]
            await b.ack(*got)
        assert [m.text for m in got] == [f"m{i}" for i in range(1, 11)]
    run(main())


def test_s4_quota_exceeded_when_no_inbox_has_room(gw1):
    """Section 4, QUOTA_EXCEEDED (not fatal) and section 6, Full inbox: with 30
    undelivered entries in the recipient's only inbox (the server's setting here)
    the next SEND is refused; consuming makes room again."""
    sender, bob = uid("q-s"), uid("q-b")
    with session(gw1, bob, "only"):
        pass                                          # bob's one device is registered, then offline

    async def main():
        async with gw1.client(sender) as s:
            for i in range(30):
                await s.send(bob, f"m{i}", timeout=5)
            with pytest.raises(ServerError) as e:
                await s.send(bob, "one too many", timeout=5)
            assert e.value.code == ErrorCode.QUOTA_EXCEEDED and s.connected
            async with gw1.client(bob, device="only") as b:
                got = [await b.recv(timeout=5) for _ in range(30)]
                assert [m.text for m in got] == [f"m{i}" for i in range(30)]
                await b.ack(*got)
                await b.ping()                    # the RECEIVED is read before the next SEND
                later = await s.send(bob, "room again", timeout=5)
                m = await b.recv(timeout=5)
                assert (m.id, m.text) == (later.id, "room again")
    run(main())


def test_s4_unavailable_while_the_owners_worker_restarts(gw2):
    """Section 4, UNAVAILABLE: while the worker serving the recipient restarts, a
    SEND to it is refused (not fatal, nothing stored) and a HELLO of its users is
    refused (fatal, before WELCOME); once it is back, both work."""
    (sender,), (bob,) = users_on(0, 2, 1, "un-s"), users_on(1, 2, 1, "un-b")
    victim = gw2.worker_pids()[1]
    w = session(gw2, sender, "d")                     # served by worker 0, whichever accepted it
    exits = gw2.text.count("event=worker_exited")
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: gw2.text.count("event=worker_exited") > exits, "the supervisor to see worker 1 die")
    w.send(encode(F.Send(1, bob, b"while it is down")))
    err = w.frame()
    assert (err.code, err.fatal, err.ref) == (ErrorCode.UNAVAILABLE, False, 1), err
    refused = None
    for _ in range(10):                               # a HELLO accepted by worker 0 cannot be handed over
        with Wire(gw2, timeout=0.3) as h:              # send-only: registers no device for bob
            h.send(hello(gw2.token(bob), send_only=True))
            try:
                f = h.frame()
            except OSError:                           # queued for worker 1: the kernel picked its socket
                continue
            if isinstance(f, F.Error):
                refused = f
                assert h.until_eof() == ([], True)
                break
    assert refused is not None and (refused.code, refused.ref, refused.fatal) == (ErrorCode.UNAVAILABLE, 0, True)

    def delivered():
        w.send(encode(F.Send(1, bob, b"while it is down")))
        f = w.frame()
        return f if isinstance(f, F.Ack) else None
    ack = wait_for(delivered, "worker 1 to be back", timeout=20, every=0.2)
    w.close()

    async def main():
        async with gw2.client(bob) as b:
            m = await b.recv(timeout=5)
            assert (m.id, m.payload) == (ack.msg_id, b"while it is down")
    run(main())


def test_s4_internal_is_fatal_and_a_retry_after_it_is_served(gw2):
    """Section 4, INTERNAL: a failure inside the server — here worker 0 out of file
    descriptors while it hands a connection to worker 1 — is a fatal ERROR with
    ref 0 before WELCOME; nothing is lost, and the client's retry (once the server
    has descriptors again) is served with the message stored before."""
    (bob,) = users_on(1, 2, 1, "int-b")
    w0 = gw2.worker_pids()[0]

    async def store():
        async with gw2.client(uid("int-s")) as s:
            return await s.send(bob, "stored before", timeout=10)
    sent = run(store())
    soft, hard = resource.prlimit(w0, resource.RLIMIT_NOFILE)
    seen = []
    try:
        for _ in range(20):                        # until one lands on worker 0 (the kernel picks)
            # one descriptor left below the limit: for the accept, none for the dup (measured each
            # time: the worker opens and closes some of its own, e.g. for the admin listener)
            fds = {int(n) for n in os.listdir(f"/proc/{w0}/fd")}
            resource.prlimit(w0, resource.RLIMIT_NOFILE, (min(set(range(len(fds) + 1)) - fds) + 1, hard))
            with Wire(gw2, timeout=1) as w:
                w.send(hello(gw2.token(bob), "d"))
                try:
                    seen.append(w.frame())
                except (OSError, AssertionError):  # none left even for the accept: refused
                    seen.append(None)
                    continue
                if isinstance(seen[-1], F.Error):
                    assert w.until_eof() == ([], True)
                    break
    finally:
        resource.prlimit(w0, resource.RLIMIT_NOFILE, (soft, hard))
    err = seen[-1]
    assert isinstance(err, F.Error) and (err.code, err.ref, err.fatal) == (ErrorCode.INTERNAL, 0, True), seen
    wait_for(lambda: "event=internal_error" in gw2.text, "the worker to log the failure")

    async def retry():
        async with gw2.client(bob, device="d") as b:
            m = await b.recv(timeout=10)
            assert (m.id, m.text) == (sent.id, "stored before")
    run(retry())
