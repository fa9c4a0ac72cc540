"""A cluster as several machines on this one: a real 3-server NATS cluster and
gateway nodes, each with its own 127.0.0.x address and data dir, talking to each
other only through NATS (docs/cluster.md)."""
import asyncio
import contextlib
import os
import re
import socket
import struct
import time

import pytest
from clusternodes import Nodes, paced_stream
from clusternodes import wait as _wait

from _core import frames
from _core.codec import Decoder, encode
from _core.protocol import PROTOCOL_VERSION, FrameType, GoawayCode

pytestmark = pytest.mark.slow


@pytest.fixture
def three(nats_cluster, tmp_path):
    nodes = Nodes(tmp_path, nats_cluster.url, ["n1", "n2", "n3"]).start_all()
    yield nodes
    nodes.stop_all()


async def _drain_in_order(client, count: int, timeout: float = 20.0) -> list[str]:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        m = await client.recv(timeout=max(0.1, deadline - time.monotonic()))
        got.append(m.text)
        await client.ack(m)
    return got


def test_messages_receipts_presence_typing_and_groups_across_three_nodes(three):
    nodes = three
    a, = nodes.users_on("n1", 1, "a")
    b, = nodes.users_on("n2", 1, "b")
    c, = nodes.users_on("n3", 1, "c")
    n = 150

    async def main():
        async with nodes.client(a) as ca, nodes.client(b) as cb, nodes.client(c) as cc:
            # 1:1 around the ring, each stream pipelined: every message once, in the order sent
            async def stream(cl, to):
                return await asyncio.gather(*(cl.send(to, f"{to}-{i}") for i in range(n)))
            acks = await asyncio.gather(stream(ca, b), stream(cb, c), stream(cc, a))
            assert all(len({r.id for r in rs}) == n for rs in acks)
            got = await asyncio.gather(_drain_in_order(cb, n), _drain_in_order(cc, n), _drain_in_order(ca, n))
            for user, received in zip((b, c, a), got):
                assert received == [f"{user}-{i}" for i in range(n)]
            # DELIVERED receipts come back across nodes, one per message
            for cl, rs in zip((ca, cb, cc), acks):
                ids = {r.id for r in rs}
                seen = set()
                while seen != ids:
                    r = await cl.recv_receipt(timeout=10)
                    assert r.kind == "delivered" and r.msg_id in ids
                    seen.add(r.msg_id)
            # presence of a user on another node, and its change
            await ca.subscribe(c)
            assert (await ca.recv_presence(timeout=10)).online
        # c's session (and the others) closed: a watcher on n2 now sees c offline, then online again
        async with nodes.client(b) as cb:
            await cb.subscribe(c)
            p = await cb.recv_presence(timeout=10)
            assert p.user == c and not p.online and p.last_seen_ms > 0
            async with nodes.client(c) as cc:
                p = await cb.recv_presence(timeout=10)
                assert p.user == c and p.online
                # typing from n3 to n2
                await cc.typing(b)
                t = await cb.recv_typing(timeout=10)
                assert t.peer == c and t.typing
                # a group whose members live on all three nodes (the group's own shard is on one of them)
                async with nodes.client(a) as ca:
                    info = await ca.group("create", "#ring", name="Ring", members=[b, c])
                    assert set(info["members"]) == {a, b, c}
                    await ca.send("#ring", "to everyone")
                    for cl in (cb, cc):
                        m = await cl.recv(timeout=10)
                        assert (m.text, m.sender, m.group) == ("to everyone", a, "#ring")
                        await cl.ack(m)
    asyncio.run(asyncio.wait_for(main(), 90))
    for name in nodes.names:
        s = nodes.status(name)["workers"]["0"]
        assert s["serving"] and set(s["owners"]) == set(nodes.names)


def _hello(token: str) -> bytes:
    return encode(frames.Hello(PROTOCOL_VERSION, token, "main", 0, False, 0))


