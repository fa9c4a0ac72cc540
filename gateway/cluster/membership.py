"""Who is in the cluster: one lease per node in the JetStream KV bucket
`NAME_nodes`, nothing else.

A lease is the key `n.NODE` whose value says how to reach the node (advertised
addresses, worker count, draining). The bucket's max age is the lease time, so a
key that is not renewed disappears (a MaxAge marker tells watchers at once); the
holder renews by compare-and-swap on its own last revision every third of the
lease, so a second process with the same node name cannot renew it: it loses the
lease instead, and stops serving. Worker 0 of a node holds the lease; every
worker watches all of them.

Liveness is judged locally too: a node whose lease was not renewed within the
lease time is treated as gone even if no marker arrived (markers are only as
timely as this worker's NATS connection).
"""
import asyncio
import json
import os
import time

from .. import log
from .buckets import open_bucket

_log = log.get("switchboard.cluster")
RENEW_LOG_EVERY = 30        # while renewals keep failing (NATS away): a log line per 30 of them


def _errors():
    import nats.js.errors as e
    return e


class LeaseLost(Exception):
    """Another process holds this node's lease: a second node with the same name."""


class Membership:
    def __init__(self, js, cluster: str, node: str, ttl: float):
        self.js, self.cluster, self.node, self.ttl = js, cluster, node, ttl
        self.bucket = f"{cluster}_nodes"
        self.kv = None
        self.nodes: dict[str, dict] = {}        # node -> its lease value
        self._seen: dict[str, float] = {}       # node -> monotonic time its lease was last renewed (seen)
        self.on_change = None                   # callable(node, info or None)
        self.info: dict | None = None           # our lease value, if we hold it
        self.revision = 0
        self.lease_ok_until = 0.0               # monotonic: our lease is surely alive until then
        self.lost = False
        self.renewals = 0
        self._tasks: list[asyncio.Task] = []
        self._caught_up = asyncio.Event()

    async def open(self) -> None:
        self.kv = await open_bucket(self.js, self.bucket, history=1, ttl=self.ttl, direct=False,
                                    limit_marker_ttl=self.ttl)
        if not self._tasks:                       # open() may be tried again (node.py: _retrying)
            self._tasks.append(asyncio.get_running_loop().create_task(self._watch()))
        await asyncio.wait_for(self._caught_up.wait(), 10)

    # -- holding our lease --------------------------------------------------------------
    async def hold(self, info: dict) -> None:
        """Take this node's lease: create it, or take over one left by an earlier
        process of this same node (same data dir id: that process is gone, since we
        hold the data dir's lock). Raises LeaseLost if another live node has the name."""
        e = _errors()
        self.info = dict(info, node=self.node, incarnation=os.urandom(6).hex())
        body = json.dumps(self.info, separators=(",", ":")).encode()
        key = f"n.{self.node}"
        t0 = time.monotonic()
        try:
            self.revision = await self.kv.create(key, body)
        except e.KeyWrongLastSequenceError:
            try:
                entry = await self.kv.get(key)
            except e.KeyNotFoundError:          # expired between the two calls
                entry = None
            held = json.loads(entry.value) if entry is not None and entry.value else {}   # empty: an expiry marker
            if entry is None:
                self.revision = await self.kv.create(key, body)
            elif held and held.get("dir_id") != info.get("dir_id"):
                raise LeaseLost(f"node name {self.node!r} is in use by a live node at {held.get('advertise')} "
                                "(another data dir): give each node its own --node") from None
            else:
                self.revision = await self.kv.update(key, body, last=entry.revision)
        self.lease_ok_until = t0 + self.ttl
        self._tasks.append(asyncio.get_running_loop().create_task(self._renew()))

    async def update_info(self, **changes) -> None:
        """Change our lease's value (e.g. draining) at the next renewal, now."""
        self.info.update(changes)
        await self._renew_once()

    async def _renew_once(self) -> None:
        t0 = time.monotonic()
        body = json.dumps(self.info, separators=(",", ":")).encode()
        self.revision = await asyncio.wait_for(
            self.kv.update(f"n.{self.node}", body, last=self.revision), self.ttl / 3)
        self.lease_ok_until = t0 + self.ttl
        self.renewals += 1

    async def _renew(self) -> None:
        """Until the lease is lost to another process: every failure (NATS unreachable, a
        bucket without a leader, a reclaim that failed half way) is logged and tried again
        a third of a lease later; lease_ok_until runs out meanwhile, and with it serving."""
        e = _errors()
        failures = 0
        while not self.lost:
            await asyncio.sleep(self.ttl / 3)
            try:
                try:
                    await self._renew_once()
                except e.KeyWrongLastSequenceError:
                    await asyncio.wait_for(self._reclaim(), self.ttl / 3)
            except Exception as exc:
                failures += 1
                if failures % RENEW_LOG_EVERY == 1:       # the first failure, then one line in every 30
                    _log.warning("event=lease_renew_failed node=%s failures=%d error=%s", self.node, failures,
                                 log.q(repr(exc)))
                continue
            if failures:
                _log.info("event=lease_renewed node=%s after_failures=%d", self.node, failures)
                failures = 0

    async def _reclaim(self) -> None:
        """Our renewal found another revision: the lease expired while we could not
        reach NATS (take it again), or another process of our name holds it (lost)."""
        e = _errors()
        key = f"n.{self.node}"
        try:
            entry = await self.kv.get(key)
            held = json.loads(entry.value) if entry.value else None
        except e.KeyNotFoundError:
            entry, held = None, None
        if held is not None and held.get("incarnation") != self.info["incarnation"]:
            # someone else wrote our key: a second process with our name. It has the lease now.
            self.lost = True
            _log.critical("event=lease_lost node=%s reason=taken_over by=%s", self.node, held.get("advertise"))
            if self.on_change is not None:
                self.on_change(self.node, None)
            return
        t0 = time.monotonic()
        body = json.dumps(self.info, separators=(",", ":")).encode()
        if entry is None:
            self.revision = await self.kv.create(key, body)
        else:
            self.revision = await self.kv.update(key, body, last=entry.revision)
        self.lease_ok_until = t0 + self.ttl
        _log.info("event=lease_reclaimed node=%s", self.node)

    def lease_valid(self) -> bool:
        return not self.lost and time.monotonic() < self.lease_ok_until

    # -- everyone's ---------------------------------------------------------------------
    async def _watch(self) -> None:
        while True:
            try:
                watcher = await self.kv.watchall()
                async for entry in watcher:
                    if entry is None:
                        self._caught_up.set()
                        continue
                    self._apply(entry)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("event=lease_watch_failed error=%s", log.q(repr(exc)))
                await asyncio.sleep(0.5)

    def _apply(self, entry) -> None:
        if not entry.key.startswith("n."):
            return
        node = entry.key[2:]
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            if self.nodes.pop(node, None) is not None:
                self._seen.pop(node, None)
                _log.info("event=node_gone node=%s", node)
                if self.on_change is not None:
                    self.on_change(node, None)
            return
        info = json.loads(entry.value)
        new = node not in self.nodes
        self.nodes[node] = info
        self._seen[node] = time.monotonic()
        if new:
            _log.info("event=node_up node=%s advertise=%s workers=%s", node, info.get("advertise"),
                      info.get("workers"))
        if self.on_change is not None:
            self.on_change(node, info)

    def alive(self, node: str) -> bool:
        if node == self.node and self.info is not None:
            return self.lease_valid()
        seen = self._seen.get(node)
        return seen is not None and time.monotonic() - seen < self.ttl

    def live_nodes(self) -> dict[str, dict]:
        return {n: i for n, i in self.nodes.items() if self.alive(n)}

    def expire_silent(self) -> list[str]:
        """Nodes whose lease ran out without a marker reaching us: gone from here on."""
        gone = [n for n in self.nodes if n != self.node and not self.alive(n)]
        for n in gone:
            del self.nodes[n]
            self._seen.pop(n, None)
            _log.info("event=node_gone node=%s reason=lease_not_renewed", n)
            if self.on_change is not None:
                self.on_change(n, None)
        return gone

    async def close(self, release: bool = True) -> None:
        for t in self._tasks:
            t.cancel()
        if release and self.info is not None and not self.lost:
            try:
                await asyncio.wait_for(self.kv.delete(f"n.{self.node}", last=self.revision), 2)
            except Exception:
                pass


def data_dir_id(data_dir) -> str:
    """A random id kept in the data dir: a restarted node proves it is the same node."""
    path = os.path.join(data_dir, "node.id")
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        ident = os.urandom(8).hex()
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(ident + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
        return ident
