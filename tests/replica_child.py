"""Child process for tests/test_replica.py's kill -9 test: a ReplicaLog applying
the batches its parent (the owner) sends, until the parent kills it with SIGKILL.

    python tests/replica_child.py DIR EPOCH

stdin: frames, a u32 length then an encoded batch (_core.replica.encode); a
length of 0 closes the replica and exits.
stdout, one line each, flushed:
    READY <holdings>    after open(): JSON {segment id: [end, header hex, digest]}
    APPLIED <n>         batch n (from 1) was applied and synced (recorded)
    REFUSED <n> <why>   batch n was refused (ChangeRefused): nothing of it applied
"""
import json
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _core.errors import ChangeRefused  # noqa: E402
from _core.replica import ReplicaLog, decode  # noqa: E402


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def read_exact(stream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            raise EOFError("the parent closed the pipe")
        data += chunk
    return data


def main(directory: str, epoch: int) -> None:
    replica = ReplicaLog(directory)
    replica.open()
    emit("READY " + json.dumps({sid: [h.end, h.header.hex(), h.digest] for sid, h in replica.holdings().items()}))
    stdin = sys.stdin.buffer
    n = 0
    while True:
        (length,) = struct.unpack("!I", read_exact(stdin, 4))
        if length == 0:
            break
        batch = decode(read_exact(stdin, length))
        n += 1
        try:
            replica.apply(batch, epoch)
        except ChangeRefused as exc:
            emit(f"REFUSED {n} {exc}")
            continue
        replica.sync()
        emit(f"APPLIED {n}")
    replica.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
