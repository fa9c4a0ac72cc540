"""One writer per data dir (issue 12, defect 11). A gateway's data dir and each
shard log in it are locked by the process that writes them, with locks that die
with the process (`_core/dirlock.py`): a second gateway, a second embedder or a
log written before it was recovered is refused with a clear error and nothing
stored is touched; the successor of a kill -9'd worker, and a gateway started
while its predecessor drains, take the shards over. Real processes, files and
sockets throughout."""
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from _core.dirlock import DirLock
from _core.errors import DataDirInUse, LogNotOpen
from _core.log import AppendLog, ShardedLog, now_ms
from router.sharding import ShardMap, shard_of

from conftest import ROOT
from log_child import config
from test_log_crash import Child, check_messages, recover
from test_workers import users_on, wait_for


def shard_dir(data_dir, user: str):
    return data_dir / "log" / f"shard-{shard_of(user):04d}"


def serve_cmd(data_dir, *args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", "serve", "--port", "0", "--ws-port", "off", "--admin-port", "off",
            "--segment-size", "2M", "--data-dir", str(data_dir), *args]


class Acks:
    """What a log_child reported, kept the way test_log_crash checks it: acked and
    not tried is certainly pending; confirmed consumes never come back."""

    def __init__(self, child: Child):
        self.child = child
        self.acked, self.tried, self.done = [], set(), set()

    def take(self, line: str) -> None:
        kind, value = line.split()
        {"ACK": self.acked.append, "TRY": self.tried.add, "CONSUMED": self.done.add}[kind](int(value))

    def read_acks(self, n: int) -> None:
        """Read until `n` more messages were ACKed (bounded by the child's line timeout)."""
        goal = len(self.acked) + n
        while len(self.acked) < goal:
            self.take(self.child.readline())

    def kill_and_check(self, directory) -> dict:
        status, rest = self.child.kill9()
        assert status == -signal.SIGKILL
        for line in rest:
            self.take(line)
        _report, pending, _last, _, _ = recover(directory, "never")
        check_messages(pending, "small")
        missing = set(self.acked) - self.tried - pending.keys()
        assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
        assert not (self.done & pending.keys()), "consumed messages came back"
        return pending


# -- the log: nothing written before recovery, one process per directory ----------------------

def test_a_log_written_before_open_is_refused_and_keeps_its_segments(tmp_path):
    """An AppendLog that never ran open() numbered its first segment 1 and renamed
    it over the stored one: every message in it was gone."""
    d = tmp_path / "log"
    first = AppendLog(d, config("never"))
    first.open()
    ids = [(now_ms() << 22) + i for i in range(1, 51)]
    for mid in ids:
        first.append("bob", mid, mid >> 22, "alice", "phone", b"kept %d" % mid)
    first.close()
    before = {p.name: p.read_bytes() for p in d.glob("*.seg")}
    assert before

    unopened = AppendLog(d, config("never"))
    with pytest.raises(LogNotOpen, match="call open"):
        unopened.append("bob", ids[-1] + 1, ids[-1] >> 22, "mallory", "x", b"over segment 1")
    with pytest.raises(LogNotOpen):
        unopened.meta_put("d\x00bob\x00phone", b"\x00" * 8)

    async def start():
        unopened.start(asyncio.get_running_loop())
    with pytest.raises(LogNotOpen):
        asyncio.run(start())
    unopened.close()
    assert {p.name: p.read_bytes() for p in d.glob("*.seg")} == before

    again = AppendLog(d, config("never"))
    again.open()
    assert [m.msg_id for m in again.pending("bob")] == ids
    again.close()
    with pytest.raises(LogNotOpen, match="closed"):
        again.open()


def test_a_second_process_cannot_open_or_wipe_a_log_in_use(tmp_path):
    """Two embedder processes on one directory both appended to the same segments
    (0-327 of ~600 ACKed messages survived). Now the second is refused with the
    holder's pid, and the first keeps every message it ACKed."""
    d = tmp_path / "log"
    holder = Acks(Child(d, "never", "small", 7, 1_000_000, tmp_path / "holder.err"))
    second = None
    try:
        assert holder.child.readline().startswith("READY ")
        holder.read_acks(100)

        # another embedder process: refused, exit 4, nothing written
        second = Child(d, "never", "small", 8, 10, tmp_path / "second.err")
        assert second.readline() == f"IN_USE {holder.child.proc.pid}"
        assert second.proc.wait(20) == 4

        # this process too: a clear exception naming the directory and the holder
        log = AppendLog(d, config("never"))
        with pytest.raises(DataDirInUse) as refused:
            log.open()
        assert refused.value.pid == holder.child.proc.pid and refused.value.directory == str(d)
        assert str(refused.value) == f"{d} is in use by another process (pid {holder.child.proc.pid})"
        with pytest.raises(LogNotOpen):          # and a refused log cannot be written either
            log.append("bob", now_ms() << 22, now_ms(), "mallory", "x", b"over the holder's segment")
        log.close()

        holder.read_acks(100)                    # the holder never noticed
        pending = holder.kill_and_check(d)       # the lock died with it: recover() could open the log
        assert pending
    finally:
        holder.child.cleanup()
        if second is not None:
            second.cleanup()


