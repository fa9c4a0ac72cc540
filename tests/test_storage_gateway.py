"""Storage failures as a user of the gateway sees them."""
import asyncio
import os
import re
import subprocess
import time

import pytest

from _core import frames as F
from _core.codec import encode
from _core.protocol import PROTOCOL_VERSION, ErrorCode
from gateway.client import ConnectionClosed, SendResult, ServerError
from rawclient import Raw
from router.sharding import shard_of
from test_metrics import scrape, value


def _tmpfs(where, size: str):
    """A real filesystem of `size` at `where` (ENOSPC is the kernel's, not a simulation),
    unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """6 MiB."""
    yield from _tmpfs(tmp_path / "small", "6m")


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


# -- a 64 MiB disk shared by all 64 shards -------------------------------------------------------

SHARDS = 64
PAYLOAD = b"p" * 50_000               # 5 records per 256 KiB segment: a message for 2 devices can straddle two
STORAGE_LINE = re.compile(r"event=(storage_full|storage_available|log_stall)\b")


@pytest.fixture
def disk_64m(tmp_path):
    """64 MiB."""
    yield from _tmpfs(tmp_path / "disk64", "64m")


def one_user_per_shard(prefix: str) -> dict:
    """{shard: a user id on it}, for every shard."""
    found, i = {}, 0
    while len(found) < SHARDS:
        found.setdefault(shard_of(f"{prefix}{i}"), f"{prefix}{i}")
        i += 1
    return found


def storage_lines(gw) -> list:
    return [line for line in gw.output if STORAGE_LINE.search(line)]


async def output_settled(gw) -> None:
    """Every line the server wrote so far has been read: a refused HELLO makes it log a
    line naming our port, after everything it logged before (one pipe, in order)."""
    raw = Raw(gw)
    port = raw.sock.getsockname()[1]
    try:
        raw.send(encode(F.Hello(version=PROTOCOL_VERSION, token="not-a-token", device="mark")))
        assert isinstance(raw.frame(), F.Error)
    finally:
        raw.close()
    deadline = time.monotonic() + 10
    while f"127.0.0.1:{port}" not in gw.text:
        assert time.monotonic() < deadline, "the server's line for the marker connection never came"
        await asyncio.sleep(0.01)


def server_failures(gw) -> str:
    """What the server logged about internal errors and exceptions (empty if nothing)."""
    text = gw.text
    at = [m.start() for m in re.finditer(r"event=internal_error|Traceback", text)]
    return "\n---\n".join(text[max(0, i - 300):i + 1500] for i in at[:3])


class SeqSender:
    """A raw sender that numbers its SENDs (PROTOCOL.md section 6). A SEND refused for
    now holds every later seq of its producer, so after one it gives up its sequence and
    starts a new one (HELLO producer 0), as section 6 allows: each refusal here is a
    shard's, not the stream's. (The SDK would instead wait and send it again.)"""

    def __init__(self, gw, user: str, device: str = "phone"):
        self.gw, self.user, self.device = gw, user, device
        self.connected = False
        self._connect()

    def _connect(self) -> None:
        self.raw = Raw(self.gw, timeout=10)
        self.raw.hello(self.gw.token(self.user), self.device, send_only=True)
        self.seq, self.connected = 0, True

    def _answer(self):
        while True:
            f = self.raw.frame()
            if isinstance(f, (F.Ack, F.Error, F.Pong)):
                return f

    async def send(self, to: str, payload: bytes, timeout: float = 10):
        self.seq += 1
        self.raw.send(encode(F.Send(self.seq, to, payload)))
        f = self._answer()
        if isinstance(f, F.Ack):
            return SendResult(f.seq, f.msg_id, f.timestamp_ms)
        assert not f.fatal, f
        self.raw.close()
        self._connect()
        raise ServerError(f.code, f.reason, f.ref)

    def same_seq_again(self, to: str, payload: bytes, n: int) -> set:
        """One refused SEND sent again `n` times in one write (as a client resending it
        would): each reaches the store. Returns the answers' codes."""
        self.seq += 1
        self.raw.send(encode(F.Send(self.seq, to, payload)) * n)
        codes = {self._answer().code for _ in range(n)}
        self.raw.close()
        self._connect()
        return codes

    async def ping(self) -> None:
        self.raw.send(encode(F.Ping(7)))
        assert self._answer() == F.Pong(7)

    def close(self) -> None:
        self.raw.close()


async def fill_until_every_shard_refuses(sender, recipients: list, limit: int = 4000) -> tuple[dict, int]:
    """SENDs round-robin (each to a recipient whose shard still takes them) until every
    one was answered STORAGE_FULL. Returns ({recipient: ACKed ids}, refusals). Any other
    answer fails the test: never INTERNAL, never a closed connection."""
    stored = {r: [] for r in recipients}
    open_ = list(recipients)
    refusals = 0
    for i in range(limit):
        if not open_:
            return stored, refusals
        r = open_[i % len(open_)]
        try:
            stored[r].append((await sender.send(r, PAYLOAD, timeout=10)).id)
        except ServerError as exc:
            assert exc.code == ErrorCode.STORAGE_FULL, exc
            assert sender.connected
            open_.remove(r)
            refusals += 1
    pytest.fail(f"the disk never filled: {sum(map(len, stored.values()))} messages stored")


