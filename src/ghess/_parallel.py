"""Coarse parallelism: a data set's chunks shared out over worker threads.

The kernels are parallel over the samples of one chunk. That leaves serial the
Python between them and starts and joins their threads at every call: on 2
cores CNN-C's products ran 1.74x faster than on one (``bench/AB_COARSE.md``).
Given T threads and at least 2 T chunks, T workers instead each take a
contiguous run of the chunks and run those chunks' kernels on one thread (the
kernels release the GIL), so the workers' kernels overlap, and one worker's
Python overlaps the others' kernels. Each worker accumulates into its own
buffers and the caller adds them in worker order: for a given thread count the
result is the same bits on every call, and it agrees with other thread counts
to rounding, as the sample-parallel kernels' results did.

A worker runs in a copy of the caller's context, so NumPy's allocator there
is the caller's (ghess's pool inside ``_config.computing``, whose counts the
memory plan's probes read).
"""

import contextvars
import itertools
import threading

from ._config import kernels_on_one_thread

__all__ = ["WORKER_CHUNKS", "worker_count", "contiguous_runs", "worker_runs", "first_samples",
           "run_workers", "map_chunks"]


#: chunks per thread that the data must make for them to go to workers: on fewer, the
#: workers' Python between kernels (one at a time, under the GIL) and their start cost
#: more than they save (CNN-S, 128 samples in 4 chunks, 2 threads: loss+gradient 10%
#: slower on workers; CNN-C, 1024 samples in 32 chunks: products 11% faster)
WORKER_CHUNKS = 2


def worker_count(n_chunks: int, n_threads: int) -> int:
    """Workers for ``n_chunks`` chunks on ``n_threads`` threads: the threads, or 1.

    With fewer than ``WORKER_CHUNKS`` chunks per thread, one chunk at a time runs
    on all the threads, parallel inside its kernels (a single worker).
    """
    return n_threads if n_threads > 1 and n_chunks >= WORKER_CHUNKS * n_threads else 1


def contiguous_runs(n_items: int, n_workers: int) -> list[range]:
    """Cut ``range(n_items)`` into ``n_workers`` contiguous runs, sizes differing by at most 1."""
    return [range(w * n_items // n_workers, (w + 1) * n_items // n_workers)
            for w in range(n_workers)]


def worker_runs(n_chunks: int, n_threads: int) -> list[range]:
    """Return the chunks' runs, one per worker (``worker_count`` of them, contiguous)."""
    return contiguous_runs(n_chunks, worker_count(n_chunks, n_threads))


def first_samples(chunk_sizes) -> list[int]:
    """Return each chunk's first sample in the data: what a worker that starts mid-way needs."""
    return [0, *itertools.accumulate(chunk_sizes)][:-1]


def run_workers(n_workers: int, task):
    """Return ``[task(0), ..., task(n_workers - 1)]``, the tasks run at once.

    Task 0 runs in the calling thread, the others in threads of their own;
    in each, the kernels run on one thread. Every task finishes before this
    returns; then the error of the lowest-numbered task that failed, if any,
    is raised (the same one on every run, whichever failed first in time).
    """
    if n_workers == 1:
        return [task(0)]
    results = [None] * n_workers
    errors = [None] * n_workers

    def body(w):
        try:
            with kernels_on_one_thread():
                results[w] = task(w)
        except BaseException as exc:  # noqa: BLE001 -- re-raised below, in task order
            errors[w] = exc

    threads = [threading.Thread(target=contextvars.copy_context().run, args=(body, w),
                                name=f"ghess-worker-{w}", daemon=True)
               for w in range(1, n_workers)]
    for thread in threads:
        thread.start()
    body(0)
    for thread in threads:
        thread.join()
    for exc in errors:
        if exc is not None:
            raise exc
    return results


def map_chunks(items, function, n_threads: int) -> list:
    """Return ``[function(item) for item in items]``, the items shared out over workers."""
    items = list(items)
    runs = worker_runs(len(items), n_threads)
    parts = run_workers(len(runs), lambda w: [function(items[i]) for i in runs[w]])
    return [result for part in parts for result in part]
