"""Which node owns each virtual shard: one key, `map`, in the JetStream KV bucket
`NAME_map`, changed only by compare-and-swap on its revision.

The key's revision is the cluster's **map epoch**. Every cross-node frame carries
the epoch its sender routed by, and each shard records `since`, the epoch at
which it got its current owner: a receiver serves a frame for shard S only if it
owns S, S is not moving, and the sender's epoch is at least since[S]. A node
acting on an older map is refused (and retries once its map catches up), never
obeyed. Views only move forward: a watch update older than the view held is
ignored, so JetStream KV's lack of read-your-writes (a get may be served by a
replica that is behind) cannot take a node back in time; our own writes take
effect from the revision the CAS returned.

With replication (setting `replicas` > 1, gateway/cluster/replication.py)
each shard also lists its **in-sync replicas** (`replicas[S]`: nodes holding
every record the owner ACKed, the only ones allowed to take S over) and the
nodes still **catching up** (`catching[S]`: streaming a snapshot, promoted to
in-sync by the owner once they hold everything), and the nodes whose disk
refused a replica's write (`full`: no copy is placed on them until they have
room again). These change without changing `since`: only a new owner does.

One key for the whole map (a few KB at 1,024 shards) keeps every change atomic —
a batch of shard moves is one CAS — and makes each revision exactly the previous
one plus one, since nothing else is written to the bucket.
"""
import asyncio
import json
from dataclasses import dataclass, field

import xxhash

from .. import log
from .buckets import open_bucket

_log = log.get("switchboard.cluster")
KEY = "map"


def hrw_owner(shard: int, nodes) -> str:
    """Rendezvous hashing: the node with the highest hash for this shard. A node
    that joins or leaves moves only the shards it wins or held."""
    return max(nodes, key=lambda n: xxhash.xxh3_64_intdigest(f"{n}/{shard}".encode()))


def hrw_rank(shard: int, nodes) -> list:
    """All `nodes` in rendezvous order for this shard (the owner's first choice first):
    replicas are placed down this list, so a node joining moves few of them."""
    return sorted(nodes, key=lambda n: xxhash.xxh3_64_intdigest(f"{n}/{shard}".encode()), reverse=True)


@dataclass
class MapView:
    epoch: int
    shards: int
    owner: list               # shard -> node name
    since: list               # shard -> epoch at which it got that owner
    moving: dict = field(default_factory=dict)    # shard -> node it is being handed to
    replicas: dict = field(default_factory=dict)  # shard -> [node, ...] in sync (may take over), in order
    catching: dict = field(default_factory=dict)  # shard -> [node, ...] catching up
    full: list = field(default_factory=list)      # nodes whose disk refused a replica's write: no copies placed

    def copy(self) -> "MapView":
        return MapView(self.epoch, self.shards, list(self.owner), list(self.since), dict(self.moving),
                       {s: list(v) for s, v in self.replicas.items() if v},
                       {s: list(v) for s, v in self.catching.items() if v}, list(self.full))

    def encode(self) -> bytes:
        """Format 1 without replicas (what a cluster of R=1 always wrote), 2 with them."""
        nodes = sorted(set(self.owner) | set(self.moving.values()))
        index = {n: i for i, n in enumerate(nodes)}
        d = {"v": 1, "shards": self.shards, "hash": "xxh3_64", "seed": 0, "nodes": nodes,
             "owner": [index[n] for n in self.owner], "since": self.since,
             "moving": {str(s): n for s, n in self.moving.items()}}
        replicas = {str(s): v for s, v in self.replicas.items() if v}
        catching = {str(s): v for s, v in self.catching.items() if v}
        if replicas or catching or self.full:
            d.update(v=2, replicas=replicas, catching=catching)
        if self.full:
            d["full"] = sorted(self.full)
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, epoch: int, raw: bytes) -> "MapView":
        d = json.loads(raw)
        if d.get("v") not in (1, 2) or d.get("hash") != "xxh3_64" or d.get("seed") != 0:
            raise ValueError(f"unknown shard map format: v={d.get('v')} hash={d.get('hash')}")
        nodes = d["nodes"]
        return cls(epoch, d["shards"], [nodes[i] for i in d["owner"]], d["since"],
                   {int(s): n for s, n in d.get("moving", {}).items()},
                   {int(s): list(v) for s, v in d.get("replicas", {}).items()},
                   {int(s): list(v) for s, v in d.get("catching", {}).items()}, list(d.get("full", ())))

    def copies(self, s: int) -> list[str]:
        """Every node holding or getting shard s: owner, in-sync replicas, catching up."""
        return [self.owner[s], *self.replicas.get(s, ()), *self.catching.get(s, ())]

    def replica_shards(self, node: str) -> list[int]:
        """Shards `node` holds a replica of (in sync or catching up)."""
        out = {s for s, v in self.replicas.items() if node in v}
        out.update(s for s, v in self.catching.items() if node in v)
        return sorted(out)

    def shards_of(self, node: str) -> list[int]:
        return [s for s, n in enumerate(self.owner) if n == node]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.owner:
            out[n] = out.get(n, 0) + 1
        return out


