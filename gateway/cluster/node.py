"""One worker's view of the cluster: its NATS connection, the leases, the shard
map, and the answers the gateway asks of them (is this user ours? which node
serves it? may this frame from another node be obeyed?).

Every worker of a node connects to NATS itself (its links to other nodes are its
own: no second hop through another process); worker 0 also holds the node's
lease. A node serves the shards the map gives it, each on worker shard % N as
on a single node. Sessions are served by the node that owns the user's shard:
a client that lands elsewhere is redirected there (GOAWAY REDIRECT), which costs
one extra connect at session open and nothing per message — proxying would put
a NATS hop in front of every frame in both directions (docs/cluster.md).
"""
import asyncio
import os
import time

from router.sharding import ShardMap

from .. import log
from . import config as ccfg
from .idgen import claim_generator
from .membership import LeaseLost, Membership, data_dir_id
from .natsbus import REMOTE_BASE, NatsBus
from .shardmap import ClusterMap

_log = log.get("switchboard.cluster")

UNAVAILABLE = 3     # ErrorCode.UNAVAILABLE (imported lazily below to keep this module light)


class NodeShards(ShardMap):
    """The shards this worker serves: those the cluster map gives this node, with
    shard % workers == this worker."""

    def __init__(self, node: "ClusterNode", shards: int, workers: int, me: int):
        super().__init__(shards, workers, me)
        self.node = node

    def is_local(self, user: str) -> bool:
        s = self.shard(user)
        return s % self.workers == self.me and self.node.view.owner[s] == self.node.name

    def owner(self, user: str) -> int:
        return self.node.dest_of_shard(self.shard(user))

    def owner_uncached(self, user: str) -> int:
        return self.node.dest_of_shard(self.shard(user))

    def owned_shards(self) -> list[int]:
        return [s for s in self.node.view.shards_of(self.node.name) if s % self.workers == self.me]


