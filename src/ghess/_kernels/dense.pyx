"""Cython kernels for the curvature engine.

Design notes
------------
1. Python validates, Cython trusts the values, but every ``def`` entry point
   still checks that the shapes of its memoryviews agree, because a wrong shape
   here would read or write out of bounds. Those checks are O(1).
2. Layouts. A quantity that does not depend on the direction vectors has shape
   ``(n, width)`` (``n`` samples of one chunk). A quantity that does, has shape
   ``(n, k, width)`` for ``k`` directions processed together (``matmat``), so
   that a dense layer's product for all ``k`` directions is ONE GEMM on the
   ``(n * k, width)`` view.
3. Per-sample Jacobian factors ``D[n, c, o] = dz[n, c] / ds[n, o]`` (``c`` over
   the ``K`` network outputs, ``o`` over a layer's outputs) are stored as
   ``(n, K, width)``: the same layout as ``k = K`` directions.
4. Threading: ONE thread pool, OpenMP's. ``prange`` over samples (or
   elements) with a static schedule, and GEMMs split into blocks of the output,
   one single-threaded BLAS call per thread (BLAS is held at one thread during
   products). Two pools, OpenMP's spinning workers and OpenBLAS's, fight over
   the same cores (``docs/design.md``, "Threads and determinism"). No kernel
   sums across threads, so results do not depend on the number of threads
   beyond rounding; sums over samples are GEMMs or the sequential
   ``sum_rows_into``.
5. Elementwise math is done in double precision and rounded to the array's
   dtype: cheap next to the GEMMs, and it keeps float32 activations accurate.
"""
from enum import IntEnum

from cython cimport floating
import numpy as np
from cython.parallel cimport prange
from libc.math cimport exp, fabs, log, log1p
from libc.stdlib cimport free, malloc

from .blas cimport gemm, syrk_lower
from .headers cimport (
    GHESS_OPENMP, GHESS_SKINNY_MAX, ghess_contract_f32, ghess_contract_f64, ghess_contract_t_f32,
    ghess_contract_t_f64, ghess_cpu_isa, ghess_isa_level, ghess_omp_max_threads,
    ghess_set_isa_level, ghess_skinny_tn_f32, ghess_skinny_tn_f64,
    ghess_elu_block, ghess_eluf_block, ghess_gelu_block, ghess_gelu_tanh_block,
    ghess_gelu_tanhf_block, ghess_geluf_block,
    ghess_sigmoid_block, ghess_sigmoidf_block, ghess_silu_block, ghess_siluf_block,
    ghess_tanh_block, ghess_tanhf_block,
)


def openmp_enabled():
    """Whether the kernels were compiled with OpenMP."""
    return bool(GHESS_OPENMP)


#: the best instruction-set level this CPU runs (0 baseline, 1 AVX2, 2 AVX-512)
CPU_ISA = ghess_cpu_isa()
#: the level used unless GHESS_ISA asks for another: the best the CPU has. On an AMD EPYC
#: (Zen 4, 512-bit vectors as two halves) the AVX-512 activations ran 1.5-1.6x faster than
#: the AVX2 ones (float32 tanh, GELU, sigmoid: 1.61 -> 1.03, 2.96 -> 1.82, 1.01 -> 0.67 ms
#: per million), the contractions and skinny GEMM as fast (MLP-M GGN product 32.6 / 32.5 ms)
DEFAULT_ISA = CPU_ISA


def set_isa(int level):
    """Run the C kernels of this module (include/contract.h, skinny.h, vecmath.h) at ISA
    ``level`` (0 the baseline build, 1 AVX2, 2 AVX-512), at most ``CPU_ISA``; return it.

    ``ghess._config`` calls it once at import, from ``GHESS_ISA`` (as ``conv.set_isa``).
    Elementwise kernels give the same bits at every level; the contractions' sums run
    over vector lanes of each level's width and agree to rounding.
    """  # noqa: D205
    return ghess_set_isa_level(level)


def isa():
    """Return the ISA level of this module's C kernels."""
    return ghess_isa_level


def openmp_max_threads():
    """OpenMP's default number of threads (1 without OpenMP)."""
    return ghess_omp_max_threads()


cdef inline void _check(bint ok, str what) except *:
    if not ok:
        raise ValueError(f"internal shape mismatch in ghess._kernels.dense: {what}")


# ---------------------------------------------------------------------------
# GEMM entry point for the Python engine
# ---------------------------------------------------------------------------

# Below this many multiply-adds a GEMM runs on one thread: splitting it would
# cost more in synchronisation than it saves.
cdef double PARALLEL_GEMM_MIN_WORK = 2.0e5