class MapConflict(Exception):
    """The map changed under a compare-and-swap more times than we retried."""


class ClusterMap:
    def __init__(self, js, cluster: str):
        self.js = js
        self.bucket = f"{cluster}_map"
        self.kv = None
        self.view: MapView | None = None
        self.on_change = None          # callable(old view, new view)
        self._task = None
        self._caught_up = asyncio.Event()

    async def open(self, shards: int, bootstrap: list[str]) -> MapView:
        """The map, made on first use: shards spread over `bootstrap` by rendezvous
        hashing (all on the first node if none is named)."""
        import nats.js.errors as e
        self.kv = await open_bucket(self.js, self.bucket, history=1, direct=False)
        try:
            entry = await self.kv.get(KEY)
            self._apply(MapView.decode(entry.revision, entry.value))
        except e.KeyNotFoundError:
            owner = [hrw_owner(s, bootstrap) for s in range(shards)]
            fresh = MapView(0, shards, owner, [1] * shards)
            try:
                rev = await self.kv.create(KEY, fresh.encode())
                fresh.epoch = rev
                fresh.since = [rev] * shards
                _log.info("event=shard_map_created shards=%d nodes=%s epoch=%d", shards, ",".join(bootstrap), rev)
                self._apply(fresh)
            except e.KeyWrongLastSequenceError:       # another node made it first
                entry = await self.kv.get(KEY)
                self._apply(MapView.decode(entry.revision, entry.value))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())
        return self.view

    def _apply(self, view: MapView) -> bool:
        if self.view is not None and view.epoch <= self.view.epoch:
            return False                      # never back in time
        old, self.view = self.view, view
        if old is not None and self.on_change is not None:
            self.on_change(old, view)
        return True

    async def _watch(self) -> None:
        while True:
            try:
                watcher = await self.kv.watch(KEY)
                async for entry in watcher:
                    if entry is None:
                        self._caught_up.set()
                        continue
                    if entry.operation is None and entry.value:
                        self._apply(MapView.decode(entry.revision, entry.value))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("event=map_watch_failed error=%s", log.q(repr(exc)))
                await asyncio.sleep(0.5)

    async def refresh(self) -> MapView:
        """Read the map from the stream's leader (not a replica)."""
        entry = await self.kv.get(KEY)
        self._apply(MapView.decode(entry.revision, entry.value))
        return self.view

    async def change(self, mutate, attempts: int = 20) -> MapView | None:
        """Compare-and-swap: `mutate(view)` returns {shard: new owner} and/or edits
        `moving` on the copy it is given, or None for no change. Shards whose owner
        changes get since = the new epoch. Retried on a conflict with a fresh read."""
        import nats.js.errors as e
        for _ in range(attempts):
            base = self.view
            draft = base.copy()
            owners = mutate(draft)
            if owners is None:
                return None
            new_epoch = base.epoch + 1
            for s, n in owners.items():
                if draft.owner[s] != n:
                    draft.owner[s] = n
                    draft.since[s] = new_epoch
            try:
                rev = await self.kv.update(KEY, draft.encode(), last=base.epoch)
            except e.KeyWrongLastSequenceError:
                await self.refresh()
                continue
            if rev != new_epoch:
                _log.warning("event=map_epoch_skipped expected=%d got=%d", new_epoch, rev)
                draft.since = [rev if v == new_epoch else v for v in draft.since]
            draft.epoch = rev
            self._apply(draft)
            return draft
        raise MapConflict(f"the shard map changed {attempts} times under one update")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
