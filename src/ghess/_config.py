"""Thread control, the pool of temporaries, and build information."""

import contextlib
import os
import platform
import sys
import threading
import warnings

import numpy as np
import scipy

from ._kernels import alloc, conv, dense
from ._version import __version__

_controller = None


def requested_threads(n_threads: int | None) -> int:
    """Return the thread count asked for: ``n_threads``, or OpenMP's default for ``None``."""
    return max(1, dense.openmp_max_threads()) if n_threads is None else n_threads


def resolve_n_threads(n_threads: int | None) -> int:
    """Threads for the OpenMP kernels: ``None`` means OpenMP's default."""
    return effective_threads(requested_threads(n_threads))


# Fork safety. GNU OpenMP's thread pool does not survive fork(): a child forked after
# the parent ran a parallel region with 2 or more threads hangs in its first parallel
# region of 2 or more. So the parent notes when it hands ghess's kernels 2 or more
# threads, and a child forked after that runs them on one thread (a one-time warning
# says so). Processes started with multiprocessing's "spawn" or "forkserver" method
# are not forked from a used runtime and keep their threads.
_OPENMP = dense.openmp_enabled()  # without OpenMP the kernels run serially anyway
_threads_used = False
_forked_after_threads = False
_fork_warned = False


def _after_fork_in_child():
    global _forked_after_threads, _fork_warned
    if _threads_used:
        _forked_after_threads = True
        _fork_warned = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# A worker of ``_parallel`` runs its chunks' kernels on one thread: its siblings hold
# the other cores.
_worker = threading.local()


@contextlib.contextmanager
def kernels_on_one_thread():
    """Inside the block, in this thread only, ``effective_threads`` is 1."""
    previous = getattr(_worker, "single", False)
    _worker.single = True
    try:
        yield
    finally:
        _worker.single = previous


def effective_threads(n_threads: int) -> int:
    """Return the threads the kernels may use: ``n_threads``; 1 in an unsafe forked child,
    or in a worker thread of ``_parallel``."""  # noqa: D205, D209
    global _threads_used, _fork_warned
    if n_threads > 1 and getattr(_worker, "single", False):
        return 1
    if n_threads > 1 and _OPENMP:
        if _forked_after_threads:
            if not _fork_warned:
                _fork_warned = True
                warnings.warn(
                    "ghess runs its kernels on one thread in this process: it was forked "
                    "after its parent ran them on several, and OpenMP's threads do not "
                    "survive fork (start worker processes with multiprocessing's 'spawn' "
                    "or 'forkserver' method to keep them parallel)", RuntimeWarning,
                    stacklevel=3)
            return 1
        _threads_used = True
    return n_threads


def _threadpool_controller():
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    return _controller


_blas_lock = threading.Lock()
_blas_depth = 0
_blas_saved = ()  # (library, its thread count) for each BLAS that single_threaded_blas changed
_blas_libraries = None

#: cap of the pool of freed temporaries (see alloc.h): a few chunks' worth, as
#: a chunk's temporaries are 64-128 MiB by default (``_engine.plan.CHUNK_BYTES``),
#: and every worker thread (``_parallel``) has its own chunk, as has a conv net's
#: one chunk on several threads per thread (up to MAX_CHUNK_THREADS): the default
#: cap is this, or 128 MiB per such thread of OpenMP's default where that is more
DEFAULT_POOL_MB = 256
#: a conv net's one chunk on several threads, with too few samples for a worker per
#: thread, grows with the threads up to this many (``_engine.plan``: temporaries
#: of at most 16 x 64 MiB = 1 GiB per chunk)
MAX_CHUNK_THREADS = 16


def default_pool_mb() -> int:
    """Return the pool's cap without ``GHESS_POOL_MB``, in MiB."""
    return max(DEFAULT_POOL_MB, 128 * min(requested_threads(None), MAX_CHUNK_THREADS))


def _pool_limit_from_environment():
    value = os.environ.get("GHESS_POOL_MB")
    if value is None or not value.strip():
        return default_pool_mb() << 20
    try:
        mb = float(value)
    except ValueError:
        mb = -1.0
    if not mb >= 0 or mb == float("inf"):
        raise ValueError(f"GHESS_POOL_MB must be a number of MiB >= 0, got {value!r}")
    return int(mb * (1 << 20))


alloc.set_limit(_pool_limit_from_environment())


def _level_from_environment(variable, levels):
    """Return the ISA level that environment variable ``variable`` names (None: unset).

    ``levels`` maps each name it may take to its level; asking for more than the CPU
    has gives what it has (``set_isa`` caps it).
    """
    value = os.environ.get(variable, "").strip().lower()
    if not value:
        return None
    if value not in levels:
        raise ValueError(f"{variable} must be one of {', '.join(levels)}, got {value!r}")
    return levels[value]


