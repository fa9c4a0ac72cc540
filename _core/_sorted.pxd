# The binary search shared by the sorted u64 arrays of the log (CopyWindow, Inbox)
# and the producer table: inline here so each stays a C loop in its own module.
from libc.stdint cimport uint64_t


cdef inline Py_ssize_t lower_bound(const uint64_t *a, Py_ssize_t lo, Py_ssize_t hi,
                                   Py_ssize_t stride, uint64_t x) noexcept nogil:
    """The first i in [lo, hi) with a[i * stride] >= x (hi if none): entries of
    `stride` u64 each, sorted by their first."""
    cdef Py_ssize_t mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid * stride] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo
