"""Groups over real servers: roles, limits, fan-out to online and offline
members' devices, per-member receipts, state across a restart."""
import asyncio
import json
import sys
from pathlib import Path

import pytest

from _core.protocol import ErrorCode
from gateway.client import ServerError
from test_messenger import _empty


@pytest.mark.parametrize("workers", ["1", "2"])
def test_group_message_reaches_every_member_device_once(gateway_factory, workers):
    gw = gateway_factory("--workers", workers)

    async def main():
        a_phone, a_laptop = gw.client("alice", "phone"), gw.client("alice", "laptop")
        b_phone, b_laptop = gw.client("bob", "phone"), gw.client("bob", "laptop")
        for c in (a_phone, a_laptop, b_phone, b_laptop):
            await c.connect()
        info = await a_phone.group("create", "#team", name="Team", members=["bob", "carol", "dave"])
        assert info == {"group": "#team", "name": "Team",
                        "members": {"alice": "admin", "bob": "member", "carol": "member", "dave": "member"}}
        ack = await a_phone.send("#team", "hello team")
        for c in (b_phone, b_laptop, a_laptop):          # everyone's devices, the sender's other one too
            m = await c.recv(timeout=5)
            assert (m.group, m.sender, m.sender_device, m.origin_id, m.text) == ("#team", "alice", "phone",
                                                                                 ack.id, "hello team")
            await c.ack(m)
        await _empty(a_phone)                            # not the device that sent it
        for user in ("carol", "dave"):                   # offline members get it when they come
            async with gw.client(user, "phone") as c:
                m = await c.recv(timeout=5)
                assert (m.group, m.origin_id, m.text) == ("#team", ack.id, "hello team")
                await c.ack(m)
                await c.read(m)
                await _empty(c)
        receipts = set()
        while len(receipts) < 6:                         # delivered x4 devices, read x2 members
            r = await a_phone.recv_receipt(timeout=5)
            assert r.msg_id == ack.id
            receipts.add((r.kind, r.by, r.by_device))
        assert receipts == {("delivered", "bob", "phone"), ("delivered", "bob", "laptop"),
                            ("delivered", "carol", "phone"), ("delivered", "dave", "phone"),
                            ("read", "carol", "phone"), ("read", "dave", "phone")}
        for c in (a_phone, a_laptop, b_phone, b_laptop):
            await c.close()
    asyncio.run(main())


@pytest.mark.parametrize("workers", ["1", "2"])
def test_membership_changes_by_admins_only(gateway_factory, workers):
    gw = gateway_factory("--workers", workers)

    async def refused(coro, code):
        with pytest.raises(ServerError) as err:
            await coro
        assert err.value.code == code, err.value

    async def main():
        async with gw.client("ann") as ann, gw.client("ben") as ben, gw.client("cat") as cat:
            await ann.group("create", "#club", members=["ben"])
            await refused(ann.group("create", "#club"), ErrorCode.GROUP_EXISTS)
            await refused(ben.group("add", "#club", members=["cat"]), ErrorCode.NOT_ADMIN)
            await refused(cat.group("info", "#club"), ErrorCode.NOT_A_MEMBER)
            await refused(cat.send("#club", "let me in"), ErrorCode.NOT_A_MEMBER)
            await refused(cat.group("info", "#nothing"), ErrorCode.NO_SUCH_GROUP)
            await refused(cat.send("#nothing", "hello?"), ErrorCode.NO_SUCH_GROUP)
            info = await ann.group("promote", "#club", members=["ben"])
            assert info["members"] == {"ann": "admin", "ben": "admin"}
            info = await ben.group("add", "#club", members=["cat"])
            assert info["members"]["cat"] == "member"
            assert (await ben.group("rename", "#club", name="The Club"))["name"] == "The Club"
            await ben.group("demote", "#club", members=["ann"])
            await refused(ann.group("remove", "#club", members=["cat"]), ErrorCode.NOT_ADMIN)
            info = await ben.group("remove", "#club", members=["cat"])
            assert set(info["members"]) == {"ann", "ben"}
            await refused(cat.send("#club", "still here?"), ErrorCode.NOT_A_MEMBER)
            assert (await ben.group("leave", "#club")) == {"group": "#club", "left": True}
            info = await ann.group("info", "#club")       # the last member left becomes admin
            assert info["members"] == {"ann": "admin"}
            await ann.group("add", "#club", members=["cat", "ben"])
            info = await ann.group("remove", "#club", members=["ann"])   # an admin removing itself
            assert info["members"] == {"ben": "admin", "cat": "member"}
    asyncio.run(main())


