"""Routing hot path per SEND, in-process (no sockets): Decoder -> SessionCore -> RouteCore.route ->
AppendLog append + DELIVER + ACK. `PYTHONPATH=TREE python bench/route_micro.py LABEL` for an A/B of two builds."""
import asyncio, sys, tempfile, time
from _core.codec import Decoder, encode
from _core import frames as F
from _core.log import AppendLog, LogConfig
from router import Router

class T:
    def __init__(self): self.n = 0
    def write(self, b): self.n += len(b)
    def close(self): pass

async def main():
    loop = asyncio.get_running_loop()
    d = tempfile.mkdtemp(prefix="om-micro-")
    store = AppendLog(d, LogConfig(durability="never", segment_size=256 << 20, max_pending=10**7))
    store.open(); store.start(loop)
    r = Router(store, loop=loop)
    a = r.open_session("alice", "p", transport=T())
    r.open_session("bob", "p", transport=T())          # online: every SEND is also a DELIVER
    dec = Decoder(a, 1 << 20)
    per = 500
    batches = [b"".join(encode(F.Send(i * per + j + 1, "bob", b"x" * 32)) for j in range(per)) for i in range(400)]
    best = []
    for rnd in range(5):
        t = time.perf_counter_ns()
        for blob in batches[rnd * 80:(rnd + 1) * 80]:
            dec.feed(blob)
            await asyncio.sleep(0)
        best.append((time.perf_counter_ns() - t) / (80 * per))
    store.close()
    print(f"{sys.argv[1]}: ns per SEND (5 rounds of 40k): " + " ".join(f"{x:.0f}" for x in best) + f"  min {min(best):.0f}")

asyncio.run(main())