async def refused_burst(sender, recipients: list, n: int) -> None:
    """`n` pipelined tries of a SEND past the limit (the size every shard refused): every
    one STORAGE_FULL, none fatal (a SEND refused for now holds the later seqs, so the
    burst is one seq sent again, as a resending client does)."""
    assert sender.same_seq_again(recipients[0], PAYLOAD, n) == {ErrorCode.STORAGE_FULL}
    await sender.ping()


async def fill_then_burst(gw, recipients: list, burst: int) -> tuple:
    """Fill every recipient's shard until it refuses, then `burst` more refused tries.
    Returns (stored, refusals, storage log lines after the fill, metrics before and after
    the burst), once the server's output has settled."""
    sender = SeqSender(gw, "sender")
    try:
        stored, refusals = await fill_until_every_shard_refuses(sender, recipients)
        await output_settled(gw)
        lines = len(storage_lines(gw))
        before = scrape(gw)
        await refused_burst(sender, recipients, burst)
        after = scrape(gw)
        await output_settled(gw)
    finally:
        sender.close()
    return stored, refusals, lines, before, after


async def receive_all(gw, user: str, ids: list, device: str = "phone") -> None:
    """The device's backlog is exactly `ids` (in order, intact); acknowledge it, and a
    new connection of the device then gets nothing."""
    async with gw.client(user, device) as c:
        got = [await c.recv(timeout=10) for _ in ids]
        assert [m.id for m in got] == ids and all(m.payload == PAYLOAD for m in got)
        await c.ack(*got)
        await c.ping()                        # the RECEIVED is processed before this PONG
    async with gw.client(user, device) as c:
        await c.ping()                        # a backlog would have come before the PONG
        with pytest.raises(asyncio.TimeoutError):
            await c.recv(timeout=0.05)


def hello_answer(gw, user: str, device: str):
    """The server's answer to a HELLO (frames built by the codec), and whether it closed."""
    raw = Raw(gw)
    try:
        raw.send(encode(F.Hello(version=PROTOCOL_VERSION, token=gw.token(user), device=device)))
        answer = raw.frame()
        if isinstance(answer, F.Error):
            _frames, closed = raw.until_eof()
            return answer, closed
        return answer, False
    finally:
        raw.close()


def register_until_the_reserve_is_used(gw, user: str, limit: int = 2000) -> int:
    """New devices of `user` (200-byte ids) connect, each setting PRIVACY, until that
    is refused: the registrations filled the active segment and went on into the
    reserve, so the shard takes no content at all. Returns the devices registered."""
    for i in range(limit):
        raw = Raw(gw)
        try:
            raw.send(encode(F.Hello(version=PROTOCOL_VERSION, token=gw.token(user), device=f"{i:04d}" + "d" * 196)))
            assert isinstance(raw.frame(), F.Welcome)
            raw.send(encode(F.Privacy(True)) + encode(F.Ping(i)))
            answers = []
            while not answers or not isinstance(answers[-1], F.Pong):
                answers.append(raw.frame())
        finally:
            raw.close()
        if len(answers) > 1:
            (error, _pong) = answers
            assert isinstance(error, F.Error) and error.code == ErrorCode.STORAGE_FULL, answers
            assert not error.fatal and error.ref == 0
            return i + 1
    pytest.fail(f"{limit} new devices of {user} and its reserve was still not in use")


async def wait_metric(gw, name: str, want, timeout: float = 30.0, **labels) -> dict:
    """Scrape /metrics until `name` is `want` (bounded); returns that scrape."""
    deadline = time.monotonic() + timeout
    while True:
        s = scrape(gw)
        if value(s, name, 0, **labels) == want:
            return s
        assert time.monotonic() < deadline, f"{name} stayed {value(s, name, 0, **labels)}, not {want}"
        await asyncio.sleep(0.1)


