"""`switchboard bench catchup`: how fast a node that returns, or one rebuilt from
scratch, gets its copies back (issue 14: catch-up speed in MB/s).

A 3-node cluster with `--replicas` copies (bench/failover.py) is filled with
`--mb` of messages for offline recipients, so they stay stored, and put in
sync. Then n3 is killed with SIGKILL (its shards fail over to their replicas)
and, with no load running, started again twice:

- **returning**: on its data dir as it was. It comes back as a new replica of
  its shards (a deposed owner's log is not kept) and takes its share of
  shards back by promotion.
- **rebuilt**: killed again and started on an empty data dir.

Each is timed from the node's READY line to every shard in sync on every node,
and the bytes are what the owners' replica streams shipped meanwhile (the sum
of `shipped_bytes_total` over every node's workers), so MB/s is the catch-up rate
across the whole cluster; a copy's bytes are written once on the replica's
disk and read once from the owner's page cache."""
import asyncio
import json
import shutil
import time
from types import SimpleNamespace

from .failover import NODES, ClusterTarget


def _shipped(cluster) -> int:
    total = 0
    for n in list(cluster.procs):
        host, admin = cluster.host(n), cluster.ports[n][1]
        import urllib.request
        with urllib.request.urlopen(f"http://{host}:{admin}/cluster", timeout=5) as r:
            for w in json.loads(r.read())["workers"].values():
                total += ((w or {}).get("replication") or {}).get("shipped_bytes_total", 0)
    return total


async def _fill(cluster, mb: int, size: int) -> int:
    """`mb` MB of `size`-byte messages from 4 senders to 64 offline recipients."""
    from gateway.client import Client

    from .cli import stop_on_sigterm
    stop_on_sigterm()
    count = (mb << 20) // size
    body = "x" * (size - 16)
    senders = [Client(cluster.seeds, 0, cluster.token(f"cu-s{i}"), "main") for i in range(4)]
    for c in senders:
        await c.connect()
    try:
        async def stream(k: int, c) -> None:
            gate = asyncio.Semaphore(64)

            async def one(i: int) -> None:
                try:
                    await c.send(f"cu-r{i % 64}", f"{i:012d}:{body}", timeout=120)
                finally:
                    gate.release()
            tasks = []
            for i in range(k, count, len(senders)):
                await gate.acquire()
                tasks.append(asyncio.ensure_future(one(i)))
            await asyncio.gather(*tasks)
        await asyncio.gather(*(stream(k, c) for k, c in enumerate(senders)))
    finally:
        for c in senders:
            await c.close()
    return count


def _catch_up(cluster, victim: str, wipe: bool) -> dict:
    cluster.kill(victim)
    # before it returns: its shards serve again from their replicas, and the two others hold
    # R copies of everything again (that re-replication is not the returning node's catch-up)
    deadline = time.monotonic() + 120
    others = [n for n in NODES if n != victim]
    while True:
        w = cluster.status(others[0])
        if (victim not in w["shard_owner"] and not w["catching"] and len(w["replicas"]) == cluster.args.shards
                and all(victim not in r for r in w["replicas"].values())):
            break
        if time.monotonic() > deadline:
            short = sorted(int(k) for k in range(cluster.args.shards) if not w["replicas"].get(str(k)))
            raise RuntimeError(f"the cluster did not recover from the kill of {victim}: owners "
                               f"{sorted(set(w['shard_owner']))}, catching {w['catching']}, shards without an "
                               f"in-sync replica {short[:20]}")
        time.sleep(0.1)
    if wipe:
        d = cluster.root / victim
        secret = (d / "secret").read_bytes()
        shutil.rmtree(d)
        d.mkdir()
        (d / "secret").write_bytes(secret)
    before = _shipped(cluster)
    cluster.start(victim)
    t0 = time.monotonic()
    cluster.wait_in_sync(600)
    seconds = time.monotonic() - t0
    shipped = _shipped(cluster) - before
    return {"case": "rebuilt" if wipe else "returning", "seconds": round(seconds, 2),
            "shipped_mb": round(shipped / 1e6, 1), "mb_per_s": round(shipped / 1e6 / seconds, 1)}


def run(args) -> int:
    import uvloop
    target = SimpleNamespace(workers=args.workers, durability=args.durability, shards=args.shards,
                             lease_ttl=3.0, replicas=args.replicas)
    cluster = ClusterTarget(target)
    try:
        t0 = time.monotonic()
        count = uvloop.run(_fill(cluster, args.mb, args.size))
        cluster.wait_in_sync(600)
        fill_s = time.monotonic() - t0
        rows = [_catch_up(cluster, "n3", wipe=False), _catch_up(cluster, "n3", wipe=True)]
    finally:
        cluster.stop()
    result = {"replicas": args.replicas, "shards": args.shards, "durability": args.durability,
              "messages": count, "size": args.size, "payload_mb": round(count * args.size / 1e6, 1),
              "fill_seconds": round(fill_s, 1), "runs": rows}
    print(f"catch-up of n3 ({args.replicas} copies, {args.shards} shards, {args.durability}; {count} messages of "
          f"{args.size} B, {result['payload_mb']} MB stored, each on {args.replicas} nodes):")
    for r in rows:
        print(f"  {r['case']:<9} {r['shipped_mb']:>8} MB shipped in {r['seconds']:>6} s: {r['mb_per_s']} MB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
