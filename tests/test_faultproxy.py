"""tests/faultproxy.py between a nats-py client and a real nats-server: the faults a gateway
node must survive (its NATS link cut, its NATS link stalled) happen as the cluster tests
will rely on."""
import asyncio
import time

import pytest

nats = pytest.importorskip("nats")

from faultproxy import FaultProxy  # noqa: E402

TIMEOUT = 30.0
# the server gives up on a client that does not read within 1 s or has 2 MiB pending
# (max_pending may not be below max_payload, 1 MiB)
STALL_CONFIG = 'write_deadline: "1s"\nmax_pending: 2097152\n'


def run(coro, timeout: float = TIMEOUT):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


async def until(check, timeout: float = 10.0, what: str = "condition"):
    """Poll a plain predicate on the loop, bounded in time."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not check():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached in {timeout} s")
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.2)


class Events:
    """nats-py's connection callbacks, as events a test can wait for."""

    def __init__(self):
        self.disconnected = asyncio.Event()
        self.reconnected = asyncio.Event()
        self.errors = []

    def options(self):
        async def disconnected_cb():
            self.disconnected.set()

        async def reconnected_cb():
            self.reconnected.set()

        async def error_cb(e):
            self.errors.append(e)
        return dict(disconnected_cb=disconnected_cb, reconnected_cb=reconnected_cb, error_cb=error_cb)


async def round_trip(pub, sub, subject: str, payload: bytes, timeout: float = 5.0) -> bytes:
    """Publish until the subscriber sees one message (a subscription made through another
    server connection may need a moment to be known), bounded."""
    got = asyncio.Queue()
    async def cb(m):
        got.put_nowait(m.data)
    s = await sub.subscribe(subject, cb=cb)
    await sub.flush()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await pub.publish(subject, payload)
            await pub.flush()
            try:
                return await asyncio.wait_for(got.get(), 0.2)
            except asyncio.TimeoutError:
                continue
        raise AssertionError(f"nothing arrived on {subject} in {timeout} s")
    finally:
        await s.unsubscribe()


def test_pub_sub_through_the_proxy(nats_single):
    with FaultProxy.to(nats_single.url) as proxy:
        async def main():
            nc = await nats.connect(proxy.url, connect_timeout=2)
            direct = await nats.connect(nats_single.url, connect_timeout=2)
            assert await round_trip(direct, nc, "to.proxied", b"down") == b"down"
            assert await round_trip(nc, direct, "from.proxied", b"up") == b"up"
            await nc.close()
            await direct.close()
        run(main())
        assert proxy.connections == 1 and proxy.refused == 0
        assert proxy.bytes_up > 0 and proxy.bytes_down > 0


def test_cut_disconnects_and_restore_reconnects(nats_single):
    with FaultProxy.to(nats_single.url) as proxy:
        async def main():
            ev = Events()
            nc = await nats.connect(proxy.url, connect_timeout=1, reconnect_time_wait=0.1,
                                    max_reconnect_attempts=-1, **ev.options())
            direct = await nats.connect(nats_single.url, connect_timeout=2)
            assert await round_trip(direct, nc, "n1.in", b"before") == b"before"

            proxy.cut()
            await asyncio.wait_for(ev.disconnected.wait(), 10)
            assert proxy.active == 0
            await until(lambda: proxy.refused >= 1, what="a reconnect attempt refused while cut")
            assert not nc.is_connected and not ev.reconnected.is_set()
            assert nats_single.monitor(0, "connz")["num_connections"] == 1     # only `direct`

            proxy.restore()
            await asyncio.wait_for(ev.reconnected.wait(), 10)
            assert nc.is_connected and proxy.connections == 2
            assert await round_trip(direct, nc, "n1.in", b"after") == b"after"
            assert await round_trip(nc, direct, "n1.out", b"after") == b"after"
            await nc.close()
            await direct.close()
        run(main())


def test_stall_makes_the_server_drop_a_slow_consumer(nats_factory):
    """Server->client bytes stop; the server's writes to the client back up until it closes the
    connection as a slow consumer (write deadline or pending bytes), seen in /connz. After
    unstall the client notices the close and reconnects."""
    server = nats_factory(1, extra_config=STALL_CONFIG)
    with FaultProxy.to(server.url) as proxy:
        async def main():
            ev = Events()
            nc = await nats.connect(proxy.url, name="stalled-node", connect_timeout=1,
                                    reconnect_time_wait=0.1, max_reconnect_attempts=-1,
                                    **ev.options())
            direct = await nats.connect(server.url, connect_timeout=2)
            assert await round_trip(direct, nc, "fanout", b"warm") == b"warm"
            await nc.subscribe("fanout")          # no callback: messages queue, nobody reads them
            await nc.flush()

            proxy.stall()
            down_before = proxy.bytes_down
            chunk = b"x" * 64 * 1024

            def closed_reason():
                for c in server.monitor(0, "connz?state=closed").get("connections") or []:
                    if c.get("name") == "stalled-node":
                        return c.get("reason")
            deadline = time.monotonic() + 15
            sent = 0
            while closed_reason() is None and time.monotonic() < deadline and sent < 8192:
                for _ in range(16):          # 1 MiB a round, far past the pending limit
                    await direct.publish("fanout", chunk)
                    sent += 1
                await direct.flush()
                await asyncio.sleep(0.05)
            reason = closed_reason()
            assert reason is not None and ("Slow Consumer" in reason or "Stale" in reason), reason
            assert server.monitor(0, "varz")["slow_consumers"] >= 1
            assert proxy.bytes_down == down_before            # nothing passed while stalled
            assert nc.is_connected and not ev.disconnected.is_set()   # the client cannot tell yet

            proxy.unstall()
            await asyncio.wait_for(ev.reconnected.wait(), 10)
            assert await round_trip(direct, nc, "after", b"flowing") == b"flowing"
            await nc.close()
            await direct.close()
        run(main())
