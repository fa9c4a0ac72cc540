"""Group fan-out: member deliveries/s and send -> last-member latency.

    python bench/group_fanout.py --sizes 10,100,1024 --messages 200 --workers 1

For each size: every member online (one connection each, acknowledging what it
gets), one sender sends --messages messages to the group with --window in
flight; the timestamp in each payload gives the latency to every member; the
latency of a message is that of its last member.
"""
import argparse
import asyncio
import json
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import uvloop  # noqa: E402

from conftest import start_gateway  # noqa: E402

_TS = struct.Struct("!dI")


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


async def run(gw, size: int, messages: int, window: int) -> dict:
    owner = gw.client("g-owner", "bench")
    await owner.connect()
    members = [f"m{size}-{i}" for i in range(size - 1)]
    group = f"#bench{size}"
    await owner.group("create", group, members=members[:1000])
    for i in range(1000, len(members), 1000):
        await owner.group("add", group, members=members[i:i + 1000])
    clients = [gw.client(m, "bench") for m in members]
    for i in range(0, len(clients), 100):
        await asyncio.gather(*(c.connect() for c in clients[i:i + 100]))
    last: dict[int, float] = {}
    got = 0
    done = asyncio.Event()

    async def member(c):
        nonlocal got
        while True:
            m = await c.recv()
            _, seq = _TS.unpack_from(m.payload)
            now = time.perf_counter()
            if now > last.get(seq, 0):
                last[seq] = now
            got += 1
            await c.ack(m)
            if got == messages * len(clients):
                done.set()
    readers = [asyncio.create_task(member(c)) for c in clients]
    sent_at: dict[int, float] = {}
    sem = asyncio.Semaphore(window)

    async def send(seq):
        async with sem:
            sent_at[seq] = time.perf_counter()
            await owner.send(group, _TS.pack(sent_at[seq], seq), timeout=60)
    t0 = time.perf_counter()
    await asyncio.gather(*(send(i) for i in range(messages)))
    await asyncio.wait_for(done.wait(), 120)
    elapsed = time.perf_counter() - t0
    for t in readers:
        t.cancel()
    lat = [last[s] - sent_at[s] for s in range(messages)]
    for c in clients + [owner]:
        await c.close()
    return {"group_size": size, "messages": messages, "deliveries": got, "seconds": round(elapsed, 2),
            "deliveries_per_s": round(got / elapsed), "messages_per_s": round(messages / elapsed, 1),
            "last_member_p50_ms": round(pct(lat, .5) * 1e3, 1), "last_member_p99_ms": round(pct(lat, .99) * 1e3, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,100,1024")
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as d:
            gw = start_gateway(Path(d) / "data", "--workers", str(args.workers), "--log-level", "WARNING",
                               "--max-group-members", str(max(size, 1024)))
            try:
                r = uvloop.run(run(gw, size, args.messages, args.window))
                r["workers"] = args.workers
                print(json.dumps(r), flush=True)
            finally:
                gw.stop()


if __name__ == "__main__":
    main()