def gemm_rowmajor(bint trans_a, bint trans_b, double alpha,
                  const floating[:, ::1] a,   # IN  (m, k), or (k, m) if trans_a
                  const floating[:, ::1] b,   # IN  (k, n), or (n, k) if trans_b
                  double beta,
                  floating[:, ::1] c,         # OUT (m, n)
                  int n_threads=1):
    """c := alpha * op(a) @ op(b) + beta * c, row-major, GIL released.

    With n_threads > 1 the OUTPUT is split into blocks of rows (or columns, if
    it has more of them), one single-threaded BLAS call per OpenMP thread. BLAS
    itself must then run single-threaded (``ghess._config.single_threaded_blas``): one
    thread pool instead of two competing for the cores, and no sums across
    threads, so the result does not depend on the number of threads beyond the
    blocking inside BLAS.
    """
    cdef int m = a.shape[1] if trans_a else a.shape[0]
    cdef int k = a.shape[0] if trans_a else a.shape[1]
    cdef int kb = b.shape[1] if trans_b else b.shape[0]
    cdef int n = b.shape[0] if trans_b else b.shape[1]
    cdef int lda = a.shape[1], ldb = b.shape[1], ldc = c.shape[1]
    cdef int n_blocks, block, start, size, t
    cdef bint split_rows
    _check(k == kb and c.shape[0] == m and c.shape[1] == n, "gemm operands")
    if m == 0 or n == 0:
        return
    if k == 0:
        with nogil:
            _scale_matrix(m, n, <floating> beta, &c[0, 0], ldc)
        return
    n_blocks = 1
    if n_threads > 1 and <double> m * n * k >= PARALLEL_GEMM_MIN_WORK:
        n_blocks = min(n_threads, max(m, n))
    if (trans_a and not trans_b and m <= GHESS_SKINNY_MAX and alpha == 1.0
            and (beta == 0.0 or beta == 1.0)):
        with nogil:
            _skinny_tn(a, b, beta == 1.0, c, n_blocks)
        return
    if n_blocks == 1:
        with nogil:
            gemm(trans_a, trans_b, m, n, k, <floating> alpha, &a[0, 0], lda,
                 &b[0, 0], ldb, <floating> beta, &c[0, 0], ldc)
        return
    split_rows = m >= n
    for t in prange(n_blocks, nogil=True, schedule='static', num_threads=n_blocks):
        if split_rows:
            block = (m + n_blocks - 1) // n_blocks
            start = t * block
            size = min(block, m - start)
            if size > 0:
                # rows start..start+size of op(a) and of c
                gemm(trans_a, trans_b, size, n, k, <floating> alpha,
                     &a[0, start] if trans_a else &a[start, 0], lda,
                     &b[0, 0], ldb, <floating> beta, &c[start, 0], ldc)
        else:
            block = (n + n_blocks - 1) // n_blocks
            start = t * block
            size = min(block, n - start)
            if size > 0:
                # columns start..start+size of op(b) and of c
                gemm(trans_a, trans_b, m, size, k, <floating> alpha,
                     &a[0, 0], lda,
                     &b[start, 0] if trans_b else &b[0, start], ldb,
                     <floating> beta, &c[0, start], ldc)


def gram_sum(const floating[:, :, ::1] X, bint transpose, floating[:, ::1] out,
             int n_threads=1):
    """out += sum_b X[b] X[b]^T, or with ``transpose`` sum_b X[b]^T X[b]; GIL released.

    X is (batch, rows, cols), row-major. KFAC's Kronecker factors are such sums:
    a convolution's patches (n, C kh kw, P) or output gradients (n m, C_out, P)
    summed over samples and pixels without transposing them first, a dense
    layer's inputs (1, n, d) with ``transpose``. Each product is a SYRK (half a
    GEMM). Threads take contiguous blocks of the batch (with ``transpose``, of
    the rows of the flattened (batch * rows, cols) matrix), each into its own
    buffer; the buffers are added in thread order, so a thread count always
    gives the same result.
    """
    cdef Py_ssize_t batch = X.shape[0], rows = X.shape[1], cols = X.shape[2]
    cdef int d = <int> (cols if transpose else rows)
    cdef Py_ssize_t units = batch * rows if transpose else batch
    cdef Py_ssize_t t, i, j, start, stop, block
    cdef int n_blocks
    _check(out.shape[0] == d and out.shape[1] == d, "gram_sum output")
    if units == 0 or d == 0:
        return
    n_blocks = 1
    if n_threads > 1 and <double> units * rows * cols >= PARALLEL_GEMM_MIN_WORK:
        n_blocks = <int> min(<Py_ssize_t> n_threads, units)
    cdef floating[:, :, ::1] part
    if n_blocks == 1:  # one SYRK straight into out's lower triangle: no buffer to add
        with nogil:
            _gram_block(X, transpose, 0, units, &out[0, 0], d)
            _mirror_lower(out, d)
        return
    parts = np.empty((n_blocks, d, d), dtype=np.asarray(out).dtype)
    part = parts
    block = (units + n_blocks - 1) // n_blocks
    for t in prange(n_blocks, nogil=True, schedule='static', num_threads=n_blocks):
        start = t * block
        stop = min(start + block, units)
        _zero_lower(&part[t, 0, 0], d)  # an empty block's buffer still counts (as zeros)
        _gram_block(X, transpose, start, stop, &part[t, 0, 0], d)
    # the buffers added in thread order, rows shared out between the threads
    for i in prange(d, nogil=True, schedule='static', num_threads=n_blocks):
        for t in range(n_blocks):
            for j in range(i + 1):
                out[i, j] += part[t, i, j]
    _mirror_lower(out, d)


