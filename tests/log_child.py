"""Child process for tests/test_log_crash.py: a real AppendLog on a real event
loop, appending (and consuming) until the parent kills it with SIGKILL.

    python tests/log_child.py DIR DURABILITY MODE SEED MAX_ITERATIONS

MODE is "small" (small payloads; consumes two of every three appends, oldest
first, calls maintain() so segments get deleted and compacted under the kills)
or "large" (about 60 KiB payloads, appended 8 per loop turn with one commit and
no consumes: the child spends most of its time copying records into the
mapping, so a kill often lands in the middle of one).

Protocol on stdout, one line each, flushed:
    IN_USE <pid>            open() was refused: another process (pid) holds the directory; exit 4
    READY <last_id>         after open() and start()
    ACK <msg_id>            after commit(then, arg) called `then` for that append
    TRY <msg_id>            just before consume() of an earlier message
    CONSUMED <msg_id>       after the commit that follows that consume
    DONE                    the iteration limit was reached (the parent kills before)

Message contents are a pure function of the id (`expected_message`), so the
parent can check every recovered byte without being told what was written.
"""
import asyncio
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _core.errors import DataDirInUse  # noqa: E402
from _core.log import AppendLog, LogConfig, now_ms  # noqa: E402

RECIPIENTS = 5
LARGE_PAYLOAD = 60 << 10
LARGE_BATCH = 8
_BLOCK = random.Random(0).randbytes(LARGE_PAYLOAD)


def config(durability: str, mode: str = "small") -> LogConfig:
    """Small segments for "small": a few hundred records each, so that consumed ones are
    deleted and their files recycled (docs/storage.md, Recycling) between the kills."""
    return LogConfig(segment_size=256 << 10 if mode == "small" else 1 << 20, durability=durability,
                     max_pending=100_000, interval_ms=50)


def expected_message(msg_id: int, mode: str) -> tuple[str, str, str, int, bytes]:
    """(recipient, sender, sender_device, client_id, payload) of message `msg_id`."""
    if mode == "large":     # cheap to make: the time goes into the log's copy, not here
        size = LARGE_PAYLOAD - msg_id % 64
        payload = msg_id.to_bytes(8, "big") + _BLOCK[msg_id % 61:][:size - 8]
    else:
        rng = random.Random(msg_id)
        payload = rng.randbytes(rng.randrange(0, 1200))
    return (f"user{msg_id % RECIPIENTS}", f"sender{msg_id % 3}", "dev", msg_id & 0xFFFF_FFFF, payload)


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(directory: str, durability: str, mode: str, seed: int, iterations: int) -> None:
    loop = asyncio.get_running_loop()
    log = AppendLog(directory, config(durability, mode))
    try:
        log.open()
    except DataDirInUse as exc:
        emit(f"IN_USE {exc.pid}")
        sys.exit(4)
    log.start(loop)
    emit(f"READY {log.last_id()}")
    rng = random.Random(seed)
    pool = []                                        # (msg_id, recipient), oldest first
    for r in log.recipients():
        pool.extend((mid, r) for mid, _loc in log.pending_locations(r))
    pool.sort()
    pool_head = 0
    last = log.last_id()

    async def committed(what: str) -> None:
        fut = loop.create_future()
        log.commit(fut.set_result, what)
        emit(await asyncio.wait_for(fut, 30))

    if mode == "large":
        for _ in range(iterations):
            batch = []
            for _ in range(LARGE_BATCH):
                msg_id = last = max(last + 1, now_ms() << 22)
                recipient, sender, device, client_id, payload = expected_message(msg_id, mode)
                log.append(recipient, msg_id, msg_id >> 22, sender, device, payload, client_id)
                batch.append(msg_id)
            await committed("\n".join(f"ACK {m}" for m in batch))
            await asyncio.sleep(0)
        emit("DONE")
        log.close()
        return

    for i in range(iterations):
        msg_id = max(last + 1, now_ms() << 22)       # the router's id shape: (ms << 22) | seq
        last = msg_id
        recipient, sender, device, client_id, payload = expected_message(msg_id, mode)
        log.append(recipient, msg_id, msg_id >> 22, sender, device, payload, client_id)
        await committed(f"ACK {msg_id}")
        pool.append((msg_id, recipient))
        if mode == "small" and i % 3 != 0 and pool_head < len(pool) - 1:
            old_id, old_recipient = pool[pool_head]
            pool_head += 1
            emit(f"TRY {old_id}")
            if rng.random() < 0.2:
                log.consume_through(old_recipient, old_id)   # the oldest of that recipient: just it
            else:
                log.consume(old_recipient, [old_id])
            await committed(f"CONSUMED {old_id}")
        if mode == "small" and i % 40 == 39:
            log.maintain()
        await asyncio.sleep(0)                       # let the worker's results (spare segments) in
    emit("DONE")
    log.close()


if __name__ == "__main__":
    d, durability, mode, seed, iterations = sys.argv[1:6]
    asyncio.run(main(d, durability, mode, int(seed), int(iterations)))
