/* A NumPy memory handler that keeps freed large blocks for reuse.
 *
 * Why: every chunk of a product or a loss+gradient allocates and frees megabytes
 * of temporaries. The C library hands such memory back to the OS (glibc trims
 * the top of its heap and unmaps mmap-ed blocks; other allocators do the same),
 * so the next chunk pays the kernel's page faults again: thousands per call, a
 * sizeable part of a loss+gradient's time in a process that has not allocated
 * much else before.
 *
 * What: blocks of at least GHESS_CACHE_MIN_BYTES go back into a small pool when
 * NumPy frees them, up to a byte limit (the oldest are released first); an
 * allocation takes the smallest pooled block that is large enough and at most
 * 1/16 larger. Smaller blocks go straight to malloc/free. Every block carries a
 * header with its capacity, so freeing never relies on the size NumPy passes.
 * NumPy uses the handler only for arrays created while ghess has it set (see
 * ghess._kernels.alloc); an array keeps its handler for life, so it may be freed
 * later from any thread: the pool is guarded by a lock that does not need the GIL.
 *
 * Each pooled block remembers the thread that freed it, and a thread takes its own
 * blocks first. With workers (ghess._parallel) two threads each run a chunk at a
 * time; when they took each other's blocks, every chunk wrote temporaries whose cache
 * lines the other core held, and on the 2-core VM both workers at times ran at half
 * speed (CNN-S loss+gradient at 2 threads 222-246 ms, against 118-121 ms with no pool
 * and 224-233 ms on 1 thread; two processes, which share no memory, never slowed).
 */
#ifndef GHESS_ALLOC_H
#define GHESS_ALLOC_H

#include <Python.h>
#include <pythread.h>
#include <stdlib.h>
#include <string.h>
#include <numpy/ndarraytypes.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#define GHESS_CACHE_MIN_BYTES ((size_t)1 << 20)
#define GHESS_CACHE_SLOTS 64
/* A block serves a request at most 1/16 smaller than itself. Chunks repeat their sizes
 * (even chunks: within a sample), so that is enough to reuse them; the bytes a reused
 * block holds beyond the request count in the peak, and at 1/4 they took a Jacobian
 * product 7-11% past its memory_required. */
#define GHESS_POOL_SLACK 16
/* keeps the user pointer 64-byte aligned when malloc's is, and 16-byte at least */
#define GHESS_HEADER 64

typedef struct {
    void *raw[GHESS_CACHE_SLOTS];       /* oldest first */
    size_t capacity[GHESS_CACHE_SLOTS];
    unsigned long owner[GHESS_CACHE_SLOTS];  /* the thread that gave the block back */
    int count;
    size_t bytes;
    size_t limit;
    size_t hits, misses;
    PyThread_type_lock lock;
} ghess_pool_t;

static ghess_pool_t ghess_pool = {{0}, {0}, {0}, 0, 0, 0, 0, 0, NULL};

/* while set, blocks are neither taken from the pool nor given back to it: every array
 * gets a fresh block of exactly its size, so usage() counts what a computation asks
 * for whatever the pool holds (memory_required's probes, ghess/operators/_memory.py) */
static int ghess_pool_bypassed = 0;

static size_t *ghess_capacity_of(void *user) { return (size_t *)((char *)user - GHESS_HEADER); }

/* bytes of the handler's blocks in use (each counted at its capacity, what is resident),
 * and their high-water mark since ghess_usage_reset: memory planning is checked against
 * these exact figures (tests/operators/test_memory.py) */
static size_t ghess_live_bytes = 0, ghess_peak_bytes = 0;

