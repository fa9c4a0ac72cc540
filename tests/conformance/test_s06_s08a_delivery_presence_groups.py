"""docs/PROTOCOL.md sections 6 (delivery: ids, order, at-least-once and the
client's part of exactly-once), 7 (receipts), 8 (presence and typing) and 8a
(groups: every answer an operation can get)."""
import json

import pytest

from _core import frames as F
from _core.errors import ServerError
from _core.protocol import ErrorCode, GroupOp
from _core.pycodec import encode

from .kit import Wire, run, session, uid

# -- section 6 -------------------------------------------------------------------------------

def test_s6_ids_are_ordered_u64_integers(gw1):
    """Section 6, Ids: "Clients MUST treat ids as opaque, ordered integers": within a
    device's stream ids strictly increase, and they are above 2^53, so a client that
    keeps them as floating point numbers loses them."""
    alice, bob = uid("ids-a"), uid("ids-b")

    async def main():
        async with gw1.client(alice) as a:
            for i in range(8):
                await a.send(bob, f"m{i}", timeout=5)
            await a.send(alice, "to myself", timeout=5)
        async with gw1.client(bob) as b:
            got = [await b.recv(timeout=5) for _ in range(8)]
            await b.ack(*got)
        ids = [m.id for m in got]
        assert ids == sorted(set(ids)) and all(i > 2 ** 53 for i in ids), ids
        assert [m.text for m in got] == [f"m{i}" for i in range(8)]
    run(main())


def test_s6_redelivered_entries_are_ignored_by_the_client(gw1):
    """Section 6, Exactly once for the application: the server delivers an entry
    again until it is acknowledged (at-least-once), and a client MUST NOT hand one
    with `msg_id <= highest` to the application: the SDK shows it once."""
    sender, bob = uid("once-s"), uid("once-b")

    async def main():
        async with gw1.client(sender) as s:
            first = await s.send(bob, "first", timeout=5)
            with session(gw1, bob, "phone") as raw:              # delivered, not acknowledged
                d = raw.frame()
                assert isinstance(d, F.Deliver) and d.msg_id == first.id
            with session(gw1, bob, "phone") as raw:              # so it comes again
                again = raw.frame()
                assert isinstance(again, F.Deliver) and again.msg_id == first.id
            async with gw1.client(bob, device="phone") as b:
                m = await b.recv(timeout=5)
                assert m.id == first.id
                b._proto.transport.abort()                     # a lost connection before the RECEIVED
                second = await s.send(bob, "second", timeout=5)
                m2 = await b.recv(timeout=10)                  # after the reconnect: first is not shown again
                assert (m2.id, m2.text) == (second.id, "second") and b.reconnects == 1
                await b.ack(m, m2)
    run(main())


# -- section 7 -------------------------------------------------------------------------------

def test_s7_read_names_the_origin_id_of_a_group_message(gw1):
    """Section 7, READ: a client MUST send the msg_ids of plain DELIVERs from `peer`,
    or the origin_id of a GROUP DELIVER: the SDK does, and the sender's READ
    receipts name the ids of its ACKs."""
    alice, bob = uid("rd-a"), uid("rd-b")
    group = f"#{uid('rd')}"

    async def main():
        async with gw1.client(alice) as a, gw1.client(bob) as b:
            await a.group("create", group, members=[bob])
            direct = await a.send(bob, "direct", timeout=5)
            grouped = await a.send(group, "grouped", timeout=5)
            got = [await b.recv(timeout=5) for _ in range(2)]
            assert got[1].group == group and got[1].id != grouped.id and got[1].origin_id == grouped.id
            await b.read(*got)
            await b.ack(*got)
            receipts = [await a.recv_receipt(timeout=5) for _ in range(4)]
        reads = sorted(r.msg_id for r in receipts if r.kind == "read")
        assert reads == sorted([direct.id, grouped.id]), receipts
        assert all(r.by == bob for r in receipts)
    run(main())