def _read_frame(sock: socket.socket, timeout: float = 10.0):
    got = []
    dec = Decoder(lambda t, f, b: got.append((t, f, bytes(b))), 1 << 20)
    sock.settimeout(timeout)
    while not got:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        dec.feed(data)
    return got[0]


def test_message_ids_are_unique_across_nodes(three):
    """Each worker of each node makes ids with its own generator number, claimed in the
    cluster's KV (gateway/cluster/idgen.py): two nodes can never give two entries one
    id (before, every node's worker 0 made the same ids in the same ms). A node keeps
    its number across a kill -9."""
    nodes = three
    gens = {name: nodes.status(name)["workers"]["0"]["id_generator"] for name in nodes.names}
    assert len(set(gens.values())) == 3, gens
    users = {name: nodes.users_on(name, 1, "gid")[0] for name in nodes.names}

    async def ids():
        got = {}
        async with nodes.any_client("gid-sender") as sc:
            for name, user in users.items():
                got[name] = [(await sc.send(user, f"to {name} {i}", timeout=30)).id for i in range(20)]
        return got
    got = asyncio.run(asyncio.wait_for(ids(), 120))
    for name, made in got.items():
        assert made == sorted(made) and {(i >> 10) & 0xFFF for i in made} == {gens[name]}, (name, gens)
    assert len({i for made in got.values() for i in made}) == 60
    nodes.kill("n2")
    nodes.start("n2")
    assert nodes.status("n2")["workers"]["0"]["id_generator"] == gens["n2"]


def test_redirect_to_owner(three):
    """PROTOCOL.md section 3, GOAWAY REDIRECT, on a real cluster: a HELLO at a node
    that does not serve the user is answered GOAWAY REDIRECT naming the node that
    does (its listener of the same kind, TCP or WebSocket); there the same HELLO
    gets WELCOME, and the SDK goes there at once as the same session."""
    nodes = three
    user, = nodes.users_on("n2", 1, "r")
    with socket.create_connection(nodes.address("n1")) as s:
        s.sendall(_hello(nodes.token(user)))
        ftype, _flags, body = _read_frame(s)
        assert ftype == FrameType.GOAWAY
        code, reconnect_ms = struct.unpack_from("!HI", body)
        (n,) = struct.unpack_from("!H", body, 6)
        address = body[8:8 + n].decode()
        assert (code, reconnect_ms) == (GoawayCode.REDIRECT, 0)
        assert address == "%s:%d" % nodes.address("n2")
        assert s.recv(1) == b""                            # and the node closes
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(_hello(nodes.token(user)))
        ftype, _flags, _body = _read_frame(s)
        assert ftype == FrameType.WELCOME
    # WebSocket: the owner's WebSocket listener, then Close 1001
    from wsclient import WsRaw
    with WsRaw(nodes.host("n1"), nodes.ports["n1"][1]) as w:
        w.upgrade()
        w.send_proto(frames.Hello(PROTOCOL_VERSION, nodes.token(user), "main", 0, False, 0))
        code, _, before = w.close_code()
    assert code == 1001 and before == [frames.Goaway(GoawayCode.REDIRECT, 0,
                                                     "%s:%d" % (nodes.host("n2"), nodes.ports["n2"][1]))]

    # the SDK follows it as the same session: a SEND queued before the connect is stored there once
    async def follow():
        from gateway.client import Client
        c = Client("%s:%d" % nodes.address("n1"), 0, nodes.token(user, "phone"), "phone")
        queued = asyncio.ensure_future(c.send(user, "queued before the connect", timeout=20))
        await asyncio.sleep(0)
        await c.connect()
        ack = await queued
        assert c.address == nodes.address("n2") and c.redirects == 1
        m = await c.recv(timeout=10)
        assert (m.id, m.text) == (ack.id, "queued before the connect")
        await c.close()
    asyncio.run(asyncio.wait_for(follow(), 30))
    assert _counter(nodes, "n1", "switchboard_redirects_total") >= 3