class ClusterNode:
    def __init__(self, cfg, worker_index: int, workers: int):
        from _core.protocol import ErrorCode
        global UNAVAILABLE
        UNAVAILABLE = int(ErrorCode.UNAVAILABLE)
        self.cfg = cfg
        self.name = ccfg.node_name(cfg)
        self.me, self.workers = worker_index, workers
        self.nc = None
        self.js = None
        self.members: Membership | None = None
        self.map: ClusterMap | None = None
        self.bus: NatsBus | None = None
        self.shards: NodeShards | None = None
        self.generator: int | None = None   # this worker's message-id generator (idgen.py)
        self.connected = False
        self.disconnects = 0
        self._tasks = []
        self.advertise = self.advertise_ws = ""
        self.on_map_change = None          # gateway/cluster/moves.py: adopt/drop shards as the map changes
        self.members_changed = None        # ... and plan moves when a node comes or goes
        self.mover = None
        self.replication = None            # gateway/cluster/replication.py, with replicas > 1

    @property
    def view(self):
        return self.map.view

    async def connect(self) -> None:
        """NATS, the leases and the map, before this worker opens any shard."""
        import nats
        cfg = self.cfg
        delay = 0.25
        while True:             # NATS may start after us: wait for it (the supervisor's ready wait bounds this)
            try:
                self.nc = await nats.connect(
                    servers=ccfg.nats_urls(cfg), name=f"switchboard {self.name}/w{self.me}",
                    connect_timeout=2, reconnect_time_wait=0.25, max_reconnect_attempts=-1, ping_interval=2,
                    max_outstanding_pings=3, allow_reconnect=True,
                    disconnected_cb=self._disconnected, reconnected_cb=self._reconnected,
                    error_cb=self._error, closed_cb=self._closed)
                break
            except Exception as exc:
                _log.warning("event=nats_unreachable servers=%s error=%s retry_in=%.2f", cfg.cluster,
                             log.q(repr(exc)), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.connected = True
        self.js = self.nc.jetstream(timeout=5)
        self.members = Membership(self.js, cfg.cluster_name, self.name, cfg.lease_ttl)
        self.members.on_change = self._node_changed
        await _retrying(self.members.open, "lease bucket")
        held = self.members.nodes.get(self.name)
        if self.me == 0 and held and self.members.alive(self.name) \
                and held.get("dir_id") != data_dir_id(cfg.data_dir):
            # before we subscribe to anything of that name: its traffic is not ours
            raise LeaseLost(f"node name {self.name!r} is in use by a live node at {held.get('advertise')} "
                            "(another data dir): give each node its own --node")
        self.map = ClusterMap(self.js, cfg.cluster_name)
        self.map.on_change = self._map_changed
        bootstrap = list(cfg.bootstrap) or [self.name]
        view = await _retrying(lambda: self.map.open(cfg.cluster_shards, bootstrap), "shard map")
        self.shards = NodeShards(self, view.shards, self.workers, self.me)
        self.generator = await _retrying(lambda: claim_generator(self.js, cfg.cluster_name, self.name, self.me),
                                         "message-id generator")
        _log.info("event=cluster_joined node=%s worker=%d epoch=%d shards=%d owned_here=%d nats=%s",
                  self.name, self.me, view.epoch, view.shards, len(self.shards.owned_shards()),
                  self.nc.connected_url.netloc if self.nc.connected_url else "?")

    async def hold_lease(self, tcp_port: int, ws_port: int) -> None:
        """Worker 0, once listening: the node's lease says where clients reach it."""
        self.advertise, self.advertise_ws = ccfg.advertised(self.cfg, tcp_port, ws_port)
        if self.me != 0:
            return
        await self.members.hold({"advertise": self.advertise, "advertise_ws": self.advertise_ws,
                                 "workers": self.workers, "draining": False, "pid": os.getppid(),
                                 "dir_id": data_dir_id(self.cfg.data_dir), "since": int(time.time())})

    def attach(self, router, local_bus, on_pressure) -> NatsBus:
        """Route through the cluster: local workers over `local_bus`, other nodes over NATS."""
        self.bus = NatsBus(self.nc, self.cfg.cluster_name, self.name, self.me, router,
                           epoch=lambda: self.map.view.epoch, fence=self.fence, alive=self.members.alive,
                           timeout=self.cfg.cluster_timeout, on_pressure=on_pressure)
        self.local_bus = local_bus

        def link_to(dest):
            if dest >= REMOTE_BASE:
                return self.bus.link_to(dest)
            return local_bus.link_to(dest) if local_bus is not None else None

        def send_control(dest, msg):
            if dest >= REMOTE_BASE:
                return self.bus.send_control(dest, msg)
            return local_bus is not None and local_bus.send_control(dest, msg)

        router.set_bus(link_to, self.shards.owner, self.shards.is_local)
        for service in (router.presence, router.groups):
            service.is_local, service.owner_of, service.bus_send = self.shards.is_local, self.shards.owner, send_control
        self.router = router
        return self.bus

    async def start_bus(self, gateway) -> None:
        from .moves import ShardMover
        await self.bus.start()
        if self.cfg.replicas > 1:
            from .replication import Replication
            self.replication = Replication(gateway, self)
            await self.replication.start()
        self.mover = ShardMover(gateway, self)
        await self.mover.start()
        self._tasks.append(asyncio.get_running_loop().create_task(self._expire_leases()))

    # -- questions the gateway asks -------------------------------------------------------
    def dest_of_shard(self, s: int) -> int:
        """The router's destination for shard s: a local worker, or a worker of another node."""
        owner = self.map.view.owner[s]
        if owner == self.name:
            return s % self.workers
        info = self.members.nodes.get(owner)
        workers = info.get("workers", 1) if info else 1
        return self.bus.dest(owner, s % workers) if self.bus is not None else REMOTE_BASE

    def fence(self, recipient: str, epoch: int) -> int:
        """0 if a frame for `recipient` from another node, routed at map `epoch`, may be
        obeyed here; else UNAVAILABLE (its sender retries, by then with a newer map)."""
        s = self.shards.shard(recipient)
        view = self.map.view
        if view.owner[s] != self.name or s % self.workers != self.me or s in view.moving:
            return UNAVAILABLE
        if epoch < view.since[s]:
            return UNAVAILABLE
        if not self.serving():
            return UNAVAILABLE
        return 0

    def redirect_for(self, user: str, websocket: bool) -> str | None:
        """Where a session of `user` must go, if not here (None: here). Raises
        ProtocolError UNAVAILABLE if its node is down (the client retries its seeds)."""
        s = self.shards.shard(user)
        view = self.map.view
        owner = view.owner[s]
        if s in view.moving:
            from _core.errors import ProtocolError
            from _core.protocol import ErrorCode
            raise ProtocolError(f"{user}'s shard is moving to another node; retry in a moment", ErrorCode.UNAVAILABLE)
        if owner == self.name:
            return None
        info = self.members.nodes.get(owner)
        if info is None or not self.members.alive(owner):
            from _core.errors import ProtocolError
            from _core.protocol import ErrorCode
            raise ProtocolError(f"the node serving {user} ({owner}) is down; retry", ErrorCode.UNAVAILABLE)
        address = info.get("advertise_ws" if websocket else "advertise")
        if not address:
            from _core.errors import ProtocolError
            from _core.protocol import ErrorCode
            raise ProtocolError(f"node {owner} serving {user} has no {'WebSocket ' if websocket else ''}listener",
                                ErrorCode.UNAVAILABLE)
        return address

    def problem(self) -> str:
        if not self.connected:
            return "no NATS connection"
        if self.members.lost:
            return "lease lost to another process with this node name"
        return "lease not renewed" if self.members.info is not None or self.me == 0 else "node lease not seen"

    def serving(self) -> bool:
        """This node may act on its shards: connected to NATS and its lease alive."""
        return self.connected and self.members is not None and self.members.alive(self.name)

    # -- events ------------------------------------------------------------------------
    def _node_changed(self, node: str, info) -> None:
        if self.members_changed is not None:
            self.members_changed()
        if info is None and self.bus is not None:
            self.bus.node_gone(node)
        elif info is not None and self.bus is not None and node != self.name:
            # it may have restarted and forgotten our sessions' presence subscriptions
            for (n, w), peer in list(self.bus.peers.items()):
                if n == node and getattr(peer, "announced", None) != info.get("since"):
                    peer.announced = info.get("since")
                    self.router.presence.owner_back(peer.dest)

    def _map_changed(self, old, new) -> None:
        moved = sum(1 for s in range(new.shards) if old.owner[s] != new.owner[s])
        _log.info("event=shard_map_changed epoch=%d moved=%d moving=%d", new.epoch, moved, len(new.moving))
        if self.on_map_change is not None:
            self.on_map_change(old, new)

    async def _expire_leases(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.cfg.lease_ttl / 4))
            self.members.expire_silent()

    async def _disconnected(self) -> None:
        self.connected = False
        self.disconnects += 1
        _log.warning("event=nats_disconnected node=%s worker=%d", self.name, self.me)
        if self.bus is not None:
            self.bus.disconnected()

    async def _reconnected(self) -> None:
        self.connected = True
        _log.info("event=nats_reconnected node=%s worker=%d url=%s", self.name, self.me,
                  self.nc.connected_url.netloc if self.nc.connected_url else "?")
        if self.bus is not None:
            self.bus.reconnected()
        try:
            await self.map.refresh()
        except Exception as exc:
            _log.warning("event=map_refresh_failed error=%s", log.q(repr(exc)))

    async def _error(self, exc) -> None:
        _log.warning("event=nats_error node=%s worker=%d error=%s", self.name, self.me, log.q(repr(exc)))

    async def _closed(self) -> None:
        self.connected = False

    def status(self) -> dict:
        view = self.map.view
        return {"node": self.name, "worker": self.me, "id_generator": self.generator,
                "epoch": view.epoch, "shards": view.shards,
                "connected": self.connected, "serving": self.serving(), "disconnects": self.disconnects,
                "lease_renewals": self.members.renewals if self.me == 0 else None,
                "nodes": {n: dict(i, alive=self.members.alive(n)) for n, i in self.members.nodes.items()},
                "owners": view.counts(), "moving": {str(s): n for s, n in view.moving.items()},
                "bus": self.bus.stats() if self.bus is not None else None,
                "moves": self.mover.stats() if self.mover is not None else None,
                "shard_owner": view.owner,
                "replicas": {str(s): r for s, r in view.replicas.items() if r},
                "catching": {str(s): r for s, r in view.catching.items() if r},
                "disk_full": list(view.full),
                "replication": self.replication.stats() if self.replication is not None else None}

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.mover is not None:
            await self.mover.close()
        if self.replication is not None:
            await self.replication.close()
        if self.bus is not None:
            await self.bus.close()
        if self.members is not None:
            await self.members.close(release=self.me == 0)
        if self.map is not None:
            await self.map.close()
        if self.nc is not None:
            try:
                await asyncio.wait_for(self.nc.drain(), 2)
            except Exception:
                await self.nc.close()


async def _retrying(step, what: str, deadline: float = 120.0):
    """A start-up step against JetStream, retried while it is not ready: a bucket
    made a moment ago by another node may not answer yet (its R3 stream is still
    electing a leader), and nodes started together race to make it."""
    import nats.errors
    import nats.js.errors
    transient = (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError,
                 nats.js.errors.ServiceUnavailableError, asyncio.TimeoutError)
    delay, t0 = 0.1, time.monotonic()
    while True:
        try:
            return await step()
        except transient as exc:
            if time.monotonic() - t0 > deadline:
                raise
            _log.warning("event=cluster_start_retry step=%s error=%s retry_in=%.1f", what.replace(" ", "_"),
                         log.q(repr(exc)), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


__all__ = ["ClusterNode", "LeaseLost", "NodeShards"]
