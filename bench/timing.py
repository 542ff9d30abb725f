"""Timing and memory measurement, and the worker processes' thread set-up.

A worker runs with ``threads`` cores: :func:`thread_env` gives the OpenMP/BLAS
(and XLA) thread settings of its environment, and :func:`pin_to_cores` restricts
it to that many cores before numpy, torch or JAX start their thread pools. The
core restriction binds every library alike, including XLA, whose CPU thread pool
has no size flag.

Times are medians after a warm-up (:func:`median_time`); the operations of a worker
are timed in interleaved rounds (:func:`interleaved_times`), so that a drift in the
machine's speed hits every implementation alike. :class:`PeakMemory` samples the
resident set size while one call runs.
"""

import os
import sys
import threading
import time

#: seconds of repeats per operation after its warm-up (--budget sets it in every worker)
BUDGET = 1.0

#: seconds a multi-threaded worker idles before each library's turn in a round: longer
#: than any library's thread pool keeps spinning after its last call (OpenBLAS: 2^28
#: cycles, about 0.11 s here; libgomp and Eigen: milliseconds)
SETTLE = 0.2


def pin_to_cores(threads, skip=0):
    """Restrict this process to ``threads`` of the cores it may use; return them.

    ``skip``: cores to leave to others first (an MPI rank r of t threads skips r t),
    wrapping around when there are not enough.
    """
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if threads > len(allowed):
        cores = allowed
    else:
        cores = allowed[skip % len(allowed):][:threads] or allowed[:threads]
    os.sched_setaffinity(0, cores)
    return cores


def thread_env(threads, env=None):
    """Return a copy of ``env`` (default: this process's) set up for ``threads`` threads.

    OpenMP, OpenBLAS and MKL get the count through their variables; with one thread
    XLA also runs with ``--xla_cpu_multi_thread_eigen=false``.
    """
    env = dict(os.environ if env is None else env)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    if threads == 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                            + " --xla_cpu_multi_thread_eigen=false").strip()
    return env


def median_time(fn, min_repeats, budget=None):
    """Median wall time of ``fn()`` after a warm-up, and the number of runs."""
    import numpy as np

    budget = BUDGET if budget is None else budget
    t0 = time.perf_counter()
    fn()  # warm-up
    first = time.perf_counter() - t0
    # slow operations (the NumPy reference on CNNs) get fewer repeats, never below 3
    min_repeats = max(3, min(min_repeats, int(4 * budget / max(first, 1e-9))))
    times = []
    start = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < budget
                                       and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), len(times)


def library(name):
    """Return the library of a timed operation: its name's first word ("ghess", "JAX")."""
    return name.split(" ", 1)[0]


def interleaved_times(fns, min_repeats, budget=None, settle=0.0):
    """Median wall time, runs and OS-kernel share of every ``fns[name]()``, interleaved.

    Each function is warmed up once; its number of runs is what ``median_time``
    would give it (at least ``min_repeats``, more within ``budget`` seconds, at most
    50, fewer for slow ones but never below 3). Round r then runs, in turn, every
    function that still has runs left. On a shared machine whose speed drifts over
    seconds, consecutive runs of one function would each see a different machine;
    interleaving makes every ratio compare timings taken under the same conditions.
    The kernel share is the process's system CPU time over the wall time of those
    runs: page faults of fresh allocations show there, not in the library's work.

    ``settle`` > 0 (multi-threaded workers): the functions of one library (``library``)
    run together in each round, after ``settle`` seconds of idling and one untimed
    call of that library's quickest function. The idling lets the previous library's
    thread pool stop spinning: with two threads on two cores, a pool still spinning
    takes a core from the next library. The untimed call wakes the library's own
    pool and the idle core (the first call after idling is slower), as in a solver's
    loop, where one library's products run back to back.
    """
    import numpy as np

    budget = BUDGET if budget is None else budget
    runs, first_time = {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()  # warm-up
        first = first_time[name] = max(time.perf_counter() - t0, 1e-9)
        floor = max(3, min(min_repeats, int(4 * budget / first)))
        runs[name] = max(floor, min(50, int(budget / first)))
    quickest = {}
    for name in fns:
        lib = library(name)
        if lib not in quickest or first_time[name] < first_time[quickest[lib]]:
            quickest[lib] = name
    times = {name: [] for name in fns}
    kernel = dict.fromkeys(fns, 0.0)
    for r in range(max(runs.values(), default=0)):
        previous = None
        for name, fn in fns.items():
            if r >= runs[name]:
                continue
            if settle > 0 and library(name) != previous:
                time.sleep(settle)
                fns[quickest[library(name)]]()
            previous = library(name)
            s0, t0 = os.times().system, time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            kernel[name] += os.times().system - s0
    return {name: (float(np.median(ts)), len(ts), kernel[name] / sum(ts))
            for name, ts in times.items()}


class PeakMemory:
    """Peak resident set size of this process while ``measure(fn)`` runs ``fn``."""

    def __init__(self, interval=5e-4):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self._statm = os.open("/proc/self/statm", os.O_RDONLY)

    def rss(self):
        """Resident bytes now."""
        return int(os.pread(self._statm, 128, 0).split()[1]) * self.page

    @staticmethod
    def _reset_high_water_mark():
        """Reset the kernel's VmHWM to the current RSS; False where that is not allowed."""
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _high_water_mark():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    @staticmethod
    def _release_free_heap():
        """Hand freed heap pages back to the OS, so that reuse does not hide a peak."""
        import ctypes

        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass

    def measure(self, fn):
        """Peak extra resident bytes during ``fn()`` over the resident size before it."""
        self._release_free_heap()
        hwm = self._reset_high_water_mark()
        before = peak = self.rss()
        stop = threading.Event()

        def sample():
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, self.rss())
                stop.wait(self.interval)

        sampler = threading.Thread(target=sample, daemon=True)
        switch = sys.getswitchinterval()
        sys.setswitchinterval(self.interval)  # let the sampler in while fn holds the GIL
        sampler.start()
        try:
            result = fn()
            peak = max(peak, self.rss())  # the result still counts
            del result
        finally:
            stop.set()
            sampler.join()
            sys.setswitchinterval(switch)
        if hwm:
            peak = max(peak, self._high_water_mark())
        return peak - before