cdef void _gram_block(const floating[:, :, ::1] X, bint transpose, Py_ssize_t start,
                      Py_ssize_t stop, floating* c, int d) noexcept nogil:
    # c's lower triangle += the Gram sum of units start..stop (see gram_sum)
    cdef Py_ssize_t cols = X.shape[2], b
    if start >= stop:
        return
    if transpose:  # rows start..stop of the (batch * rows, cols) matrix
        syrk_lower(True, d, <int> (stop - start), <floating> 1.0, &X[0, 0, 0] + start * cols,
                   <int> cols, <floating> 1.0, c, d)
    else:
        for b in range(start, stop):
            syrk_lower(False, d, <int> cols, <floating> 1.0, &X[b, 0, 0], <int> cols,
                       <floating> 1.0, c, d)


cdef void _zero_lower(floating* a, Py_ssize_t d) noexcept nogil:
    cdef Py_ssize_t i, j
    for i in range(d):
        for j in range(i + 1):
            a[i * d + j] = 0


cdef void _mirror_lower(floating[:, ::1] a, Py_ssize_t d) noexcept nogil:
    # a[i, j] = a[j, i] above the diagonal, in 32 x 32 tiles: the strided reads of a
    # column stay in cache
    cdef Py_ssize_t i0, j0, i, j, i1, j1
    for i0 in range(0, d, 32):
        i1 = min(i0 + 32, d)
        for j0 in range(i0, d, 32):
            j1 = min(j0 + 32, d)
            for i in range(i0, i1):
                for j in range(max(j0, i + 1), j1):
                    a[i, j] = a[j, i]


cdef void _skinny_tn(const floating[:, ::1] a, const floating[:, ::1] b, bint accumulate,
                     floating[:, ::1] c, int n_blocks) noexcept nogil:
    """c (+)= a^T b with a (k, m), m small, without BLAS (see include/skinny.h).

    The weight gradient gy^T x of a dense layer with few outputs. Threads take
    blocks of c's columns, so each sum over the k rows runs in one order.
    """
    cdef Py_ssize_t m = c.shape[0], n = c.shape[1], k = a.shape[0]
    cdef Py_ssize_t block = (n + n_blocks - 1) // n_blocks, start, size
    cdef int t
    for t in prange(n_blocks, schedule='static', num_threads=n_blocks):
        start = t * block
        size = min(block, n - start)
        if size > 0:
            if floating is double:
                ghess_skinny_tn_f64(&a[0, 0], m, &b[0, start], n, &c[0, start], n, m, k, size,
                                    accumulate)
            else:
                ghess_skinny_tn_f32(&a[0, 0], m, &b[0, start], n, &c[0, start], n, m, k, size,
                                    accumulate)


cdef inline void _scale_matrix(int m, int n, floating beta, floating* c,
                               int ldc) noexcept nogil:
    # c := beta * c (the k == 0 case of gemm, where BLAS is not called)
    cdef int i, j
    for i in range(m):
        for j in range(n):
            c[i * ldc + j] = 0 if beta == 0 else beta * c[i * ldc + j]


# ---------------------------------------------------------------------------
# Row and column helpers
# ---------------------------------------------------------------------------

def add_grouped_rows(floating[:, :, ::1] y,          # IN/OUT (n, k, m)
                     const floating[:, ::1] rows,    # IN     (k, m)
                     int n_threads):
    """y[i, j, :] += rows[j, :] for every sample i (bias terms)."""
    cdef Py_ssize_t n = y.shape[0], k = y.shape[1], m = y.shape[2]
    cdef Py_ssize_t i, j, o
    _check(rows.shape[0] == k and rows.shape[1] == m, "add_grouped_rows")
    for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
        for j in range(k):
            for o in range(m):
                y[i, j, o] += rows[j, o]


