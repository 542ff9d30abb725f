"""GEMM rates: the machine's peak, and each library's BLAS on the same operands.

The peak is a 1024 x 784 x 512 GEMM timed in the worker; :func:`blas_rates` times
the GEMMs of the benchmarked networks in NumPy's BLAS, the BLAS ghess calls
(SciPy's, through a private hook of :mod:`bench._internals`) and PyTorch's.
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
