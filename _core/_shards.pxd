cdef class ShardMap:
    cdef readonly int shards
    cdef readonly int workers
    cdef readonly int me
    cdef set _owned              # shards this worker owns
    cdef dict _cache             # recently routed user -> shard (bounded: _limit)
    cdef Py_ssize_t _limit
    cdef dict __dict__           # subclasses (a cluster node's map) add attributes

    cdef int shard_of_user(self, str user) except -1
    cpdef bint is_local(self, str user) except -1
