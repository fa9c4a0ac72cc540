"""Storage failures as a user of the gateway sees them."""
import asyncio
import os
import re
import subprocess

import pytest

from _core import frames as F
from _core.codec import encode
from _core.protocol import ErrorCode
from gateway.client import ConnectionClosed, ServerError
from rawclient import Raw


@pytest.fixture
def small_disk(tmp_path):
    """A real 6 MiB filesystem, so ENOSPC is the kernel's, not a simulation."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_refuses_sends_clearly_and_keeps_delivering(gateway_factory, small_disk):
    gw = gateway_factory("--segment-size", "1M", "--max-pending", "1000000", data_dir=small_disk / "data")
    payload = b"x" * 8000

    stored = []
    with Raw(gw, timeout=10) as alice:             # raw: the SDK would wait and resend STORAGE_FULL
        alice.hello(gw.token("alice"), device="phone")
        for seq in range(1, 2001):                 # bounded: 6 MiB can't hold 2000 x 8 KB
            alice.send(encode(F.Send(seq, "bob", payload)))
            f = alice.frame()
            if isinstance(f, F.Error):
                assert (f.code, f.ref, f.fatal) == (ErrorCode.STORAGE_FULL, seq, False), f
                assert "storage full" in f.reason
                break
            stored.append(f.msg_id)
        else:
            pytest.fail("the disk never filled up")
        assert len(stored) > 10
        alice.send(encode(F.Ping(5)))              # the session is still usable
        assert alice.frame() == F.Pong(5)

    async def main():
        # what was stored is delivered intact
        async with gw.client("bob", "phone") as bob:
            got = [await bob.recv(timeout=10) for _ in stored]
            assert [m.id for m in got] == stored
            assert all(m.payload == payload for m in got)
            await bob.ack(*got)
            await bob.ping()

    asyncio.run(main())
    assert gw.alive()
    # after a restart on the same full disk nothing was lost or resurrected
    assert gw.stop() == 0
    gw2 = gateway_factory("--segment-size", "1M", data_dir=small_disk / "data")

    async def after():
        async with gw2.client("bob", "phone") as bob:
            await bob.ping()
            with pytest.raises(asyncio.TimeoutError):
                await bob.recv(timeout=0.01)
    asyncio.run(after())
    assert stored


def test_failed_fsync_stops_the_worker_without_acking(gateway_factory):
    """A writeback error is reported once; the worker must not ACK what may not
    be on disk: it exits (status 3) and the supervisor restarts it, and recovery
    syncs before anything read back is acknowledged (here the disk keeps failing,
    so nothing ever is)."""
    gw = gateway_factory("--durability", "always", "--workers", "1", env={"SWITCHBOARD_LOG_FAULT": "eio"})

    async def main():
        alice = gw.client("alice", "phone", max_backoff=0.2)
        with pytest.raises((ConnectionClosed, ServerError, asyncio.TimeoutError)):
            await alice.connect()
            await alice.send("bob", "never acknowledged", timeout=3)
        await alice.close()
    asyncio.run(main())
    gw.stop()
    out = gw.text
    assert "event=log_sync_failed" in out
    # the worker stopped itself with status 3 (whether the supervisor saw it before or
    # during its own shutdown)
    assert re.search(r"event=worker_(exited|stopped) worker=0 pid=\d+ status=3", out), out
