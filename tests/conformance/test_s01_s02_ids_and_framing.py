"""docs/PROTOCOL.md sections 1 (overview, booleans, the id rule) and 2 (frame
layout, flags, limits, the checks on every frame)."""
import os
import struct
import subprocess
import sys
import time
import unicodedata

import pytest

from _core import frames as F
from _core.errors import ServerError
from _core.protocol import DEFAULT_MAX_FRAME, ErrorCode, FrameType, GroupOp, PRE_AUTH_MAX_FRAME
from _core.pycodec import encode
from conftest import ROOT
from gateway.auth import TokenAuthority, load_secret

from .kit import DOC, Wire, doc_token, fatal, hello, patched, resized, run, session, uid

# -- section 1: booleans ---------------------------------------------------------------------

def test_s1_booleans_receivers_take_any_nonzero_as_true_senders_send_0_or_1(gw1):
    """Section 1: "Senders MUST send 0 or 1; the server answers any other value with
    MALFORMED_FRAME". A SUBSCRIBE whose `on` byte is 2 is refused (fatal); the
    server's own booleans (PRESENCE online, TYPING) are 0 or 1."""
    watcher, typist = uid("bool-w"), uid("bool-t")
    with session(gw1, watcher) as w:
        w.send(patched(encode(F.Subscribe((typist,), True)), 6, 2))      # body byte 0: on
        fatal(w, ErrorCode.MALFORMED_FRAME)
    with session(gw1, watcher) as w, session(gw1, typist) as t:
        w.send(encode(F.Subscribe((typist,), True)))
        p = w.frame()
        assert p == F.Presence(typist, True, p.last_seen_ms), p
        assert w.wire[-1][2][1 + len(typist.encode())] == 1       # online: the byte itself is 1
        t.send(encode(F.Typing(watcher, True)))
        got = w.frame()
        assert got == F.Typing(typist, True), got
        assert w.wire[-1][2][-1] == 1


# -- section 1: ids --------------------------------------------------------------------------

ILLEGAL = {
    "space": "bob smith",
    "tab": "bob\tsmith",
    "newline": "bob\nsmith",
    "NUL": "bob\x00smith",
    "DEL": "bob\x7fsmith",
    "C1 control": "bob\x85smith",
    "no-break space": "bob\u00a0smith",
    "ideographic space": "bob\u3000smith",
    "zero-width space": "\u200bbob",
    "bidi override": "bob\u202e",
    "line separator": "bob\u2028",
    "NFD": "jose\u0301",
    "private use": "bob\ue000",
    "unassigned": "bob\u0378",
    "emoji joiner": "\U0001f469\u200d\U0001f4bb",
}
LEGAL = ["jos\u00e9", "\u7528\u623742", "bob@example.com", "a", "x" * 255, "\u00e9" * 127, "bob\U0001f642"]


def test_s1_ids_unassigned_is_judged_by_the_unicode_version_the_document_names():
    """Section 1, Ids: the document names the server's Unicode database version."""
    assert f"(Unicode {unicodedata.unidata_version.removesuffix('.0')} today)" in DOC.read_text()


@pytest.mark.parametrize("kind", list(ILLEGAL))
def test_s1_ids_the_issuer_refuses_an_illegal_user_or_device_id(gw1, kind):
    """Section 1, Ids: `switchboard token issue` issues no token for an id that breaks the rule."""
    authority = TokenAuthority(load_secret(gw1.data_dir))
    with pytest.raises(ValueError):
        authority.issue(ILLEGAL[kind])
    with pytest.raises(ValueError):
        authority.issue("alice", device=ILLEGAL[kind])


