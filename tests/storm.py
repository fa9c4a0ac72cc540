"""A message storm between two SDK clients, for the kill -9 tests."""
import asyncio


async def run_storm(gw, sender: str, recipient: str, n: int, on_acked, window: int = 32):
    """`sender` sends n numbered messages to `recipient`, who reads and acks them;
    `on_acked(count)` runs after each ACK (to kill things). Both clients
    reconnect by themselves. Returns (acked {msg_id: text}, texts seen, reconnects)."""
    a = gw.client(sender, "phone", max_backoff=0.3)
    b = gw.client(recipient, "phone", max_backoff=0.3)
    await a.connect()
    await b.connect()
    acked, seen = {}, []

    async def send_all():
        sem = asyncio.Semaphore(window)

        async def one(i):
            async with sem:
                r = await a.send(recipient, f"m{i}", timeout=60)
                acked[r.id] = f"m{i}"
                on_acked(len(acked))
        await asyncio.gather(*(one(i) for i in range(n)))

    async def receive_all():
        while len(seen) < n:
            m = await b.recv(timeout=60)
            seen.append(m.text)
            await b.ack(m)

    await asyncio.wait_for(asyncio.gather(send_all(), receive_all()), 120)
    await a.close()
    await b.close()
    return acked, seen, a.reconnects + b.reconnects


def assert_exactly_once_in_order(acked: dict, seen: list, n: int) -> None:
    """Every message ACKed, and the application saw each once, in the order sent."""
    assert len(acked) == n, "every message was eventually ACKed (retries reuse their seqs)"
    assert len(set(seen)) == len(seen), f"{len(seen) - len(set(seen))} duplicates reached the application"
    inversions = sum(1 for x, y in zip(seen, seen[1:]) if int(x[1:]) > int(y[1:]))
    assert inversions == 0, f"{inversions} reorderings"
    assert seen == [f"m{i}" for i in range(n)]
