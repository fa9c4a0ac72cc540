"""Child process for tests/test_shard_move.py: imports a shard's chunks
(gateway/cluster/shardcopy.py) and tells the parent, on stdout, when it has
reached the point where the parent SIGKILLs it; then it waits to be killed.

    python tests/shard_import_child.py LOG_ROOT SHARD CHUNKS_FILE POINT

CHUNKS_FILE: the chunks, each as a u32 length and its bytes. POINT:
    half       after half of the chunks were fed
    tomb       inside finish(), right after a stale shard-NNNN was renamed to
               its tombstone (before the new copy is renamed into place)
    installed  after finish() returned
Protocol: one line `AT POINT` when there, flushed; the child then blocks.
"""
import os
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.cluster import shardcopy  # noqa: E402


def read_chunks(path) -> list:
    data = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("!I", data, pos)
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


def at(point: str) -> None:
    sys.stdout.write(f"AT {point}\n")
    sys.stdout.flush()
    sys.stdin.read()          # until killed (the parent never closes it first)


def main() -> None:
    root, shard, chunks_file, point = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    chunks = read_chunks(chunks_file)
    if point == "tomb":
        rename = os.rename

        def pausing_rename(src, dst):       # the kill lands between the two renames of finish()
            rename(src, dst)
            if ".tomb-" in str(dst):
                at(point)
        os.rename = pausing_rename
    imp = shardcopy.ShardImport(root, shard)
    for i, chunk in enumerate(chunks):
        if point == "half" and i == len(chunks) // 2:
            at(point)
        imp.feed(chunk)
    imp.finish()
    at(point)


if __name__ == "__main__":
    main()
