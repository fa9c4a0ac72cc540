"""Messenger features over real servers: several devices per user, mirroring of
what a user sends, the device limit, and delivery/read receipts."""
import asyncio

import pytest

from _core.protocol import ErrorCode
from gateway.client import ServerError
from test_workers import users_on


def _empty(client):
    """Nothing more queued for this client: a PONG comes after anything pending."""
    async def check():
        await client.ping()
        with pytest.raises(asyncio.TimeoutError):
            await client.recv(timeout=0.01)
    return check()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_three_devices_one_offline_catches_up_exactly_once(gateway_factory, workers):
    gw = gateway_factory("--workers", workers)

    async def main():
        phone, laptop, tablet = (gw.client("bob", d) for d in ("phone", "laptop", "tablet"))
        for c in (phone, laptop, tablet):
            await c.connect()              # each device registers once
        await tablet.close()               # the tablet goes offline
        async with gw.client("alice", "phone") as alice:
            sent = [(await alice.send("bob", f"m{i}")).id for i in range(3)]
            for dev in (phone, laptop):
                got = [await dev.recv(timeout=5) for _ in sent]
                assert [m.id for m in got] == sent and [m.text for m in got] == ["m0", "m1", "m2"]
                await dev.ack(*got)
            async with gw.client("bob", "tablet") as tablet2:
                got = [await tablet2.recv(timeout=5) for _ in sent]
                assert [m.id for m in got] == sent
                await tablet2.ack(*got)
                await _empty(tablet2)
            async with gw.client("bob", "tablet") as tablet3:     # acked: never again
                await _empty(tablet3)
        await phone.close()
        await laptop.close()
    asyncio.run(main())


@pytest.mark.parametrize("workers", ["1", "2"])
def test_what_a_user_sends_is_mirrored_to_its_other_devices(gateway_factory, workers):
    gw = gateway_factory("--workers", workers)
    me, peer = (users_on(0, 2, 1, "mir-a")[0], users_on(1, 2, 1, "mir-b")[0]) if workers == "2" else ("ann", "ben")

    async def main():
        async with gw.client(me, "phone") as phone, gw.client(me, "laptop") as laptop:
            ack = await phone.send(peer, "from my phone")
            m = await laptop.recv(timeout=5)
            assert (m.sender, m.sender_device, m.peer, m.origin_id, m.text) == (me, "phone", peer, ack.id,
                                                                                 "from my phone")
            await laptop.ack(m)
            await _empty(phone)                 # the sending device gets no copy
        async with gw.client(peer, "main") as p:
            got = await p.recv(timeout=5)
            assert (got.id, got.peer, got.text) == (ack.id, "", "from my phone")
    asyncio.run(main())


def test_device_limit_is_a_clear_error(gateway_factory):
    gw = gateway_factory("--max-devices", "2", "--workers", "1")

    async def main():
        a, b = gw.client("carl", "d1"), gw.client("carl", "d2")
        await a.connect()
        await b.connect()
        third = gw.client("carl", "d3", reconnect=False)
        with pytest.raises(ServerError) as err:
            await third.connect()
        assert err.value.code == ErrorCode.DEVICE_LIMIT and "limit" in err.value.reason
        await b.close()
        async with gw.client("carl", "d3"):          # room again
            pass
        # a send-only session (a bot, the CLI) is no device and does not count
        async with gw.client("carl", "bot", send_only=True) as bot:
            await bot.send("dora", "from a bot")
        await a.close()
    asyncio.run(main())


@pytest.mark.parametrize("workers", ["1", "2"])
def test_delivered_and_read_receipts_reach_the_sender_online_or_not(gateway_factory, workers):
    gw = gateway_factory("--workers", workers)
    alice, bob = (users_on(0, 2, 1, "rc-a")[0], users_on(1, 2, 1, "rc-b")[0]) if workers == "2" else ("al", "bo")

    async def main():
        # sender online: receipts arrive live
        async with gw.client(alice, "phone") as a:
            s1 = await a.send(bob, "hi")
            async with gw.client(bob, "phone") as b:
                m = await b.recv(timeout=5)
                await b.ack(m)
                r = await a.recv_receipt(timeout=5)
                assert (r.kind, r.msg_id, r.by, r.by_device) == ("delivered", s1.id, bob, "phone")
                await b.read(m)
                r = await a.recv_receipt(timeout=5)
                assert (r.kind, r.msg_id, r.by) == ("read", s1.id, bob)
            s2 = await a.send(bob, "while you are away")
        # sender offline: receipts wait for it like messages
        async with gw.client(bob, "phone") as b:
            m = await b.recv(timeout=5)
            assert m.id == s2.id
            await b.ack(m)
            await b.read(m)
            await b.ping()
        async with gw.client(alice, "phone") as a:
            kinds = {(await a.recv_receipt(timeout=5)).kind for _ in range(2)}
            assert kinds == {"delivered", "read"}
            await _empty(a)
    asyncio.run(main())


