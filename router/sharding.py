"""Users -> virtual shards -> workers.

shard = xxh3_64(user id as UTF-8, seed 0) mod SHARDS, with SHARDS fixed (64) for
the life of a data directory; worker = shard mod WORKERS. Each shard has its own
log directory, so restarting with another worker count only changes which
process opens which shard's log: nothing stored becomes unreachable.

The hash, seed and shard count are written to DATA_DIR/layout.json on first
start and checked on every start: they never change silently. A data dir made
with another shard count (a cluster's nodes share theirs) keeps it: the count
is read from layout.json, the hash and seed must match. A data dir's shards
are split offline into a power-of-two multiple of their count by `switchboard
reshard` (gateway/reshard.py): old shard k becomes the shards k + S*j, since
xxh3 mod N mod S is xxh3 mod S; while its last renames are under way
layout.json carries the mark RESHARD_MARK and no gateway runs on it.

In a cluster a worker owns only some of its shards (`ShardMap(owned=...)`):
shards move between nodes (`take`/`give`, gateway/cluster/shardcopy.py).
"""
import json
import os
from pathlib import Path

from _core._shards import ShardMap, shard_of     # in C: asked on every SEND and receipt
from _core.log import fsync_dir

__all__ = ["ShardMap", "shard_of", "owner_of", "check_layout", "write_layout", "splits_into", "LayoutError",
           "HASH", "SEED", "DEFAULT_SHARDS", "LAYOUT_FILE", "LAYOUT_VERSION", "RESHARD_MARK"]

HASH = "xxh3_64"
SEED = 0
DEFAULT_SHARDS = 64
LAYOUT_FILE = "layout.json"
LAYOUT_VERSION = 1
#: layout.json key of a reshard past its commit whose renames are not all done
RESHARD_MARK = "reshard"


def owner_of(shard: int, workers: int) -> int:
    return shard % workers


class LayoutError(Exception):
    """The data directory was written with another sharding layout."""


def check_layout(data_dir, shards: int | None = None) -> dict:
    """Write the layout on first use; refuse to run against a different one.
    `shards` None: a new data dir gets DEFAULT_SHARDS and an existing one keeps
    the count it was made with (the returned layout says which); a number must
    match what is there."""
    path = Path(data_dir) / LAYOUT_FILE
    want = {"version": LAYOUT_VERSION, "hash": HASH, "seed": SEED,
            "shards": DEFAULT_SHARDS if shards is None else shards}
    try:
        have = json.loads(path.read_text())
    except FileNotFoundError:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        write_layout(data_dir, want)
        return want
    except ValueError as exc:
        raise LayoutError(f"{path} is not valid JSON: {exc}") from None
    if isinstance(have, dict) and RESHARD_MARK in have:
        raise LayoutError(f"{path}: a reshard to {have.get('shards')} shards was interrupted after its commit; "
                          f"finish it with `switchboard reshard --data-dir {data_dir} --shards {have.get('shards')}` "
                          "(a gateway's start also finishes it)")
    if shards is None and isinstance(have, dict) and isinstance(have.get("shards"), int) and have["shards"] >= 1:
        want["shards"] = have["shards"]
    if have != want:
        hint = ""
        if isinstance(have, dict) and have.get("shards") != shards:
            hint = f"; this data dir has {have.get('shards')} shards and the cluster's map has {shards}: "
            if splits_into(have.get("shards"), shards):
                hint += (f"stop the gateway and split them first with `switchboard reshard --data-dir {data_dir} "
                         f"--shards {shards}` (docs/cluster.md, Carrying a data dir over)")
            else:
                hint += ("shards can only be split into a power-of-two multiple of their count "
                         "(docs/cluster.md, Carrying a data dir over)")
        raise LayoutError(f"{path} says {have}, this server uses {want}: the user -> shard map would "
                          f"change and stored messages would land on the wrong shard{hint}")
    return have


def splits_into(have, shards) -> bool:
    """Whether a data dir of `have` shards can be split into `shards` (reshard): a
    power-of-two multiple of it, itself a power of two."""
    return (isinstance(have, int) and isinstance(shards, int) and 1 <= have < shards
            and shards % have == 0 and not shards & (shards - 1) and not (shards // have) & (shards // have - 1))


def write_layout(data_dir, layout: dict) -> None:
    """Replace layout.json in one step: written beside it, fsynced, renamed over
    it, the directory fsynced (a crash leaves the old file or the new one)."""
    path = Path(data_dir) / LAYOUT_FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")      # the workers of a new node may race here
    tmp.write_text(json.dumps(layout) + "\n")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fsync_dir(path.parent)
