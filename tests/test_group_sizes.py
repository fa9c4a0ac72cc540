"""Groups of every size the server allows, with member ids of 255 bytes, over real
gateways (1 and 2 workers, the durable log, restarts): PROTOCOL.md sections 2
(limits), 3 (GROUP, GROUP_INFO), 4 (GROUP_FULL, BAD_REQUEST) and 8a.

A group's answer can be larger than one frame: GROUP_INFO is then cut into
consecutive frames with the MORE flag. A refused operation changes nothing,
on any worker, in the log, after a restart.
"""
import asyncio
import base64
import json
import re
import struct
import uuid

import pytest

from _core import frames as F
from _core.protocol import FLAG_MORE, ErrorCode, FrameType, GroupOp
from _core.pycodec import encode
from gateway.client import ServerError
from rawclient import Raw
from router.groups import MAX_GROUP_MEMBERS, decode_state, encode_state, info_pages
from router.sharding import DEFAULT_SHARDS, ShardMap

LIMIT = 1024          # the default max_group_members (PROTOCOL.md section 2)


def member_id(i: int) -> str:
    """A distinct user id of exactly 255 bytes; every other one is mostly 2-byte characters."""
    u = f"m{i:04d}" + ("\u00e9" * 125 if i % 2 else "x" * 250)
    assert len(u.encode()) == 255
    return u


def on_other_workers(user: str, workers: int) -> str:
    """A group id whose owner is not `user`'s worker (with one worker: any), so that the
    operations and their answers cross the bus."""
    shards = ShardMap(DEFAULT_SHARDS, workers, 0)
    for i in range(1000):
        g = f"#group-{i}"
        if workers == 1 or shards.owner(g) != shards.owner(user):
            return g
    raise AssertionError("no group id on another worker")


async def refused(coro, code: ErrorCode) -> ServerError:
    with pytest.raises(ServerError) as err:
        await coro
    assert err.value.code == code, err.value
    return err.value


@pytest.mark.parametrize("workers", [1, 2])
def test_every_group_size_up_to_the_limit(gateway_factory, tmp_path, workers):
    """Sections 2 and 8a: sizes 1..1024 (the default limit) with 255-byte member ids, each
    answered with the exact state; the 1025th member is GROUP_FULL and changes nothing,
    also seen from another worker and after a restart."""
    data = tmp_path / "d"
    gw = gateway_factory("--workers", str(workers), data_dir=data)
    group = on_other_workers("owner", workers)
    expect = {"owner": "admin"}

    async def grow():
        async with gw.client("owner") as o, gw.client("watcher") as w:
            assert (await o.group("create", group)) == {"group": group, "name": group, "members": expect}
            # one by one on one worker; in batches of 31 across workers (each answer is the
            # whole state: one by one is 130 MB of JSON, and the path is the same)
            step = 1 if workers == 1 else 31
            for i in range(1, LIMIT, step):
                batch = [member_id(j) for j in range(i, min(i + step, LIMIT))]
                info = await o.group("add", group, members=batch)
                expect.update(dict.fromkeys(batch, "member"))
                assert len(info["members"]) == i + len(batch) and info["members"] == expect, i
            await refused(o.group("add", group, members=[member_id(LIMIT)]), ErrorCode.GROUP_FULL)
            await refused(o.group("add", group, members=[member_id(LIMIT), member_id(LIMIT + 1)]),
                          ErrorCode.GROUP_FULL)
            assert (await o.group("info", group))["members"] == expect
            # the refused member is no member: it is refused like any stranger
            await refused(w.group("info", group), ErrorCode.NOT_A_MEMBER)
            await o.group("add", group, members=[member_id(1), member_id(2)])     # present already: no change
            assert (await o.group("info", group))["members"] == expect
    asyncio.run(grow())
    assert gw.stop() == 0, gw.text[-3000:]
    gw2 = gateway_factory("--workers", str(3 - workers), data_dir=data)

    async def after():
        async with gw2.client("owner") as o:
            assert (await o.group("info", group)) == {"group": group, "name": group, "members": expect}
            await refused(o.group("add", group, members=[member_id(LIMIT)]), ErrorCode.GROUP_FULL)
            info = await o.group("remove", group, members=[member_id(LIMIT - 1)])
            assert len(info["members"]) == LIMIT - 1
            info = await o.group("add", group, members=[member_id(LIMIT)])
            assert len(info["members"]) == LIMIT and info["members"][member_id(LIMIT)] == "member"
    asyncio.run(after())


