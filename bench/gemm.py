"""GEMM rates: the machine's peak, and each library's BLAS on the same operands.

The peak is a 1024 x 784 x 512 GEMM timed in the worker; :func:`blas_rates` times
the GEMMs of the benchmarked networks in NumPy's BLAS, the BLAS ghess calls
(SciPy's, through a private hook of :mod:`bench._internals`) and PyTorch's;
:func:`machine_gemms` gives the same GEMM three ways of using T threads, whose
speed-ups over one thread are what the machine itself gains from more cores.
"""

from . import _internals
from .competitors.common import Unavailable
from .competitors.pytorch import import_torch
from .timing import interleaved_times, median_time

#: (op(a), op(b), m, k, n) of the GEMMs whose rate each library reaches: the peak's
#: shape; MLP-M's forward x W^T, weight gradient g^T x and input gradient g W (its
#: loss+grad's GEMMs); two im2col products of CNN-C's convolutions
BLAS_SHAPES = (("N", "N", 1024, 784, 512), ("N", "T", 1024, 784, 512),
               ("T", "N", 512, 1024, 784), ("N", "N", 1024, 512, 512),
               ("N", "N", 32, 75, 1024), ("N", "N", 64, 576, 64))


def _operand_name(rows, cols, transposed):
    """Name a GEMM operand as the table does: ``rows x cols``, or the transpose it is stored as."""
    return f"({cols}x{rows})^T" if transposed else f"{rows}x{cols}"


def blas_rates(dtype):
    """GFLOP/s of NumPy's matmul, of the BLAS ghess calls and of torch.matmul, per shape.

    ghess calls the BLAS that SciPy ships (``scipy.linalg.cython_blas``); NumPy and
    PyTorch bring their own. The same GEMM can run at different rates in each, which
    no choice inside ghess's kernels changes. Timed in interleaved rounds; NumPy and
    ghess write into preallocated outputs, torch allocates its own as autograd's
    ``mm`` does.
    """
    import numpy as np

    try:
        torch = import_torch()
    except Unavailable:
        torch = None
    rng = np.random.default_rng(2)
    rates = {}
    for op_a, op_b, m, k, n in BLAS_SHAPES:
        trans_a, trans_b = op_a == "T", op_b == "T"
        a = rng.normal(size=(k, m) if trans_a else (m, k)).astype(dtype)
        b = rng.normal(size=(n, k) if trans_b else (k, n)).astype(dtype)
        A, B = (a.T if trans_a else a), (b.T if trans_b else b)
        outputs = [np.empty((m, n), dtype=dtype) for _ in range(2)]

        def ghess_blas(a=a, b=b, c=outputs[0], ta=trans_a, tb=trans_b):
            _internals.gemm_rowmajor(ta, tb, 1.0, a, b, 0.0, c, 1)

        fns = {"numpy": lambda A=A, B=B, c=outputs[1]: np.matmul(A, B, out=c),
               "ghess (SciPy's BLAS)": ghess_blas}
        if torch is not None:
            tA, tB = torch.from_numpy(A), torch.from_numpy(B)
            fns["torch"] = lambda tA=tA, tB=tB: torch.mm(tA, tB)
        timed = interleaved_times(fns, 7, budget=0.2)
        name = f"{_operand_name(m, k, trans_a)} @ {_operand_name(k, n, trans_b)}"
        rates[name] = {lib: 2 * m * k * n / t / 1e9 for lib, (t, _, _) in timed.items()}
    return rates


def gemm_one_thread(a, b, repeats):
    """Median time of ``a @ b`` with NumPy's BLAS held at one thread."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return median_time(lambda: a @ b, repeats)[0]


#: the GEMM whose thread scaling :func:`machine_gemms` measures: (m, k, n)
MACHINE_GEMM = (1024, 784, 512)
#: GEMMs per timed call: about 80 ms on one core, so that a thread's start or wake-up
#: weighs in it as little as in the benchmarked operations (on this VM a thread woken
#: after an idle spell can wait milliseconds for the idle core)
MACHINE_GEMM_REPEATS = 10


def machine_gemms(dtype, threads):
    """Return ``{name: fn}``: ``MACHINE_GEMM_REPEATS`` 1024 x 784 x 512 GEMMs, computed on
    ``threads`` threads three ways, each into a preallocated output.

    - ``split``: ghess's ``gemm_rowmajor``, its output's rows split over OpenMP
      threads, one single-threaded BLAS call each (as ghess's kernels run a chunk);
    - ``side by side``: ``threads`` Python threads, each a single-threaded BLAS call
      on its own share of the rows, with its own copy of the right operand (as
      ghess's workers each run their own chunks);
    - ``NumPy``: NumPy's matmul with its BLAS's own threads (the worker's setting).

    The work is the same at every thread count, so a time's ratio to the 1-thread
    time is the machine's speed-up for that kind of parallel GEMM.
    """  # noqa: D205, D209
    import threading

    import numpy as np

    m, k, n = MACHINE_GEMM
    rng = np.random.default_rng(3)
    a = rng.normal(size=(m, k)).astype(dtype)
    b = rng.normal(size=(k, n)).astype(dtype)
    c = np.empty((m, n), dtype=dtype)
    rows = [slice(w * m // threads, (w + 1) * m // threads) for w in range(threads)]
    shares = [(np.ascontiguousarray(a[r]), b.copy(), np.empty((r.stop - r.start, n), dtype))
              for r in rows]

    def split():
        with _internals.single_threaded_blas():
            for _ in range(MACHINE_GEMM_REPEATS):
                _internals.gemm_rowmajor(False, False, 1.0, a, b, 0.0, c, threads)

    def one_share(w):
        for _ in range(MACHINE_GEMM_REPEATS):
            _internals.gemm_rowmajor(False, False, 1.0, *shares[w][:2], 0.0, shares[w][2], 1)

    def numpy_threads():
        for _ in range(MACHINE_GEMM_REPEATS):
            np.matmul(a, b, out=c)

    def side_by_side():
        with _internals.single_threaded_blas():
            others = [threading.Thread(target=one_share, args=(w,)) for w in range(1, threads)]
            for thread in others:
                thread.start()
            one_share(0)
            for thread in others:
                thread.join()

    # each its own "library" (the name's first word), so that timing rounds with several
    # threads let one's pool idle before the next runs (``timing.interleaved_times``)
    return {"GEMM-split (ghess's gemm_rowmajor, rows over OpenMP threads)": split,
            "GEMM-workers (one single-threaded GEMM per Python thread)": side_by_side,
            "GEMM-NumPy (its BLAS's own threads)": numpy_threads}
