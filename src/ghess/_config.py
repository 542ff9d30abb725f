"""Thread control and build information."""

import contextlib
import platform
import sys
import threading

import numpy as np
import scipy

from . import _kernels

_controller = None


def resolve_n_threads(n_threads):
    """Threads for the OpenMP kernels: ``None`` means OpenMP's default."""
    if n_threads is None:
        return max(1, _kernels.openmp_max_threads())
    return n_threads


def _threadpool_controller():
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    return _controller


_blas_lock = threading.Lock()
_blas_depth = 0
_blas_limiter = None


@contextlib.contextmanager
def single_threaded_blas():
    """Hold every BLAS library at one thread inside the block.

    ghess parallelises with OpenMP only, splitting GEMMs itself
    (``_kernels.gemm_rowmajor``): a second pool of spinning BLAS threads would
    compete with OpenMP's for the same cores. Re-entrant and thread-safe: the
    first block to enter sets the limit, the last to leave restores it, so
    products running in several Python threads never see BLAS threads change.
    """
    global _blas_depth, _blas_limiter
    with _blas_lock:
        if _blas_depth == 0:
            _blas_limiter = _threadpool_controller().limit(limits=1, user_api="blas")
        _blas_depth += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_depth -= 1
            if _blas_depth == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


def show_config(file=None):
    """Print versions, OpenMP support, threads and the BLAS libraries in use."""
    from . import __version__

    lines = [
        f"ghess:     {__version__}",
        f"python:    {sys.version.split()[0]} ({platform.platform()})",
        f"numpy:     {np.__version__}",
        f"scipy:     {scipy.__version__}",
        f"OpenMP:    {'on' if _kernels.openmp_enabled() else 'off'}",
        f"threads:   {resolve_n_threads(None)} (OpenMP default; n_threads= overrides)",
    ]
    try:
        for info in _threadpool_controller().info():
            lines.append(f"threadpool: {info.get('internal_api')} {info.get('version')} "
                         f"({info.get('user_api')}, {info.get('num_threads')} threads, "
                         f"{info.get('filepath')})")
    except Exception as exc:  # threadpoolctl is informative only here
        lines.append(f"threadpool: unavailable ({exc})")
    print("\n".join(lines), file=file)