def test_group_size_limit(gateway_factory):
    gw = gateway_factory("--max-group-members", "3")

    async def main():
        async with gw.client("owner") as o:
            await o.group("create", "#small", members=["m1", "m2"])
            with pytest.raises(ServerError) as err:
                await o.group("add", "#small", members=["m3"])
            assert err.value.code == ErrorCode.GROUP_FULL and "at most 3" in err.value.reason
            with pytest.raises(ServerError) as err:
                await o.group("create", "#big", members=["a", "b", "c"])
            assert err.value.code == ErrorCode.GROUP_FULL
            assert len((await o.group("info", "#small"))["members"]) == 3
    asyncio.run(main())


def test_group_state_and_undelivered_messages_survive_a_restart(gateway_factory, tmp_path):
    data = tmp_path / "d"
    gw = gateway_factory("--workers", "2", data_dir=data)

    async def before():
        async with gw.client("host") as h:
            await h.group("create", "#kept", name="Kept", members=["guest"])
            return (await h.send("#kept", "while you were away")).id
    origin = asyncio.run(before())
    assert gw.stop() == 0
    gw2 = gateway_factory("--workers", "3", data_dir=data)

    async def after():
        async with gw2.client("guest") as g:
            m = await g.recv(timeout=5)
            assert (m.group, m.origin_id, m.text) == ("#kept", origin, "while you were away")
            await g.ack(m)
            info = await g.group("info", "#kept")
            assert info == {"group": "#kept", "name": "Kept", "members": {"host": "admin", "guest": "member"}}
        async with gw2.client("stranger") as s:
            with pytest.raises(ServerError) as err:
                await s.send("#kept", "hi")
            assert err.value.code == ErrorCode.NOT_A_MEMBER
    asyncio.run(after())


def test_group_cli(gateway_proc):
    import subprocess
    gw = gateway_proc
    sb = [str(Path(sys.executable).parent / "switchboard")]
    ep = ["--host", gw.host, "--port", str(gw.port), "--data-dir", str(gw.data_dir)]

    def run(*args):
        return subprocess.run(sb + list(args) + ep, capture_output=True, text=True, timeout=30)
    r = run("group", "create", "#cli", "bo", "cy", "--name", "CLI team", "--as", "al")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["members"] == {"al": "admin", "bo": "member", "cy": "member"}
    r = run("group", "add", "#cli", "dee", "--as", "bo")
    assert r.returncode != 0 and "NOT_ADMIN" in r.stderr
    r = run("send", "--as", "al", "--to", "#cli", "hi all")
    assert r.returncode == 0, r.stderr
    r = run("recv", "--as", "cy", "--count", "1", "--timeout", "5")
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout.splitlines()[0])
    assert (line["from"], line["text"]) == ("al", "hi all")
    r = run("token", "issue", "#notauser") if False else subprocess.run(
        sb + ["token", "issue", "#notauser", "--data-dir", str(gw.data_dir)], capture_output=True, text=True)
    assert r.returncode != 0 and "may not start with '#'" in r.stderr


def test_group_copy_to_a_restarting_members_worker_is_retried(gateway_factory):
    """The members' worker is killed -9: the group's owner has the messages (ACKed)
    and keeps offering the members' copies until the restarted worker takes them;
    each member gets each message once, in the order it was sent."""
    import os
    import signal
    from router.sharding import shard_of
    from test_workers import users_on
    gw = gateway_factory("--workers", "2")
    group = next(f"#g{i}" for i in range(1000) if shard_of(f"#g{i}") % 2 == 0)
    owner = users_on(0, 2, 1, "gr-a")[0]
    members = users_on(1, 2, 2, "gr-b")        # both on the killed worker: one batch carries both copies

    async def main():
        async with gw.client(owner) as o:
            await o.group("create", group, members=members)
            before = await o.send(group, "before", timeout=10)
            os.kill(gw.worker_pids()[1], signal.SIGKILL)
            acks = [before] + [await o.send(group, f"while your worker restarts {i}", timeout=10) for i in range(10)]
        texts = ["before"] + [f"while your worker restarts {i}" for i in range(10)]
        for member in members:
            async with gw.client(member, max_backoff=0.2) as m:
                got = []
                for _ in texts:
                    msg = await m.recv(timeout=15)
                    got.append((msg.group, msg.origin_id, msg.text))
                    await m.ack(msg)
                assert got == [(group, a.id, t) for a, t in zip(acks, texts)], member   # once each, in order
                await _empty(m)
    asyncio.run(main())
