"""A NumPy memory handler that reuses ghess's large temporaries (see include/alloc.h).

Design notes
------------
1. NumPy (>= 1.22) lets a library choose the allocator of the arrays created
   in the current context (``PyDataMem_SetHandler``, a context variable).
   ``ghess._config.computing`` sets this module's handler around every
   computation and restores the caller's on exit, so arrays the user creates
   outside ghess never touch the pool.
2. The pool only keeps FREED blocks: memory in use is exactly what NumPy's
   default handler would use. The pool's own size is capped (``limit`` bytes,
   oldest blocks released first) and ``release()`` empties it.
"""

cdef extern from *:
    """
    #define NPY_NO_DEPRECATED_API NPY_1_22_API_VERSION
    #define NPY_TARGET_VERSION NPY_1_22_API_VERSION
    #include <numpy/arrayobject.h>
    #include "alloc.h"

    static PyObject *ghess_pool_capsule(void)
    {
        return PyCapsule_New(&ghess_handler, "mem_handler", NULL);
    }
    """
    int _import_array() except -1
    object PyDataMem_SetHandler(object handler)
    object ghess_pool_capsule()
    int ghess_pool_init(size_t limit)
    size_t ghess_pool_release() nogil
    void ghess_pool_stats(size_t* count, size_t* nbytes, size_t* limit, size_t* hits,
                          size_t* misses) nogil
    size_t GHESS_CACHE_MIN_BYTES
    void ghess_usage_reset(size_t* live, size_t* peak) nogil
    int ghess_pool_bypass(int on) nogil

_import_array()
if ghess_pool_init(0) != 0:
    raise MemoryError("ghess._kernels.alloc: could not create the pool's lock")

#: the handler as NumPy wants it: a "mem_handler" capsule
_capsule = ghess_pool_capsule()

#: blocks smaller than this bypass the pool
min_block_bytes = GHESS_CACHE_MIN_BYTES


def set_limit(size_t limit):
    """Empty the pool and cap the bytes of freed blocks it keeps (0: keep none)."""
    ghess_pool_release()
    ghess_pool_init(limit)


def use_pool():
    """Make the pool the allocator of new arrays in this context; return the previous one."""
    return PyDataMem_SetHandler(_capsule)


def restore(previous):
    """Reinstate the allocator ``use_pool`` returned."""
    PyDataMem_SetHandler(previous)


def release():
    """Free every pooled block; return the number of bytes released."""
    return ghess_pool_release()


def stats():
    """Pool state: blocks, bytes and limit, and the hits and misses of large allocations."""
    cdef size_t count, nbytes, limit, hits, misses
    ghess_pool_stats(&count, &nbytes, &limit, &hits, &misses)
    return {"blocks": count, "bytes": nbytes, "limit": limit, "hits": hits, "misses": misses}


def usage():
    """Return ``(live, peak)``: bytes of ghess's temporaries in use now, and the most in use
    since the previous call (the high-water mark restarts at ``live``).

    Counts the arrays created inside ``ghess._config.computing`` (each at its block's
    size), not the caller's arrays nor the pool's idle blocks: what a computation itself
    needs at once, to check the memory plan against.
    """
    cdef size_t live, peak
    ghess_usage_reset(&live, &peak)
    return live, peak


def bypass_pool(bint on):
    """Give every new array a fresh block of its exact size (``on``), or pool again.

    Returns the previous setting. While bypassed, ``usage`` counts the bytes a
    computation asks for, whatever the pool holds (the memory plan's probes).
    """
    return bool(ghess_pool_bypass(on))
