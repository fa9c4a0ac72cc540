"""Replicas and failover (gateway/cluster/replication.py, docs/cluster.md
Replication): three real gateway nodes with `--replicas 2` on a real 3-server
NATS cluster; nodes are killed with SIGKILL (supervisor and workers), paused
with SIGSTOP, and every ACKed message must reach its recipient exactly once, in
the order its device sent it."""
import asyncio
import os
import re
import signal
import time

import pytest

from clusternodes import Nodes, shard_of

pytestmark = pytest.mark.slow


@pytest.fixture
def rnodes(nats_cluster, tmp_path):
    nodes = Nodes(tmp_path, nats_cluster.url, ["n1", "n2", "n3"], extra=("--replicas", "2"))
    nodes.start_all()
    yield nodes
    nodes.stop_all()


def _wait(what, check, timeout: float = 60.0, detail=None):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f": {detail()}" if detail else ""))
        time.sleep(0.05)


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


def kill9(nodes, name: str) -> None:
    """kill -9 of a whole node: its workers first, then its supervisor (no graceful exit anywhere)."""
    gw = nodes.procs[name]
    pids = list(gw.worker_pids().values())
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    gw.proc.kill()
    gw.proc.wait(10)
    for pid in pids:
        _wait(f"worker {pid} gone", lambda: not _alive(pid), 10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def _stream(nodes, sender: str, recipient: str, fault, count: int = 400, window: int = 4):
    """`sender` streams `count` numbered messages to `recipient` (both online, every
    node a seed) while `fault()` runs in a thread after the first 100; returns what
    the recipient got, in order, and the ACKed sends."""
    loop = asyncio.get_running_loop()
    async with nodes.any_client(recipient) as rc, nodes.any_client(sender) as sc:
        got, acked = [], []

        async def send():
            gate = asyncio.Semaphore(window)

            async def one(i):
                try:
                    await sc.send(recipient, f"m{i}", timeout=120)
                    acked.append(i)
                finally:
                    gate.release()
            tasks = []
            for i in range(count):
                await gate.acquire()
                tasks.append(asyncio.ensure_future(one(i)))
                await asyncio.sleep(0.003)
            await asyncio.gather(*tasks)

        async def receive():
            while len(got) < count:
                m = await rc.recv(timeout=120)
                got.append(m.text)
                await rc.ack(m)
        writer, reader = asyncio.ensure_future(send()), asyncio.ensure_future(receive())
        while len(acked) < 100:
            await asyncio.sleep(0.01)
        await loop.run_in_executor(None, fault)
        await asyncio.gather(writer, reader)
        with pytest.raises(asyncio.TimeoutError):
            await rc.recv(timeout=0.5)                      # nothing twice
        return got, acked


def test_every_shard_gets_an_in_sync_replica(rnodes):
    nodes = rnodes
    _wait("every shard in sync", lambda: _in_sync(nodes, "n1"))
    w = _map(nodes, "n1")
    for s in range(nodes.shards):
        owner, reps = w["shard_owner"][s], w["replicas"][str(s)]
        assert len(reps) == 1 and reps[0] != owner


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
    got, acked = asyncio.run(asyncio.wait_for(_stream(nodes, a, b, lambda: kill9(nodes, "n2")), 180))
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
    got, acked = asyncio.run(asyncio.wait_for(_stream(nodes, a, b, lambda: kill9(nodes, heir)), 180))
    assert got == [f"m{i}" for i in range(400)]
    reps = owner_and_replicas(nodes, owner, b)[1]
    assert reps and heir not in reps, reps
    text = nodes.procs[owner].text
    assert re.search(rf"event=replica_stream_broken shard=\d+ replica={heir}", text), text[-3000:]
    nodes.start(heir)


def _signal_node(nodes, name: str, sig) -> None:
    gw = nodes.procs[name]
    for pid in [*gw.worker_pids().values(), gw.proc.pid]:
        os.kill(pid, sig)


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
        _signal_node(nodes, "n2", signal.SIGSTOP)
        try:
            _wait("b's shard taken over", lambda: owner_and_replicas(nodes, other, b)[0] != "n2", 60)
        finally:
            _signal_node(nodes, "n2", signal.SIGCONT)
    got, acked = asyncio.run(asyncio.wait_for(_stream(nodes, a, b, pause), 180))
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
            got, acked = asyncio.run(asyncio.wait_for(_stream(nodes, a, b, cut), 180))
            assert got == [f"m{i}" for i in range(400)]
            _wait("n2 learns it was deposed", lambda: "event=shard_deposed" in nodes.procs["n2"].text, 60)
        finally:
            nodes.stop_all()


def test_a_replica_killed_while_catching_up_starts_over(rnodes):
    """A replica killed part-way through its snapshot is dropped from the shard's
    sets when its lease expires and another catches up from scratch; the shard
    never takes it for in sync (only in-sync replicas may take over)."""
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
    kill9(nodes, first)
    _wait("the third node catching up", lambda: third in _map(nodes, owner)["catching"].get(
        str(shard_of(b, nodes.shards)), []), 30)
    kill9(nodes, third)
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
