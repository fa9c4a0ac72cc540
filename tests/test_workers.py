"""Several worker processes behind one supervisor: users sharded by xxhash,
connections handed to their owner, messages forwarded between workers, and a
worker killed with -9 in the middle of it all."""
import asyncio
import os
import re
import signal
import time

import pytest

from _core import frames as F
from _core.protocol import GoawayCode
from _core.pycodec import encode
from rawclient import Raw
from storm import assert_exactly_once_in_order, run_storm
from router.sharding import shard_of


def users_on(worker: int, workers: int, n: int, prefix: str) -> list[str]:
    out, i = [], 0
    while len(out) < n:
        name = f"{prefix}{i}"
        if shard_of(name) % workers == worker:
            out.append(name)
        i += 1
    return out


def wait_for(pred, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_messages_cross_workers_both_ways_and_offline(gateway_factory):
    gw = gateway_factory("--workers", "2")
    (a,), (b,) = users_on(0, 2, 1, "a"), users_on(1, 2, 1, "b")

    async def main():
        async with gw.client(a) as ca:
            offline = [(await ca.send(b, f"offline {i}")).id for i in range(3)]
            async with gw.client(b) as cb:
                got = [await cb.recv(timeout=5) for _ in range(3)]
                assert [m.id for m in got] == offline and got[0].sender == a
                await cb.ack(*got)
                live = await cb.send(a, "back across")
                m = await ca.recv(timeout=5)
                assert (m.id, m.sender, m.text) == (live.id, b, "back across")
    asyncio.run(main())


def test_duplicate_send_across_workers_is_delivered_once(gateway_factory):
    gw = gateway_factory("--workers", "2")
    (a,), (b,) = users_on(0, 2, 1, "dup-a"), users_on(1, 2, 1, "dup-b")
    raw = Raw(gw)
    raw.hello(gw.token(a), "raw")
    frame = encode(F.Send(1, b, b"only once"))
    raw.send(frame)
    first = raw.frame()
    raw.send(frame)                               # a retry with the same seq
    second = raw.frame()
    raw.send(encode(F.Send(2, b, b"marker")))
    marker = raw.frame()
    assert isinstance(first, F.Ack) and isinstance(second, F.Ack), (first, second)
    assert first.msg_id == second.msg_id

    async def main():
        async with gw.client(b) as cb:
            got = [await cb.recv(timeout=5) for _ in range(2)]
            assert [(m.id, m.payload) for m in got] == [(first.msg_id, b"only once"), (marker.msg_id, b"marker")]
    asyncio.run(main())
    raw.close()


def test_handoff_carries_bytes_already_read(gateway_factory):
    """HELLO, a SEND and a PING in one write: whichever worker accepts, the
    owner answers all three, in order, on the same TCP connection."""
    gw = gateway_factory("--workers", "2")
    senders = users_on(0, 2, 10, "hs-a") + users_on(1, 2, 10, "hs-b")
    target = users_on(1, 2, 1, "hs-target")[0]
    for i, user in enumerate(senders):
        raw = Raw(gw)
        raw.send(encode(F.Hello(2, gw.token(user), "raw", 0)) + encode(F.Send(1, target, f"m{i}".encode()))
                 + encode(F.Ping(i)))
        welcome = raw.frame()
        assert isinstance(welcome, F.Welcome) and welcome.user == user
        # the ACK may come after the PONG: storing can take a trip to another worker
        rest = sorted([raw.frame(), raw.frame()], key=lambda f: type(f).__name__)
        assert isinstance(rest[0], F.Ack) and rest[0].seq == 1, rest
        assert rest[1] == F.Pong(i)
        raw.close()

    async def main():
        async with gw.client(target) as ct:
            got = {(await ct.recv(timeout=5)).text for _ in senders}
            assert got == {f"m{i}" for i in range(len(senders))}
    asyncio.run(main())
    assert gw.stop() == 0
    handed = sum(int(n) for n in re.findall(r"handoffs_in=(\d+)", gw.text))
    # 20 connections over a shared accept queue: some landed on the other worker
    assert handed > 0, gw.text


def test_a_handed_over_hello_is_verified_by_its_owner(gateway_factory):
    """The accepting worker hands a HELLO over on the user its token names, without
    checking the token (the owner does): a token from another secret, a tampered
    one and an expired one are each refused with their code, for users of both
    workers, and the gateway serves on; the counts show hand-overs happened."""
    import base64
    from gateway.auth import TokenAuthority
    from _core.protocol import ErrorCode
    gw = gateway_factory("--workers", "2")
    users = users_on(0, 2, 6, "vh-a") + users_on(1, 2, 6, "vh-b")

    def tampered(user):
        prefix, body, mac = gw.token(user).split(".")
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        raw = raw[:-1] + bytes([raw[-1] ^ 1])          # the expiry changed: the MAC no longer matches
        return ".".join([prefix, base64.urlsafe_b64encode(raw).rstrip(b"=").decode(), mac])
    cases = [(lambda u: TokenAuthority(os.urandom(32)).issue(u), ErrorCode.AUTH_FAILED, "bad token signature"),
             (tampered, ErrorCode.AUTH_FAILED, "bad token signature"),
             (lambda u: gw.token(u, ttl=1, now=time.time() - 100), ErrorCode.TOKEN_EXPIRED, "token expired")]
    for user in users:
        for make, code, reason in cases:
            raw = Raw(gw)
            raw.send(encode(F.Hello(2, make(user), "raw", 0)))
            err = raw.frame()
            assert isinstance(err, F.Error) and (err.code, err.reason) == (code, reason), (user, err)
            raw.close()
        raw = Raw(gw)
        assert raw.hello(gw.token(user)).user == user
        raw.close()
    assert gw.stop() == 0
    assert sum(int(n) for n in re.findall(r"handoffs_in=(\d+)", gw.text)) > 0, gw.text


@pytest.mark.parametrize("victim", ["recipient's worker", "sender's worker"])
def test_kill_9_of_a_worker_during_a_storm(gateway_factory, victim):
    """The supervisor restarts the worker, it recovers its shards' logs, clients
    reconnect: every message ACKed is delivered exactly once, in order."""
    gw = gateway_factory("--workers", "2", "--durability", "interval")
    sender, recipient = users_on(0, 2, 1, "ks-a")[0], users_on(1, 2, 1, "ks-b")[0]
    worker = 1 if victim == "recipient's worker" else 0
    n = 1500
    killed = []

    def on_acked(count):
        if count == n // 3 and not killed:
            pid = gw.worker_pids()[worker]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    acked, seen, reconnects = asyncio.run(run_storm(gw, sender, recipient, n, on_acked))
    assert killed and reconnects >= 1
    assert_exactly_once_in_order(acked, seen, n)
    # the supervisor started a new process for that worker
    assert gw.worker_pids()[worker] != killed[0]
    assert re.search(rf"event=worker_exited worker={worker} pid={killed[0]} status=-9", gw.text)


def test_restart_with_another_worker_count_loses_nothing(gateway_factory, tmp_path):
    data = tmp_path / "d"
    recipients = [f"offline{i}" for i in range(40)]        # spread over many shards

    async def send(gw):
        async with gw.client("sender") as s:
            return {r: [(await s.send(r, f"for {r} #{k}")).id for k in range(2)] for r in recipients}

    async def drain(gw, expect):
        for r in recipients:
            async with gw.client(r) as c:
                got = [await c.recv(timeout=5) for _ in expect[r]]
                assert [m.id for m in got] == expect[r], r
                await c.ack(*got)
                await c.ping()

    async def empty(gw):
        for r in recipients[:10]:
            async with gw.client(r) as c:
                await c.ping()
                with pytest.raises(asyncio.TimeoutError):
                    await c.recv(timeout=0.01)

    gw2 = gateway_factory("--workers", "2", data_dir=data)
    sent = asyncio.run(send(gw2))
    assert gw2.stop() == 0
    gw3 = gateway_factory("--workers", "3", data_dir=data)
    asyncio.run(drain(gw3, sent))
    assert gw3.stop() == 0
    gw1 = gateway_factory("--workers", "1", data_dir=data)
    asyncio.run(empty(gw1))


def test_sigterm_drains_with_jittered_goaway(gateway_factory):
    gw = gateway_factory("--workers", "2")
    raws = []
    for user in users_on(0, 2, 6, "dr-a") + users_on(1, 2, 6, "dr-b"):
        r = Raw(gw, timeout=10)
        r.hello(gw.token(user), "raw")
        raws.append(r)
    t0 = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    hints = []
    for r in raws:
        frames, closed = r.until_eof()
        goaway = [f for f in frames if isinstance(f, F.Goaway)]
        assert closed and len(goaway) == 1, frames
        assert goaway[0].code == GoawayCode.SHUTTING_DOWN
        hints.append(goaway[0].reconnect_ms)
        r.close()
    assert gw.proc.wait(20) == 0
    assert time.monotonic() - t0 < 15
    assert all(0 <= h <= 5000 for h in hints)
    assert len(set(hints)) > 1, "reconnect hints must be spread, not one value"


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS:")).split()[1])


def test_slow_link_pauses_senders_and_memory_stays_bounded(gateway_factory):
    """Freeze the recipient's worker (SIGSTOP): the link to it backs up, the
    sending worker stops reading its clients instead of buffering without bound,
    and once the worker runs again every message is stored and delivered."""
    gw = gateway_factory("--workers", "2", "--max-pending", "100000")
    sender, recipient = users_on(0, 2, 1, "bp-a")[0], users_on(1, 2, 1, "bp-b")[0]
    pids = gw.worker_pids()
    raw = Raw(gw, timeout=2)
    raw.hello(gw.token(sender), "raw")
    payload = b"p" * 60_000
    before = _rss_kib(pids[0])
    os.kill(pids[1], signal.SIGSTOP)
    sent = 0
    try:
        for i in range(4000):                      # at most 240 MB offered; far more than the high water
            try:
                raw.send(encode(F.Send(i + 1, recipient, payload)))
            except (TimeoutError, OSError):        # the server stopped reading us: backpressure
                break
            sent += 1
        assert sent < 4000, "the sender was never paused"
        grown_mib = (_rss_kib(pids[0]) - before) / 1024
        assert grown_mib < 64, f"worker 0 grew by {grown_mib:.0f} MiB while the link was stuck"
        assert "event=bus_paused" in gw.text
    finally:
        os.kill(pids[1], signal.SIGCONT)
    raw.sock.settimeout(30)
    acks = set()
    while len(acks) < sent:
        f = raw.frame()
        if isinstance(f, F.Ack):
            acks.add(f.seq)
    assert acks == set(range(1, sent + 1))
    raw.close()
    wait_for(lambda: "event=bus_resumed" in gw.text, "the bus to resume")
    # the link drained: its writer callback was removed cleanly (it used to raise on every turn)
    assert "Traceback" not in gw.text, gw.text[gw.text.index("Traceback") - 200:][:2000]


def test_restart_backoff_is_for_crash_loops_not_for_kill_9(gateway_factory):
    """A worker killed with SIGKILL comes back after the base delay each time, so a storm
    of kills does not hide behind growing restarts; a worker that keeps dying by itself
    (here SIGABRT, quick deaths) is restarted with a doubling backoff."""
    gw = gateway_factory("--workers", "2")

    def kill_and_wait(sig):
        pid = gw.worker_pids()[1]
        os.kill(pid, sig)
        wait_for(lambda: gw.worker_pids().get(1, pid) != pid, "the worker's successor")
        m = re.search(rf"event=worker_exited worker=1 pid={pid} status=(-?\d+) restart_in=([\d.]+)s", gw.text)
        assert m and int(m.group(1)) == -sig, gw.text
        return float(m.group(2))

    assert [kill_and_wait(signal.SIGKILL) for _ in range(3)] == [0.1, 0.1, 0.1]
    assert [kill_and_wait(signal.SIGABRT) for _ in range(3)] == [0.1, 0.2, 0.4]


def test_adopted_connections_leave_no_descriptor_behind(gateway_factory):
    """A connection handed to its owner is closed once, by the owner's transport (the
    owner keeps no socket object of its own for it), whether the client hangs up or the
    server replaces it: both workers' descriptor counts come back to where they were,
    and an adopted connection carries messages meanwhile."""
    gw = gateway_factory("--workers", "2")
    wait_for(lambda: len(gw.worker_pids()) == 2, "two workers")
    pids = gw.worker_pids()
    users = users_on(0, 2, 15, "fd-a") + users_on(1, 2, 15, "fd-b")

    def fds():
        return {w: len(os.listdir(f"/proc/{p}/fd")) for w, p in pids.items()}

    def open_all():
        raws = []
        for u in users:
            raw = Raw(gw)
            raw.hello(gw.token(u), "phone")
            raws.append(raw)
        return raws

    for raw in open_all():                      # every device registered, every shard file open
        raw.close()
    before = None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:          # the warm-up's closes have reached both workers
        now = fds()
        if now == before:
            break
        before = now
        time.sleep(0.2)
    raws = open_all()
    raws[0].send(encode(F.Send(1, users[-1], b"through adopted connections")))
    assert isinstance(raws[0].frame(), F.Ack)
    got = raws[-1].frame()
    assert isinstance(got, F.Deliver) and got.payload == b"through adopted connections"
    during = fds()
    assert sum(during.values()) >= sum(before.values()) + len(users)
    replacements = []
    for raw, u in list(zip(raws, users))[::2]:  # the server closes these: a newer connection replaces each
        new = Raw(gw)
        new.hello(gw.token(u), "phone")
        frames_, closed = raw.until_eof()
        assert closed and any(isinstance(f, F.Goaway) and f.code == GoawayCode.REPLACED for f in frames_), frames_
        replacements.append(new)
    for raw in raws + replacements:
        raw.close()
    wait_for(lambda: fds() == before, f"descriptors back to {before} (now {fds()})")
    gw.stop()
    assert sum(int(n) for n in re.findall(r"handoffs_in=(\d+)", gw.text)) > 0, gw.text
