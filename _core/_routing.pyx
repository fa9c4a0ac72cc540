cdef class _Placeholder: pass