def test_a_refused_create_leaves_no_group(gateway_factory, tmp_path):
    """Section 8a: CREATE past the limit is GROUP_FULL and the group does not exist, on any
    worker and after a restart."""
    data = tmp_path / "d"
    gw = gateway_factory("--workers", "2", "--max-group-members", "3", data_dir=data)
    group = on_other_workers("owner", 2)

    async def main():
        async with gw.client("owner") as o:
            await refused(o.group("create", group, members=[member_id(1), member_id(2), member_id(3)]),
                          ErrorCode.GROUP_FULL)
            await refused(o.group("info", group), ErrorCode.NO_SUCH_GROUP)
            await refused(o.send(group, "anyone?"), ErrorCode.NO_SUCH_GROUP)
    asyncio.run(main())
    assert gw.stop() == 0
    gw2 = gateway_factory("--workers", "1", "--max-group-members", "3", data_dir=data)

    async def after():
        async with gw2.client("owner") as o:
            await refused(o.group("info", group), ErrorCode.NO_SUCH_GROUP)
            assert len((await o.group("create", group, members=[member_id(1), member_id(2)]))["members"]) == 3
    asyncio.run(after())


def test_the_largest_allowed_group(gateway_factory, tmp_path):
    """Section 2: max_group_members may be set up to 2048; such a group of 255-byte member ids
    is kept across a restart, answered in several frames, and its messages reach members."""
    data = tmp_path / "d"
    args = ("--workers", "2", "--max-group-members", str(MAX_GROUP_MEMBERS))
    gw = gateway_factory(*args, data_dir=data)
    group = on_other_workers("owner", 2)
    members = ["reader"] + [member_id(i) for i in range(1, MAX_GROUP_MEMBERS - 1)]

    async def fill():
        async with gw.client("owner") as o:
            await o.group("create", group, members=members[:200])
            for i in range(200, len(members), 200):         # a request must fit in one frame
                info = await o.group("add", group, members=members[i:i + 200])
            assert len(info["members"]) == MAX_GROUP_MEMBERS
            await refused(o.group("add", group, members=["one-too-many"]), ErrorCode.GROUP_FULL)
            return info
    info = asyncio.run(fill())
    assert gw.stop() == 0
    gw2 = gateway_factory(*args, data_dir=data)

    async def after():
        async with gw2.client("owner") as o, gw2.client("reader") as r:
            assert (await o.group("info", group)) == info
            ack = await o.send(group, "to all 2048")
            m = await r.recv(timeout=10)
            assert (m.group, m.origin_id, m.text) == (group, ack.id, "to all 2048")
    asyncio.run(after())


@pytest.mark.parametrize("workers", [1, 2])
def test_group_info_in_several_frames(gateway_factory, workers):
    """Section 3, GROUP_INFO: an answer larger than max_frame comes in consecutive frames of
    at most max_frame, each holding valid UTF-8, MORE on all but the last; joined, they are
    the group's JSON."""
    gw = gateway_factory("--workers", str(workers), "--max-frame", "1024", "--pre-auth-max-frame", "1024",
                         "--store", "memory")
    group = on_other_workers("owner", workers)
    members = [member_id(i) for i in range(1, 40)]

    async def make():
        async with gw.client("owner") as o:
            await o.group("create", group, name="\u00e9" * 120 + "-n")
            for i in range(0, len(members), 3):             # three 255-byte ids fit in a 1 KiB request
                info = await o.group("add", group, members=members[i:i + 3])
            return info
    info = asyncio.run(make())
    assert len(info["members"]) == 40 and info["name"] == "\u00e9" * 120 + "-n"
    with Raw(gw) as r:
        w = r.hello(gw.token("owner"))
        assert not r.frames                               # nothing but WELCOME came before the request
        r.send(encode(F.Group(77, GroupOp.INFO, group)))
        pieces, wire = [], b""
        while not pieces or pieces[-1][2] & FLAG_MORE:   # the raw frames, with their flags
            data = r.sock.recv(65536)
            assert data, "the server closed the connection"
            wire += data
            frames, wire = split_frames(wire)
            pieces += frames
    assert not wire and len(pieces) > 10
    assert all(length <= w.max_frame and ftype == FrameType.GROUP_INFO for length, ftype, _, _ in pieces)
    assert [bool(flags & FLAG_MORE) for _, _, flags, _ in pieces] == [True] * (len(pieces) - 1) + [False]
    assert all(struct.unpack_from("!Q", body)[0] == 77 for *_, body in pieces)
    text = "".join(body[10:].decode() for *_, body in pieces)      # request_id, u16 length, the piece
    assert json.loads(text) == info


def split_frames(wire: bytes) -> tuple[list, bytes]:
    """(length, type, flags, body) of each whole frame at the start of `wire`, and the rest."""
    out, pos = [], 0
    while len(wire) - pos >= 4 and len(wire) - pos >= 4 + struct.unpack_from("!I", wire, pos)[0]:
        length, ftype, flags = struct.unpack_from("!IBB", wire, pos)
        out.append((length, ftype, flags, wire[pos + 6:pos + 4 + length]))
        pos += 4 + length
    return out, wire[pos:]


MEMBER_ERRORS = {
    "empty-id": [""],
    "256-byte-id": ["x" * 256],
    "256-bytes-of-2-byte-characters": ["\u00e9" * 128],
    "a-group-id": ["#other"],
    "not-a-string": [7],
    "not-a-list": "bob",
}


@pytest.mark.parametrize("case", list(MEMBER_ERRORS))
def test_bad_member_ids_are_refused_and_change_nothing(gateway_factory, case):
    """Section 4, BAD_REQUEST: `members` must be a list of user ids of 1..255 bytes not
    starting with '#'; CREATE and ADD with anything else change nothing."""
    gw = gateway_factory("--workers", "2", "--store", "memory")
    group = on_other_workers("owner", 2)
    bad = MEMBER_ERRORS[case]

    async def main():
        async with gw.client("owner") as o:
            await refused(o.group("create", group, members=bad), ErrorCode.BAD_REQUEST)
            await refused(o.group("info", group), ErrorCode.NO_SUCH_GROUP)
            await o.group("create", group, members=[member_id(1)])
            for op in ("add", "remove", "promote", "demote"):
                await refused(o.group(op, group, members=bad), ErrorCode.BAD_REQUEST)
            assert (await o.group("info", group))["members"] == {"owner": "admin", member_id(1): "member"}
    asyncio.run(main())


@pytest.mark.parametrize("arg", ['{"members": ["\\ud800"]}', '{"name": "\\udc00"}', '{"members": "\\ud800"}'],
                         ids=["member", "name", "members-not-a-list"])
def test_json_escapes_that_are_no_text_are_refused(gateway_factory, arg):
    """Section 4, BAD_REQUEST: a JSON escape of a lone surrogate is no UTF-8 text; as a member
    id or a name it is refused (non-fatal, ref = request_id) and nothing is created."""
    gw = gateway_factory("--workers", "2", "--store", "memory")
    group = on_other_workers("owner", 2)
    with Raw(gw) as r:
        r.hello(gw.token("owner"))
        r.send(encode(F.Group(31, GroupOp.CREATE, group, arg)))
        err = r.frame()
        assert (type(err), err.code, err.fatal, err.ref) == (F.Error, ErrorCode.BAD_REQUEST, False, 31), err
        r.send(encode(F.Group(32, GroupOp.INFO, group)))
        err = r.frame()
        assert (err.code, err.ref) == (ErrorCode.NO_SUCH_GROUP, 32), err


@pytest.mark.parametrize("name", ["", "n" * 256, "\u00e9" * 128, 5], ids=["empty", "256", "256-of-2-byte", "number"])
def test_group_names_are_1_to_255_bytes_on_create_and_rename(gateway_factory, name):
    """Section 3, GROUP and section 4, BAD_REQUEST: a name is 1..255 bytes of text, on CREATE
    as on RENAME (255 bytes is accepted)."""
    gw = gateway_factory("--workers", "1", "--store", "memory")

    async def main():
        async with gw.client("owner") as o:
            await refused(o.group("create", "#named", name=name), ErrorCode.BAD_REQUEST)
            await refused(o.group("info", "#named"), ErrorCode.NO_SUCH_GROUP)
            assert (await o.group("create", "#named", name="\u00e9" * 127 + "x"))["name"] == "\u00e9" * 127 + "x"
            await refused(o.group("rename", "#named", name=name), ErrorCode.BAD_REQUEST)
            assert (await o.group("info", "#named"))["name"] == "\u00e9" * 127 + "x"
    asyncio.run(main())