def sum_rows_into(const floating[:, ::1] x,   # IN     (n, m)
                  floating[::1] out,          # IN/OUT (m,)
                  int n_threads=1):
    """out += sum over rows of x, in a fixed order (deterministic), accumulated in double.

    (A float32 accumulator lost 1.5% of a bias gradient over 2e6 samples.) Four
    rows per pass over the accumulator, which the compiler vectorises; threads
    take blocks of columns, so each column's sum runs in one order.
    """
    cdef Py_ssize_t n = x.shape[0], m = x.shape[1]
    cdef Py_ssize_t block, start, size
    cdef double[::1] acc
    cdef int t, n_blocks
    _check(out.shape[0] == m, "sum_rows_into")
    if m == 0 or n == 0:
        return
    acc = np.zeros(m)
    # a block of at least 64 columns (a cache line of float64 sums and more) per thread
    n_blocks = max(1, min(n_threads, m // 64)) if <double> n * m >= 1e5 else 1
    block = (m + n_blocks - 1) // n_blocks
    for t in prange(n_blocks, nogil=True, schedule='static', num_threads=n_blocks):
        start = t * block
        size = min(block, m - start)
        if size > 0:
            _sum_rows_block(&x[0, start], m, n, size, &acc[start])
    for t in range(m):
        out[t] += <floating> acc[t]


cdef void _sum_rows_block(const floating* x, Py_ssize_t ldx, Py_ssize_t n, Py_ssize_t size,
                          double* sums) noexcept nogil:
    # sums[o] += x[i, o] for o < size, four rows per pass
    cdef Py_ssize_t i = 0, o
    cdef const floating* r0
    while i + 4 <= n:
        r0 = x + i * ldx
        for o in range(size):
            sums[o] += ((<double> r0[o] + <double> r0[ldx + o])
                        + (<double> r0[2 * ldx + o] + <double> r0[3 * ldx + o]))
        i += 4
    while i < n:
        r0 = x + i * ldx
        for o in range(size):
            sums[o] += <double> r0[o]
        i += 1


# ---------------------------------------------------------------------------
# Elementwise activations
# ---------------------------------------------------------------------------

cdef inline void _sigmoid_both(double x, double* s, double* c) noexcept nogil:
    # s = sigma(x) and c = 1 - sigma(x) = sigma(-x), each to full relative precision:
    # 1 - s cancels to 0 above x ~ 36.7, where sigma'(x) = s c is still e^-x, not 0
    cdef double e = exp(-fabs(x))
    if x >= 0:
        s[0] = 1.0 / (1.0 + e)
        c[0] = e / (1.0 + e)
    else:
        s[0] = e / (1.0 + e)
        c[0] = 1.0 / (1.0 + e)


cdef inline void _activation(int kind, double x, double p0, double p1,
                             double* y, double* d1, double* d2) noexcept nogil:
    # y = f(x), d1 = f'(x), d2 = f''(x) for the kinds without a vectorised kernel (ReLU and
    # LeakyReLU have loops of their own, the rest the blocks of vecmath.h): SOFTPLUS, with
    # p0: beta and p1: threshold, and the identity
    cdef double s, c, bx
    if kind == SOFTPLUS:
        # linear above the threshold, as in PyTorch
        bx = p0 * x
        if bx > p1:
            y[0] = x
            d1[0] = 1.0
            d2[0] = 0.0
        else:
            _sigmoid_both(bx, &s, &c)
            y[0] = (log1p(exp(-fabs(bx))) + (bx if bx > 0 else 0.0)) / p0
            d1[0] = s
            d2[0] = p0 * s * c
    else:
        y[0] = x
        d1[0] = 1.0
        d2[0] = 0.0


cdef inline void _block_kernel(int kind, const floating* x, floating* y, floating* d1,
                               floating* d2, Py_ssize_t n, double p0) noexcept nogil:
    # the vectorised kernel of vecmath.h for one contiguous block
    if floating is double:
        if kind == TANH:
            ghess_tanh_block(x, y, d1, d2, n)
        elif kind == SIGMOID:
            ghess_sigmoid_block(x, y, d1, d2, n, p0)
        elif kind == SILU:
            ghess_silu_block(x, y, d1, d2, n, p0)
        elif kind == GELU_TANH:
            ghess_gelu_tanh_block(x, y, d1, d2, n, p0)
        elif kind == GELU:
            ghess_gelu_block(x, y, d1, d2, n, p0)
        else:
            ghess_elu_block(x, y, d1, d2, n, p0)
    else:
        if kind == TANH:
            ghess_tanhf_block(x, y, d1, d2, n)
        elif kind == SIGMOID:
            ghess_sigmoidf_block(x, y, d1, d2, n, p0)
        elif kind == SILU:
            ghess_siluf_block(x, y, d1, d2, n, p0)
        elif kind == GELU_TANH:
            ghess_gelu_tanhf_block(x, y, d1, d2, n, p0)
        elif kind == GELU:
            ghess_geluf_block(x, y, d1, d2, n, p0)
        else:
            ghess_eluf_block(x, y, d1, d2, n, p0)


#: the kinds with a vectorised kernel in vecmath.h
cdef inline bint _has_block_kernel(int kind) noexcept nogil:
    return (kind == TANH or kind == SIGMOID or kind == SILU or kind == GELU
            or kind == GELU_TANH or kind == ELU)


cdef void _activation_blocks(int kind, const floating* x, floating* y, floating* d1,
                             floating* d2, Py_ssize_t size, double p0,
                             int n_threads) noexcept nogil:
    # one contiguous block per thread, each through the vectorised loop of the header
    cdef Py_ssize_t block = (size + n_threads - 1) // n_threads if n_threads > 0 else size
    cdef Py_ssize_t b, start, count
    if size == 0:
        return
    for b in prange(n_threads, schedule='static', num_threads=n_threads):
        start = b * block
        count = min(block, size - start)
        if count > 0:
            _block_kernel(kind, x + start, y + start, NULL if d1 == NULL else d1 + start,
                          NULL if d2 == NULL else d2 + start, count, p0)


def activation_forward(int kind, double p0, double p1,
                       const floating[::1] x,   # IN  (size,)
                       floating[::1] y,         # OUT (size,)
                       floating[::1] d1,        # OUT (size,) f'(x), or empty
                       floating[::1] d2,        # OUT (size,) f''(x), or empty
                       int n_threads):
    """y = f(x), and optionally f'(x) and f''(x), elementwise."""
    cdef Py_ssize_t size = x.shape[0], i
    cdef bint want_d1 = d1.shape[0] > 0, want_d2 = d2.shape[0] > 0
    cdef double vy, v1, v2
    cdef floating slope = <floating> p0
    _check(y.shape[0] == size, "activation_forward y")
    _check(not want_d1 or d1.shape[0] == size, "activation_forward d1")
    _check(not want_d2 or d2.shape[0] == size, "activation_forward d2")
    if kind == RELU or kind == LEAKY_RELU:
        if kind == RELU:
            slope = 0
        # piecewise linear: plain loops that GCC vectorises (with -fno-trapping-math, see
        # the top-level meson.build); the per-element _activation below does not vectorise
        if want_d1:  # one pass over x for both
            for i in prange(size, nogil=True, schedule='static', num_threads=n_threads):
                y[i] = x[i] if x[i] > 0 else slope * x[i]
                d1[i] = 1 if x[i] > 0 else slope
        else:
            for i in prange(size, nogil=True, schedule='static', num_threads=n_threads):
                y[i] = x[i] if x[i] > 0 else slope * x[i]
        if want_d2:
            d2[:] = 0
        return
    if _has_block_kernel(kind):
        _activation_blocks(kind, &x[0] if size else NULL, &y[0] if size else NULL,
                           &d1[0] if want_d1 else NULL, &d2[0] if want_d2 else NULL, size, p0,
                           n_threads)
        return
    for i in prange(size, nogil=True, schedule='static', num_threads=n_threads):
        # Assigned in the loop body, so that prange makes them thread-private
        # (a variable only written through a pointer would be shared).
        vy = 0.0
        v1 = 0.0
        v2 = 0.0
        _activation(kind, x[i], p0, p1, &vy, &v1, &v2)
        y[i] = <floating> vy
        if want_d1:
            d1[i] = <floating> v1
        if want_d2:
            d2[i] = <floating> v2


def scale_grouped(const floating[:, ::1] d,     # IN  (n, m)
                  const floating[:, :, ::1] x,  # IN  (n, k, m)
                  floating[:, :, ::1] out,      # OUT (n, k, m), may alias x
                  int n_threads):
    """out[i, j, :] = d[i, :] * x[i, j, :] (an activation's JVP or VJP)."""
    cdef Py_ssize_t n = x.shape[0], k = x.shape[1], m = x.shape[2]
    cdef Py_ssize_t i, j, o
    _check(d.shape[0] == n and d.shape[1] == m, "scale_grouped d")
    _check(out.shape[0] == n and out.shape[1] == k and out.shape[2] == m,
           "scale_grouped out")
    for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
        for j in range(k):
            for o in range(m):
                out[i, j, o] = d[i, o] * x[i, j, o]


def activation_rbackward(const floating[:, ::1] d1,      # IN  (n, m) f'(s)
                         const floating[:, ::1] d2,      # IN  (n, m) f''(s)
                         const floating[:, ::1] g,       # IN  (n, m) dL/df
                         const floating[:, :, ::1] rx,   # IN  (n, k, m) R{s}
                         const floating[:, :, ::1] rg,   # IN  (n, k, m) R{dL/df}
                         floating[:, :, ::1] out,        # OUT (n, k, m) R{dL/ds}
                         int n_threads):
    """R{dL/ds} = f'(s) R{dL/df} + f''(s) (dL/df) R{s} (R-operator backward)."""
    cdef Py_ssize_t n = rx.shape[0], k = rx.shape[1], m = rx.shape[2]
    cdef Py_ssize_t i, j, o
    _check(d1.shape[0] == n and d1.shape[1] == m, "activation_rbackward d1")
    _check(d2.shape[0] == n and d2.shape[1] == m, "activation_rbackward d2")
    _check(g.shape[0] == n and g.shape[1] == m, "activation_rbackward g")
    _check(rg.shape[0] == n and rg.shape[1] == k and rg.shape[2] == m,
           "activation_rbackward rg")
    _check(out.shape[0] == n and out.shape[1] == k and out.shape[2] == m,
           "activation_rbackward out")
    for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
        for j in range(k):
            for o in range(m):
                out[i, j, o] = d1[i, o] * rg[i, j, o] + d2[i, o] * g[i, o] * rx[i, j, o]


# ---------------------------------------------------------------------------
# Per-sample Jacobian factors
# ---------------------------------------------------------------------------

def contract_factor(const floating[:, :, ::1] D,   # IN  (n, K, m)
                    const floating[:, :, ::1] u,   # IN  (n, k, m)
                    floating[:, :, ::1] out,       # IN/OUT (n, k, K)
                    bint accumulate,
                    int n_threads):
    """out[i, j, :] (+)= D[i] @ u[i, j, :]  (J v for one layer, per sample)."""
    cdef Py_ssize_t n = D.shape[0], K = D.shape[1], m = D.shape[2]
    cdef Py_ssize_t k = u.shape[1], i
    _check(u.shape[0] == n and u.shape[2] == m, "contract_factor u")
    _check(out.shape[0] == n and out.shape[1] == k and out.shape[2] == K,
           "contract_factor out")
    if n == 0 or k == 0 or K == 0:
        return
    for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
        if floating is double:
            ghess_contract_f64(&D[i, 0, 0] if m else NULL, &u[i, 0, 0] if m else NULL,
                               &out[i, 0, 0], K, m, k, accumulate)
        else:
            ghess_contract_f32(&D[i, 0, 0] if m else NULL, &u[i, 0, 0] if m else NULL,
                               &out[i, 0, 0], K, m, k, accumulate)


def contract_factor_t(const floating[:, :, ::1] D,   # IN  (n, K, m)
                      const floating[:, :, ::1] w,   # IN  (n, k, K)
                      floating[:, :, ::1] out,       # OUT (n, k, m)
                      int n_threads):
    """out[i, j, :] = D[i]^T @ w[i, j, :]  (J^T w for one layer, per sample)."""
    cdef Py_ssize_t n = D.shape[0], K = D.shape[1], m = D.shape[2]
    cdef Py_ssize_t k = w.shape[1], i
    _check(w.shape[0] == n and w.shape[2] == K, "contract_factor_t w")
    _check(out.shape[0] == n and out.shape[1] == k and out.shape[2] == m,
           "contract_factor_t out")
    if n == 0 or k == 0 or m == 0:
        return
    if K == 0:
        out[...] = 0
        return
    for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
        if floating is double:
            ghess_contract_t_f64(&D[i, 0, 0], &w[i, 0, 0], &out[i, 0, 0], K, m, k, 0)
        else:
            ghess_contract_t_f32(&D[i, 0, 0], &w[i, 0, 0], &out[i, 0, 0], K, m, k, 0)


def ggn_factor_core(tuple D,                      # IN  per layer (n, K, m_l)
                    tuple U,                      # IN  per layer (n, k, m_l): (dp/dw) v
                    tuple S,                      # OUT per layer (n, k, m_l): D^T B J v
                    floating[:, :, ::1] Jv,       # IN/OUT (n, k, K)
                    floating[:, :, ::1] u,        # OUT (n, k, K): scale * B J v
                    int kind,
                    const floating[:, ::1] state,  # IN  (n, K), or (0, 0): see output_hessian_apply
                    double scale,
                    int n_threads):
    """The middle of a stored GGN product, one sample at a time.

    Per sample i: Jv[i] += sum_l D_l[i] U_l[i] (Jv comes in holding the terms of
    the layers without a per-sample factor), u[i] = scale * B_i Jv[i], and
    S_l[i] = D_l[i]^T u[i]. Taking a sample's three steps together reads its
    factors from memory once and then from cache, where one pass per step read
    them from memory twice (a conv net's factors take about 1 MB per sample).
    """
    cdef Py_ssize_t n = Jv.shape[0], k = Jv.shape[1], K = Jv.shape[2], i
    cdef Py_ssize_t L = len(D), l
    cdef floating[:, :, ::1] d, a, b
    _check(len(U) == L and len(S) == L, "ggn_factor_core layer count")
    _check(u.shape[0] == n and u.shape[1] == k and u.shape[2] == K, "ggn_factor_core u")
    _check_output_hessian(kind, state, n, K)
    if n == 0 or k == 0 or K == 0:
        return
    cdef Py_ssize_t* m = <Py_ssize_t*> malloc(max(L, 1) * sizeof(Py_ssize_t))
    cdef const floating** Dp = <const floating**> malloc(max(L, 1) * sizeof(floating*))
    cdef const floating** Up = <const floating**> malloc(max(L, 1) * sizeof(floating*))
    cdef floating** Sp = <floating**> malloc(max(L, 1) * sizeof(floating*))
    if m == NULL or Dp == NULL or Up == NULL or Sp == NULL:
        free(m); free(Dp); free(Up); free(Sp)
        raise MemoryError()
    try:
        for l in range(L):
            d, a, b = D[l], U[l], S[l]  # the tuples keep the arrays alive
            _check(d.shape[0] == n and d.shape[1] == K and d.shape[2] > 0,
                   "ggn_factor_core D")
            _check(a.shape[0] == n and a.shape[1] == k and a.shape[2] == d.shape[2],
                   "ggn_factor_core U")
            _check(b.shape[0] == n and b.shape[1] == k and b.shape[2] == d.shape[2],
                   "ggn_factor_core S")
            m[l], Dp[l], Up[l], Sp[l] = d.shape[2], &d[0, 0, 0], &a[0, 0, 0], &b[0, 0, 0]
        for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
            _ggn_core_sample(Dp, Up, Sp, m, L, &Jv[i, 0, 0], &u[i, 0, 0], i, k, K, kind,
                             &state[i, 0] if kind != B_IDENTITY else NULL, scale)
    finally:
        free(m); free(Dp); free(Up); free(Sp)


cdef void _ggn_core_sample(const floating** D, const floating** U, floating** S,
                           const Py_ssize_t* m, Py_ssize_t L, floating* Jv, floating* u,
                           Py_ssize_t i, Py_ssize_t k, Py_ssize_t K, int kind,
                           const floating* state, double scale) noexcept nogil:
    # sample i of ggn_factor_core
    cdef Py_ssize_t l
    for l in range(L):
        if floating is double:
            ghess_contract_f64(D[l] + i * K * m[l], U[l] + i * k * m[l], Jv, K, m[l], k, 1)
        else:
            ghess_contract_f32(D[l] + i * K * m[l], U[l] + i * k * m[l], Jv, K, m[l], k, 1)
    _apply_output_hessian(kind, state, scale, Jv, u, k, K)
    for l in range(L):
        if floating is double:
            ghess_contract_t_f64(D[l] + i * K * m[l], u, S[l] + i * k * m[l], K, m[l], k, 0)
        else:
            ghess_contract_t_f32(D[l] + i * K * m[l], u, S[l] + i * k * m[l], K, m[l], k, 0)


def linear_sample_jacobian(const floating[:, :, ::1] D,   # IN  (n, K, m), m outputs
                           const floating[:, ::1] a,      # IN  (n, p), p inputs
                           bint has_bias,
                           Py_ssize_t offset,
                           floating[:, :, ::1] J,         # OUT (n, K, n_params)
                           int n_threads):
    """Write a dense layer's block of the per-sample Jacobians.

    J[i, c, offset + o * p + q] = D[i, c, o] * a[i, q]   (weight, (m, p) C order)
    J[i, c, offset + m * p + o] = D[i, c, o]             (bias)
    """
    cdef Py_ssize_t n = D.shape[0], K = D.shape[1], m = D.shape[2]
    cdef Py_ssize_t p = a.shape[1], i, c, o, q, base
    cdef floating dco
    _check(a.shape[0] == n and J.shape[0] == n and J.shape[1] == K,
           "linear_sample_jacobian shapes")
    _check(offset >= 0 and offset + m * p + (m if has_bias else 0) <= J.shape[2],
           "linear_sample_jacobian offset")
    for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
        for c in range(K):
            for o in range(m):
                dco = D[i, c, o]
                base = offset + o * p
                for q in range(p):
                    J[i, c, base + q] = dco * a[i, q]
                if has_bias:
                    J[i, c, offset + m * p + o] = dco


# ---------------------------------------------------------------------------
# Losses: per-sample value, gradient r = dl/dz, and the output-space Hessian B
# ---------------------------------------------------------------------------

def mse_value_grad(const floating[:, ::1] z,    # IN  (n, K)
                   const floating[:, ::1] y,    # IN  (n, K)
                   double scale,
                   double[::1] loss_out,        # OUT (n,) sum_c (z - y)^2
                   floating[:, ::1] r_out,      # OUT (n, K) scale * 2 (z - y)
                   int n_threads):
    """Squared error per sample and its scaled gradient."""
    cdef Py_ssize_t n = z.shape[0], K = z.shape[1], i, c
    cdef double diff, acc
    _check(y.shape[0] == n and y.shape[1] == K, "mse y")
    _check(loss_out.shape[0] == n, "mse loss_out")
    _check(r_out.shape[0] == n and r_out.shape[1] == K, "mse r_out")
    for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
        acc = 0.0
        for c in range(K):
            diff = <double> z[i, c] - <double> y[i, c]
            acc = acc + diff * diff
            r_out[i, c] = <floating> (2.0 * scale * diff)
        loss_out[i] = acc


def cross_entropy_value_grad(const floating[:, ::1] z,     # IN  (n, K) logits
                             const Py_ssize_t[::1] labels,  # IN  (n,) in [0, K)
                             double scale,
                             double[::1] loss_out,          # OUT (n,)
                             floating[:, ::1] r_out,        # OUT (n, K) scale (p - e_y)
                             floating[:, ::1] p_out,        # OUT (n, K) softmax(z)
                             int n_threads):
    """Softmax cross-entropy per sample, its scaled gradient, and softmax."""
    cdef Py_ssize_t n = z.shape[0], K = z.shape[1], i, c
    cdef double zmax, total, lse, pc
    _check(labels.shape[0] == n and loss_out.shape[0] == n, "cross_entropy n")
    _check(r_out.shape[0] == n and r_out.shape[1] == K, "cross_entropy r_out")
    _check(p_out.shape[0] == n and p_out.shape[1] == K, "cross_entropy p_out")
    for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
        zmax = z[i, 0]
        for c in range(1, K):
            if z[i, c] > zmax:
                zmax = z[i, c]
        total = 0.0
        for c in range(K):
            total = total + exp(<double> z[i, c] - zmax)
        lse = zmax + log(total)
        loss_out[i] = lse - <double> z[i, labels[i]]
        for c in range(K):
            pc = exp(<double> z[i, c] - lse)
            p_out[i, c] = <floating> pc
            r_out[i, c] = <floating> (scale * (pc - (1.0 if c == labels[i] else 0.0)))


def bce_value_grad(const floating[:, ::1] z,    # IN  (n, K) logits
                   const floating[:, ::1] y,    # IN  (n, K) targets in [0, 1]
                   double scale,
                   double[::1] loss_out,        # OUT (n,)
                   floating[:, ::1] r_out,      # OUT (n, K) scale (sigmoid(z) - y)
                   floating[:, ::1] h_out,      # OUT (n, K) sigmoid'(z)
                   int n_threads):
    """Binary cross-entropy with logits per sample, its gradient, and sigma'."""
    cdef Py_ssize_t n = z.shape[0], K = z.shape[1], i, c
    cdef double zc, s, sc, acc
    _check(y.shape[0] == n and y.shape[1] == K, "bce y")
    _check(loss_out.shape[0] == n, "bce loss_out")
    _check(r_out.shape[0] == n and r_out.shape[1] == K, "bce r_out")
    _check(h_out.shape[0] == n and h_out.shape[1] == K, "bce h_out")
    for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
        acc = 0.0
        for c in range(K):
            zc = z[i, c]
            # max(z, 0) - z y + log(1 + exp(-|z|)): stable for large |z|
            acc = acc + (zc if zc > 0 else 0.0) - zc * y[i, c] + log1p(exp(-fabs(zc)))
            # assigned in the loop body, so that prange makes them thread-private (written
            # only through pointers, they would be shared between the threads)
            s = 0.0
            sc = 0.0
            _sigmoid_both(zc, &s, &sc)
            # s - y, or (1 - y) - (1 - s) where s is near 1: exact for y = 1 at any z
            r_out[i, c] = <floating> (scale * ((s - y[i, c]) if zc < 0
                                               else ((1.0 - y[i, c]) - sc)))
            h_out[i, c] = <floating> (s * sc)  # s (1 - s) would be 0 above z ~ 36.7
        loss_out[i] = acc


# The kinds B_IDENTITY, B_SOFTMAX, B_DIAGONAL of dense.pxd as a Python enum (dense.pxd says
# why it is not a cpdef enum like ActivationKind).
OutputHessianKind = IntEnum(
    "OutputHessianKind",
    [("IDENTITY", B_IDENTITY), ("SOFTMAX", B_SOFTMAX), ("DIAGONAL", B_DIAGONAL)],
    module=__name__,
)
OutputHessianKind.__doc__ = """The output-space Hessian B_i of ``output_hessian_apply``.

IDENTITY: I (state unused); SOFTMAX: diag(p_i) - p_i p_i^T, state p (n, K);
DIAGONAL: diag(h_i), state h (n, K).
"""


cdef inline void _apply_output_hessian(int kind, const floating* state, double scale,
                                       const floating* x, floating* out, Py_ssize_t k,
                                       Py_ssize_t K) noexcept nogil:
    # out[j] = scale * B x[j] for one sample's k directions (x, out: k rows of K)
    cdef Py_ssize_t j, c, top = 0
    cdef double t, xt
    if kind == B_SOFTMAX:
        # B x = p (x - p^T x) = p (d - p^T d) with d = x - x_top, as sum(p) = 1. The largest
        # p never enters p^T d (d_top = 0): at a saturated softmax, where p_top rounds to 1
        # and sum(p) is off by an ulp, p^T x would add -ulp * x_top^2 to x^T B x and make
        # B indefinite; p^T d keeps its true, tiny size and B stays PSD
        for c in range(1, K):
            if state[c] > state[top]:
                top = c
    for j in range(k):
        if kind == B_SOFTMAX:
            xt = <double> x[j * K + top]
            t = 0.0
            for c in range(K):
                t = t + <double> state[c] * (<double> x[j * K + c] - xt)
            for c in range(K):
                out[j * K + c] = <floating> (scale * <double> state[c]
                                             * ((<double> x[j * K + c] - xt) - t))
        elif kind == B_DIAGONAL:
            for c in range(K):
                out[j * K + c] = <floating> (scale * <double> state[c] * <double> x[j * K + c])
        else:
            for c in range(K):
                out[j * K + c] = <floating> (scale * <double> x[j * K + c])


cdef void _check_output_hessian(int kind, const floating[:, ::1] state, Py_ssize_t n,
                                Py_ssize_t K) except *:
    _check(B_IDENTITY <= kind <= B_DIAGONAL, "output Hessian kind")
    _check(kind == B_IDENTITY or (state.shape[0] == n and state.shape[1] == K),
           "output Hessian state")


def output_hessian_apply(int kind,
                         const floating[:, ::1] state,  # IN  (n, K), or (0, 0) for B_IDENTITY
                         double scale,
                         const floating[:, :, ::1] x,   # IN  (n, k, K)
                         floating[:, :, ::1] out,       # OUT (n, k, K)
                         int n_threads):
    """out[i, j] = scale * B_i x[i, j] (B_i of the given kind: an OutputHessianKind)."""
    cdef Py_ssize_t n = x.shape[0], k = x.shape[1], K = x.shape[2], i
    _check_output_hessian(kind, state, n, K)
    _check(out.shape[0] == n and out.shape[1] == k and out.shape[2] == K,
           "output_hessian_apply out")
    if n == 0 or k == 0 or K == 0:
        return
    for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
        _apply_output_hessian(kind, &state[i, 0] if kind != B_IDENTITY else NULL, scale,
                              &x[i, 0, 0], &out[i, 0, 0], k, K)