def test_s7_receipts_are_best_effort(gw1):
    """Section 7, Best effort: "A client MUST NOT depend on receiving every receipt":
    a receipt for a user whose only inbox is full is dropped, while the messages
    are all kept; the next receipt, once there is room, arrives."""
    alice, bob, filler = uid("be-a"), uid("be-b"), uid("be-f")

    async def main():
        async with gw1.client(alice, device="only") as a:
            sent = await a.send(bob, "please confirm", timeout=5)
        async with gw1.client(filler) as f:                 # alice's inbox: 30 entries, the limit here
            for i in range(30):
                await f.send(alice, f"fill{i}", timeout=5)
        async with gw1.client(bob) as b:
            m = await b.recv(timeout=5)
            await b.ack(m)                                  # its DELIVERED receipt finds no room
            await b.ping()
            async with gw1.client(alice, device="only") as a:
                got = [await a.recv(timeout=5) for _ in range(30)]
                assert [x.text for x in got] == [f"fill{i}" for i in range(30)]
                await a.ack(*got)
                await a.ping()
                await b.read(m)                             # room again: this one arrives
                r = await a.recv_receipt(timeout=5)
                assert (r.kind, r.msg_id, r.by) == ("read", sent.id, bob)
    run(main())


# -- section 8 -------------------------------------------------------------------------------

def test_s8_presence_reaches_every_session_of_the_watcher_send_only_included(gw1):
    """Section 8, Who receives PRESENCE (and section 3, HELLO send-only): PRESENCE
    goes to every session of a user that follows the watched user, registered or
    send-only, not only to the one that subscribed; a client MUST accept PRESENCE
    it did not ask for and take each as the current state (the same state again
    included)."""
    watcher, watched = uid("pr-w"), uid("pr-x")
    with session(gw1, watcher, "phone") as phone, session(gw1, watcher, "laptop") as laptop, \
            session(gw1, watcher, "bot", send_only=True) as bot:
        phone.send(encode(F.Subscribe((watched,), True)))
        offline = F.Presence(watched, False, 0)
        assert [s.frame() for s in (phone, laptop, bot)] == [offline] * 3
        phone.send(encode(F.Subscribe((watched,), True)))      # asked again: the same state again
        assert [s.frame() for s in (phone, laptop, bot)] == [offline] * 3
        with session(gw1, watched, "x"):
            for s in (phone, laptop, bot):
                p = s.frame()
                assert (p.user, p.online) == (watched, True) and p.last_seen_ms > 0, p
        for s in (phone, laptop, bot):
            p = s.frame()
            assert (p.user, p.online) == (watched, False) and p.last_seen_ms > 0, p


def test_s8_typing_reaches_registered_sessions_only(gw1):
    """Section 8, Typing: relayed to the peer's online registered sessions, never to
    a send-only one (nor stored)."""
    typist, peer = uid("ty-t"), uid("ty-p")
    with session(gw1, peer, "phone") as phone, session(gw1, peer, "bot", send_only=True) as bot, \
            session(gw1, typist) as t:
        t.send(encode(F.Typing(peer, True)))
        assert phone.frame() == F.Typing(typist, True)
        assert bot.ping(1) == []
    with session(gw1, peer, "phone") as phone:
        assert phone.ping(2) == []                          # not stored for later


# -- section 8a ------------------------------------------------------------------------------

def _op(w: Wire, req: int, op: GroupOp, group: str, arg) -> object:
    w.send(encode(F.Group(req, op, group, arg if isinstance(arg, str) else json.dumps(arg))))
    f = w.frame()
    assert getattr(f, "ref", getattr(f, "request_id", None)) == req, f
    if isinstance(f, F.Error):
        assert not f.fatal, f
        return f.code
    return json.loads(f.info)