@pytest.mark.parametrize("workers", ["1", "2"])
def test_presence_and_last_seen_transitions(gateway_factory, workers):
    gw = gateway_factory("--workers", workers)
    watcher, user = (users_on(0, 2, 1, "pw-a")[0], users_on(1, 2, 1, "pw-b")[0]) if workers == "2" else ("w", "u")

    async def main():
        async with gw.client(watcher) as w:
            await w.subscribe(user)
            p = await w.recv_presence(timeout=5)
            assert (p.user, p.online, p.last_seen_ms) == (user, False, 0)     # never seen
            u = gw.client(user, "phone")
            await u.connect()
            p = await w.recv_presence(timeout=5)
            assert (p.user, p.online) == (user, True)
            async with gw.client(user, "laptop"):
                pass                       # a second device coming and going changes nothing
            await u.close()
            p = await w.recv_presence(timeout=5)
            assert (p.user, p.online) == (user, False) and p.last_seen_ms > 0
            seen = p.last_seen_ms
            # hidden last seen
            async with gw.client(user, "phone") as u2:
                assert (await w.recv_presence(timeout=5)).online
                await u2.set_privacy(hide_last_seen=True)
                p = await w.recv_presence(timeout=5)
                assert (p.online, p.last_seen_ms) == (True, 0)
            p = await w.recv_presence(timeout=5)
            assert (p.online, p.last_seen_ms) == (False, 0)
            await w.unsubscribe(user)
            async with gw.client(user, "phone"):
                await w.ping()
                with pytest.raises(asyncio.TimeoutError):
                    await w.recv_presence(timeout=0.2)
            assert seen
    asyncio.run(main())


@pytest.mark.parametrize("workers", ["1", "2"])
def test_typing_reaches_online_devices_only_and_is_never_stored(gateway_factory, workers):
    gw = gateway_factory("--workers", workers)
    a, b = (users_on(0, 2, 1, "ty-a")[0], users_on(1, 2, 1, "ty-b")[0]) if workers == "2" else ("ta", "tb")

    async def main():
        async with gw.client(a) as ca:
            await ca.typing(b, True)             # b is offline: dropped, never stored
            await ca.ping()
            async with gw.client(b) as cb:
                await cb.ping()
                with pytest.raises(asyncio.TimeoutError):
                    await cb.recv_typing(timeout=0.2)
                await ca.typing(b, True)
                t = await cb.recv_typing(timeout=5)
                assert (t.peer, t.typing) == (a, True)
                # rate limit: a burst far above 10 indicators delivers at most the bucket
                for _ in range(200):
                    await ca.typing(b, True)
                await ca.send(b, "done typing")
                m = await cb.recv(timeout=5)
                got = 0
                while True:
                    try:
                        await cb.recv_typing(timeout=0.2)
                        got += 1
                    except asyncio.TimeoutError:
                        break
                assert m.text == "done typing" and got <= 11
    asyncio.run(main())


def test_presence_survives_a_restart_of_the_watched_users_worker(gateway_factory):
    """The owner of a watched user is killed -9 and restarted: it forgot its
    watchers, the watcher's worker tells it again, and updates keep coming."""
    import os
    import signal
    gw = gateway_factory("--workers", "2")
    watcher, user = users_on(0, 2, 1, "pr-a")[0], users_on(1, 2, 1, "pr-b")[0]

    async def main():
        async with gw.client(watcher, max_backoff=0.2) as w:
            await w.subscribe(user)
            assert not (await w.recv_presence(timeout=5)).online
            os.kill(gw.worker_pids()[1], signal.SIGKILL)
            # the restarted owner is told again and answers with the state
            p = await w.recv_presence(timeout=15)
            assert (p.user, p.online) == (user, False)
            async with gw.client(user, "phone", max_backoff=0.2):
                p = await w.recv_presence(timeout=10)
                assert (p.user, p.online) == (user, True)
    asyncio.run(main())
