"""One throughput load process: connects its flows, says ready, runs on `go`,
drains, and prints its counters as JSON (driven by `bench.throughput`)."""
import argparse
import asyncio
import json
import sys
import time

import uvloop

from ._loadgen import Conn, Flow, Stats


def _greeting(dialect: str, name: str, receiver: bool, subject: str, args) -> bytes:
    if dialect == "switchboard":
        from _core import frames as F
        from _core.codec import encode
        from gateway.auth import TokenAuthority, load_secret
        token = TokenAuthority(load_secret(args.data_dir)).issue(name, ttl=86400)
        send_only = not receiver and not args.receipts
        from _core.protocol import PROTOCOL_VERSION
        return encode(F.Hello(PROTOCOL_VERSION, token, "load", 0, send_only))
    if dialect == "nats":
        sub = f"SUB {subject} 1\r\n" if receiver else ""
        return f'CONNECT {{"verbose":false,"pedantic":false,"name":"{name}"}}\r\n{sub}PING\r\n'.encode()
    return (f"GET /ws/{name} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


async def _make_groups(args, flows_spec) -> None:
    """Switchboard group mode: each sender creates its group with its members."""
    from gateway.auth import TokenAuthority, load_secret
    from gateway.client import Client
    auth = TokenAuthority(load_secret(args.data_dir))
    seeds = ",".join(hp.split("=")[1] for hp in args.nodes.split(",")) if args.nodes else args.host
    for sender, target, members in flows_spec:
        async with Client(seeds, args.port, auth.issue(sender), "setup", reconnect=False,
                          send_only=True) as c:
            await c.group("create", target, members=members)


class _Placement:
    """A cluster under test (--nodes): each user connects straight to the node that
    owns its shard (as a redirected client would end up), and pairs are picked to
    be on one node (local) or on two (cross)."""

    def __init__(self, args):
        from gateway.cluster.shardmap import hrw_owner
        from router.sharding import shard_of
        self.addr = {}
        for entry in args.nodes.split(","):
            name, hp = entry.split("=")
            host, port = hp.rsplit(":", 1)
            self.addr[name] = (host, int(port))
        names = sorted(self.addr)
        self.owner = lambda user: hrw_owner(shard_of(user, args.shards), names)
        self.names = names

    def pick(self, base: str, node: str) -> str:
        for k in range(10_000):
            u = f"{base}_{k}"
            if self.owner(u) == node:
                return u
        raise RuntimeError(f"no user name for node {node}")

    def address(self, user: str) -> tuple[str, int]:
        return self.addr[self.owner(user)]


async def main(args) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    flows, spec = [], []
    t = args.tag      # fresh users per run: a server remembers client ids it has answered
    place = _Placement(args) if args.nodes else None
    for i in range(args.first, args.first + args.flows):
        if args.mode == "group":
            members = [f"{t}g{i}m{k}" for k in range(args.group_size)]
            target = f"#{t}g{i}" if args.dialect == "switchboard" else f"{t}g.{i}"
            spec.append((f"{t}g{i}s", target, members))
        elif place is not None:
            n = len(place.names)
            home = place.names[i % n]
            away = home if args.placement == "local" else place.names[(i + 1) % n]
            spec.append((place.pick(f"{t}s{i}", home), None, [place.pick(f"{t}r{i}", away)]))
            spec[-1] = (spec[-1][0], spec[-1][2][0], spec[-1][2])
        else:
            target = f"{t}r{i}" if args.dialect != "nats" else f"{t}p.{i}"
            spec.append((f"{t}s{i}", target, [f"{t}r{i}"]))
    if args.mode == "group" and args.dialect == "switchboard":
        await _make_groups(args, spec)
    waits = []
    for sender, target, receivers in spec:
        flow = Flow(stats, args.dialect, target, args.size, args.window)
        for name, is_sender in [(r, False) for r in receivers] + [(sender, True)]:
            ready = loop.create_future()
            conn = Conn(flow, is_sender, args.dialect, _greeting(args.dialect, name, not is_sender, target, args),
                        ready)
            flow.add(conn)
            host, port = place.address(name) if place is not None else (args.host, args.port)
            await loop.create_connection(lambda c=conn: c, host, port)
            waits.append(ready)
        flows.append(flow)
    await asyncio.wait_for(asyncio.gather(*waits), 60)
    print(json.dumps({"ready": len(flows)}), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)

    t0 = time.perf_counter()
    for f in flows:
        f.started = True
    if args.rate:
        per_flow = args.rate / len(flows)
        for f in flows:
            f.open_loop = True

        async def pace():
            while not stats.stopped:
                budget = int(per_flow * (time.perf_counter() - t0)) + 1
                for f in flows:
                    f.rate_budget = budget
                    f.pump()
                await asyncio.sleep(0.001)
        pacer = loop.create_task(pace())
    else:
        for f in flows:
            f.pump()
    warm_until = t0 + args.warmup
    await asyncio.sleep(args.warmup)
    d0, sent0 = stats.delivered, stats.sent
    stats.reset_latency()
    t1 = time.perf_counter()
    await asyncio.sleep(args.duration)
    stats.stopped = True
    elapsed = time.perf_counter() - t1
    delivered_in_window = stats.delivered - d0
    p50, p99, p999 = stats.percentiles([0.5, 0.99, 0.999])
    expected = sum(f.sent * len(f.receivers) for f in flows)
    deadline = time.monotonic() + 15
    receipts_due = args.dialect == "switchboard" and args.receipts and args.mode == "pairs"

    def drained() -> bool:
        if stats.delivered + stats.duplicates < expected:
            return False
        if args.dialect == "switchboard" and stats.acked < stats.sent:
            return False
        return not receipts_due or stats.receipts >= stats.delivered    # the last receipts are in flight

    while not drained() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    if args.rate:
        pacer.cancel()
    for f in flows:
        for c in [f.sender, *f.receivers]:
            c.transport.close()
    print(json.dumps({
        "elapsed": elapsed, "delivered_in_window": delivered_in_window, "sent_in_window": stats.sent - sent0,
        "sent": stats.sent, "expected_deliveries": expected, "delivered": stats.delivered,
        "acked": stats.acked if args.dialect == "switchboard" else None,
        "receipts": stats.receipts, "duplicates": stats.duplicates, "gaps": stats.gaps, "errors": stats.errors,
        "last_error": str(stats.last_error) if stats.last_error else None,
        "p50_ms": p50, "p99_ms": p99, "p999_ms": p999, "warmup_s": warm_until - t0,
    }), flush=True)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dialect", required=True, choices=["switchboard", "nats", "websockets"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--data-dir")
    ap.add_argument("--mode", choices=["pairs", "group"], default="pairs")
    ap.add_argument("--group-size", type=int, default=10)
    ap.add_argument("--tag", default="", help="prefix of every user name in this run")
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--flows", type=int, required=True)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--rate", type=float, default=0.0)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--receipts", type=int, default=1)
    ap.add_argument("--nodes", default="", help="a cluster: NAME=HOST:PORT,... (each user goes to its owner)")
    ap.add_argument("--shards", type=int, default=64, help="the cluster's shard count (with --nodes)")
    ap.add_argument("--placement", choices=["local", "cross"], default="cross",
                    help="with --nodes: pairs on one node or on two")
    return ap.parse_args(argv)


if __name__ == "__main__":
    uvloop.run(main(parse()))