def test_s8a_every_refusal_of_a_group_operation(gw1):
    """Section 8a and section 4 (codes 27-32, not fatal, ref = request_id; a refused
    operation changes nothing): GROUP_EXISTS, NO_SUCH_GROUP, NOT_A_MEMBER,
    NOT_ADMIN, GROUP_FULL (4 members here) and each BAD_REQUEST of the table."""
    admin, member, outsider = uid("ga"), uid("gm"), uid("go")
    group = f"#{uid('g')}"
    with session(gw1, admin) as a, session(gw1, member) as m, session(gw1, outsider) as o:
        state = _op(a, 1, GroupOp.CREATE, group, {"members": [member]})
        assert state == {"group": group, "name": group, "members": {admin: "admin", member: "member"}}
        assert _op(o, 2, GroupOp.CREATE, group, {}) == ErrorCode.GROUP_EXISTS
        assert _op(o, 3, GroupOp.INFO, f"#{uid('none')}", {}) == ErrorCode.NO_SUCH_GROUP
        assert _op(o, 4, GroupOp.INFO, group, {}) == ErrorCode.NOT_A_MEMBER
        assert _op(m, 5, GroupOp.ADD, group, {"members": [outsider]}) == ErrorCode.NOT_ADMIN
        assert _op(a, 6, GroupOp.ADD, group, {"members": [uid("x"), uid("y"), uid("z")]}) == ErrorCode.GROUP_FULL
        assert _op(a, 7, GroupOp.CREATE, f"#{uid('big')}", {"members": [uid(str(i)) for i in range(4)]}) \
            == ErrorCode.GROUP_FULL
        bad = [
            (GroupOp.INFO, "[1, 2]"),                               # arg not a JSON object
            (GroupOp.INFO, "{not json"),
            (GroupOp.ADD, {"members": "bob"}),                      # members not a list
            (GroupOp.ADD, {"members": [""]}),
            (GroupOp.ADD, {"members": [f"#{uid('g')}"]}),
            (GroupOp.RENAME, {}),                                   # RENAME needs a name
            (GroupOp.RENAME, {"name": ""}),
            (GroupOp.RENAME, {"name": "n" * 256}),
            (GroupOp.RENAME, {"name": 7}),
            (GroupOp.PROMOTE, {"members": [outsider]}),             # not a member
            (GroupOp.DEMOTE, {"members": [admin]}),                 # no admin would remain
            (99, {}),                                               # unknown op
        ]
        for i, (op, arg) in enumerate(bad, start=10):
            assert _op(a, i, op, group, arg) == ErrorCode.BAD_REQUEST, (op, arg)
        assert _op(a, 30, GroupOp.INFO, group, {}) == state         # nothing changed
        assert o.ping(1) == [] and m.ping(2) == []              # answers went to the asker only

    async def main():                     # a SEND to a group: NO_SUCH_GROUP and NOT_A_MEMBER fail only it
        async with gw1.client(outsider) as c:
            for to, code in ((f"#{uid('none')}", ErrorCode.NO_SUCH_GROUP), (group, ErrorCode.NOT_A_MEMBER)):
                with pytest.raises(ServerError) as e:
                    await c.send(to, "x", timeout=5)
                assert e.value.code == code and e.value.ref != 0
            assert c.connected
    run(main())


@pytest.mark.parametrize("name,stored", [(None, "group id"), ("Team \u2603", "Team \u2603"), ("x" * 255, "x" * 255)])
def test_s8a_create_takes_a_name_of_1_to_255_bytes_or_the_group_id(gw1, name, stored):
    """Section 8a, CREATE: the name is `name` (a string of 1..255 bytes), the group id
    if absent; the same rule as RENAME."""
    group = f"#{uid('named')}"
    with session(gw1, uid("namer")) as w:
        info = _op(w, 1, GroupOp.CREATE, group, {} if name is None else {"name": name})
        assert info["name"] == (group if stored == "group id" else stored)


@pytest.mark.parametrize("name", ["", "n" * 256, "\u00e9" * 128, 5, None, ["x"]])
def test_s8a_create_refuses_a_name_that_is_not_1_to_255_bytes(gw1, name):
    """Section 8a and section 4, BAD_REQUEST: CREATE with a `name` that is not a
    string of 1..255 bytes makes no group."""
    group = f"#{uid('badname')}"
    with session(gw1, uid("namer")) as w:
        assert _op(w, 1, GroupOp.CREATE, group, {"name": name}) == ErrorCode.BAD_REQUEST
        assert _op(w, 2, GroupOp.INFO, group, {}) == ErrorCode.NO_SUCH_GROUP