def test_a_sharded_log_refuses_waits_for_and_takes_over_a_held_shard(tmp_path):
    root = tmp_path / "log"
    owned = ShardMap(64, 2, 0).owned_shards()
    held = owned[3]
    held_dir = root / f"shard-{held:04d}"
    holder = Acks(Child(held_dir, "never", "small", 9, 1_000_000, tmp_path / "holder.err"))
    try:
        assert holder.child.readline().startswith("READY ")
        holder.read_acks(50)

        # no wait: refused at once, naming the shard and its holder; nothing stays locked
        with pytest.raises(DataDirInUse) as refused:
            ShardedLog(root, config("never"), ShardMap(64, 2, 0)).open()
        assert (refused.value.directory, refused.value.pid) == (str(held_dir), holder.child.proc.pid)
        for shard in owned:
            if shard != held:
                lock = DirLock(root / f"shard-{shard:04d}")
                assert lock.try_acquire(), f"shard {shard} was left locked"
                lock.release()

        # a wait that is cancelled (the worker's supervisor died) gives up at once
        started = time.monotonic()
        with pytest.raises(DataDirInUse):
            ShardedLog(root, config("never"), ShardMap(64, 2, 0), lock_wait=60).open(cancelled=lambda: True)
        assert time.monotonic() - started < 10

        # with a wait: the free shards first, the held one once its holder dies
        sharded = ShardedLog(root, config("never"), ShardMap(64, 2, 0), lock_wait=60)
        waiting = threading.Event()
        result = {}

        def is_waiting():                        # polled only while a shard is held elsewhere
            waiting.set()
            return False

        def open_it():
            try:
                result["report"] = sharded.open(cancelled=is_waiting)
            except BaseException as exc:         # handed to the test thread
                result["error"] = exc
        opener = threading.Thread(target=open_it)
        opener.start()
        assert waiting.wait(20), "open() did not wait for the held shard"
        assert set(sharded.locks) == set(owned) - {held}
        holder.read_acks(50)                     # the holder still appends meanwhile
        status, rest = holder.child.kill9()
        assert status == -signal.SIGKILL
        for line in rest:
            holder.take(line)
        opener.join(30)
        assert not opener.is_alive() and "error" not in result, result
        assert set(sharded.locks) == set(owned)
        recovered = sharded.reports[held].pending
        sharded.close()
    finally:
        holder.child.cleanup()
    _report, pending, _last, _, _ = recover(held_dir, "never")
    check_messages(pending, "small")
    assert recovered == len(pending)
    assert not (set(holder.acked) - holder.tried - pending.keys()), "acknowledged messages lost"


# -- the gateway: one per data dir, shards handed over ---------------------------------------

async def _send(gw, sender: str, to: list[str], n: int, tag: str) -> dict:
    async with gw.client(sender, send_only=True) as s:
        return {u: [(await s.send(u, f"{tag} {i}")).id for i in range(n)] for u in to}


async def _receive_exactly(gw, expect: dict) -> None:
    for user, ids in expect.items():
        async with gw.client(user, max_backoff=0.3) as c:
            got = [await c.recv(timeout=20) for _ in ids]
            await c.ack(*got)
            await c.ping()                   # the PONG comes after any backlog
            with pytest.raises(asyncio.TimeoutError):
                await c.recv(timeout=0.01)
        assert sorted(m.id for m in got) == sorted(ids), user


def test_a_second_serve_on_the_same_data_dir_exits_4_with_one_line(gateway_factory):
    gw = gateway_factory("--workers", "2", "--ws-port", "off")
    bob = "lk-bob"
    first = asyncio.run(_send(gw, "lk-alice", [bob], 20, "before"))
    out = subprocess.run(serve_cmd(gw.data_dir, "--workers", "2"), cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    assert out.returncode == 4, lines
    assert lines == [f"switchboard: data dir {os.path.abspath(gw.data_dir)} is in use by another gateway "
                     f"(pid {gw.proc.pid}); stop or drain it first, or give another --data-dir"]
    assert gw.alive()
    second = asyncio.run(_send(gw, "lk-alice", [bob], 20, "after"))
    asyncio.run(_receive_exactly(gw, {bob: first[bob] + second[bob]}))


def test_kill_9_of_a_worker_frees_its_shards_for_the_restarted_worker(gateway_factory):
    gw = gateway_factory("--workers", "2", "--ws-port", "off")
    (bob,) = users_on(1, 2, 1, "lk-k")
    lock_file = shard_dir(gw.data_dir, bob) / "LOCK"
    old = gw.worker_pids()[1]
    sent = asyncio.run(_send(gw, "lk-sender", [bob], 30, "before the kill"))
    assert lock_file.read_text().split() == [str(old)]
    mark = len(gw.text)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: gw.worker_pids().get(1, old) != old and "event=worker_ready worker=1" in gw.text[mark:],
             "worker 1 restarted", timeout=30)
    assert lock_file.read_text().split() == [str(gw.worker_pids()[1])]
    assert "event=shard_lock_wait" not in gw.text     # the kernel let go of the dead worker's locks
    asyncio.run(_receive_exactly(gw, sent))