_LEVELS = {name: level for level, name in enumerate(conv.ISA_NAMES)}
# GHESS_ISA: avx512, avx2 or generic (the direct convolutions off: im2col + BLAS; the
# other C kernels at their baseline build) for every kernel, so that one machine can
# test and time every path. Unset, each module takes its default (conv.DEFAULT_ISA: per
# layer the faster of AVX2 and AVX-512, timed at its first call; dense.DEFAULT_ISA: what
# measured fastest).
_ISA = _level_from_environment("GHESS_ISA", _LEVELS)
# GHESS_CONV_ISA: the direct convolutions alone, over GHESS_ISA (measured as well), so
# that their AVX2 and AVX-512 builds can be timed against the per-layer choice with
# every other kernel at its default
_CONV_ISA = _level_from_environment("GHESS_CONV_ISA", {"measured": conv.ISA_MEASURED, **_LEVELS})
conv.set_isa(_CONV_ISA if _CONV_ISA is not None else
             conv.DEFAULT_ISA if _ISA is None else _ISA)
conv.set_maps_isa(conv.MAPS_DEFAULT_ISA if _ISA is None else _ISA)
dense.set_isa(dense.DEFAULT_ISA if _ISA is None else _ISA)


def release_memory() -> int:
    """Free the temporaries ghess keeps for reuse; return the number of bytes freed.

    Each chunk of a product or a loss+gradient allocates and frees megabytes of
    temporaries. Handing them back to the OS and faulting them in again costs
    a sixth of a call or more (``docs/design.md``), so ghess keeps the freed
    blocks of at least 1 MiB for its next allocations: at most ``GHESS_POOL_MB``
    MiB (environment variable read at import; default 256, or 128 per thread of
    OpenMP's default where that is more; 0 keeps none). Arrays you create
    outside ghess never use this pool.
    """
    return alloc.release()


@contextlib.contextmanager
def computing():
    """Run a ghess computation: BLAS held at one thread, temporaries from the pool."""
    previous = alloc.use_pool()
    try:
        with single_threaded_blas():
            yield
    finally:
        alloc.restore(previous)


@contextlib.contextmanager
def single_threaded_blas():
    """Hold every BLAS library at one thread inside the block.

    ghess parallelises with OpenMP only, splitting GEMMs itself
    (``_kernels.dense.gemm_rowmajor``): a second pool of spinning BLAS threads would
    compete with OpenMP's for the same cores. Re-entrant and thread-safe: the
    first block to enter sets the limit, the last to leave restores it, so
    products running in several Python threads never see BLAS threads change.
    """
    global _blas_depth, _blas_saved
    with _blas_lock:
        if _blas_depth == 0:
            _blas_saved = _limit_blas_to_one_thread()
        _blas_depth += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_depth -= 1
            if _blas_depth == 0:
                for library, n in _blas_saved:
                    library.set_num_threads(n)
                _blas_saved = ()


def _limit_blas_to_one_thread():
    """Set every BLAS library to one thread; return those changed, with their counts.

    The calls go straight to threadpoolctl's per-library controllers, found once:
    its ``limit()`` context re-reads every library's state on each entry, a
    noticeable share of a small product's Python overhead (docs/design.md).
    """
    global _blas_libraries
    if _blas_libraries is None:
        _blas_libraries = tuple(
            _threadpool_controller().select(user_api="blas").lib_controllers)
    saved = []
    for library in _blas_libraries:
        n = library.get_num_threads()
        if n != 1:
            library.set_num_threads(1)
            if n is not None:
                saved.append((library, n))
    return tuple(saved)


def show_config(file=None) -> None:
    """Print versions, OpenMP support, threads and the BLAS libraries in use."""
    lines = [
        f"ghess:     {__version__}",
        f"python:    {sys.version.split()[0]} ({platform.platform()})",
        f"numpy:     {np.__version__}",
        f"scipy:     {scipy.__version__}",
        f"OpenMP:    {'on' if dense.openmp_enabled() else 'off'}",
        f"threads:   {resolve_n_threads(None)} (OpenMP default; n_threads= overrides)",
        f"ISA:       {conv.isa_name()} (direct convolutions; measured: AVX2 or AVX-512 per "
        f"layer, whichever runs faster; generic: im2col + BLAS; the CPU runs "
        f"{conv.ISA_NAMES[conv.CPU_ISA]}; GHESS_ISA caps it), "
        f"{conv.ISA_NAMES[dense.isa()]} (contractions, skinny GEMM, activations), "
        f"{conv.ISA_NAMES[conv.maps_isa()]} (pooling, bias and batch-norm maps)",
    ]
    try:
        for info in _threadpool_controller().info():
            lines.append(f"threadpool: {info.get('internal_api')} {info.get('version')} "
                         f"({info.get('user_api')}, {info.get('num_threads')} threads, "
                         f"{info.get('filepath')})")
    except Exception as exc:  # threadpoolctl is informative only here
        lines.append(f"threadpool: unavailable ({exc})")
    pool = alloc.stats()
    lines.append(f"pool:      {pool['bytes'] >> 20} of {pool['limit'] >> 20} MiB held in "
                 f"{pool['blocks']} freed blocks ({pool['hits']} reused, {pool['misses']} new; "
                 "GHESS_POOL_MB, ghess.release_memory)")
    print("\n".join(lines), file=file)