def test_a_killed_node_leaves_its_shards_unavailable_and_loses_nothing(three):
    """kill -9 of the recipient's node while a sender on another node streams to
    it: sends get UNAVAILABLE and are retried by the SDK until the node is back;
    every ACKed message arrives once, in order."""
    nodes = three
    a, = nodes.users_on("n1", 1, "ka")
    b, = nodes.users_on("n2", 1, "kb")
    n = 400

    async def main():
        async with nodes.client(a) as ca:
            sends = [asyncio.ensure_future(ca.send(b, f"m{i}", timeout=60)) for i in range(n // 2)]
            await asyncio.gather(*sends[:20])
            await asyncio.get_running_loop().run_in_executor(None, nodes.kill, "n2")
            more = [asyncio.ensure_future(ca.send(b, f"m{i}", timeout=60)) for i in range(n // 2, n)]
            # while n2 is down its shards are unavailable: nothing past what was ACKed before can be ACKed
            await asyncio.sleep(0)
            await asyncio.get_running_loop().run_in_executor(None, nodes.start, "n2")
            results = await asyncio.gather(*sends, *more)
            assert len({r.id for r in results}) == n
        async with nodes.client(b) as cb:
            got = await _drain_in_order(cb, n, timeout=30)
            assert got == [f"m{i}" for i in range(n)]
            with pytest.raises(asyncio.TimeoutError):
                await cb.recv(timeout=0.5)                   # and nothing twice
    asyncio.run(asyncio.wait_for(main(), 120))
    text = nodes.procs["n1"].text
    assert re.search(r"event=(cluster_peer_reset|cluster_forward_timeout|node_gone)", text), text[-3000:]


def test_readyz_follows_the_nats_connection(nats_single, tmp_path):
    """A node without NATS cannot serve its shards: /readyz 503 naming why, 200 again once back."""
    nodes = Nodes(tmp_path, nats_single.url, ["n1"]).start_all()
    try:
        assert nodes.admin("n1", "/readyz")[0] == 200
        nats_single.stop(0)
        deadline = time.monotonic() + 20
        while (st := nodes.admin("n1", "/readyz"))[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert st[0] == 503 and "NATS" in st[1], st
        nats_single.restart(0)
        deadline = time.monotonic() + 30
        while (st := nodes.admin("n1", "/readyz"))[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert st[0] == 200, st
        assert "event=nats_disconnected" in nodes.procs["n1"].text
    finally:
        nodes.stop_all()


def test_a_second_node_with_a_live_nodes_name_is_refused(three, tmp_path):
    from conftest import start_gateway
    other = tmp_path / "impostor"
    with pytest.raises(RuntimeError, match="node name 'n1' is in use"):
        start_gateway(other, "--host", "127.0.0.21", "--admin-host", "127.0.0.21", "--workers", "1",
                      "--cluster", three.nats_url, "--node", "n1", "--cluster-shards", "64", timeout=30)
    assert os.path.isdir(other)


def _last_until(t0: float, seconds: float) -> None:
    """A fault that began at monotonic time t0 lasts `seconds` (a duration, not a synchronisation)."""
    while time.monotonic() - t0 < seconds:
        time.sleep(0.2)


@pytest.mark.parametrize("replicas", [1, 2], ids=["copying", "promoting"])
def test_a_node_joins_and_one_is_drained_under_load(nats_cluster, tmp_path, replicas):
    """n3 joins a 2-node cluster while clients stream messages, and takes its
    share of the shards; then n1 is drained with `switchboard drain` and hands
    all of its shards away before it exits. Clients use every node as a seed
    and follow redirects; every ACKed message reaches its recipient exactly
    once, in the order sent. With one copy per shard a move copies the shard's
    files; with two it promotes a replica (test_replication kills an owner in
    the middle of a move)."""
    nodes = Nodes(tmp_path, nats_cluster.url, ["n1", "n2", "n3"], bootstrap=["n1", "n2"],
                  extra=("--replicas", str(replicas)))
    nodes.start("n1")
    nodes.start("n2")
    pairs = [(f"js{i}", f"jr{i}") for i in range(8)]
    try:
        async def main():
            loop = asyncio.get_running_loop()
            recv_clients = {r: nodes.any_client(r) for _, r in pairs}
            senders = {s: nodes.any_client(s) for s, _ in pairs}
            for c in [*recv_clients.values(), *senders.values()]:
                await c.connect()
            got = {r: [] for _, r in pairs}
            sent = {s: 0 for s, _ in pairs}
            stop = asyncio.Event()

            async def receive(r, c, s):
                while not (stop.is_set() and len(got[r]) >= sent[s]):
                    try:
                        m = await c.recv(timeout=1)
                    except asyncio.TimeoutError:
                        continue
                    got[r].append(m.text)
                    await c.ack(m)

            async def send(s, r):
                while not stop.is_set() and sent[s] < 5000:
                    await senders[s].send(r, f"{s}-{sent[s]}", timeout=120)
                    sent[s] += 1
                    await asyncio.sleep(0.002)             # a steady stream, not one burst

            def total():
                return sum(sent.values())

            async def until(n):
                while total() < n:
                    await asyncio.sleep(0.01)
            readers = [asyncio.ensure_future(receive(r, recv_clients[r], s)) for s, r in pairs]
            writers = [asyncio.ensure_future(send(s, r)) for s, r in pairs]
            await until(200)
            # under load: n3 joins and takes its share
            await loop.run_in_executor(None, nodes.start, "n3")
            await loop.run_in_executor(None, _wait, "n3 to own its shards",
                                       lambda: nodes.owned("n3") > 10 and not nodes.status("n3")["workers"]["0"]["moving"],
                                       60)
            await until(total() + 200)
            # under load: n1 is drained and hands its shards away before it exits
            from gateway.stats import run_drain
            await loop.run_in_executor(None, run_drain, nodes.host("n1"), nodes.ports["n1"][2], 50, 0.1, 60.0)
            await until(total() + 200)
            stop.set()
            await asyncio.gather(*writers)
            await asyncio.wait_for(asyncio.gather(*readers), 90)
            for c in [*senders.values(), *recv_clients.values()]:
                await c.close()
            return got, sent
        got, sent = asyncio.run(asyncio.wait_for(main(), 240))
        for s, r in pairs:
            assert got[r] == [f"{s}-{i}" for i in range(sent[s])], (r, sent[s], got[r][:10])
        n1 = nodes.procs["n1"]
        n1.proc.wait(30)
        assert n1.proc.returncode == 0, n1.text[-3000:]
        assert "event=shards_handed_over" in n1.text and "complete=True" in n1.text
        if replicas > 1:
            assert "from=promotion" in nodes.procs["n2"].text + nodes.procs["n3"].text
        owners = _wait("n2 and n3 own every shard", lambda: (lambda o: set(o) == {"n2", "n3"} and o)(
            nodes.status("n2")["workers"]["0"]["owners"]), 30)
        assert sum(owners.values()) == 64, owners
        for name in ("n2", "n3"):
            assert re.search(r"event=shard_adopted", nodes.procs[name].text)
    finally:
        nodes.stop_all()


def test_a_nats_server_killed_under_load(nats_cluster, tmp_path):
    """The NATS server most nodes' workers use is killed mid-stream and restarted:
    they reconnect to the others by themselves; nothing ACKed is lost or doubled."""
    nodes = Nodes(tmp_path, nats_cluster.url, ["n1", "n2", "n3"]).start_all()
    try:
        a, = nodes.users_on("n1", 1, "na")
        b, = nodes.users_on("n2", 1, "nb")

        def fault():
            counts = [len([c for c in nats_cluster.monitor(i, "/connz?limit=1000")["connections"] or []
                           if c.get("name", "").startswith("switchboard")]) for i in range(3)]
            victim = counts.index(max(counts))
            nats_cluster.kill(victim)
            _wait("a node to notice", lambda: any("event=nats_reconnected" in gw.text for gw in nodes.procs.values()),
                  30)
            nats_cluster.restart(victim)
        got = asyncio.run(asyncio.wait_for(paced_stream(nodes, a, b, fault), 180))
        assert got == [f"m{i}" for i in range(600)]
        assert any("event=nats_disconnected" in gw.text for gw in nodes.procs.values())
        for name in nodes.names:
            _wait(f"{name} ready", lambda name=name: nodes.admin(name, "/readyz")[0] == 200, 30)
    finally:
        nodes.stop_all()


@contextlib.contextmanager
def _n2_behind_a_proxy(nats, tmp_path):
    """Three nodes; n2 reaches NATS only through a fault proxy (tests/faultproxy.py)."""
    from faultproxy import FaultProxy
    with FaultProxy.to(nats.urls[0]) as proxy:
        nodes = Nodes(tmp_path, nats.url, ["n1", "n2", "n3"])
        try:
            nodes.start("n1")
            nodes.start("n2", "--cluster", proxy.url)
            nodes.start("n3")
            yield nodes, proxy
        finally:
            nodes.stop_all()


def test_a_node_without_nats_for_10_s(nats_cluster, tmp_path):
    """n2's only way to NATS is cut for 10 s: its lease runs out (the others see it
    gone and answer its users' senders UNAVAILABLE), its /readyz is 503; once the
    connection is back it takes its lease again and serves; the stream from n1 to
    n2's user loses and doubles nothing."""
    with _n2_behind_a_proxy(nats_cluster, tmp_path) as (nodes, proxy):
        a, = nodes.users_on("n1", 1, "pa")
        b, = nodes.users_on("n2", 1, "pb")

        def fault():
            t0 = time.monotonic()
            proxy.cut()
            _wait("n1 to see n2 gone", lambda: not nodes.status("n1")["workers"]["0"]["nodes"].get("n2", {})
                  .get("alive", False), 30)
            _wait("n2 /readyz 503", lambda: nodes.admin("n2", "/readyz")[0] == 503, 30)
            code, why = nodes.admin("n2", "/readyz")
            assert "NATS" in why, why
            _last_until(t0, 10)
            proxy.restore()
            _wait("n2 ready again", lambda: nodes.admin("n2", "/readyz")[0] == 200, 30)
        got = asyncio.run(asyncio.wait_for(paced_stream(nodes, a, b, fault), 180))
        assert got == [f"m{i}" for i in range(600)]
        text = nodes.procs["n2"].text
        assert "event=nats_disconnected" in text and "event=nats_reconnected" in text
        assert "event=lease_reclaimed" in text or "event=lease_renew_failed" in text
        assert "event=node_gone node=n2" in nodes.procs["n1"].text


def _counter(nodes, name: str, series: str) -> float:
    code, text = nodes.admin(name, "/metrics")
    assert code == 200
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_node_acting_on_a_stale_map_is_refused(nats_cluster, tmp_path):
    """n1 stops hearing from NATS (its connection stalls) while the shard of r moves
    from n2 to n3. n1 still routes by its old map and forwards r's messages to n2,
    which no longer owns that shard: n2 refuses them (fenced), stores nothing, and
    once n1 hears again the messages go to n3 and arrive exactly once, in order."""
    from faultproxy import FaultProxy

    from gateway.cluster.shardmap import hrw_owner
    from router.sharding import shard_of
    with FaultProxy.to(nats_cluster.urls[0]) as proxy:
        nodes = Nodes(tmp_path, nats_cluster.url, ["n1", "n2", "n3"], bootstrap=["n1", "n2"])
        try:
            nodes.start("n1", "--cluster", proxy.url)
            nodes.start("n2")
            s, = nodes.users_on("n1", 1, "fs")
            r = next(u for u in (f"fr{i}" for i in range(10_000))
                     if nodes.owner(u) == "n2" and hrw_owner(shard_of(u, 64), ["n1", "n2", "n3"]) == "n3")

            async def main():
                loop = asyncio.get_running_loop()
                async with nodes.client(s) as cs:
                    await cs.send(r, "m0")
                    await loop.run_in_executor(None, proxy.stall)
                    await loop.run_in_executor(None, nodes.start, "n3")
                    await loop.run_in_executor(None, _wait, "r's shard on n3",
                                               lambda: not nodes.status("n2")["workers"]["0"]["moving"]
                                               and nodes.owned("n3") > 0, 30)
                    sends = [asyncio.ensure_future(cs.send(r, f"m{i}", timeout=120)) for i in range(1, 21)]
                    await loop.run_in_executor(None, _wait, "n2 to refuse n1's stale forwards",
                                               lambda: _counter(nodes, "n2", 'switchboard_cluster_fenced_total'
                                                                '{kind="forwards"}') > 0, 30)
                    await loop.run_in_executor(None, proxy.unstall)
                    await asyncio.gather(*sends)
                async with nodes.any_client(r) as cr:
                    got = await _drain_in_order(cr, 21, timeout=30)
                    assert got == [f"m{i}" for i in range(21)]
                    with pytest.raises(asyncio.TimeoutError):
                        await cr.recv(timeout=0.5)
            asyncio.run(asyncio.wait_for(main(), 150))
        finally:
            nodes.stop_all()


def test_a_group_copy_batch_on_a_stale_map_is_obeyed_for_the_members_still_owned(nats_cluster, tmp_path):
    """n1 owns group g and sends one copy message per node for a group message,
    naming all of that node's members. n1 stops hearing from NATS while the shard
    of member r moves from n2 to n3, so n1's batches for n2 still name r and k.
    n2 refuses r's copies (fenced) and makes k's. Once n1 hears again, r's copies
    go to n3. Each member gets every message exactly once, in order."""
    from faultproxy import FaultProxy

    from gateway.cluster.shardmap import hrw_owner
    from router.sharding import shard_of
    three = ["n1", "n2", "n3"]
    after = lambda name: hrw_owner(shard_of(name, 64), three)           # noqa: E731  owner once n3 is in
    with FaultProxy.to(nats_cluster.urls[0]) as proxy:
        nodes = Nodes(tmp_path, nats_cluster.url, three, bootstrap=["n1", "n2"])
        try:
            nodes.start("n1", "--cluster", proxy.url)
            nodes.start("n2")
            s, = nodes.users_on("n1", 1, "gs")
            r = next(u for u in (f"gr{i}" for i in range(10_000)) if nodes.owner(u) == "n2" and after(u) == "n3")
            k = next(u for u in (f"gk{i}" for i in range(10_000)) if nodes.owner(u) == "n2" and after(u) == "n2")
            g = next(x for x in (f"#g{i}" for i in range(10_000)) if nodes.owner(x) == "n1" and after(x) == "n1")

            async def main():
                loop = asyncio.get_running_loop()
                async with nodes.client(s) as cs:
                    await cs.group("create", g, members=[r, k])
                    await cs.send(g, "m0")
                    await loop.run_in_executor(None, proxy.stall)
                    await loop.run_in_executor(None, nodes.start, "n3")
                    await loop.run_in_executor(None, _wait, "r's shard on n3",
                                               lambda: not nodes.status("n2")["workers"]["0"]["moving"]
                                               and nodes.owned("n3") > 0, 30)
                    for i in range(1, 11):
                        await cs.send(g, f"m{i}", timeout=30)     # stored on n1: ACKed while n1 is deaf
                    await loop.run_in_executor(None, _wait, "n2 to refuse r's copies",
                                               lambda: _counter(nodes, "n2", 'switchboard_cluster_fenced_total'
                                                                '{kind="controls"}') > 0, 30)
                    await loop.run_in_executor(None, proxy.unstall)
                for member in (k, r):
                    async with nodes.any_client(member) as cm:
                        got = await _drain_in_order(cm, 11, timeout=60)
                        assert got == [f"m{i}" for i in range(11)], member
                        with pytest.raises(asyncio.TimeoutError):
                            await cm.recv(timeout=0.5)
            asyncio.run(asyncio.wait_for(main(), 150))
        finally:
            nodes.stop_all()


def test_frames_larger_than_nats_max_payload_cross_nodes(nats_cluster, tmp_path):
    """NATS takes at most 1 MiB per message: a 3 MiB message and a group message of
    1 MiB (its copies cross as base64 in a control frame) between nodes arrive whole."""
    nodes = Nodes(tmp_path, nats_cluster.url, ["n1", "n2", "n3"],
                  extra=("--max-frame", str(4 << 20), "--segment-size", "16M")).start_all()
    try:
        a, = nodes.users_on("n1", 1, "la")
        b, = nodes.users_on("n2", 1, "lb")
        c, = nodes.users_on("n3", 1, "lc")
        big = os.urandom(3 << 20)
        mid = os.urandom(1 << 20)

        async def main():
            async with nodes.client(a) as ca, nodes.client(b) as cb, nodes.client(c) as cc:
                await ca.send(b, big, timeout=30)
                m = await cb.recv(timeout=30)
                assert m.payload == big
                await cb.ack(m)
                await ca.group("create", "#big", members=[b, c])
                await ca.send("#big", mid, timeout=30)
                for cl in (cb, cc):
                    m = await cl.recv(timeout=30)
                    assert m.group == "#big" and m.payload == mid
                    await cl.ack(m)
        asyncio.run(asyncio.wait_for(main(), 90))
        assert _counter(nodes, "n1", 'switchboard_cluster_bytes_total{direction="out"}') > len(big)
    finally:
        nodes.stop_all()


def test_a_node_cut_by_nats_as_a_slow_consumer(nats_factory, tmp_path):
    """n2 stops reading from NATS (its connection stalls) while n1 streams large
    messages to n2's user: nats-server finds n2 a slow consumer and closes its
    connection; n2 reconnects once it reads again, and the stream loses and
    doubles nothing."""
    # 256 x 60 KiB in flight fill the loopback socket buffers (~4-6 MiB) at once, so a write blocks
    # past write_deadline well before n2's own ping check (3 unanswered pings 2 s apart) could cut it
    # first; max_pending is large enough that the resent backlog, read at once, is not cut again
    nats = nats_factory(3, extra_config='write_deadline: "1s"\nmax_pending: 8MB')
    with _n2_behind_a_proxy(nats, tmp_path) as (nodes, proxy):
        a, = nodes.users_on("n1", 1, "sa")
        b, = nodes.users_on("n2", 1, "sb")

        def fault():
            proxy.stall()
            _wait("nats-server to cut n2 as a slow consumer",
                  lambda: "event=nats_disconnected" in nodes.procs["n2"].text, 90)
            proxy.unstall()
            # the resent backlog may exceed the tiny max_pending again: cut and back, until it drains
            _wait("n2 ready again", lambda: nodes.admin("n2", "/readyz")[0] == 200, 120)
        got = asyncio.run(asyncio.wait_for(paced_stream(nodes, a, b, fault, count=300, pad=60 << 10, window=256),
                                       300))
        assert got == [f"m{i}" for i in range(300)]
        assert nats.monitor(0, "/varz").get("slow_consumers", 0) > 0     # the server cut it, not a ping


def _stream_replicas(nats, stream: str) -> int:
    for account in nats.monitor(0, "jsz?streams=true&config=true").get("account_details") or []:
        for s in account.get("stream_detail") or []:
            if s["name"] == stream:
                return s["config"]["num_replicas"]
    raise AssertionError(f"no stream {stream}")


def _lead(nats, stream: str, server: int, timeout: float = 20.0) -> None:
    """Make nats-server `server` the leader of `stream` (a JetStream stepdown naming it)."""
    import json

    import nats as nats_py
    name = nats.server_name(server)

    def leaders() -> set:
        """Each server's view of the stream's leader (they agree once it settled)."""
        seen = set()
        for i in range(nats.size):
            for account in nats.monitor(i, "jsz?streams=true").get("account_details") or []:
                for s in account.get("stream_detail") or []:
                    if s["name"] == stream:
                        seen.add((s.get("cluster") or {}).get("leader"))
        return seen

    async def stepdown():
        nc = await nats_py.connect(nats.urls[server])
        try:
            deadline = time.monotonic() + timeout
            while leaders() != {name}:
                assert time.monotonic() < deadline, f"{name} never became the leader of {stream}: {leaders()}"
                with contextlib.suppress(Exception):      # "already leader", or no leader yet: look again
                    await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}",
                                     json.dumps({"placement": {"preferred": name}}).encode(), timeout=5)
                settle = time.monotonic() + 3
                while leaders() != {name} and time.monotonic() < settle:
                    await asyncio.sleep(0.05)
        finally:
            await nc.close()
    asyncio.run(stepdown())


def test_a_nats_server_cut_off_from_its_routes(tmp_path):
    """A partition between the NATS servers, not a dead one: the server n1 uses, which
    also leads the lease and map buckets, loses every route for 10 s while n1 stays
    connected to it. n1 can no longer renew its lease, so it stops serving (/readyz 503)
    and the others see it gone; the two other servers elect new leaders and n2 and n3
    keep serving their own users; when the routes come back n1 takes its lease again.
    The stream from n2's user to n1's user loses and doubles nothing."""
    from conftest import _nats_server_or_skip
    from natspartition import PartitionableNats
    _nats_server_or_skip()
    nats = PartitionableNats(tmp_path / "nats").start()
    nodes = Nodes(tmp_path, nats.url, ["n1", "n2", "n3"])
    try:
        nodes.start("n1", "--cluster", nats.urls[0])
        nodes.start("n2", "--cluster", f"{nats.urls[1]},{nats.urls[2]}")
        nodes.start("n3", "--cluster", f"{nats.urls[2]},{nats.urls[1]}")
        for stream in ("KV_switchboard_nodes", "KV_switchboard_map"):
            # n1, which made them, was given one NATS URL: the buckets are replicated all the same
            assert _stream_replicas(nats, stream) == 3
            _lead(nats, stream, 0)
        a, a2 = nodes.users_on("n2", 2, "ra")
        b, = nodes.users_on("n1", 1, "rb")
        c, = nodes.users_on("n3", 1, "rc")

        async def while_cut():
            """n3's user to n2's other user: the majority side serves through the partition."""
            async with nodes.any_client(a2) as rc, nodes.any_client(c) as sc:
                await sc.send(a2, "during the partition", timeout=60)
                m = await rc.recv(timeout=60)
                await rc.ack(m)
                return m.text

        def fault():
            t0 = time.monotonic()
            nats.isolate(0)
            _wait("n1 /readyz 503", lambda: nodes.admin("n1", "/readyz")[0] == 503, 30)
            _wait("n2 to see n1 gone", lambda: not nodes.status("n2")["workers"]["0"]["nodes"].get("n1", {})
                  .get("alive", False), 30)
            assert asyncio.run(asyncio.wait_for(while_cut(), 90)) == "during the partition"
            assert nodes.admin("n1", "/readyz")[0] == 503           # still cut off: still not serving
            _last_until(t0, 10)
            nats.heal()
            _wait("n1 ready again", lambda: nodes.admin("n1", "/readyz")[0] == 200, 60)
        got = asyncio.run(asyncio.wait_for(paced_stream(nodes, a, b, fault), 240))
        assert got == [f"m{i}" for i in range(600)]
        text = nodes.procs["n1"].text
        assert "event=lease_renew_failed" in text and "event=lease_reclaimed" in text
        assert text.count("event=lease_renew_failed") <= 2          # ~10 failures a second apart: bounded lines
        assert "event=node_gone node=n1" in nodes.procs["n2"].text
        assert "event=nats_disconnected" not in text                # a partition, not a lost connection
    finally:
        nodes.stop_all()
        nats.stop_all()