def test_a_successor_started_during_a_drain_takes_the_shards_as_the_old_workers_exit(gateway_factory):
    """The drained supervisor lets go of the data dir when its listeners close; the
    successor's workers wait for each shard until the old worker holding it exits.
    Old worker 1 is frozen (SIGSTOP) until the successor says it is waiting, so
    the hand-over is seen every time."""
    gw = gateway_factory("--workers", "2", "--ws-port", "off")
    users = users_on(0, 2, 2, "lk-d0-") + users_on(1, 2, 2, "lk-d1-")
    sent = asyncio.run(_send(gw, "lk-dsender", users, 10, "stored"))
    anchors = users_on(0, 2, 2, "lk-a0-") + users_on(1, 2, 2, "lk-a1-")
    old1 = gw.worker_pids()[1]
    resumed = []

    def resume_old_worker(line: str) -> None:
        if "event=shard_lock_wait" in line and not resumed:
            resumed.append(line)
            os.kill(old1, signal.SIGCONT)

    async def main():
        # sessions to tell, one per worker per batch, 2 s apart: the old workers are
        # still draining when the successor starts
        clients = [gw.client(u, max_backoff=0.3) for u in anchors]
        for c in clients:
            await c.connect()
        out = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gateway", "drain", "--admin-port", str(gw.admin_port),
                             "--batch", "2", "--pause", "2"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        os.kill(old1, signal.SIGSTOP)
        try:
            successor = await asyncio.to_thread(
                gateway_factory, "--workers", "2", "--port", str(gw.port), "--ws-port", "off", "--admin-port", "0",
                data_dir=gw.data_dir, on_line=resume_old_worker)
        finally:
            if not resumed:                      # never left frozen, whatever happened
                os.kill(old1, signal.SIGCONT)
        assert resumed, "the successor never waited for the old worker's shards"
        assert await asyncio.to_thread(gw.proc.wait, 30) == 0
        assert "event=data_dir_released reason=drain" in gw.text
        assert "event=shard_locks_taken" in successor.text
        for shard_lock in (gw.data_dir / "log").glob("shard-*/LOCK"):
            assert int(shard_lock.read_text()) in successor.worker_pids().values(), shard_lock
        for c in clients:
            await c.close()
        await _receive_exactly(successor, sent)

    asyncio.run(main())


def test_a_gateway_gives_up_on_a_shard_an_embedder_holds_after_lock_wait(tmp_path):
    data = tmp_path / "data"
    held_dir = data / "log" / "shard-0005"
    holder = Acks(Child(held_dir, "never", "small", 11, 1_000_000, tmp_path / "holder.err"))
    proc = None
    try:
        assert holder.child.readline().startswith("READY ")
        holder.read_acks(20)
        proc = subprocess.Popen(serve_cmd(data, "--workers", "1", "--lock-wait", "0.5"), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 4, out
        assert f"event=shard_lock_wait dir={data / 'log'} shards=1 held_by={holder.child.proc.pid}" in out
        assert (f"event=cannot_start worker=0 reason=shard_log_in_use dir={held_dir} "
                f"held_by={holder.child.proc.pid}") in out
        assert "listening on" not in out and "Traceback" not in out
        holder.read_acks(20)                     # the embedder kept its log
        holder.kill_and_check(held_dir)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        holder.child.cleanup()


def test_a_worker_waiting_for_a_shard_gives_its_shards_back_when_its_supervisor_dies(tmp_path):
    """kill -9 of the supervisor while its worker waits for a held shard: the worker
    stops waiting and exits, so the shards it had taken are not kept from the
    next gateway for lock_wait seconds."""
    data = tmp_path / "data"
    held_dir = data / "log" / "shard-0005"
    holder = Child(held_dir, "never", "small", 12, 1_000_000, tmp_path / "holder.err")
    proc = None
    try:
        assert holder.readline().startswith("READY ")
        proc = subprocess.Popen(serve_cmd(data, "--workers", "1"), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        worker = None
        for line in proc.stdout:                 # ends at EOF: the gateway would have exited
            if "event=worker_started" in line:
                worker = int(line.split("pid=")[1].split()[0])
            if "event=shard_lock_wait" in line:
                break
        assert worker is not None, "no worker started"
        free = DirLock(data / "log" / "shard-0006")
        assert not free.try_acquire()            # the waiting worker has taken the free shards
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: not os.path.exists(f"/proc/{worker}") or
                 open(f"/proc/{worker}/stat").read().split()[2] == "Z", "the orphaned worker to exit")
        assert free.try_acquire()
        free.release()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        holder.cleanup()


def test_serve_on_a_data_dir_it_cannot_lock_is_one_line_and_exit_1(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    out = subprocess.run(serve_cmd(not_a_dir), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert (out.stdout + out.stderr).splitlines() == [f"switchboard: cannot lock data dir {not_a_dir}: File exists"]
