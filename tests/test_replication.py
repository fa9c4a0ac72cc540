"""Replicas and failover (gateway/cluster/replication.py, docs/cluster.md
Replication): three real gateway nodes with `--replicas 2` on a real 3-server
NATS cluster; nodes are killed with SIGKILL (supervisor and workers), paused
with SIGSTOP, and every ACKed message must reach its recipient exactly once, in
the order its device sent it."""
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
from clusternodes import Nodes, paced_stream, shard_of
from clusternodes import wait as _wait

pytestmark = pytest.mark.slow


@pytest.fixture
def rnodes(nats_cluster, tmp_path):
    nodes = Nodes(tmp_path, nats_cluster.url, ["n1", "n2", "n3"], extra=("--replicas", "2"))
    nodes.start_all()
    yield nodes
    nodes.stop_all()


def _map(nodes, via: str) -> dict:
    return nodes.status(via)["workers"]["0"]


def _in_sync(nodes, via: str) -> bool:
    """Every shard has one in-sync replica (none catching up), in `via`'s view."""
    w = _map(nodes, via)
    return not w["catching"] and len(w["replicas"]) == nodes.shards


def owner_and_replicas(nodes, via: str, user: str) -> tuple[str, list]:
    w = _map(nodes, via)
    s = shard_of(user, nodes.shards)
    return w["shard_owner"][s], w["replicas"].get(str(s), [])


def test_every_shard_gets_an_in_sync_replica(rnodes):
    from gateway.cluster.shardmap import hrw_rank
    nodes = rnodes

    def settled():
        """In sync, and each shard's replica the first node after its owner in its rendezvous order."""
        w = _map(nodes, "n1")
        return _in_sync(nodes, "n1") and all(
            w["replicas"][str(s)] == hrw_rank(s, [n for n in nodes.names if n != w["shard_owner"][s]])[:1]
            for s in range(nodes.shards)) and w
    w = _wait("every shard in sync where placement wants it", settled, 60,
              lambda: {k: _map(nodes, "n1")[k] for k in ("replicas", "catching")})
    for s in range(nodes.shards):
        owner, reps = w["shard_owner"][s], w["replicas"][str(s)]
        assert len(reps) == 1 and reps[0] != owner
    # and `switchboard cluster status` says so (once placement has settled: a node that joined
    # last gets its share of copies, catching up for a moment)
    def status():
        out = subprocess.run([sys.executable, "-m", "gateway", "cluster", "status", "--admin-host",
                              nodes.host("n1"), "--admin-port", str(nodes.ports["n1"][2])],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout
    _wait("cluster status: every shard in sync", lambda: "replicas: 2 copies per shard; 0 shards with too few "
          "in sync, 0 catching up" in status(), 30, status)


def test_a_killed_owner_fails_over_and_loses_nothing(rnodes):
    """kill -9 of the recipient's node under load: its in-sync replica takes the
    shard over; every ACKed message arrives once, in order; the killed node comes
    back as a replica."""
    nodes = rnodes
    _wait("every shard in sync", lambda: _in_sync(nodes, "n1"))
    a, = nodes.users_on("n1", 1, "fa")
    b, = nodes.users_on("n2", 1, "fb")
    owner, reps = owner_and_replicas(nodes, "n1", b)
    assert owner == "n2" and reps and reps[0] != "n2"
    heir = reps[0]
    got = asyncio.run(asyncio.wait_for(paced_stream(nodes, a, b, lambda: nodes.kill9("n2"), count=400, window=4), 180))
    assert got == [f"m{i}" for i in range(400)]
    text = nodes.procs[heir].text
    assert re.search(r"event=shards_taken_over count=\d+ from=n2", text), text[-3000:]
    assert owner_and_replicas(nodes, heir, b)[0] != "n2"
    nodes.start("n2")
    # it comes back empty-handed for what it lost: it holds copies again only as a new replica (or by a move)
    _wait("n2 back in the copies", lambda: _in_sync(nodes, "n1") and _holds_copies(nodes, "n1", "n2"), 90,
          lambda: {k: _map(nodes, "n1")[k] for k in ("replicas", "catching", "shard_owner")})


def _holds_copies(nodes, via: str, node: str) -> bool:
    w = _map(nodes, via)
    return node in w["shard_owner"] or any(node in r for r in w["replicas"].values())


def _others(nodes, *names):
    return [n for n in nodes.names if n not in names]


def test_a_killed_replica_is_replaced_and_nothing_is_lost(rnodes):
    """kill -9 of the recipient's replica node under load: the owner's ACKs wait
    (too few copies) until the planner puts a new replica in and it catches up."""
    nodes = rnodes
    _wait("every shard in sync", lambda: _in_sync(nodes, "n1"))
    b, = nodes.users_on("n2", 1, "rb")
    owner, (heir,) = owner_and_replicas(nodes, "n1", b)
    third, = _others(nodes, owner, heir)
    a, = nodes.users_on(third, 1, "ra")
    got = asyncio.run(asyncio.wait_for(paced_stream(nodes, a, b, lambda: nodes.kill9(heir), count=400, window=4), 180))
    assert got == [f"m{i}" for i in range(400)]
    reps = owner_and_replicas(nodes, owner, b)[1]
    assert reps and heir not in reps, reps
    text = nodes.procs[owner].text
    assert re.search(rf"event=replica_stream_broken shard=\d+ replica={heir}", text), text[-3000:]
    nodes.start(heir)


def test_a_paused_owner_that_wakes_after_its_lease_expired_acks_nothing(rnodes):
    """SIGSTOP of the node serving both the sender and the recipient, until a
    replica has taken the shard over; then SIGCONT. The woken node still has the
    sender's connection and its SENDs, but its replica refuses it (a newer epoch):
    nothing it appends after its lease expired is ACKed. Every ACKed message is
    delivered once, in order (a wrong ACK would be a message lost with the deposed
    owner's log)."""
    nodes = rnodes
    _wait("every shard in sync", lambda: _in_sync(nodes, "n1"))
    a, b = nodes.users_on("n2", 2, "pa")
    other = _others(nodes, "n2")[0]

    def pause():
        nodes.signal_all("n2", signal.SIGSTOP)
        try:
            _wait("b's shard taken over", lambda: owner_and_replicas(nodes, other, b)[0] != "n2", 60)
        finally:
            nodes.signal_all("n2", signal.SIGCONT)
    got = asyncio.run(asyncio.wait_for(paced_stream(nodes, a, b, pause, count=400, window=4), 180))
    assert got == [f"m{i}" for i in range(400)]
    text = _wait("n2 learns it was deposed", lambda: "event=shard_deposed" in nodes.procs["n2"].text
                 and nodes.procs["n2"].text, 30)
    assert re.search(r"event=shard_(deposed|lost_unquiesced)", text)


def test_an_owner_cut_from_nats_while_its_clients_reach_it_acks_nothing(nats_cluster, tmp_path):
    """n2 reaches NATS only through a fault proxy, which is cut: its clients stay
    connected and keep sending, but no replica hears it, so it ACKs nothing; a
    replica takes its shards over once its lease expires; when the proxy is back
    n2 finds it was deposed. Every ACKed message arrives once, in order."""
    from faultproxy import FaultProxy
    with FaultProxy.to(nats_cluster.urls[0]) as proxy:
        nodes = Nodes(tmp_path, nats_cluster.url, ["n1", "n2", "n3"], extra=("--replicas", "2"))
        try:
            nodes.start("n1")
            nodes.start("n2", "--cluster", proxy.url)
            nodes.start("n3")
            _wait("every shard in sync", lambda: _in_sync(nodes, "n1"))
            a, b = nodes.users_on("n2", 2, "na")

            def cut():
                proxy.cut()
                try:
                    _wait("b's shard taken over", lambda: owner_and_replicas(nodes, "n1", b)[0] != "n2", 60)
                finally:
                    proxy.restore()
            got = asyncio.run(asyncio.wait_for(paced_stream(nodes, a, b, cut, count=400, window=4), 180))
            assert got == [f"m{i}" for i in range(400)]
            _wait("n2 learns it was deposed", lambda: "event=shard_deposed" in nodes.procs["n2"].text, 60)
        finally:
            nodes.stop_all()


def test_a_replica_killed_while_catching_up_starts_over(rnodes):
    """The replica of a shard holding ~18 MB is killed; the third node is put in
    as catching up and killed while the map still lists it so (its snapshot may
    or may not be through by then). It never counts as in sync: when the first
    one returns it is placed again, catches up and becomes the in-sync replica;
    every message is still there."""
    nodes = rnodes
    _wait("every shard in sync", lambda: _in_sync(nodes, "n1"))
    b, = nodes.users_on("n2", 1, "cb")
    a, = nodes.users_on("n1", 1, "ca")
    owner, (first,) = owner_and_replicas(nodes, "n1", b)
    big = "x" * 60_000

    async def fill():
        async with nodes.any_client(a) as ca:
            await asyncio.gather(*(ca.send(b, f"{i}:{big}", timeout=60) for i in range(300)))   # ~18 MB
    asyncio.run(asyncio.wait_for(fill(), 120))
    # the replica goes; the third node is put in and starts its snapshot; kill it during that
    third, = _others(nodes, owner, first)
    nodes.kill9(first)
    _wait("the third node catching up", lambda: third in _map(nodes, owner)["catching"].get(
        str(shard_of(b, nodes.shards)), []), 30)
    nodes.kill9(third)
    nodes.start(first)
    _wait("a new in-sync replica", lambda: owner_and_replicas(nodes, owner, b)[1] == [first], 90,
          lambda: {k: _map(nodes, owner)[k] for k in ("replicas", "catching")})
    nodes.start(third)

    async def drain():
        async with nodes.any_client(b) as cb:
            got = []
            while len(got) < 300:
                m = await cb.recv(timeout=30)
                got.append(int(m.text.split(":", 1)[0]))
                await cb.ack(m)
            return got
    assert asyncio.run(asyncio.wait_for(drain(), 120)) == list(range(300))


@pytest.fixture
def n3_on_a_small_disk(tmp_path):
    """n3's data dir on its own 64 MiB tmpfs (ENOSPC is the kernel's)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    where = tmp_path / "n3"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_replica_whose_disk_fills_hands_its_copy_to_another_node(nats_cluster, tmp_path, n3_on_a_small_disk):
    """n3 holds the in-sync copy of b's shard (owned by n1 or n2) when its disk
    fills: its next write to the copy fails with ENOSPC, it leaves the shard's
    replicas and marks itself full in the map; the owner's ACKs wait until the
    third node has caught up, and every ACKed message arrives once, in order.
    Once there is room again n3 clears its mark."""
    filler = n3_on_a_small_disk / "filler"
    nodes = Nodes(tmp_path, nats_cluster.url, ["n1", "n2", "n3"],
                  extra=("--replicas", "2", "--segment-size", "1M"))
    try:
        nodes.start_all()
        _wait("every shard in sync", lambda: _in_sync(nodes, "n1"))
        w = _map(nodes, "n1")
        b = next((u for u in (f"fd{i}" for i in range(10_000))
                  if w["shard_owner"][shard_of(u, nodes.shards)] != "n3"
                  and w["replicas"].get(str(shard_of(u, nodes.shards))) == ["n3"]), None)
        assert b is not None, (w["shard_owner"], w["replicas"])
        s = shard_of(b, nodes.shards)
        owner = w["shard_owner"][s]
        heir, = _others(nodes, owner, "n3")
        a, = nodes.users_on(owner, 1, "fa")

        def fill_the_disk():
            with open(filler, "wb") as f:
                free = shutil.disk_usage(n3_on_a_small_disk).free
                os.posix_fallocate(f.fileno(), 0, max(free - (64 << 10), 1))
        # acknowledged only at the end: consumed segments deleted meanwhile would give the copy room
        # again, and whether n3's next write found the disk full would be a race
        got = asyncio.run(asyncio.wait_for(paced_stream(nodes, a, b, fill_the_disk, count=500, pad=12_000,
                                                        window=4, ack_at_end=True), 180))
        assert got == [f"m{i}" for i in range(500)]
        n3 = nodes.procs["n3"].text
        assert re.search(rf"event=replica_write_failed shard={s} full=True", n3), n3[-3000:]
        assert "event=replica_disk_full" in n3
        assert owner_and_replicas(nodes, owner, b) == (owner, [heir])
        assert _map(nodes, owner)["disk_full"] == ["n3"]
        out = subprocess.run([sys.executable, "-m", "gateway", "cluster", "status", "--admin-host",
                              nodes.host(owner), "--admin-port", str(nodes.ports[owner][2])],
                             capture_output=True, text=True, timeout=30)
        assert "no room for replica copies (disk full): n3" in out.stdout, out.stdout
        filler.unlink()
        _wait("n3 has room again", lambda: not _map(nodes, owner)["disk_full"], 30)
        # n3 logs it once its map change is through: the owner may see the change first
        _wait("n3 to say so", lambda: "event=replica_disk_room node=n3" in nodes.procs["n3"].text, 10)
    finally:
        nodes.stop_all()


def test_a_replica_copy_that_differs_from_the_log_is_rebuilt_before_it_takes_over(nats_cluster, tmp_path):
    """A byte of a message in a sealed segment of b's shard's replica copy changes
    on disk (a bad disk, a hand). The owner's periodic check (xxh3_128 of sealed
    segments on both sides) finds it, takes the replica out of the in-sync set and
    rebuilds it from a snapshot; then the owner is killed with SIGKILL, the replica
    takes over, and b receives every message exactly as sent."""
    nodes = Nodes(tmp_path, nats_cluster.url, ["n1", "n2", "n3"],
                  extra=("--replicas", "2", "--segment-size", "1M", "--replica-check-interval", "0.2"))
    try:
        nodes.start_all()
        _wait("every shard in sync", lambda: _in_sync(nodes, "n1"))
        b, = nodes.users_on("n2", 1, "kb")
        a, = nodes.users_on("n1", 1, "ka")
        s = shard_of(b, nodes.shards)
        owner, (rep,) = owner_and_replicas(nodes, "n1", b)
        sent = [f"{i:04d}:" + "y" * 12_000 for i in range(250)]          # ~3 MB: sealed 1 MiB segments

        async def fill():
            async with nodes.any_client(a) as ca:
                await asyncio.gather(*(ca.send(b, text, timeout=60) for text in sent))
        asyncio.run(asyncio.wait_for(fill(), 120))
        copy = nodes.dir(rep) / "replicas" / f"shard-{s:04d}"
        first = sorted(copy.glob("*.seg"))[0]
        data = first.read_bytes()
        at = data.index(b"0007:yyyy") + 7
        with open(first, "r+b") as f:                       # one byte of message 7, at rest
            f.seek(at)
            f.write(b"z")
        text = _wait("the check finds it", lambda: re.search(
            rf"event=replica_checksum_mismatch shard={s} replica={rep} segments=\d+", nodes.procs[owner].text), 30)
        assert text
        _wait("rebuilt and in sync again", lambda: "how=\"snapshot (rebuild: checksums" in nodes.procs[owner].text
              and owner_and_replicas(nodes, owner, b)[1] == [rep], 60,
              lambda: owner_and_replicas(nodes, owner, b))
        assert open(first, "rb").read()[at:at + 1] == b"y"
        nodes.kill9(owner)

        async def drain():
            async with nodes.any_client(b) as cb:
                got = []
                while len(got) < len(sent):
                    m = await cb.recv(timeout=30)
                    got.append(m.text)
                    await cb.ack(m)
                return got
        assert asyncio.run(asyncio.wait_for(drain(), 120)) == sent
        assert re.search(rf"event=shards_taken_over count=\d+ from={owner}", nodes.procs[rep].text)
    finally:
        nodes.stop_all()


def test_with_fewer_nodes_than_replicas_sends_are_refused_clearly_until_one_joins(nats_cluster, tmp_path):
    """`replicas` is 2 by default. One node alone cannot hold two copies: a SEND
    gets UNAVAILABLE saying why (not an ACK that never comes); once a second
    node joins and holds the copies, the same SEND, resent, is ACKed and
    delivered once."""
    from _core import frames as F
    from _core.codec import encode
    from _core.protocol import ErrorCode
    from rawclient import Raw

    from gateway.config import GatewayConfig
    assert GatewayConfig().replicas == 2
    from gateway.cluster.shardmap import hrw_owner
    nodes = Nodes(tmp_path, nats_cluster.url, ["n1", "n2"], bootstrap=["n1"], extra=("--replicas", "2"))
    alice, bob = [next(u for u in (f"{p}{i}" for i in range(1000))       # shards n1 keeps when n2 joins
                       if hrw_owner(shard_of(u, nodes.shards), ["n1", "n2"]) == "n1") for p in ("fa", "fb")]
    try:
        gw = nodes.start("n1")
        _wait("n1 says it is short", lambda: "event=replicas_short" in gw.text, 30)
        with Raw(gw, timeout=10) as raw:
            raw.hello(nodes.token(alice, "phone"), device="phone")
            raw.send(encode(F.Send(1, bob, b"hello")))
            err = raw.frame()
            assert isinstance(err, F.Error) and (err.code, err.ref, err.fatal) == (ErrorCode.UNAVAILABLE, 1, False), err
            assert "1 of 2 copies and there is no live node for another" in err.reason, err.reason
            nodes.start("n2")
            _wait("every shard in sync", lambda: _in_sync(nodes, "n1"), 60)
            raw.send(encode(F.Send(1, bob, b"hello")))
            ack = raw.frame()
            assert isinstance(ack, F.Ack) and ack.seq == 1 and ack.msg_id, ack

        async def receive():
            async with nodes.any_client(bob) as cb:
                m = await cb.recv(timeout=30)
                await cb.ack(m)
                with pytest.raises(asyncio.TimeoutError):
                    await cb.recv(timeout=0.3)
                return m.text
        assert asyncio.run(asyncio.wait_for(receive(), 60)) == "hello"
    finally:
        nodes.stop_all()


def test_an_owner_killed_in_the_middle_of_a_move_is_taken_over(rnodes):
    """n1 is drained while r, the in-sync replica of b's shard and the move's target
    for it (n2 or n3: which node holds which copies depends on who was up when n1
    placed them), is paused: the shard is marked moving but the move cannot finish
    (its quiesce waits for r's acknowledgement). n1 is killed with SIGKILL there
    and r woken. The move was never switched, so the map still names the dead n1
    with the mark: a replica takes the shard over all the same, clearing it.
    Every ACKed message arrives once, in order."""
    import threading

    from gateway.cluster.shardmap import hrw_owner
    from gateway.stats import run_drain
    nodes = rnodes
    _wait("every shard in sync", lambda: _in_sync(nodes, "n1"))
    w = _map(nodes, "n1")

    def fits(u):
        s = shard_of(u, nodes.shards)
        reps = w["replicas"].get(str(s), [])
        return w["shard_owner"][s] == "n1" and len(reps) == 1 and hrw_owner(s, ["n2", "n3"]) == reps[0]
    b = next(u for u in (f"mb{i}" for i in range(10_000)) if fits(u))
    s = shard_of(b, nodes.shards)
    r, = w["replicas"][str(s)]
    other, = _others(nodes, "n1", r)
    a, = nodes.users_on(other, 1, "ma")

    def kill_mid_move():
        nodes.signal_all(r, signal.SIGSTOP)
        try:
            threading.Thread(target=lambda: _quiet(run_drain, nodes.host("n1"), nodes.ports["n1"][2], 50, 0.1, None),
                             daemon=True).start()
            _wait(f"b's shard marked moving to {r}", lambda: _map(nodes, "n1")["moving"].get(str(s)) == r, 20)
            nodes.kill9("n1")
        finally:
            nodes.signal_all(r, signal.SIGCONT)
    got = asyncio.run(asyncio.wait_for(paced_stream(nodes, a, b, kill_mid_move, count=400, window=4), 180))
    assert got == [f"m{i}" for i in range(400)]
    view = _map(nodes, other)
    assert view["shard_owner"][s] != "n1" and str(s) not in view["moving"], view["moving"]
    assert re.search(r"event=shards_taken_over count=\d+ from=n1", nodes.procs["n2"].text + nodes.procs["n3"].text)


def _quiet(fn, *args):
    try:
        fn(*args)
    except Exception:
        pass                     # the node was killed under it


def test_a_two_node_cluster_that_loses_a_node_refuses_then_resumes_losing_nothing(nats_cluster, tmp_path):
    """Two nodes, two copies: kill -9 of the one holding b's replica while a streams
    to b. The survivor has no node for a second copy: SENDs are refused with
    UNAVAILABLE (any ACKs it still held for the shard are dropped, their sessions
    closed, never written on one copy) until the killed node is back and in sync.
    Every ACKed message arrives once, in the order sent."""
    nodes = Nodes(tmp_path, nats_cluster.url, ["n1", "n2"], extra=("--replicas", "2"))
    try:
        nodes.start_all()
        _wait("every shard in sync", lambda: _in_sync(nodes, "n1"))
        a, b = nodes.users_on("n1", 2, "tw")

        def lose_and_return():
            nodes.kill9("n2")
            _wait("n1 short of copies", lambda: "event=replicas_short" in nodes.procs["n1"].text, 30)
            nodes.start("n2")
        got = asyncio.run(asyncio.wait_for(paced_stream(nodes, a, b, lose_and_return, count=400, window=4), 180))
        assert got == [f"m{i}" for i in range(400)]
    finally:
        nodes.stop_all()
