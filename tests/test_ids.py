"""Message ids (docs/PROTOCOL.md section 6, "Ids"): `ms << 22 | generator | sequence`,
increasing per generator, and never carrying another generator's bits."""
import pytest

from router import Router
from router.store import MemoryStore

MS = 1 << 22


def _router(generator: int, bits: int | None = None) -> Router:
    r = Router(MemoryStore(100))
    if bits is None:
        r.set_worker(generator)
    else:
        r.set_generator(generator, bits)
    return r


def _generator(msg_id: int, bits: int) -> int:
    return (msg_id >> (22 - bits)) & ((1 << bits) - 1)


@pytest.mark.parametrize("generator,bits", [(3, None), (0, None), (63, None), (5, 12), (4095, 12)])
def test_ids_increase_and_carry_their_generator(generator, bits):
    r = _router(generator, bits)
    ids = [r.new_id()[0] for _ in range(5000)]      # more than one ms's sequence at 12 bits (1,024)
    assert ids == sorted(set(ids))
    assert {_generator(i, bits or 6) for i in ids} == {generator}


@pytest.mark.parametrize("theirs", [0, 9, 63])
def test_the_id_after_another_generators_id_is_ours(theirs):
    """An adopted shard's highest id (made by another worker, ahead of our clock) raises
    our floor: the next id is above it with our generator bits, not that id plus one."""
    r = _router(7)
    foreign = ((r.new_id()[0] >> 22) + 1000) * MS | theirs << 16 | 0xFFFF >> 1
    r.raise_last_id(foreign)
    nxt = r.new_id()[0]
    assert nxt > foreign and _generator(nxt, 6) == 7


def test_a_full_sequence_borrows_the_next_ms():
    r = _router(2, 12)
    last_of_ms = ((r.new_id()[0] >> 22) + 500) * MS | 2 << 10 | 1023
    r.raise_last_id(last_of_ms)
    nxt = r.new_id()[0]
    assert nxt == ((last_of_ms >> 22) + 1) * MS | 2 << 10


def test_a_generator_must_fit_its_bits():
    r = Router(MemoryStore(100))
    with pytest.raises(ValueError):
        r.set_generator(4096, 12)
    with pytest.raises(ValueError):
        r.set_generator(1, 17)