def test_a_request_over_the_frame_limit_is_refused_by_the_sdk(gateway_factory):
    """Section 3, GROUP: one request is one frame of at most max_frame; the SDK says so
    instead of sending a frame the server would answer FRAME_TOO_LARGE (fatal)."""
    gw = gateway_factory("--workers", "1", "--store", "memory")

    async def main():
        async with gw.client("owner") as o:
            with pytest.raises(ValueError, match="several requests"):
                await o.group("create", "#huge", members=[member_id(i) for i in range(1, 300)])
            await refused(o.group("info", "#huge"), ErrorCode.NO_SUCH_GROUP)     # nothing sent, still connected
    asyncio.run(main())


@pytest.mark.parametrize("value", ["0", str(MAX_GROUP_MEMBERS + 1)])
def test_member_limit_setting_range(tmp_path, value):
    """Section 2: max_group_members is 1..2048; another value is a bad setting (exit 2)."""
    import subprocess
    import sys
    from conftest import ROOT
    r = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "0", "--data-dir", str(tmp_path),
                        "--max-group-members", value], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and re.search("max.group.members", r.stderr), r.stderr


def test_group_message_with_the_largest_payload_crosses_workers(gateway_factory):
    """Sections 2 and 8a: with max_frame at its largest (16 MiB), a group message of
    max_payload bytes reaches a member on another worker (its copy crosses the bus)."""
    gw = gateway_factory("--workers", "2", "--max-frame", str(16 << 20), "--store", "memory",
                         "--segment-size", "64M")            # a segment holds 4 frames of the largest size
    shards = ShardMap(DEFAULT_SHARDS, 2, 0)
    group = "#wide"
    member = next(f"far-{i}" for i in range(100) if shards.owner(f"far-{i}") != shards.owner(group))

    async def main():
        async with gw.client("owner") as o, gw.client(member) as m:
            await o.group("create", group, members=[member])
            payload = uuid.uuid4().bytes * (o.welcome.max_payload // 16)
            ack = await o.send(group, payload, timeout=30)
            got = await m.recv(timeout=30)
            assert (got.origin_id, got.payload) == (ack.id, payload)
    asyncio.run(main())


# -- the pieces, without a server ----------------------------------------------------------

def test_info_pages_cut_at_character_boundaries():
    """Each piece fits one GROUP_INFO of max_frame and is valid UTF-8; joined, they are the text."""
    text = json.dumps({"members": {member_id(i): "member" for i in range(50)}, "x": "\U0001F600" * 300},
                      ensure_ascii=False)
    for max_frame in (1024, 1025, 1026, 1027, 4096, 65536, 1 << 20):
        pages = info_pages(text, max_frame)
        assert "".join(pages) == text
        assert all(0 < len(p.encode()) <= min(0xFFFF, max_frame - 12) for p in pages)
    assert info_pages("{}", 1024) == ["{}"]


def test_stored_state_is_compact_and_reads_the_old_json():
    """A full group's stored state (526,595 bytes at most) fits in one record of the smallest
    log segment (1 MiB), with room to spare."""
    state = {"name": "\u00e9" * 127 + "x", "members": {member_id(i): "member" for i in range(MAX_GROUP_MEMBERS)}}
    state["members"][member_id(0)] = "admin"
    raw = encode_state(state)
    assert len(raw) == 1 + 1 + 255 + 2 + MAX_GROUP_MEMBERS * (1 + 1 + 255) < (1 << 20) * 3 // 4
    assert decode_state(raw) == state
    assert decode_state(json.dumps(state).encode()) == state            # a data dir from before
    # older versions took any name and member id: what cannot be one is dropped or cut, an admin stays
    old = {"name": "n" * 300, "members": {"x" * 256: "admin", "#g": "member", "bob": "member", "al": "member"}}
    assert decode_state(json.dumps(old).encode()) == {"name": "n" * 255, "members": {"bob": "member", "al": "admin"}}
    assert decode_state(encode_state(decode_state(json.dumps(old).encode()))) == decode_state(json.dumps(old).encode())


def test_error_reasons_are_cut_to_fit_the_smallest_frame():
    """Section 3, ERROR: the server's frames fit in max_frame, whose smallest setting is 1024:
    a reason quoting ids is cut to 1000 bytes, at a character boundary."""
    from _core.pycodec import Decoder, decode_body
    from router import MemoryStore, Router
    out = []
    loop = asyncio.new_event_loop()
    try:
        router = Router(MemoryStore(), loop=loop)
        s = router.open_session("u", "d", write=out.append, close=lambda: None)
        s.error(ErrorCode.BAD_REQUEST, "not members: " + ", ".join("\U0001F600" * 63 + f"{i:03d}" for i in range(40)),
                5)
        s.flush()
    finally:
        loop.close()
    got = []
    Decoder(lambda t, f, b: got.append((len(b) + 2, decode_body(t, f, b))), 1 << 20).feed(b"".join(out))
    (length, err), = got
    assert length <= 1024 and err.reason.startswith("not members: \U0001F600")
    assert len(err.reason.encode()) <= 1000 and len(err.reason.encode()) > 996


def test_a_group_stored_as_json_by_an_older_version_still_works(gateway_factory, tmp_path):
    """A data dir whose group state an older version wrote as JSON (with a member id it should
    have refused): the group answers, the bad id is gone, and its next change is kept."""
    from _core.log import LogConfig, ShardedLog
    data = tmp_path / "d"
    assert gateway_factory("--workers", "1", data_dir=data).stop() == 0     # the secret and the layout
    store = ShardedLog(data / "log", LogConfig(segment_size=2 << 20), ShardMap(DEFAULT_SHARDS, 1, 0))
    store.open()
    old = {"name": "Old", "members": {"owner": "admin", "bob": "member", "x" * 256: "member"}}
    store.meta_put_for("#old", "g\x00#old", json.dumps(old).encode())
    store.close()
    gw = gateway_factory("--workers", "2", data_dir=data)

    async def main():
        async with gw.client("owner") as o:
            assert (await o.group("info", "#old")) == {"group": "#old", "name": "Old",
                                                       "members": {"owner": "admin", "bob": "member"}}
            await o.group("add", "#old", members=["carol"])
    asyncio.run(main())
    assert gw.stop() == 0
    gw2 = gateway_factory("--workers", "1", data_dir=data)

    async def after():
        async with gw2.client("owner") as o:
            assert (await o.group("info", "#old"))["members"] == {"owner": "admin", "bob": "member",
                                                                  "carol": "member"}
    asyncio.run(after())


def test_an_older_workers_single_member_group_copy_is_made_and_answered_in_its_format():
    """Rolling upgrade (docs/operations.md): an older group owner sends one `gcopy` per
    member and reads `member` in the answer. A newer worker makes the copy (the member's
    device gets the DELIVER, flagged as a group message) and answers with both fields."""
    from _core.pycodec import Decoder, decode_body
    from router import MemoryStore, Router
    out, sent = [], []
    loop = asyncio.new_event_loop()
    try:
        router = Router(MemoryStore(), loop=loop)
        router.open_session("bob", "phone", write=out.append, close=lambda: None).flush()
        out.clear()
        groups = router.groups
        groups.is_local = lambda name: not name.startswith("#")     # the group's owner is elsewhere
        groups.owner_of = lambda name: 3
        groups.bus_send = lambda owner, msg: sent.append((owner, msg))
        groups.control({"t": "gcopy", "member": "bob", "origin": 77, "ts": 1_700_000_000_000, "sender": "al",
                        "device": "d", "group": "#team", "payload": base64.b64encode(b"hi team").decode()})
        loop.run_until_complete(asyncio.sleep(0))                   # the turn's flush
        for s in router.sessions_of("bob"):
            s.flush()
    finally:
        loop.close()
    got = []
    Decoder(lambda t, f, b: got.append(decode_body(t, f, b)), 1 << 20).feed(b"".join(out))
    (d,) = got
    assert (d.sender, d.payload, d.peer, d.origin_id, d.group) == ("al", b"hi team", "#team", 77, True)
    assert sent == [(3, {"t": "gcopied", "group": "#team", "origin": 77, "members": ["bob"], "member": "bob"})]
