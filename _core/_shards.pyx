"""Users -> virtual shards -> workers, in C for the routing path (see
router/sharding.py for the layout and why). Every SEND and every receipt asks
which shard a user is on and whether this worker owns it, two or three times;
as Python calls that was ~7% of a worker at 60 k msgs/s."""
import xxhash

DEFAULT_SHARDS = 64


cdef inline int _shard(str user, int shards) except -1:
    return xxhash.xxh3_64_intdigest(user.encode("utf-8"), seed=0) % shards


def shard_of(str user, int shards=DEFAULT_SHARDS):
    """xxh3_64(user as UTF-8, seed 0) mod shards."""
    return _shard(user, shards)


cdef class ShardMap:
    """Which shard a user is on and which worker owns it, with a bounded cache
    of recently routed users (a hash per routed message would cost more than the
    dict lookup; 8,192 entries, not one per connected user: idle sessions would
    pay ~40 bytes each for it).

    `owned` None: this worker owns every shard s with s % workers == me (one
    node). A set: exactly those shards (each still one with s % workers == me);
    `take`/`give` change it as shards move between nodes. Ownership is a set
    either way, so `is_local` costs the same (one membership test). A subclass
    may override `is_local` (a cluster node asks its map); the router then calls
    the override."""

    def __init__(self, int shards=DEFAULT_SHARDS, int workers=1, int me=0, owned=None,
                 Py_ssize_t cache_limit=1 << 13):
        if not (1 <= workers <= shards):
            raise ValueError(f"workers must be between 1 and {shards} (the number of shards)")
        self.shards, self.workers, self.me = shards, workers, me
        self._owned = set()
        for s in (range(me, shards, workers) if owned is None else owned):
            self.take(s)
        self._cache = {}
        self._limit = cache_limit

    cdef int shard_of_user(self, str user) except -1:
        s = self._cache.get(user)
        if s is None:
            if len(self._cache) >= self._limit:
                self._cache.clear()
            s = self._cache[user] = _shard(user, self.shards)
        return <int>s

    def shard(self, str user):
        return self.shard_of_user(user)

    def owner(self, str user):
        return self.shard_of_user(user) % self.workers

    def owner_uncached(self, str user):
        """For once-per-connection questions (HELLO): caching every connected
        user would cost ~40 bytes per idle session."""
        s = self._cache.get(user)
        return (s if s is not None else _shard(user, self.shards)) % self.workers

    cpdef bint is_local(self, str user) except -1:
        return self.shard_of_user(user) in self._owned

    def owns_shard(self, int shard):
        return shard in self._owned

    def take(self, int shard):
        """This worker owns `shard` from now on (a shard that moved here)."""
        if not (0 <= shard < self.shards) or shard % self.workers != self.me:
            raise ValueError(f"shard {shard} is not one worker {self.me} of {self.workers} can own "
                             f"(shard % workers == worker, 0 <= shard < {self.shards})")
        self._owned.add(shard)

    def give(self, int shard):
        """This worker no longer owns `shard` (it moved away, or is moving)."""
        self._owned.discard(shard)

    def owned_shards(self):
        return sorted(self._owned)