def test_s4_storage_full_on_a_64m_disk_with_64_shards_keeps_acks_reconnects_and_recovery(
        gateway_factory, disk_64m):
    """64 shards on a 64 MiB disk (256 KiB segments, only the reserve made ahead: 512 KiB
    per shard). SENDs past the limit get non-fatal STORAGE_FULL, a message for a user with
    two devices is refused whole or stored for both; PRIVACY and GROUP on a full shard get
    non-fatal STORAGE_FULL; what is stored is delivered and acknowledged, also after a
    restart on the full disk; a known device and a new device of a known user reconnect; a
    user on a shard with no room for a log gets STORAGE_FULL at HELLO; consuming frees the
    disk and SENDs are ACKed again; the storage lines in the log are bounded by the shards,
    not by the refusals."""
    args = ("--workers", "1", "--segment-size", "256K", "--log-spares", "0", "--max-pending", "1000000")
    data = disk_64m / "data"
    gw = gateway_factory(*args, data_dir=data)
    users = one_user_per_shard("u")
    untouched = next(s for s in users if s != shard_of("sender"))
    newcomer = users.pop(untouched)               # its shard never gets a log before the disk is full
    recipients = sorted(users.values())
    group = next(f"#g{i}" for i in range(1000) if shard_of(f"#g{i}") == shard_of(recipients[1]))

    async def fill():
        for r in recipients:                      # register their devices: 63 shard logs
            async with gw.client(r, "phone"):
                pass
        async with gw.client(recipients[0], "tablet"):
            pass
        stored, refusals, lines, before, after = await fill_then_burst(gw, recipients, 1000)
        # new devices register in the reserve; once it is in use even PRIVACY is refused
        assert register_until_the_reserve_is_used(gw, recipients[1]) > 1
        async with gw.client(recipients[2], "phone") as c:
            with pytest.raises(ServerError) as e:   # the group's shard takes no content: not created
                await c.group("create", group, members=[recipients[2]])
            assert e.value.code == ErrorCode.STORAGE_FULL
            await c.ping()                        # and the session goes on
        errors = value(scrape(gw), "errors_total", 0, code="STORAGE_FULL")
        return stored, refusals, lines, before, after, errors

    stored, refusals, lines, before, after, errors = asyncio.run(fill())
    total = sum(map(len, stored.values()))
    assert total > 400 and refusals == len(recipients)
    assert lines == refusals                      # one storage_full line per shard
    # the SENDs, the burst, the PRIVACY (its ERROR has ref 0) and the GROUP
    assert errors == refusals + 1000 + 2
    # 1000 refusals more: not one more line, and not a try at a new segment per refusal
    assert len(storage_lines(gw)) == lines <= 2 * SHARDS, storage_lines(gw)[lines:]
    tries = value(after, "log_segment_failures_total") - value(before, "log_segment_failures_total")
    assert tries < 200, tries
    assert value(after, "storage_refused_total") - value(before, "storage_refused_total") >= 1000
    assert value(after, "log_shards_full") >= len(recipients) - 1
    assert value(after, "errors_total", 0, code="INTERNAL") == 0

    # a restart on the full disk
    assert gw.stop() == 0
    gw = gateway_factory(*args, data_dir=data)
    answer, closed = hello_answer(gw, newcomer, "phone")
    assert isinstance(answer, F.Error) and answer.code == ErrorCode.STORAGE_FULL and answer.fatal and closed
    # a new device of a known user: registered in its shard's reserve, which outlived the restart
    answer, _ = hello_answer(gw, recipients[0], "laptop")
    assert isinstance(answer, F.Welcome)

    async def consume_and_send_again():
        await receive_all(gw, recipients[0], stored[recipients[0]], "tablet")   # the same messages as phone
        for r in recipients:
            await receive_all(gw, r, stored[r])
        s = await wait_metric(gw, "log_shards_full", 0)
        assert value(s, "log_unrecorded_acks") == 0
        async with gw.client("sender", "phone") as sender:
            for r in recipients:
                await sender.send(r, b"room again", timeout=10)
        async with gw.client(newcomer, "phone") as c:          # and its shard gets a log now
            await c.ping()

    asyncio.run(consume_and_send_again())
    assert gw.alive()
    assert not server_failures(gw), server_failures(gw)
    assert len(storage_lines(gw)) <= 2 * SHARDS


def test_s4_storage_full_with_2_workers_refuses_forwarded_sends_and_recovers(gateway_factory, disk_64m):
    """The same disk with 2 workers and a spare besides the reserve (768 KiB per shard): SENDs to
    recipients on the other worker are refused with STORAGE_FULL through the bus (non-fatal),
    deliveries and RECEIVED work on both workers, and consuming frees both."""
    gw = gateway_factory("--workers", "2", "--segment-size", "256K", "--log-spares", "1",
                         "--max-pending", "1000000", data_dir=disk_64m / "data")
    recipients = sorted(one_user_per_shard("w").values())
    assert {shard_of(r) % 2 for r in recipients} == {0, 1}

    async def run():
        for r in recipients:
            async with gw.client(r, "phone"):
                pass
        stored, refusals, lines, _before, _after = await fill_then_burst(gw, recipients, 500)
        async with gw.client("sender", "phone") as sender:
            assert len(storage_lines(gw)) == lines <= 2 * SHARDS, storage_lines(gw)[lines:]
            s = scrape(gw)
            assert value(s, "log_shards_full", worker=0) > 0 and value(s, "log_shards_full", worker=1) > 0
            assert value(s, "errors_total", 0, code="INTERNAL") == 0
            for r in recipients:
                await receive_all(gw, r, stored[r])
            await wait_metric(gw, "log_shards_full", 0)
            for r in recipients:
                await sender.send(r, b"room again", timeout=10)
        return stored, refusals

    stored, refusals = asyncio.run(run())
    assert sum(map(len, stored.values())) > 100 and refusals == len(recipients)
    assert not server_failures(gw), server_failures(gw)