static void ghess_usage_add(void *user)
{
    size_t live = __atomic_add_fetch(&ghess_live_bytes, *ghess_capacity_of(user),
                                     __ATOMIC_RELAXED);
    size_t peak = __atomic_load_n(&ghess_peak_bytes, __ATOMIC_RELAXED);
    while (live > peak && !__atomic_compare_exchange_n(&ghess_peak_bytes, &peak, live, 1,
                                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
}

static void ghess_usage_remove(void *user)
{
    __atomic_sub_fetch(&ghess_live_bytes, *ghess_capacity_of(user), __ATOMIC_RELAXED);
}

static int ghess_pool_bypass(int on)
{
    return __atomic_exchange_n(&ghess_pool_bypassed, on, __ATOMIC_RELAXED);
}

static void ghess_usage_reset(size_t *live, size_t *peak)
{
    *live = __atomic_load_n(&ghess_live_bytes, __ATOMIC_RELAXED);
    *peak = __atomic_exchange_n(&ghess_peak_bytes, *live, __ATOMIC_RELAXED);
}

static void ghess_advise_huge(void *raw, size_t size)
{
    /* as NumPy's default handler: transparent huge pages for blocks >= 4 MiB */
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (size >= ((size_t)4 << 20)) {
        size_t page = 4096, start = ((size_t)raw + page - 1) & ~(page - 1);
        size_t end = ((size_t)raw + size) & ~(page - 1);
        if (end > start)
            (void)madvise((void *)start, end - start, MADV_HUGEPAGE);
    }
#else
    (void)raw; (void)size;
#endif
}

/* take slot i out of the pool, keeping the others oldest first (lock held) */
static void *ghess_pool_remove(int i)
{
    void *raw = ghess_pool.raw[i];
    ghess_pool.bytes -= ghess_pool.capacity[i];
    for (int j = i + 1; j < ghess_pool.count; j++) {
        ghess_pool.raw[j - 1] = ghess_pool.raw[j];
        ghess_pool.capacity[j - 1] = ghess_pool.capacity[j];
        ghess_pool.owner[j - 1] = ghess_pool.owner[j];
    }
    ghess_pool.count--;
    return raw;
}

/* a pooled block of at least `size` bytes (at most 1/GHESS_POOL_SLACK more), or NULL:
 * the smallest that this thread gave back, else the smallest of any thread's */
static void *ghess_pool_take(size_t size)
{
    void *raw = NULL;
    int best = -1, own = 0;
    unsigned long me;
    if (size < GHESS_CACHE_MIN_BYTES || ghess_pool.lock == NULL
        || __atomic_load_n(&ghess_pool_bypassed, __ATOMIC_RELAXED))
        return NULL;
    me = PyThread_get_thread_ident();
    PyThread_acquire_lock(ghess_pool.lock, WAIT_LOCK);
    for (int i = 0; i < ghess_pool.count; i++) {
        size_t c = ghess_pool.capacity[i];
        int mine = ghess_pool.owner[i] == me;
        if (c >= size && c - size <= size / GHESS_POOL_SLACK &&
            (best < 0 || mine > own || (mine == own && c < ghess_pool.capacity[best]))) {
            best = i;
            own = mine;
        }
    }
    if (best >= 0) {
        raw = ghess_pool_remove(best);
        ghess_pool.hits++;
    } else {
        ghess_pool.misses++;
    }
    PyThread_release_lock(ghess_pool.lock);
    return raw;
}

/* pool the block if it is large and fits under the limit (evicting the oldest), else free it */
static void ghess_pool_give(void *raw, size_t capacity)
{
    void *evicted[GHESS_CACHE_SLOTS];
    int n_evicted = 0, kept = 0;
    if (capacity >= GHESS_CACHE_MIN_BYTES && ghess_pool.lock != NULL
        && !__atomic_load_n(&ghess_pool_bypassed, __ATOMIC_RELAXED)) {
        PyThread_acquire_lock(ghess_pool.lock, WAIT_LOCK);
        if (capacity <= ghess_pool.limit) {
            while (ghess_pool.count > 0 && (ghess_pool.count == GHESS_CACHE_SLOTS ||
                                            ghess_pool.bytes + capacity > ghess_pool.limit)) {
                evicted[n_evicted++] = ghess_pool_remove(0);
            }
            ghess_pool.raw[ghess_pool.count] = raw;
            ghess_pool.capacity[ghess_pool.count] = capacity;
            ghess_pool.owner[ghess_pool.count] = PyThread_get_thread_ident();
            ghess_pool.count++;
            ghess_pool.bytes += capacity;
            kept = 1;
        }
        PyThread_release_lock(ghess_pool.lock);
    }
    for (int i = 0; i < n_evicted; i++)
        free(evicted[i]);
    if (!kept)
        free(raw);
}

static void *ghess_new_block(size_t size, int zeroed)
{
    char *raw;
    if (size > (size_t)-1 - GHESS_HEADER)
        return NULL;
    raw = zeroed ? calloc(1, size + GHESS_HEADER) : malloc(size + GHESS_HEADER);
    if (raw == NULL)
        return NULL;
    *(size_t *)raw = size;
    ghess_advise_huge(raw, size + GHESS_HEADER);
    return raw + GHESS_HEADER;
}

static void *ghess_tracked(void *user)
{
    if (user != NULL)
        ghess_usage_add(user);
    return user;
}

static void *ghess_handler_malloc(void *ctx, size_t size)
{
    char *raw = ghess_pool_take(size);
    (void)ctx;
    if (raw != NULL)
        return ghess_tracked(raw + GHESS_HEADER);
    return ghess_tracked(ghess_new_block(size, 0));
}

static void *ghess_handler_calloc(void *ctx, size_t nelem, size_t elsize)
{
    size_t size;
    char *raw;
    (void)ctx;
    if (elsize != 0 && nelem > (size_t)-1 / elsize)
        return NULL;
    size = nelem * elsize;
    raw = ghess_pool_take(size);
    if (raw != NULL) {
        /* writing zeros over resident pages beats faulting fresh zero pages in */
        memset(raw + GHESS_HEADER, 0, size);
        return ghess_tracked(raw + GHESS_HEADER);
    }
    return ghess_tracked(ghess_new_block(size, 1));
}

static void ghess_handler_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx; (void)size;
    if (ptr == NULL)
        return;
    ghess_usage_remove(ptr);
    ghess_pool_give((char *)ptr - GHESS_HEADER, *ghess_capacity_of(ptr));
}

static void *ghess_handler_realloc(void *ctx, void *ptr, size_t new_size)
{
    char *raw;
    (void)ctx;
    if (ptr == NULL)
        return ghess_handler_malloc(NULL, new_size);
    if (new_size > (size_t)-1 - GHESS_HEADER)
        return NULL;
    ghess_usage_remove(ptr);
    raw = realloc((char *)ptr - GHESS_HEADER, new_size + GHESS_HEADER);
    if (raw == NULL) {
        ghess_usage_add(ptr);  /* the old block stays */
        return NULL;
    }
    *(size_t *)raw = new_size;
    return ghess_tracked(raw + GHESS_HEADER);
}

static PyDataMem_Handler ghess_handler = {
    "ghess_pool",
    1,
    {NULL, ghess_handler_malloc, ghess_handler_calloc, ghess_handler_realloc,
     ghess_handler_free},
};

/* 0 on success; the lock is created once */
static int ghess_pool_init(size_t limit)
{
    if (ghess_pool.lock == NULL) {
        ghess_pool.lock = PyThread_allocate_lock();
        if (ghess_pool.lock == NULL)
            return -1;
    }
    PyThread_acquire_lock(ghess_pool.lock, WAIT_LOCK);
    ghess_pool.limit = limit;
    PyThread_release_lock(ghess_pool.lock);
    return 0;
}

/* free every pooled block; returns the bytes released */
static size_t ghess_pool_release(void)
{
    void *raw[GHESS_CACHE_SLOTS];
    int count;
    size_t bytes;
    if (ghess_pool.lock == NULL)
        return 0;
    PyThread_acquire_lock(ghess_pool.lock, WAIT_LOCK);
    count = ghess_pool.count;
    bytes = ghess_pool.bytes;
    memcpy(raw, ghess_pool.raw, sizeof(void *) * (size_t)count);
    ghess_pool.count = 0;
    ghess_pool.bytes = 0;
    PyThread_release_lock(ghess_pool.lock);
    for (int i = 0; i < count; i++)
        free(raw[i]);
    return bytes;
}

static void ghess_pool_stats(size_t *count, size_t *bytes, size_t *limit, size_t *hits,
                             size_t *misses)
{
    *count = *bytes = *limit = *hits = *misses = 0;
    if (ghess_pool.lock == NULL)
        return;
    PyThread_acquire_lock(ghess_pool.lock, WAIT_LOCK);
    *count = (size_t)ghess_pool.count;
    *bytes = ghess_pool.bytes;
    *limit = ghess_pool.limit;
    *hits = ghess_pool.hits;
    *misses = ghess_pool.misses;
    PyThread_release_lock(ghess_pool.lock);
}

#endif
