"""`switchboard drain` for a rolling restart: clients are told to go in paced
batches (timed from the clients' side), /readyz answers 503 and new connections
are refused from the start, the gateway exits when empty, and a successor on
the same port and data dir delivers every ACKed message exactly once."""
import asyncio
import socket
import subprocess
import sys

from conftest import ROOT
from test_metrics import get
from test_workers import users_on

PER_WORKER = 4
BATCH, PAUSE = 2, 0.6          # one session per worker per batch


def test_drain_moves_clients_in_batches_and_loses_nothing(gateway_factory):
    gw = gateway_factory("--workers", "2", "--ws-port", "off")
    users = users_on(0, 2, PER_WORKER, "dr-a") + users_on(1, 2, PER_WORKER, "dr-b")
    successor = []

    async def main():
        loop = asyncio.get_running_loop()
        clients = [gw.client(u, max_backoff=0.3) for u in users]
        for c in clients:
            await c.connect()
        sender = gw.client("dr-sender", send_only=True, max_backoff=0.3)
        await sender.connect()
        acked: dict[str, set] = {u: set() for u in users}
        sending = asyncio.Event()

        async def send_all(count: int):
            for i in range(count):
                to = users[i % len(users)]
                r = await sender.send(to, f"m{i}", timeout=60)
                acked[to].add(r.id)
                if i == 10:
                    sending.set()
        sends = loop.create_task(send_all(300))
        await asyncio.wait_for(sending.wait(), 20)

        started = loop.time()
        out = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gateway", "drain", "--admin-port", str(gw.admin_port),
                             "--batch", str(BATCH), "--pause", str(PAUSE)],
            cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "draining: 9 sessions on 2 workers" in out.stdout, (out.stdout, out.stderr)
        # from the start: not ready, and new connections are refused rather than queued
        status, body = await asyncio.to_thread(get, gw.admin_port, "/readyz")
        assert status == 503 and "draining" in body
        probe = socket.socket()
        try:
            assert probe.connect_ex((gw.host, gw.port)) != 0
        finally:
            probe.close()

        assert await asyncio.to_thread(gw.proc.wait, 30) == 0      # exits by itself once empty
        successor.append(await asyncio.to_thread(
            gateway_factory, "--workers", "2", "--port", str(gw.port), "--ws-port", "off", "--admin-port", "0",
            data_dir=gw.data_dir))
        await asyncio.wait_for(sends, 60)

        # batches, seen by the clients: BATCH sessions (one per worker) every PAUSE s
        times = sorted(c.goaway_at for c in clients)
        assert all(c.goaway is not None and c.goaway.reason == "server draining" for c in clients)
        assert times[0] >= started
        batches = [times[i:i + BATCH] for i in range(0, len(times), BATCH)]
        assert len(batches) == PER_WORKER
        for b in batches:
            assert b[-1] - b[0] < PAUSE / 2, times
        for prev, cur in zip(batches, batches[1:]):
            assert PAUSE * 0.7 <= cur[0] - prev[0] <= PAUSE + 0.8, times

        # every ACKed message, exactly once, from the old gateway's log or the new one
        for c, u in zip(clients, users):
            got = []
            while len(got) < len(acked[u]):
                m = await c.recv(timeout=20)
                got.append(m.id)
                await c.ack(m)
            assert sorted(got) == sorted(acked[u]) and len(set(got)) == len(got), u
        assert sum(len(v) for v in acked.values()) == 300
        for c in [*clients, sender]:
            await c.close()
    asyncio.run(main())
