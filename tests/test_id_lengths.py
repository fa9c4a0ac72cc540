"""Every id length the protocol allows (PROTOCOL.md sections 1 and 2: ids are 1..255
bytes of UTF-8) for users, devices, recipients, group ids and group members, over
real gateways with 1 and 2 workers; and ids of 0 and 256 bytes get the documented
answer wherever they can be named (token issue, the SDK, the wire).

For each length L a user of L bytes connects as a registered device (with a
255-byte device id), and a 255-byte sender with an L-byte device sends to it:
message, mirror, DELIVERED and READ receipts, presence, typing, and a group of
L bytes with the L-byte user as member. With the durable log a registered
device's record key is 'd', the user, the device; it holds two 255-byte ids
since the log's META keys have a u16 length (the lead's change to _log.pyx:
the log-store runs here pass once that is merged).
"""
import asyncio
import base64
import hashlib
import hmac
import struct
import subprocess
import sys
import time

import pytest

from _core import frames as F
from _core.protocol import PROTOCOL_VERSION, ErrorCode
from _core.pycodec import encode
from conftest import ROOT
from gateway.auth import load_secret
from rawclient import Raw
from test_adversarial import assert_fatal

WIDTHS = ("\u00e9", "\u20ac", "\U0001F600", "a")        # 2, 3, 4 and 1 bytes of UTF-8


def id_of(n: int, first: str) -> str:
    """An id of exactly `n` bytes starting with the ASCII `first`, in characters of every width."""
    out, size, i = first, 1, 0
    while size < n:
        ch = WIDTHS[i % len(WIDTHS)]
        i += 1
        if size + len(ch.encode()) > n:
            ch = "a"
        out += ch
        size += len(ch.encode())
    assert len(out.encode()) == n, (n, out)
    return out


def ids_for(n: int) -> dict:
    """The ids of one round: the receiver and the group are `n` bytes, the sender 255 with an
    `n`-byte device."""
    return {
        "user": id_of(n, "u"),                                  # receiver, group member, recipient
        "device": id_of(255, "r"),
        "sender": f"s{n:03d}" + id_of(251, "s"),                # 255 bytes, one per round
        "sender_device": id_of(n, "d"),
        "other_device": id_of(255, "o"),                        # the sender's other device (mirrors)
        "group": "#" if n == 1 else "#" + id_of(n - 1, "g"),
    }


async def one_round(gw, n: int) -> None:
    i = ids_for(n)
    async with gw.client(i["user"], i["device"]) as rcv, \
            gw.client(i["sender"], i["other_device"]) as other, \
            gw.client(i["sender"], i["sender_device"]) as snd:
        assert (rcv.welcome.user, rcv.welcome.device) == (i["user"], i["device"])
        assert (snd.welcome.user, snd.welcome.device) == (i["sender"], i["sender_device"])
        await other.subscribe(i["user"])                        # presence of an n-byte user
        p = await other.recv_presence(timeout=5)
        assert (p.user, p.online) == (i["user"], True)

        ack = await snd.send(i["user"], f"hello {n}")           # an n-byte recipient
        m = await rcv.recv(timeout=5)
        assert (m.sender, m.sender_device, m.id, m.text) == (i["sender"], i["sender_device"], ack.id, f"hello {n}")
        mirror = await other.recv(timeout=5)                    # the sender's other device
        assert (mirror.peer, mirror.origin_id, mirror.sender_device) == (i["user"], ack.id, i["sender_device"])
        await other.ack(mirror)
        await rcv.ack(m)
        await rcv.read(m)
        receipts = {(r.kind, r.msg_id, r.by, r.by_device) for r in
                    [await snd.recv_receipt(timeout=5), await snd.recv_receipt(timeout=5)]}
        assert receipts == {("delivered", ack.id, i["user"], i["device"]), ("read", ack.id, i["user"], i["device"])}

        await snd.typing(i["user"])
        t = await rcv.recv_typing(timeout=5)
        assert (t.peer, t.typing) == (i["sender"], True)

        info = await snd.group("create", i["group"], members=[i["user"]])     # an n-byte group and member
        assert info == {"group": i["group"], "name": i["group"],
                        "members": {i["user"]: "member", i["sender"]: "admin"}}
        gack = await snd.send(i["group"], f"to the group {n}")
        for c in (rcv, other):
            g = await c.recv(timeout=5)
            assert (g.group, g.origin_id, g.sender, g.sender_device) == (i["group"], gack.id, i["sender"],
                                                                          i["sender_device"])
            await c.ack(g)


@pytest.mark.parametrize("store", ["log", "memory"])
@pytest.mark.parametrize("workers", [1, 2])
def test_every_id_length(gateway_factory, workers, store):
    """Sections 1, 2, 3 and 8a: ids of every length 1..255 work for users, devices,
    recipients, group ids and group members (messages, mirrors, receipts, presence,
    typing, groups), with one worker and with two (ids crossing the bus)."""
    gw = gateway_factory("--workers", str(workers), "--store", store)

    async def main():
        for n in range(1, 256):
            try:
                await one_round(gw, n)
            except BaseException as exc:
                raise AssertionError(f"ids of {n} bytes: {exc!r}") from exc
    asyncio.run(main())
    assert "event=internal_error" not in gw.text


