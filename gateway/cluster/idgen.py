"""Message-id generators: a number per worker of the whole cluster, so that no two
entries anywhere get the same id (docs/PROTOCOL.md section 6, "Ids").

An id is `ms << 22 | generator << (22 - bits) | sequence`. A single gateway's
generator is its worker index (6 bits, 16 of sequence). A cluster node's worker
claims a number once, by create-if-absent in the KV bucket `NAME_ids`
(`g.N` -> "node.worker", and `w.node.worker` -> N to find it again after a
restart): 12 bits, so 4,096 workers across the fleet, each making 1,024 ids per
ms before it borrows the next ms. A number stays with its node name and worker
index for good: a decommissioned node's numbers are not reused, so a late
message from it can never share an id with a new node's.
"""
from .buckets import open_bucket

GENERATOR_BITS = 12
GENERATORS = 1 << GENERATOR_BITS


class NoGeneratorLeft(RuntimeError):
    """Every generator number of the cluster is claimed."""


async def claim_generator(js, cluster: str, node: str, worker: int) -> int:
    """This worker's generator number: the one it claimed before, or the lowest free one."""
    import nats.js.errors as e
    kv = await open_bucket(js, f"{cluster}_ids", history=1, direct=False)
    mine = f"w.{node}.{worker}"
    try:
        return int((await kv.get(mine)).value)
    except e.KeyNotFoundError:
        pass
    try:
        taken = {int(k[2:]) for k in await kv.keys() if k.startswith("g.")}
    except e.NoKeysError:
        taken = set()
    for number in range(GENERATORS):
        if number in taken:
            continue
        try:
            await kv.create(f"g.{number}", f"{node}.{worker}".encode())
        except e.KeyWrongLastSequenceError:       # claimed by another worker meanwhile: the next one
            continue
        try:
            await kv.create(mine, str(number).encode())
        except e.KeyWrongLastSequenceError:       # an earlier try of ours got this far: keep that one
            return int((await kv.get(mine)).value)
        return number
    raise NoGeneratorLeft(f"all {GENERATORS} message-id generators of cluster {cluster!r} are claimed "
                          "(one per worker of every node that ever joined)")
