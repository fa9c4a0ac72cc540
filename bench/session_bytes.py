"""Bytes per idle session and per sending device in the router, in-process:
`PYTHONPATH=TREE python bench/session_bytes.py LABEL` for an A/B of two builds
(docs/benchmarks.md, "What the idempotent sends cost")."""
import asyncio
import sys
import tracemalloc

from _core import frames as F
from _core.codec import Decoder, encode
from router import Router
from router.store import MemoryStore

N = 50_000


class NullStore(MemoryStore):
    """Keeps nothing: what is measured is the router's own state, not stored messages."""
    def append(self, *a, **kw):
        pass


class T:
    def write(self, b): pass
    def close(self): pass


async def main():
    r = Router(NullStore())
    t = T()
    r.open_session("warm", "d", transport=t)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    sessions = [r.open_session(f"user{i:06d}", "phone", transport=t) for i in range(N)]
    idle = (tracemalloc.get_traced_memory()[0] - base) / N
    size = sys.getsizeof(sessions[0])
    # each of 1,000 devices sends 300 messages (more than the send window) to its peer
    base = tracemalloc.get_traced_memory()[0]
    for s in sessions[:1000]:
        dec = Decoder(s, 1 << 20)
        dec.feed(b"".join(encode(F.Send(k, "peer" + s.user, b"x")) for k in range(1, 301)))
    await asyncio.sleep(0)
    sending = (tracemalloc.get_traced_memory()[0] - base) / 1000
    print(f"{sys.argv[1] if len(sys.argv) > 1 else 'this tree'}: SessionCore object {size} B; "
          f"idle registered session {idle:.0f} B (router side); "
          f"dedup state per device after 300 SENDs: {sending:.0f} B")

asyncio.run(main())
