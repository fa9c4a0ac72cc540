"""What users trust the gateway with: a message ACKed to its sender is never lost,
also across kill -9 of the server, and the application sees it exactly once."""
import asyncio
import signal

import pytest

from conftest import start_gateway
from gateway.client import Client

STORM = 3000


async def _storm(gw_box, kill_after: int):
    """alice sends STORM numbered messages to bob while bob reads and acks them;
    the gateway is killed with SIGKILL after `kill_after` ACKs and restarted on
    the same port and data dir. Both clients reconnect by themselves."""
    gw = gw_box[0]
    alice = Client(gw.host, gw.port, gw.token("alice"), "phone", max_backoff=0.5)
    bob = Client(gw.host, gw.port, gw.token("bob"), "phone", max_backoff=0.5)
    await alice.connect()
    await bob.connect()
    acked: dict[int, str] = {}
    seen: list[str] = []
    killed = asyncio.Event()

    async def send_all():
        sem = asyncio.Semaphore(64)

        async def one(i):
            async with sem:
                r = await alice.send("bob", f"m{i}", timeout=60)
                acked[r.id] = f"m{i}"
                if len(acked) == kill_after and not killed.is_set():
                    gw_box[0].proc.send_signal(signal.SIGKILL)
                    gw_box[0].proc.wait(10)
                    killed.set()
                    # same port, same data dir: the clients find it again
                    gw_box[0] = start_gateway(gw.data_dir, "--port", str(gw.port), "--segment-size", "2M")
        await asyncio.gather(*(one(i) for i in range(STORM)))

    async def receive_all():
        while len(seen) < STORM:
            m = await bob.recv(timeout=60)
            seen.append(m.text)
            await bob.ack(m)

    await asyncio.wait_for(asyncio.gather(send_all(), receive_all()), 120)
    await alice.close()
    await bob.close()
    return acked, seen, alice.reconnects, bob.reconnects


@pytest.mark.parametrize("durability", ["interval", "always"])
def test_kill_9_during_a_storm_loses_nothing_acked_and_delivers_once(gateway_factory, durability):
    gw = gateway_factory("--durability", durability)
    box = [gw]
    try:
        acked, seen, alice_reconnects, bob_reconnects = asyncio.run(_storm(box, kill_after=STORM // 3))
    finally:
        if box[0] is not gw:
            box[0].stop()
    assert alice_reconnects >= 1 and bob_reconnects >= 1, "the server was not actually killed"
    # every message was eventually ACKed (retries after the restart reuse client ids)
    assert len(acked) == STORM
    # the application saw every message exactly once, in send order per sender
    assert sorted(seen, key=lambda t: int(t[1:])) == [f"m{i}" for i in range(STORM)]
    assert len(set(seen)) == STORM


def test_backlog_survives_restart_and_is_consumed_once(gateway_factory, tmp_path):
    """Messages for an offline device are on disk: a restarted server (clean or
    killed) still has them, and once acknowledged they are gone for good."""
    async def send(gw, n):
        async with gw.client("alice", "phone") as a:
            return [(await a.send("carol", f"offline {i}")).id for i in range(n)]

    async def receive(gw, n, ack):
        async with gw.client("carol", "phone") as c:
            got = [await c.recv(timeout=10) for _ in range(n)]
            if ack:
                await c.ack(*got)
                await c.ping()          # the ACK frame is processed before this answers
            return [m.id for m in got]

    data = tmp_path / "d"
    gw = gateway_factory(data_dir=data)
    ids = asyncio.run(send(gw, 5))
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait(10)
    gw2 = gateway_factory(data_dir=data)
    assert asyncio.run(receive(gw2, 5, ack=True)) == ids
    assert gw2.stop() == 0
    gw3 = gateway_factory(data_dir=data)

    async def nothing_pending():
        async with gw3.client("carol", "phone") as c:
            await c.ping()       # the PONG comes after any backlog on the same stream
            with pytest.raises(asyncio.TimeoutError):
                await c.recv(timeout=0.01)
    asyncio.run(nothing_pending())