# -- ids of 0 and 256 bytes ---------------------------------------------------------------

@pytest.mark.parametrize("args", [["", ], ["u" * 256], ["\u20ac" * 86], ["alice", "--device", "d" * 256],
                                  ["#group"]], ids=["user-0", "user-256", "user-258-of-3-byte", "device-256",
                                                    "a-group-id"])
def test_token_issue_refuses_ids_out_of_range(tmp_path, args):
    """Section 10: tokens are for user ids of 1..255 bytes (not group ids) and device ids of
    0..255: `token issue` says so (exit 1) and prints no token."""
    r = subprocess.run([sys.executable, "-m", "gateway", "token", "issue", *args, "--data-dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stdout == "", (r.returncode, r.stdout)
    assert "1..255 bytes" in r.stderr or "may not start with '#'" in r.stderr, r.stderr


def _signed(gw, body: bytes) -> str:
    """A token over `body` signed with the gateway's own secret (as gateway/auth.py signs)."""
    mac = hmac.new(load_secret(gw.data_dir), b"switchboard-token-v1\0" + body, hashlib.sha256).digest()
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()     # noqa: E731
    return f"sb1.{b64(body)}.{b64(mac)}"


def test_a_signed_token_with_an_empty_user_is_refused(gateway_proc):
    """Sections 2 and 10: a user id is 1..255 bytes; a token whose user is empty (even one
    signed with the server's secret) or with bytes after its expiry is AUTH_FAILED."""
    expiry = struct.pack("!Q", int(time.time()) + 3600)
    for body in (b"\x00\x00" + expiry, b"\x05alice\x00" + expiry + b"!"):
        with Raw(gateway_proc) as r:
            r.send(encode(F.Hello(version=PROTOCOL_VERSION, token=_signed(gateway_proc, body), device="d")))
            assert_fatal(r.until_eof(), ErrorCode.AUTH_FAILED)
    with Raw(gateway_proc) as r:                          # the same body as issue() makes it is fine
        r.hello(_signed(gateway_proc, b"\x05alice\x00" + expiry))


def test_the_sdk_refuses_ids_out_of_range_before_sending(gateway_proc):
    """Sections 1 and 3: a 0- or 256-byte device, recipient or group id cannot be encoded;
    the SDK raises ValueError and the connection stays usable."""
    async def main():
        async with gateway_proc.client("alice") as c:
            for to in ("", "b" * 256, "\u20ac" * 86):
                with pytest.raises(ValueError, match="1..255 bytes"):
                    await c.send(to, "x")
            for group in ("", "#" + "g" * 255):
                with pytest.raises(ValueError, match="1..255 bytes"):
                    await c.group("info", group)
            assert (await c.send("alice", "still here")).id
        for device in ("", "d" * 256):
            with pytest.raises(ValueError, match="1..255 bytes"):
                async with gateway_proc.client("alice", device):
                    pass
    asyncio.run(main())


@pytest.mark.parametrize("workers", [1, 2])
def test_send_only_sessions_with_the_longest_ids(gateway_factory, workers):
    """Section 3, HELLO: a send-only session of a 255-byte user and device sends and is
    answered (it registers nothing)."""
    gw = gateway_factory("--workers", str(workers))
    user, device = id_of(255, "b"), id_of(255, "c")

    async def main():
        async with gw.client(user, device, send_only=True) as bot, gw.client("plain") as r:
            ack = await bot.send("plain", "from a bot")
            m = await r.recv(timeout=5)
            assert (m.sender, m.sender_device, m.id) == (user, device, ack.id)
    asyncio.run(main())


def test_following_many_long_ids_and_again_after_a_reconnect(gateway_factory):
    """Sections 2 and 3, SUBSCRIBE: at most 1024 users and max_frame bytes per frame. 1500
    users of 255 bytes (384 KB of ids) are followed in several frames, and followed again in
    several frames after a reconnect (the owning worker killed with -9)."""
    import os
    import signal
    from router.sharding import DEFAULT_SHARDS, ShardMap
    gw = gateway_factory("--workers", "2", "--store", "memory")
    watcher = next(f"watcher-{i}" for i in range(50) if ShardMap(DEFAULT_SHARDS, 2, 0).owner(f"watcher-{i}") == 1)
    watched = [f"w{i:04d}" + id_of(250, "w") for i in range(1500)]

    async def answers(c, n):
        seen = set()
        while len(seen) < n:
            seen.add((await c.recv_presence(timeout=30)).user)
        return seen

    async def main():
        async with gw.client(watcher) as c:
            await c.subscribe(*watched)
            assert await answers(c, len(watched)) == set(watched)
            os.kill(gw.worker_pids()[1], signal.SIGKILL)
            assert await answers(c, len(watched)) == set(watched)      # re-sent after the new WELCOME
            assert c.reconnects >= 1 and c.connected
    asyncio.run(main())
