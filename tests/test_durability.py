"""What users trust the gateway with: a message ACKed to its sender is never lost,
also across kill -9 of the server, and the application sees it exactly once."""
import asyncio
import signal

import pytest

from conftest import start_gateway
from storm import assert_exactly_once_in_order, run_storm

STORM = 3000


class _Restarting:
    """The gateway under test, replaced by a new process on the same port and data
    dir after kill -9 (clients only need host, port and tokens from it)."""

    def __init__(self, gw):
        self.gw = gw

    def __getattr__(self, name):
        return getattr(self.gw, name)

    def kill_and_restart(self):
        self.gw.proc.send_signal(signal.SIGKILL)
        self.gw.proc.wait(10)
        self.gw = start_gateway(self.gw.data_dir, "--port", str(self.gw.port), "--segment-size", "2M")


@pytest.mark.parametrize("durability", ["interval", "always"])
def test_kill_9_during_a_storm_loses_nothing_acked_and_delivers_once(gateway_factory, durability):
    gw = gateway_factory("--durability", durability)
    target = _Restarting(gw)

    def on_acked(count):
        if count == STORM // 3:
            target.kill_and_restart()
    try:
        acked, seen, reconnects = asyncio.run(run_storm(target, "alice", "bob", STORM, on_acked, window=64))
    finally:
        if target.gw is not gw:
            target.gw.stop()
    assert reconnects >= 2, "the server was not actually killed"
    assert_exactly_once_in_order(acked, seen, STORM)


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
