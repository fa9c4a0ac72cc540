"""Users -> virtual shards -> workers.

shard = xxh3_64(user id as UTF-8, seed 0) mod SHARDS, with SHARDS fixed (64) for
the life of a data directory; worker = shard mod WORKERS. Each shard has its own
log directory, so restarting with another worker count only changes which
process opens which shard's log: nothing stored becomes unreachable.

The hash, seed and shard count are written to DATA_DIR/layout.json on first
start and checked on every start: they never change silently.
"""
import json
import os
from pathlib import Path

import xxhash

HASH = "xxh3_64"
SEED = 0
DEFAULT_SHARDS = 64
LAYOUT_FILE = "layout.json"
LAYOUT_VERSION = 1


def shard_of(user: str, shards: int = DEFAULT_SHARDS) -> int:
    return xxhash.xxh3_64_intdigest(user.encode("utf-8"), seed=SEED) % shards


def owner_of(shard: int, workers: int) -> int:
    return shard % workers


class LayoutError(Exception):
    """The data directory was written with another sharding layout."""


def check_layout(data_dir, shards: int = DEFAULT_SHARDS) -> dict:
    """Write the layout on first use; refuse to run against a different one."""
    path = Path(data_dir) / LAYOUT_FILE
    want = {"version": LAYOUT_VERSION, "hash": HASH, "seed": SEED, "shards": shards}
    try:
        have = json.loads(path.read_text())
    except FileNotFoundError:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")      # the workers of a new node may race here
        tmp.write_text(json.dumps(want) + "\n")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.rename(tmp, path)
        return want
    except ValueError as exc:
        raise LayoutError(f"{path} is not valid JSON: {exc}") from None
    if have != want:
        hint = ""
        if have.get("shards") != shards:
            hint = (f"; this data dir was made with {have.get('shards')} shards and the cluster's map has {shards}: "
                    "see docs/cluster.md, Carrying a data dir over")
        raise LayoutError(f"{path} says {have}, this server uses {want}: the user -> shard map would "
                          f"change and stored messages would land on the wrong shard{hint}")
    return have


class ShardMap:
    """Which shard a user is on and which worker owns it, with a bounded cache
    of recently routed users (a hash per routed message would cost more than the
    dict lookup; 8,192 entries, not one per connected user: idle sessions would
    pay ~40 bytes each for it)."""

    __slots__ = ("shards", "workers", "me", "_cache", "_limit")

    def __init__(self, shards: int = DEFAULT_SHARDS, workers: int = 1, me: int = 0, cache_limit: int = 1 << 13):
        if not (1 <= workers <= shards):
            raise ValueError(f"workers must be between 1 and {shards} (the number of shards)")
        self.shards, self.workers, self.me = shards, workers, me
        self._cache: dict[str, int] = {}
        self._limit = cache_limit

    def shard(self, user: str) -> int:
        s = self._cache.get(user)
        if s is None:
            if len(self._cache) >= self._limit:
                self._cache.clear()
            s = self._cache[user] = shard_of(user, self.shards)
        return s

    def owner(self, user: str) -> int:
        return self.shard(user) % self.workers

    def owner_uncached(self, user: str) -> int:
        """For once-per-connection questions (HELLO): caching every connected
        user would cost ~40 bytes per idle session."""
        s = self._cache.get(user)
        return (s if s is not None else shard_of(user, self.shards)) % self.workers

    def is_local(self, user: str) -> bool:
        return self.shard(user) % self.workers == self.me

    def owned_shards(self) -> list[int]:
        return [s for s in range(self.shards) if s % self.workers == self.me]
