"""A real NATS cluster whose network between servers can fail.

Killing a nats-server tests a dead server. A partition is different: the isolated
server keeps running and its clients stay connected to it, but it loses its routes,
so it sees no interest from the other side and JetStream on it has no quorum.
Each server dials each other one through a tests/faultproxy.py proxy of its own
(one per ordered pair), so `isolate(i)` can cut exactly server i's routes and
`heal()` restores them. Servers advertise a port nobody listens on (1): a route learned
by gossip cannot go around the proxies (every route is an explicit one anyway).
"""
from __future__ import annotations

import time

from faultproxy import FaultProxy

from gateway.cluster.natsd import NatsCluster


class PartitionableNats(NatsCluster):
    """`PartitionableNats(root, size=3).start()`; `isolate(i)` cuts server i off from
    the others (they stay routed to each other), `heal()` brings its routes back."""

    def __init__(self, root, size: int = 3, **kwargs):
        super().__init__(root, size=size, **kwargs)
        self.proxies: dict[tuple[int, int], FaultProxy] = {}      # (dialler, dialled) -> proxy
        self.isolated: int | None = None

    def _pick_ports(self) -> None:
        self._close_proxies()                       # a port retry picks new ports: new proxies
        super()._pick_ports()
        for i in range(self.size):
            for j, port in enumerate(self.cluster_ports):
                if i != j:
                    self.proxies[i, j] = FaultProxy(self.host, port).start()

    def route_addresses(self, i: int) -> list[str]:
        return [f"{self.host}:{self.proxies[i, j].port}" for j in range(self.size) if j != i]

    def cluster_advertise(self, i: int) -> str | None:
        return f"{self.host}:1"                 # nobody listens on port 1: a gossiped dial is refused

    def _routed_peers(self, i: int) -> set[str]:
        try:
            return {r.get("remote_name") for r in self.monitor(i, "routez").get("routes") or []}
        except (OSError, ValueError):
            return set()

    def isolate(self, i: int, timeout: float = 30.0) -> None:
        """Cut every route of server i; returns once it has none and the others are
        still routed to each other."""
        self.isolated = i
        for (a, b), proxy in self.proxies.items():
            if i in (a, b):
                proxy.cut()
        others = [j for j in range(self.size) if j != i]
        deadline = time.monotonic() + timeout
        while True:
            alone = not self._routed_peers(i)
            paired = all(self.server_name(k) in self._routed_peers(j) for j in others for k in others if k != j)
            if alone and paired:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"partition not in place after {timeout} s (isolated alone: {alone}, "
                                   f"the others routed: {paired})")
            time.sleep(0.05)

    def heal(self, timeout: float | None = None) -> None:
        """Restore every route; returns once all three are routed again and healthy."""
        for proxy in self.proxies.values():
            proxy.restore()
        self.isolated = None
        self._wait_ready(range(self.size), time.monotonic() + (timeout or self.start_timeout))

    def _close_proxies(self) -> None:
        for proxy in self.proxies.values():
            proxy.close()
        self.proxies.clear()

    def stop_all(self) -> None:
        try:
            super().stop_all()
        finally:
            self._close_proxies()