def test_s1_ids_token_issue_command_refuses_in_one_line(gw1):
    """Section 1, Ids: the command line says why and exits non-zero; a legal
    non-ASCII id is issued."""
    cmd = [sys.executable, "-m", "gateway", "token", "issue", "--data-dir", str(gw1.data_dir)]
    bad = subprocess.run(cmd + ["bob smith"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and bad.stdout == "", bad
    assert len(bad.stderr.strip().splitlines()) == 1 and "not a legal user id" in bad.stderr, bad.stderr
    good = subprocess.run(cmd + ["jos\u00e9"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert good.returncode == 0 and good.stdout.startswith("sb1."), good


@pytest.mark.parametrize("user", ["bob smith", "bob\x00x", "jose\u0301", "#team"])
def test_s1_ids_hello_whose_token_names_an_illegal_user_is_auth_failed(gw1, user):
    """Section 1, Ids and section 4 (AUTH_FAILED): a correctly signed token for an
    id the rule refuses (made elsewhere, or before the rule) opens no session."""
    token = doc_token(load_secret(gw1.data_dir), user, "", int(time.time()) + 3600)
    with Wire(gw1) as w:
        w.send(hello(token))
        fatal(w, ErrorCode.AUTH_FAILED)


@pytest.mark.parametrize("device", ["my phone", "ph\x00ne", "\u200bphone", "cafe\u0301"])
def test_s1_ids_hello_with_an_illegal_device_is_malformed(gw1, device):
    """Section 1, Ids: HELLO's `device` that breaks the rule is MALFORMED_FRAME, fatal."""
    with Wire(gw1) as w:
        w.send(hello(gw1.token(uid("dev")), device=device))
        fatal(w, ErrorCode.MALFORMED_FRAME)


def test_s1_ids_send_to_an_illegal_recipient_is_bad_recipient_not_fatal(gw1):
    """Section 1, Ids and section 4 (BAD_RECIPIENT): each illegal recipient fails
    only its own SEND (the error names it by ref, so the SDK fails that send); the
    connection stays and the next SEND to a legal id is stored and delivered."""
    alice, bob = uid("br-a"), uid("br-b")

    async def main():
        async with gw1.client(alice) as a, gw1.client(bob) as b:
            for kind, to in ILLEGAL.items():
                with pytest.raises(ServerError) as e:
                    await a.send(to, kind, timeout=5)
                assert e.value.code == ErrorCode.BAD_RECIPIENT and e.value.ref != 0, (kind, e.value)
            assert a.connected and a.reconnects == 0
            sent = await a.send(bob, "after the refusals", timeout=5)
            m = await b.recv(timeout=5)
            assert (m.id, m.text) == (sent.id, "after the refusals")
    run(main())


def test_s1_ids_legal_ids_are_compared_byte_for_byte(gw1):
    """Section 1, Ids: non-ASCII ids in NFC are legal users; `Bob` and `bob` are two users."""
    sender = uid("cmp")
    tail = uid("")

    def unique(base: str) -> str:            # the legal id made fresh, at most 240 bytes (the
        while len((base + tail).encode()) > 240:   # lengths up to 255 are section 2's tests)
            base = base[:-1]
        return base + tail
    names = [unique("Bob"), unique("bob")] + [unique(n) for n in LEGAL]

    async def main():
        async with gw1.client(sender) as s:
            acks = {n: await s.send(n, f"to {n}", timeout=5) for n in names}
        for n in names:
            async with gw1.client(n) as c:
                m = await c.recv(timeout=5)
                assert (m.id, m.text) == (acks[n].id, f"to {n}"), n
                await c.ack(m)
    run(main())


def test_s1_ids_group_ids_and_members_follow_the_rule(gw1):
    """Section 1, Ids and section 8a: an illegal group id or member is BAD_REQUEST
    (non-fatal, nothing made); `#` plus a legal non-ASCII id is a group."""
    admin = uid("gid")

    async def main():
        async with gw1.client(admin) as c:
            for group, members in ((f"#team {uid('')}", []), (f"#{uid('')}\u200b", []),
                                   (f"#{uid('ok')}", ["bob smith"]), (f"#{uid('ok')}", ["#other"])):
                with pytest.raises(ServerError) as e:
                    await c.group("create", group, members=members)
                assert e.value.code == ErrorCode.BAD_REQUEST, (group, members, e.value)
                with pytest.raises(ServerError) as e:
                    await c.group("info", group)
                assert e.value.code in (ErrorCode.NO_SUCH_GROUP, ErrorCode.BAD_REQUEST), e.value
            good = f"#\u00e9quipe-{uid('')}"
            info = await c.group("create", good)
            assert info["group"] == good and info["members"] == {admin: "admin"}
    run(main())


def test_s1_ids_subscribe_to_an_illegal_id_is_offline_to_that_session_only(gw1):
    """Section 1, Ids and section 8: an illegal id (a group id too) is answered
    offline with last_seen 0 to the subscribing session alone, and not followed;
    a legal one is answered to every session of the watcher."""
    watcher, legal = uid("sub-w"), uid("sub-legal")
    with session(gw1, watcher, "one") as one, session(gw1, watcher, "two") as two:
        one.send(encode(F.Subscribe(("bob smith", "#team"), True)))
        assert [one.frame(), one.frame()] == [F.Presence("bob smith", False, 0), F.Presence("#team", False, 0)]
        assert two.ping(1) == []                 # not told: nothing is followed for the user
        one.send(encode(F.Subscribe((legal,), True)))
        assert one.frame() == F.Presence(legal, False, 0)
        assert two.frame() == F.Presence(legal, False, 0)


def test_s1_ids_read_and_typing_naming_an_illegal_peer_are_ignored(gw1):
    """Section 1, Ids: READ and TYPING to an illegal peer are dropped and the
    connection stays open (answers the next PING, nothing before it)."""
    with session(gw1, uid("rt")) as w:
        w.send(encode(F.Read("bob smith", (1, 2, 3))) + encode(F.Typing("bob\x00x", True))
               + encode(F.Read("#team", (4,))))
        assert w.ping(7) == []


# -- section 2: frame layout and the checks on every frame -----------------------------------

def _ping(n: int = 1) -> bytes:
    return encode(F.Ping(n))


@pytest.mark.parametrize("authenticated", [False, True])
def test_s2_length_below_two_is_malformed(gw1, authenticated):
    """Section 2, check 2: `length < 2` is MALFORMED_FRAME, fatal (before and after WELCOME)."""
    with (session(gw1, uid("len")) if authenticated else Wire(gw1)) as w:
        w.send(struct.pack("!I", 1) + bytes([FrameType.PING]))
        fatal(w, ErrorCode.MALFORMED_FRAME)


def test_s2_body_must_match_its_layout_trailing_bytes_are_malformed(gw1):
    """Section 2: "A frame's body MUST match its layout exactly": a PING with a
    ninth body byte is MALFORMED_FRAME, fatal."""
    with session(gw1, uid("trail")) as w:
        w.send(resized(_ping(), b"\x00"))
        fatal(w, ErrorCode.MALFORMED_FRAME)


def test_s2_frame_too_large_is_decided_from_the_prefix(gw1):
    """Section 2, check 1 and the limits table: more than 4096 before WELCOME and
    more than max_frame after it is FRAME_TOO_LARGE, fatal, answered from the
    4-byte prefix alone (no body is sent here); exactly 4096 is accepted."""
    with Wire(gw1) as w:
        w.send(struct.pack("!I", PRE_AUTH_MAX_FRAME + 1))
        fatal(w, ErrorCode.FRAME_TOO_LARGE)
    with session(gw1, uid("big")) as w:
        assert w.welcome.max_frame == DEFAULT_MAX_FRAME
        w.send(struct.pack("!I", w.welcome.max_frame + 1))
        fatal(w, ErrorCode.FRAME_TOO_LARGE)
    with Wire(gw1) as w:                         # exactly the limit: read whole, then judged by its body
        w.send(struct.pack("!I", PRE_AUTH_MAX_FRAME) + bytes([FrameType.HELLO, 0])
               + b"\x00" * (PRE_AUTH_MAX_FRAME - 2))
        frames = fatal(w, ErrorCode.UNSUPPORTED_VERSION)      # its body's version (0) is checked first
        assert frames == []


@pytest.mark.parametrize("authenticated", [False, True])
@pytest.mark.parametrize("ftype", [0x00, 0x13, 0x41, 0xFF])
def test_s2_unknown_frame_type_is_fatal(gw1, authenticated, ftype):
    """Section 2, check 3 and section 4: a type byte not in section 3's table is
    UNKNOWN_FRAME_TYPE, fatal (the bus's own types 0x41.. included)."""
    with (session(gw1, uid("type")) if authenticated else Wire(gw1)) as w:
        w.send(patched(_ping(), 4, ftype))
        fatal(w, ErrorCode.UNKNOWN_FRAME_TYPE)


def test_s2_a_receiver_ignores_flag_bits_it_does_not_know(gw1):
    """Section 2: "a receiver MUST ignore bits it does not know" (and section 11): a
    PING with every flag bit set is answered; a HELLO with only undefined bits set
    is a registered session (it gets its backlog), not a send-only one."""
    user = uid("flags")

    async def main():
        async with gw1.client(uid("flags-s")) as s:
            return await s.send(user, "waiting", timeout=5)
    with session(gw1, user, "first") as w:          # register the device
        assert w.ping(1) == []
    sent = run(main())
    with Wire(gw1) as w:
        w.send(patched(hello(gw1.token(user), device="first"), 5, 0xFE))
        assert isinstance(w.frame(), F.Welcome)
        d = w.frame()
        assert isinstance(d, F.Deliver) and d.msg_id == sent.id, d
        w.send(patched(_ping(9), 5, 0xFF))
        assert w.frame() == F.Pong(9)


def test_s2_the_server_sets_no_undefined_flag_bits_and_sends_mirror_and_group_fields(gw1):
    """Section 2: "A sender MUST set undefined bits to 0" (the server's frames carry
    only FATAL on ERROR and MIRROR/GROUP on DELIVER) and "MIRROR and GROUP add fields
    to the body, so a client MUST implement them": the fields are there, in order
    (section 11: a client that knew only the types 0x01-0x0A misreads them)."""
    alice, bob = uid("fl-a"), uid("fl-b")
    group = f"#{uid('fl')}"
    defined = {FrameType.ERROR: 0x01, FrameType.DELIVER: 0x02 | 0x04}
    with session(gw1, alice, "laptop") as laptop, session(gw1, bob, "phone") as b:

        async def main():
            async with gw1.client(alice, device="phone") as phone:
                await phone.group("create", group, members=[bob])
                direct = await phone.send(bob, "hi", timeout=5)
                grouped = await phone.send(group, "all", timeout=5)
                with pytest.raises(ServerError):
                    await phone.send("not legal", "x", timeout=5)
                return direct, grouped
        direct, grouped = run(main())
        b.send(encode(F.Subscribe((alice,), True)) + encode(F.Received((direct.id,))))
        frames = b.until(lambda f: isinstance(f, F.Presence)) + b.ping(2)
        frames += laptop.until(lambda f: isinstance(f, F.Receipt))
        laptop.send(encode(F.Group(5, GroupOp.INFO, f"#{uid('none')}", "{}")))
        frames += laptop.until(lambda f: isinstance(f, F.Error))
        for w in (b, laptop):
            for ftype, flags, _ in w.wire:
                assert flags & ~defined.get(ftype, 0) == 0, (FrameType(ftype).name, flags)
        mirror = next(f for f in frames if isinstance(f, F.Deliver) and f.peer == bob and not f.group)
        assert (mirror.sender, mirror.sender_device, mirror.origin_id, mirror.payload) == (alice, "phone", direct.id, b"hi")
        copy = next(f for f in frames if isinstance(f, F.Deliver) and f.group and f.sender_device == "phone"
                    and f.origin_id == grouped.id and f.peer == group)
        assert copy.payload == b"all"
        theirs = next(f for f in frames if isinstance(f, F.Deliver) and f.group and f.sender == alice)
        assert (theirs.peer, theirs.origin_id, theirs.sender_device, theirs.payload) == (group, grouped.id,
                                                                                          "phone", b"all")


def test_s2_a_payload_of_max_payload_fits_every_deliver(gw1):
    """Section 2, limits: a SEND payload of exactly max_payload is accepted and its
    DELIVER (and its mirror, whose peer and origin id it carries) fit max_frame;
    one byte more is PAYLOAD_TOO_LARGE, not fatal."""
    alice, bob = uid("a" * 100), uid("b" * 100)

    async def main():
        async with gw1.client(alice, device="d" * 100) as a, gw1.client(alice, device="e" * 100) as mirror, \
                gw1.client(bob) as b:
            n = a.welcome.max_payload
            assert n == a.welcome.max_frame - 794
            with pytest.raises(ServerError) as e:
                await a.send(bob, os.urandom(n + 1), timeout=5)
            assert e.value.code == ErrorCode.PAYLOAD_TOO_LARGE and a.connected
            payload = os.urandom(n)
            sent = await a.send(bob, payload, timeout=10)
            m = await b.recv(timeout=10)
            assert (m.id, m.payload) == (sent.id, payload)
            copy = await mirror.recv(timeout=10)
            assert (copy.peer, copy.origin_id, copy.payload) == (bob, sent.id, payload)
    run(main())
