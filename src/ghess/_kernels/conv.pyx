"""Cython kernels for convolution and pooling layers.

Design notes
------------
1. Geometry. Every kernel takes the layer geometry as a tuple of 13 ints
   ``(C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w)`` (see
   ``ghess.nn._window``), unpacked into a ``Geometry`` struct. Inputs are per sample
   ``(C * H * W)`` in C order; unfolded inputs ``(C * kh * kw, P)`` with
   ``P = out_h * out_w``; outputs ``(M, P)`` for ``M`` output channels.
2. A convolution is ``s_n = W phi(x_n)`` per sample (``phi`` = im2col), one
   single-threaded BLAS GEMM per sample, samples spread over OpenMP threads
   (``prange``). BLAS is held at one thread during ghess products.
3. Broadcast over directions. Arrays with a direction axis ``k`` have shape
   ``(n, k, ...)``; an operand whose direction axis has length 1 is shared by
   all k directions. This covers the forward pass (k = 1), ``V phi(x)`` for k
   tangents V (one stacked GEMM), and ``W phi(R{x})`` for k directions R{x}.
4. Sums over samples (weight gradients) go to one accumulator per thread,
   added in thread order at the end: deterministic for a given number of
   threads, equal across thread counts up to rounding.
5. Where the CPU has AVX-512 (F, BW, DQ, VL) or AVX2 and FMA (the level in use:
   ``isa()``, set from ``GHESS_ISA`` at import), a layer with stride 1 along the width runs
   its forward GEMM (and ``V phi(x)``) and its weight gradient as direct
   convolutions (``include/direct_conv.h``): the unfolded operand is read
   straight from a zero-padded copy of the input, faster than im2col + BLAS
   (``docs/design.md``, "Measurements"). Its input gradient is a direct convolution
   too (stride 1 both ways). ``ghess.nn.conv.Conv2d`` then keeps x instead of phi(x). Hessian
   products use the same kernels for ``W phi(R{x})`` (the n*k tangent inputs as
   samples, added into the output: ``accumulate``), ``g phi(R{x})^T`` and
   ``W^T R{g} + V^T g``.
"""
import time

import numpy as np

from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.stdint cimport int32_t
from libc.string cimport memcpy, memset

from .blas cimport gemm
from .headers cimport (
    GHESS_DC_MR, ghess_avgpool_f32, ghess_avgpool_f64, ghess_avgpool_t_f32,
    ghess_avgpool_t_f64, ghess_channel_affine_f32, ghess_channel_affine_f64, ghess_cpu_isa,
    ghess_dc_forward_f32, ghess_dc_forward_f64, ghess_dc_geom, ghess_dc_grad_panels_size,
    ghess_dc_offsets, ghess_dc_pack_grad_f32, ghess_dc_pack_grad_f64, ghess_dc_pack_weights_f32,
    ghess_dc_pack_weights_f64, ghess_dc_pad_f32, ghess_dc_pad_f64, ghess_dc_padded_size,
    ghess_dc_vector_length, ghess_dc_weight_grad_f32, ghess_dc_weight_grad_f64,
    ghess_gather_f32, ghess_gather_f64, ghess_isa_level, ghess_maxpool_f32, ghess_maxpool_f64,
    ghess_pairwise_sum_f32, ghess_pairwise_sum_f64, ghess_pairwise_sum_samples_f32,
    ghess_pairwise_sum_samples_f64, ghess_scatter_f32, ghess_scatter_f64,
    ghess_set_isa_level,
)


# one geometry struct for the Cython kernels and the C ones of include/direct_conv.h
ctypedef ghess_dc_geom Geometry


cdef Geometry _geometry(tuple geom) except *:
    cdef Geometry g
    if len(geom) != 13:
        raise ValueError(f"internal: geometry must have 13 ints, got {geom!r}")
    (g.C, g.H, g.W, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw,
     g.out_h, g.out_w) = geom
    return g


cdef inline void _check(bint ok, str what) except *:
    if not ok:
        raise ValueError(f"internal shape mismatch in ghess._kernels.conv: {what}")


# ---------------------------------------------------------------------------
# im2col / col2im
# ---------------------------------------------------------------------------

cdef inline void _valid_range(int size, int out_size, int stride, int off,
                              int* lo, int* hi) noexcept nogil:
    # outputs t (along one axis) whose input index t*stride + off lies in [0, size):
    # lo <= t < hi. off = tap * dilation - padding: columns (W, out_w, sw, b*dw - pw)
    # or rows (H, out_h, sh, a*dh - ph).
    cdef int t0 = 0, t1
    if off < 0:
        t0 = (-off + stride - 1) // stride
    if size - 1 - off < 0:
        t1 = 0
    else:
        t1 = (size - 1 - off) // stride + 1
    lo[0] = min(t0, out_size)
    hi[0] = max(lo[0], min(t1, out_size))


cdef inline void _valid_columns(Geometry* g, int b, int* lo, int* hi) noexcept nogil:
    _valid_range(g.W, g.out_w, g.sw, b * g.dw - g.pw, lo, hi)


cdef void _im2col_shifted(const floating* x, floating* cols, Geometry* g) noexcept nogil:
    # Stride 1 and out_w == W ('same' width): output (i, j) of row (c, a, b) reads
    # x[c] at the constant offset (a*dh - ph) * W + (b*dw - pw) from i * W + j, so
    # the valid rows are ONE contiguous copy; only the wrapped-around columns
    # (j < lo or j >= hi) and the rows outside [i0, i1) are zeroed afterwards.
    # A row-by-row copy is loop-overhead bound for short out_w.
    cdef int P = g.out_h * g.out_w, W = g.W
    cdef int c, a, b, i, j, row, lo, hi, i0, i1
    cdef Py_ssize_t first, last, shift
    cdef floating* out
    for c in range(g.C):
        for a in range(g.kh):
            _valid_range(g.H, g.out_h, g.sh, a * g.dh - g.ph, &i0, &i1)
            for b in range(g.kw):
                row = (c * g.kh + a) * g.kw + b
                out = cols + <Py_ssize_t> row * P
                _valid_columns(g, b, &lo, &hi)
                if i0 >= i1 or lo >= hi:
                    memset(out, 0, P * sizeof(floating))
                    continue
                shift = (<Py_ssize_t> a * g.dh - g.ph) * W + b * g.dw - g.pw
                first = <Py_ssize_t> i0 * W + lo
                last = <Py_ssize_t> (i1 - 1) * W + hi  # one past the last valid element
                memset(out, 0, first * sizeof(floating))
                memcpy(out + first, x + <Py_ssize_t> c * g.H * W + first + shift,
                       (last - first) * sizeof(floating))
                memset(out + last, 0, (P - last) * sizeof(floating))
                if lo > 0 or hi < W:
                    for i in range(i0, i1):
                        for j in range(lo):
                            out[i * W + j] = 0
                        for j in range(hi, W):
                            out[i * W + j] = 0


cdef void _im2col(const floating* x, floating* cols, Geometry* g) noexcept nogil:
    # cols[(c, a, b), (i, j)] = x[c, i*sh - ph + a*dh, j*sw - pw + b*dw], 0 outside.
    # The valid column range is computed once per (a, b), so the inner loop is a
    # branch-free (strided) copy that GCC vectorises, with no test per element.
    cdef int P = g.out_h * g.out_w
    cdef int c, a, b, i, j, ih, row, lo, hi, off
    cdef floating* out
    cdef const floating* src
    if g.sh == 1 and g.sw == 1 and g.out_w == g.W:
        _im2col_shifted(x, cols, g)
        return
    for c in range(g.C):
        for a in range(g.kh):
            for b in range(g.kw):
                row = (c * g.kh + a) * g.kw + b
                _valid_columns(g, b, &lo, &hi)
                off = b * g.dw - g.pw
                for i in range(g.out_h):
                    out = cols + <Py_ssize_t> row * P + i * g.out_w
                    ih = i * g.sh - g.ph + a * g.dh
                    if ih < 0 or ih >= g.H:
                        memset(out, 0, g.out_w * sizeof(floating))
                        continue
                    src = x + (<Py_ssize_t> c * g.H + ih) * g.W + off
                    for j in range(lo):
                        out[j] = 0
                    if g.sw == 1:
                        for j in range(lo, hi):
                            out[j] = src[j]
                    else:
                        for j in range(lo, hi):
                            out[j] = src[j * g.sw]
                    for j in range(hi, g.out_w):
                        out[j] = 0


cdef void _col2im_add(const floating* cols, floating* x, Geometry* g) noexcept nogil:
    # x[c, i*sh - ph + a*dh, j*sw - pw + b*dw] += cols[(c, a, b), (i, j)] (transpose of im2col)
    cdef int P = g.out_h * g.out_w
    cdef int c, a, b, i, j, ih, row, lo, hi, off
    cdef const floating* src
    cdef floating* dst
    for c in range(g.C):
        for a in range(g.kh):
            for b in range(g.kw):
                row = (c * g.kh + a) * g.kw + b
                _valid_columns(g, b, &lo, &hi)
                off = b * g.dw - g.pw
                for i in range(g.out_h):
                    ih = i * g.sh - g.ph + a * g.dh
                    if ih < 0 or ih >= g.H:
                        continue
                    src = cols + <Py_ssize_t> row * P + i * g.out_w
                    dst = x + (<Py_ssize_t> c * g.H + ih) * g.W + off
                    if g.sw == 1:
                        for j in range(lo, hi):
                            dst[j] += src[j]
                    else:
                        for j in range(lo, hi):
                            dst[j * g.sw] += src[j]


def unfold(const floating[:, ::1] x,        # IN  (m, C*H*W)
           floating[:, :, ::1] cols,        # OUT (m, C*kh*kw, P)
           tuple geom, int n_threads):
    """cols[i] = im2col(x[i]) for every row i."""
    cdef Geometry g = _geometry(geom)
    cdef Py_ssize_t m = x.shape[0], i
    _check(x.shape[1] == g.C * g.H * g.W, "unfold x")
    _check(cols.shape[0] == m and cols.shape[1] == g.C * g.kh * g.kw
           and cols.shape[2] == g.out_h * g.out_w, "unfold cols")
    if m == 0:
        return
    for i in prange(m, nogil=True, schedule='static', num_threads=n_threads):
        _im2col(&x[i, 0], &cols[i, 0, 0], &g)


# ---------------------------------------------------------------------------
# Direct convolution (forward pass, weight gradient)
# ---------------------------------------------------------------------------

#: the instruction-set levels of the direct convolutions, lowest first
ISA_NAMES = ("generic", "avx2", "avx512")
#: the best this CPU runs (2: AVX-512 F/BW/DQ/VL, 1: AVX2 + FMA, 0: neither)
CPU_ISA = ghess_cpu_isa()
#: ``set_isa(ISA_MEASURED)``: each direct-convolution call runs the faster of the AVX2
#: and AVX-512 builds for its kernel, geometry, channel count and dtype, timed once on a
#: few of the call's own samples (``measured_isa_choices``). Both builds give the same
#: bits, so the choice changes the speed only. Which is faster depends on the CPU and on
#: the layer: on a Zen 4 EPYC (512-bit vectors as two 256-bit halves) AVX-512 ran 2-13%
#: faster on CNN-C's 32x32 and 16x16 layers, but 1.8-1.9x slower on its 8x8 layer (a row
#: of 8 output positions fills half of a 16-float vector) and 1.3x slower on CNN-S's first
#: (one input channel, 9 taps, 16 outputs) (docs/design.md, "Measurements"); a CPU with
#: full-width AVX-512 moves the balance towards it.
ISA_MEASURED = -1
#: the level used unless GHESS_ISA asks for another: measured per layer where the CPU has
#: AVX-512, else the best it has
DEFAULT_ISA = ISA_MEASURED if CPU_ISA == 2 else CPU_ISA
# the level in use (or ISA_MEASURED): set once, at import (ghess._config, GHESS_ISA)
cdef int _isa = DEFAULT_ISA
# ISA_MEASURED's choices: (kernel, geometry, channels, K, is_double) -> level
cdef dict _measured = {}
#: AVX-512 is chosen only when at least this much faster (a tie keeps the narrower build)
MEASURED_MARGIN = 0.97
#: a timed run takes as many of the call's samples as fill about this many seconds, from
#: 1 to MEASURED_SAMPLES (so a large layer's choice costs about 2 x MEASURED_ROUNDS of its
#: samples, a small one's about 20 ms), in MEASURED_ROUNDS alternating rounds per level
MEASURED_RUN_SECONDS = 2e-3
MEASURED_SAMPLES = 8
MEASURED_ROUNDS = 5


def set_isa(int level):
    """Use the direct convolutions of ISA level ``level`` (0-2), at most ``CPU_ISA``; return it.

    ``ISA_MEASURED`` (-1) picks AVX2 or AVX-512 per layer by timing both (on a CPU
    with AVX-512; elsewhere it is the best level the CPU has). ``ghess._config`` calls
    it once at import, from ``GHESS_ISA``. Level 0 turns the direct convolutions off
    (im2col + BLAS), which changes what layers keep: set it before building any model's
    plan. Levels 1 and 2 give the same bits.
    """
    global _isa
    if level == ISA_MEASURED:
        _isa = ISA_MEASURED if CPU_ISA == 2 else CPU_ISA
    else:
        _isa = max(0, min(level, CPU_ISA))
    return _isa


def isa():
    """Return the ISA level in use (an index into ``ISA_NAMES``), or ``ISA_MEASURED``."""
    return _isa


def isa_name(level=None):
    """Name ``level`` (default: the one in use): an ``ISA_NAMES`` entry or ``"measured"``."""
    level = _isa if level is None else level
    return "measured" if level == ISA_MEASURED else ISA_NAMES[level]


def measured_isa_choices():
    """``ISA_MEASURED``'s choices so far: ``{(kernel, geometry, channels, K, dtype): level}``."""
    return {(kind, geom, channels, K, "float64" if is_double else "float32"): level
            for (kind, geom, channels, K, is_double), level in _measured.items()}


def forget_measured_isa():
    """Drop ``ISA_MEASURED``'s choices: the next call of each kernel times both builds again."""
    _measured.clear()


def _faster_level(run, n):
    """Time ``run(level, samples)`` at AVX2 and AVX-512 in alternating rounds on up to ``n``
    samples; return the faster level (AVX2 unless AVX-512 takes under MEASURED_MARGIN of its
    time: a tie keeps the narrower build)."""  # noqa: D205, D209
    start = time.perf_counter()
    run(1, 1)  # warm-up on one sample, which also sizes the timed runs
    one = max(time.perf_counter() - start, 1e-9)
    samples = max(1, min(n, MEASURED_SAMPLES, int(MEASURED_RUN_SECONDS / one)))
    best = {1: float("inf"), 2: float("inf")}
    for _ in range(MEASURED_ROUNDS):
        for level in (1, 2):
            start = time.perf_counter()
            run(level, samples)
            best[level] = min(best[level], time.perf_counter() - start)
    return 2 if best[2] < MEASURED_MARGIN * best[1] else 1


cdef int _level_for(str kind, tuple geom, int channels, int K, bint is_double, Py_ssize_t n,
                    make_run) except -1:
    # the level a call runs at: the one set, or ISA_MEASURED's choice (measured now if new,
    # with the ``run`` that ``make_run()`` builds: its scratch exists only while timing)
    if _isa != ISA_MEASURED:
        return _isa
    key = (kind, geom, channels, K, is_double)
    level = _measured.get(key)
    if level is None:
        level = _measured[key] = _faster_level(make_run(), n)
    return level


def _forward_run(weights, bias, x, tuple geom, Py_ssize_t width, dtype):
    """``run(level, samples)`` of ``conv_forward_direct`` on x's first samples, on one
    thread, into one scratch output shared by every run."""  # noqa: D205, D209
    scratch = np.empty((min(x.shape[0], MEASURED_SAMPLES), width), dtype=dtype)
    return lambda level, s: conv_forward_direct(weights, bias, x[:s], scratch[:s], geom, 1,
                                                False, level)


def _weight_grad_run(g, x, tuple geom, tuple out_shape, dtype):
    """``run(level, samples)`` of ``conv_weight_grad_direct`` on the first samples, on one
    thread, into one scratch output shared by every run (its sums are unused)."""  # noqa: D205, D209
    scratch = np.zeros(out_shape, dtype=dtype)
    return lambda level, s: conv_weight_grad_direct(g[:s], x[:s], scratch, geom, 1, level)


#: the level of the pooling and per-channel kernels (include/pooling.h, channel.h) unless
#: GHESS_ISA asks for another: the best the CPU runs
MAPS_DEFAULT_ISA = CPU_ISA


def set_maps_isa(int level):
    """Use the pooling and per-channel kernels of ISA level ``level`` (0-2), capped; return it.

    ``ghess._config`` calls it once at import, from ``GHESS_ISA``, as ``set_isa`` for the
    direct convolutions. Every level gives the same bits.
    """
    return ghess_set_isa_level(level)


def maps_isa():
    """Return the ISA level of the pooling and per-channel kernels."""
    return ghess_isa_level


def direct_conv_supported(geom):
    """Whether ``conv_forward_direct`` runs on this CPU for this geometry (None: no)."""
    return _isa != 0 and geom is not None and len(geom) == 13 and geom[6] == 1


def conv_forward_direct(const floating[:, ::1] weights,  # IN  (M, C*kh*kw)
                        const floating[::1] bias,         # IN  (M,), or (0,): no bias
                        const floating[:, ::1] x,         # IN  (n, C*H*W)
                        floating[:, ::1] out,             # OUT or IN/OUT (n, M*P)
                        tuple geom, int n_threads, bint accumulate=False, int level=-2):
    """out[i] (+)= weights @ im2col(x[i]) (+ bias per channel), without the im2col buffer.

    ``level``: the ISA level to run (1 or 2); by default the one set (``set_isa``).
    """
    cdef Geometry g = _geometry(geom)
    cdef Py_ssize_t n = x.shape[0], i
    cdef int M = weights.shape[0], K = weights.shape[1], t
    cdef int P = g.out_h * g.out_w
    _check(direct_conv_supported(geom), "conv_forward_direct needs AVX2 and width stride 1")
    _check(K == g.C * g.kh * g.kw and x.shape[1] == g.C * g.H * g.W,
           "conv_forward_direct weights/x")
    _check(bias.shape[0] in (0, M), "conv_forward_direct bias")
    _check(out.shape[0] == n and out.shape[1] == M * P, "conv_forward_direct out")
    if n == 0 or M == 0 or P == 0:
        return
    dtype = np.float64 if floating is double else np.float32
    _check(level <= CPU_ISA, "conv_forward_direct level above the CPU's")
    if level < 1:
        level = _level_for("forward", geom, M, K, floating is double, n,
                           lambda: _forward_run(weights, bias, x, geom, M * P, dtype))
    # (M + MR - 1) // MR panels; not -(-M // MR): cdivision truncates toward zero
    cdef floating[::1] packed = np.empty((M + GHESS_DC_MR - 1) // GHESS_DC_MR * GHESS_DC_MR * K,
                                         dtype=dtype)
    cdef int[::1] offsets = np.empty(K, dtype=np.intc)
    cdef floating[:, ::1] padded = np.empty((n_threads, ghess_dc_padded_size(&g)), dtype=dtype)
    cdef const floating* b = &bias[0] if bias.shape[0] > 0 else NULL
    with nogil:
        ghess_dc_offsets(&g, &offsets[0])
        if floating is double:
            ghess_dc_pack_weights_f64(&weights[0, 0], M, K, &packed[0])
        else:
            ghess_dc_pack_weights_f32(&weights[0, 0], M, K, &packed[0])
    for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
        t = threadid()
        if floating is double:
            ghess_dc_pad_f64(&x[i, 0], &g, &padded[t, 0])
            ghess_dc_forward_f64(level, &packed[0], b, M, &padded[t, 0], &offsets[0], &g,
                                 &out[i, 0], accumulate)
        else:
            ghess_dc_pad_f32(&x[i, 0], &g, &padded[t, 0])
            ghess_dc_forward_f32(level, &packed[0], b, M, &padded[t, 0], &offsets[0], &g,
                                 &out[i, 0], accumulate)


def conv_weight_grad_direct(const floating[:, :, ::1] g,  # IN  (n, k, M*P)
                            const floating[:, ::1] x,     # IN  (n, C*H*W)
                            floating[:, :, ::1] out,      # IN/OUT (k, M, C*kh*kw)
                            tuple geom, int n_threads, int level=-2):
    """out[j] += sum_i g[i, j] @ im2col(x[i])^T (weight gradients), without im2col.

    The k directions share the input, so they are k*M channels of one pass.
    ``level``: the ISA level to run (1 or 2); by default the one set (``set_isa``).
    """
    cdef Geometry gm = _geometry(geom)
    cdef Py_ssize_t n = g.shape[0], i, kk, e
    cdef int k = g.shape[1], M = out.shape[1], K = out.shape[2], t, km
    cdef int P = gm.out_h * gm.out_w
    cdef int L
    _check(direct_conv_supported(geom), "conv_weight_grad_direct needs AVX2/FMA, stride 1")
    _check(K == gm.C * gm.kh * gm.kw and x.shape[0] == n and x.shape[1] == gm.C * gm.H * gm.W,
           "conv_weight_grad_direct x/out")
    _check(out.shape[0] == k and g.shape[2] == M * P, "conv_weight_grad_direct g")
    km = k * M
    if n == 0 or km == 0 or K == 0:
        return
    dtype = np.float64 if floating is double else np.float32
    _check(level <= CPU_ISA, "conv_weight_grad_direct level above the CPU's")
    if level < 1:
        level = _level_for("weight gradient", geom, km, K, floating is double, n,
                           lambda: _weight_grad_run(g, x, geom, (k, M, K), dtype))
    L = ghess_dc_vector_length(level, floating is double)
    cdef int[::1] offsets = np.empty(K, dtype=np.intc)
    cdef floating[:, ::1] padded = np.empty((n_threads, ghess_dc_padded_size(&gm)), dtype=dtype)
    cdef floating[:, ::1] panels = np.empty((n_threads, ghess_dc_grad_panels_size(km, P, L)),
                                            dtype=dtype)
    cdef floating[:, :, ::1] work = np.zeros((n_threads, K, km), dtype=dtype)
    ghess_dc_offsets(&gm, &offsets[0])
    for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
        t = threadid()
        if floating is double:
            ghess_dc_pad_f64(&x[i, 0], &gm, &padded[t, 0])
            ghess_dc_pack_grad_f64(L, &g[i, 0, 0], km, P, &panels[t, 0])
            ghess_dc_weight_grad_f64(level, &panels[t, 0], km, &padded[t, 0], &offsets[0], &gm,
                                     &work[t, 0, 0])
        else:
            ghess_dc_pad_f32(&x[i, 0], &gm, &padded[t, 0])
            ghess_dc_pack_grad_f32(L, &g[i, 0, 0], km, P, &panels[t, 0])
            ghess_dc_weight_grad_f32(level, &panels[t, 0], km, &padded[t, 0], &offsets[0], &gm,
                                     &work[t, 0, 0])
    # out (k*M, K) += the per-thread (K, k*M) sums, transposed, in thread order
    with nogil:
        for t in range(n_threads):
            for e in range(km):
                for kk in range(K):
                    (&out[0, 0, 0])[e * K + kk] += work[t, kk, e]


# ---------------------------------------------------------------------------
# GEMMs over samples and directions
# ---------------------------------------------------------------------------

def conv_gemm(const floating[:, :, ::1] weights,     # IN  (kw_, M, CKK)
              const floating[:, :, :, ::1] cols,     # IN  (n, kc, CKK, P)
              floating[:, :, ::1] out,               # IN/OUT (n, k, M*P)
              bint accumulate, int n_threads):
    """out[i, j] (+)= weights[j or 0] @ cols[i, j or 0]  (a convolution's GEMMs)."""
    cdef Py_ssize_t n = cols.shape[0], i
    cdef int kW = weights.shape[0], M = weights.shape[1], CKK = weights.shape[2]
    cdef int kc = cols.shape[1], P = cols.shape[3], k = out.shape[1], j
    cdef floating beta = 1 if accumulate else 0
    _check(cols.shape[2] == CKK, "conv_gemm cols")
    _check(k == max(kW, kc) and (kW == 1 or kW == k) and (kc == 1 or kc == k),
           "conv_gemm directions")
    _check(out.shape[0] == n and out.shape[2] == M * P, "conv_gemm out")
    if n == 0 or k == 0 or M == 0 or P == 0:
        return
    for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
        if kc == 1:
            # all directions' weights stacked: (kW*M, CKK) @ (CKK, P) in one GEMM
            gemm(False, False, kW * M, P, CKK, 1, &weights[0, 0, 0], CKK,
                 &cols[i, 0, 0, 0], P, beta, &out[i, 0, 0], P)
        else:
            for j in range(k):
                gemm(False, False, M, P, CKK, 1, &weights[j if kW > 1 else 0, 0, 0], CKK,
                     &cols[i, j, 0, 0], P, beta, &out[i, j, 0], P)


def conv_weight_grad(const floating[:, :, ::1] g,        # IN  (n, kg, M*P)
                     const floating[:, :, :, ::1] cols,  # IN  (n, kc, CKK, P)
                     floating[:, :, ::1] out,            # IN/OUT (k, M, CKK)
                     floating[:, :, :, ::1] work,        # WORK (n_threads, k, M, CKK)
                     int n_threads):
    """out[j] += sum_i g[i, j or 0] @ cols[i, j or 0]^T  (weight gradients)."""
    cdef Py_ssize_t n = g.shape[0], i
    cdef int kg = g.shape[1], kc = cols.shape[1], k = out.shape[0]
    cdef int M = out.shape[1], CKK = out.shape[2], P = cols.shape[3], j, t
    cdef Py_ssize_t size = <Py_ssize_t> k * M * CKK, e
    _check(cols.shape[0] == n and cols.shape[2] == CKK, "conv_weight_grad cols")
    _check(g.shape[2] == M * P, "conv_weight_grad g")
    _check(k == max(kg, kc) and (kg == 1 or kg == k) and (kc == 1 or kc == k),
           "conv_weight_grad directions")
    _check(work.shape[0] >= n_threads and work.shape[1] == k and work.shape[2] == M
           and work.shape[3] == CKK, "conv_weight_grad work")
    if n == 0 or size == 0:
        return
    with nogil:
        memset(&work[0, 0, 0, 0], 0, n_threads * size * sizeof(floating))
    for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
        t = threadid()
        if kc == 1:
            # (kg*M, P) @ (P, CKK): every direction at once
            gemm(False, True, kg * M, CKK, P, 1, &g[i, 0, 0], P, &cols[i, 0, 0, 0], P,
                 1, &work[t, 0, 0, 0], CKK)
        else:
            for j in range(k):
                gemm(False, True, M, CKK, P, 1, &g[i, j if kg > 1 else 0, 0], P,
                     &cols[i, j, 0, 0], P, 1, &work[t, j, 0, 0], CKK)
    with nogil:
        for t in range(n_threads):
            for e in range(size):
                (&out[0, 0, 0])[e] += (&work[t, 0, 0, 0])[e]


def conv_input_grad(const floating[:, :, ::1] weights,   # IN  (kw_, M, CKK)
                    const floating[:, :, ::1] g,         # IN  (n, kg, M*P)
                    const floating[:, :, ::1] weights2,  # IN  (kw2, M, CKK), kw2 = 0: none
                    const floating[:, :, ::1] g2,        # IN  (n, kg2, M*P), unused if none
                    floating[:, :, ::1] out,             # IN/OUT (n, k, C*H*W)
                    floating[:, :, ::1] work,            # WORK (n_threads, CKK, P)
                    tuple geom, bint accumulate, int n_threads):
    """out[i, j] (+)= col2im(weights[j or 0]^T @ g[i, j or 0] + weights2[..]^T @ g2[..]).

    The optional second pair is the R-operator's V^T g term: both GEMMs go into
    one unfolded buffer, so the (memory-bound) col2im runs once instead of twice.
    """
    cdef Geometry geo = _geometry(geom)
    cdef Py_ssize_t n = g.shape[0], i
    cdef int kW = weights.shape[0], M = weights.shape[1], CKK = weights.shape[2]
    cdef int kW2 = weights2.shape[0], kg2 = g2.shape[1] if weights2.shape[0] > 0 else 1
    cdef int kg = g.shape[1], k = out.shape[1], P = geo.out_h * geo.out_w, j, t
    _check(CKK == geo.C * geo.kh * geo.kw and g.shape[2] == M * P, "conv_input_grad g")
    _check(k == max(kW, kg) and (kW == 1 or kW == k) and (kg == 1 or kg == k),
           "conv_input_grad directions")
    if kW2 > 0:
        _check(weights2.shape[1] == M and weights2.shape[2] == CKK
               and g2.shape[0] == n and g2.shape[2] == M * P, "conv_input_grad second pair")
        _check((kW2 == 1 or kW2 == k) and (kg2 == 1 or kg2 == k),
               "conv_input_grad second pair directions")
    _check(out.shape[0] == n and out.shape[2] == geo.C * geo.H * geo.W, "conv_input_grad out")
    _check(work.shape[0] >= n_threads and work.shape[1] == CKK and work.shape[2] == P,
           "conv_input_grad work")
    if n == 0 or k == 0:
        return
    for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
        t = threadid()
        for j in range(k):
            if not accumulate:
                memset(&out[i, j, 0], 0, out.shape[2] * sizeof(floating))
            gemm(True, False, CKK, P, M, 1, &weights[j if kW > 1 else 0, 0, 0], CKK,
                 &g[i, j if kg > 1 else 0, 0], P, 0, &work[t, 0, 0], P)
            if kW2 > 0:
                gemm(True, False, CKK, P, M, 1, &weights2[j if kW2 > 1 else 0, 0, 0], CKK,
                     &g2[i, j if kg2 > 1 else 0, 0], P, 1, &work[t, 0, 0], P)
            _col2im_add(&work[t, 0, 0], &out[i, j, 0], &geo)


def channel_bias_add(floating[:, :, ::1] out,        # IN/OUT (n, k, M*P)
                     const floating[:, ::1] bias,    # IN     (kb, M)
                     int n_threads):
    """out[i, j, m*P:(m+1)*P] += bias[j or 0, m]."""
    cdef Py_ssize_t n = out.shape[0], i, P
    cdef int k = out.shape[1], kb = bias.shape[0], M = bias.shape[1]
    _check(kb == 1 or kb == k, "channel_bias_add directions")
    _check(M > 0 and out.shape[2] % M == 0, "channel_bias_add out")
    P = out.shape[2] // M
    if n == 0 or k == 0 or P == 0:
        return
    for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
        if floating is double:
            ghess_channel_affine_f64(&out[i, 0, 0], k, NULL, 0, &bias[0, 0], kb, &out[i, 0, 0],
                                     k, M, P, 0)
        else:
            ghess_channel_affine_f32(&out[i, 0, 0], k, NULL, 0, &bias[0, 0], kb, &out[i, 0, 0],
                                     k, M, P, 0)


cdef inline double _pairwise(const floating* x, const floating* y,
                             Py_ssize_t count) noexcept nogil:
    # the sum of x[:count] (y NULL) or the dot product of x and y, pairwise in double
    # (include/channel.h: log2(count) ulp of error, at the module's ISA level)
    if floating is double:
        return ghess_pairwise_sum_f64(x, y, count)
    else:
        return ghess_pairwise_sum_f32(x, y, count)


def channel_bias_grad(const floating[:, :, ::1] g,   # IN     (n, k, M*P)
                      floating[:, ::1] out,          # IN/OUT (k, M)
                      int n_threads):
    """out[j, m] += sum over samples and positions of g[i, j, m*P:(m+1)*P] (pairwise)."""
    cdef Py_ssize_t n = g.shape[0], i
    cdef int k = out.shape[0], M = out.shape[1], jm, P
    cdef double acc
    _check(g.shape[1] == k and M > 0 and g.shape[2] % M == 0, "channel_bias_grad")
    P = g.shape[2] // M
    if n == 0 or P == 0:
        return
    # one output per (j, m), summed in a fixed order: thread-count independent. Each
    # sample's positions pairwise; the samples (a chunk: tens to a few thousand) add up
    # in order
    for jm in prange(k * M, nogil=True, schedule='static', num_threads=n_threads):
        if floating is double:
            acc = ghess_pairwise_sum_samples_f64(&g[0, jm // M, (jm % M) * P], k * M * P,
                                                 NULL, 0, n, P)
        else:
            acc = ghess_pairwise_sum_samples_f32(&g[0, jm // M, (jm % M) * P], k * M * P,
                                                 NULL, 0, n, P)
        out[jm // M, jm % M] += <floating> acc


def channel_affine(const floating[:, :, ::1] x,      # IN     (n, kx, M*P), kx in (1, k)
                   const floating[:, ::1] scale,    # IN     (ks, M), ks in (1, k)
                   const floating[:, ::1] shift,    # IN     (kb, M), kb in (0, 1, k)
                   floating[:, :, ::1] out,         # OUT    (n, k, M*P), may alias x
                   bint accumulate, int n_threads):
    """out[i, j, m, p] (+)= scale[j, m] x[i, j, m, p] + shift[j, m] (batch norm's maps).

    An operand with one row (x's direction axis, scale or shift) serves every
    direction; shift with no rows adds nothing.
    """
    cdef Py_ssize_t n = out.shape[0], i, P
    cdef int k = out.shape[1], kx = x.shape[1], ks = scale.shape[0], kb = shift.shape[0]
    cdef int M = scale.shape[1]
    _check(M > 0 and out.shape[2] % M == 0 and x.shape[0] == n
           and x.shape[2] == out.shape[2], "channel_affine shapes")
    _check((kx == 1 or kx == k) and (ks == 1 or ks == k) and kb in (0, 1, k)
           and (kb == 0 or shift.shape[1] == M), "channel_affine directions")
    P = out.shape[2] // M
    if n == 0 or k == 0 or P == 0:
        return
    for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
        if floating is double:
            ghess_channel_affine_f64(&x[i, 0, 0], kx, &scale[0, 0], ks,
                                     &shift[0, 0] if kb > 0 else NULL, kb, &out[i, 0, 0],
                                     k, M, P, accumulate)
        else:
            ghess_channel_affine_f32(&x[i, 0, 0], kx, &scale[0, 0], ks,
                                     &shift[0, 0] if kb > 0 else NULL, kb, &out[i, 0, 0],
                                     k, M, P, accumulate)


def channel_dot(const floating[:, :, ::1] g,   # IN     (n, k, M*P)
                const floating[:, :, ::1] x,   # IN     (n, kx, M*P), kx in (1, k)
                floating[:, ::1] out,          # IN/OUT (k, M)
                int n_threads):
    """out[j, m] += sum over samples and positions of g[i, j, m, p] x[i, j, m, p] (pairwise).

    Batch norm's gamma gradient (x = xhat, shared by the directions).
    """
    cdef Py_ssize_t n = g.shape[0], i
    cdef int k = out.shape[0], M = out.shape[1], kx = x.shape[1], jm, j, m, P
    cdef double acc
    _check(g.shape[1] == k and M > 0 and g.shape[2] % M == 0 and x.shape[0] == n
           and x.shape[2] == g.shape[2] and (kx == 1 or kx == k), "channel_dot shapes")
    P = g.shape[2] // M
    if n == 0 or P == 0:
        return
    # one output per (j, m), summed in a fixed order: thread-count independent
    for jm in prange(k * M, nogil=True, schedule='static', num_threads=n_threads):
        j = jm // M
        m = jm % M
        if floating is double:
            acc = ghess_pairwise_sum_samples_f64(&g[0, j, m * P], k * M * P,
                                                 &x[0, j if kx > 1 else 0, m * P], kx * M * P,
                                                 n, P)
        else:
            acc = ghess_pairwise_sum_samples_f32(&g[0, j, m * P], k * M * P,
                                                 &x[0, j if kx > 1 else 0, m * P], kx * M * P,
                                                 n, P)
        out[j, m] += <floating> acc


def conv_sample_jacobian(const floating[:, :, ::1] D,     # IN  (n, K, M*P)
                         const floating[:, :, ::1] cols,  # IN  (n, CKK, P)
                         bint has_bias, Py_ssize_t offset,
                         floating[:, :, ::1] J,           # OUT (n, K, n_params)
                         floating[:, ::1] work,           # WORK (n_threads, K*M*CKK)
                         int n_threads):
    """J[i, c, offset:] = (D[i, c] @ cols[i]^T, sum_p D[i, c]): a conv layer's columns.

    One GEMM per sample for all K columns, (K*M, P) @ (P, CKK), into a thread's
    workspace, then copied into J's K rows: cols[i] is packed once per sample, not
    once per column, and the GEMM has K times the rows (J's rows are not one
    stride apart, so the GEMM cannot write them directly).
    """
    cdef Py_ssize_t n = D.shape[0], i
    cdef int K = D.shape[1], CKK = cols.shape[1], P = cols.shape[2], c, m, M, t
    _check(cols.shape[0] == n and J.shape[0] == n and J.shape[1] == K, "conv_sample_jacobian")
    _check(P > 0 and D.shape[2] % P == 0, "conv_sample_jacobian D")
    M = D.shape[2] // P
    _check(offset >= 0 and offset + M * CKK + (M if has_bias else 0) <= J.shape[2],
           "conv_sample_jacobian offset")
    _check(work.shape[0] >= n_threads and work.shape[1] >= <Py_ssize_t> K * M * CKK,
           "conv_sample_jacobian work")
    if n == 0 or K == 0 or M * CKK == 0:
        return
    for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
        t = threadid()
        gemm(False, True, K * M, CKK, P, 1, &D[i, 0, 0], P, &cols[i, 0, 0], P,
             0, &work[t, 0], CKK)
        for c in range(K):
            memcpy(&J[i, c, offset], &work[t, <Py_ssize_t> c * M * CKK],
                   <Py_ssize_t> M * CKK * sizeof(floating))
            if has_bias:
                for m in range(M):
                    J[i, c, offset + M * CKK + m] = <floating> _pairwise(&D[i, c, m * P], NULL, P)


# ---------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------

def maxpool_forward(const floating[:, ::1] x,     # IN  (n, C*H*W)
                    floating[:, ::1] y,           # OUT (n, C*out_h*out_w)
                    int32_t[:, ::1] argmax,       # OUT (n, C*out_h*out_w) index into x[i]
                    tuple geom, int n_threads):
    """Max over each window (padding is -inf); argmax is the FIRST maximum, row-major."""
    cdef Geometry g = _geometry(geom)
    cdef Py_ssize_t n = x.shape[0], i
    _check(x.shape[1] == g.C * g.H * g.W, "maxpool_forward x")
    _check(y.shape[0] == n and y.shape[1] == g.C * g.out_h * g.out_w, "maxpool_forward y")
    _check(argmax.shape[0] == n and argmax.shape[1] == y.shape[1], "maxpool_forward argmax")
    _check(x.shape[1] < 2 ** 31, "maxpool_forward: int32 indices")
    if n == 0 or y.shape[1] == 0:
        return
    for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
        if floating is double:
            ghess_maxpool_f64(&x[i, 0], &y[i, 0], &argmax[i, 0], &g)
        else:
            ghess_maxpool_f32(&x[i, 0], &y[i, 0], &argmax[i, 0], &g)


def gather(const floating[:, :, ::1] x,          # IN  (n, k, in_width)
           const int32_t[:, ::1] index,          # IN  (n, out_width)
           const floating[:, ::1] gain,          # IN  (n, out_width), or (0, 0): all ones
           floating[:, :, ::1] out,              # OUT (n, k, out_width)
           int n_threads):
    """out[i, j, o] = gain[i, o] * x[i, j, index[i, o]]  (max-pooling JVP).

    With a gain, the JVP of an activation and the max-pooling after it in one
    pass: gain is f' at the argmax.
    """
    cdef Py_ssize_t n = x.shape[0], k = x.shape[1], w = x.shape[2], m = out.shape[2], i
    cdef bint scaled = gain.shape[0] > 0
    _check(index.shape[0] == n and index.shape[1] == m, "gather index")
    _check(out.shape[0] == n and out.shape[1] == k, "gather out")
    _check(not scaled or (gain.shape[0] == n and gain.shape[1] == m), "gather gain")
    if n == 0 or k == 0 or m == 0:
        return
    for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
        if floating is double:
            ghess_gather_f64(&x[i, 0, 0], w, &index[i, 0], &gain[i, 0] if scaled else NULL,
                             &out[i, 0, 0], m, k)
        else:
            ghess_gather_f32(&x[i, 0, 0], w, &index[i, 0], &gain[i, 0] if scaled else NULL,
                             &out[i, 0, 0], m, k)


def scatter_add(const floating[:, :, ::1] g,     # IN  (n, k, out_width)
                const int32_t[:, ::1] index,     # IN  (n, out_width), values < in_width
                const floating[:, ::1] gain,     # IN  (n, out_width), or (0, 0): all ones
                floating[:, :, ::1] out,         # OUT (n, k, in_width), zeroed here
                bint distinct, int n_threads):
    """out[i, j, index[i, o]] += gain[i, o] * g[i, j, o]  (max-pooling VJP; see gather).

    distinct: no sample's indices repeat (the windows do not overlap), which lets the
    loop vectorise; with repeats the additions run in order of o.
    """
    cdef Py_ssize_t n = g.shape[0], k = g.shape[1], m = g.shape[2], w = out.shape[2], i
    cdef bint scaled = gain.shape[0] > 0
    _check(index.shape[0] == n and index.shape[1] == m, "scatter_add index")
    _check(out.shape[0] == n and out.shape[1] == k, "scatter_add out")
    _check(not scaled or (gain.shape[0] == n and gain.shape[1] == m), "scatter_add gain")
    if n == 0 or k == 0 or w == 0:
        return
    if m == 0:  # no outputs: nothing lands
        out[:, :, :] = 0
        return
    for i in prange(n, nogil=True, schedule='static', num_threads=n_threads):
        if floating is double:
            ghess_scatter_f64(&g[i, 0, 0], m, &index[i, 0], &gain[i, 0] if scaled else NULL,
                              &out[i, 0, 0], w, k, distinct)
        else:
            ghess_scatter_f32(&g[i, 0, 0], m, &index[i, 0], &gain[i, 0] if scaled else NULL,
                              &out[i, 0, 0], w, k, distinct)


def avgpool_forward(const floating[:, ::1] x,    # IN  (m, C*H*W)
                    floating[:, ::1] y,          # OUT (m, C*out_h*out_w)
                    tuple geom, int n_threads):
    """Mean over each window, padded zeros included (divisor kh * kw)."""
    cdef Geometry g = _geometry(geom)
    cdef Py_ssize_t m = x.shape[0], i
    _check(x.shape[1] == g.C * g.H * g.W, "avgpool_forward x")
    _check(y.shape[0] == m and y.shape[1] == g.C * g.out_h * g.out_w, "avgpool_forward y")
    if m == 0 or y.shape[1] == 0:
        return
    for i in prange(m, nogil=True, schedule='static', num_threads=n_threads):
        if floating is double:
            ghess_avgpool_f64(&x[i, 0], &y[i, 0], &g)
        else:
            ghess_avgpool_f32(&x[i, 0], &y[i, 0], &g)


def avgpool_backward(const floating[:, ::1] gy,  # IN  (m, C*out_h*out_w)
                     floating[:, ::1] gx,        # OUT (m, C*H*W), zeroed here
                     tuple geom, int n_threads):
    """Transpose of avgpool_forward: spread each output's gradient over its window."""
    cdef Geometry g = _geometry(geom)
    cdef Py_ssize_t m = gy.shape[0], i
    _check(gy.shape[1] == g.C * g.out_h * g.out_w, "avgpool_backward gy")
    _check(gx.shape[0] == m and gx.shape[1] == g.C * g.H * g.W, "avgpool_backward gx")
    if m == 0 or gx.shape[1] == 0:
        return
    for i in prange(m, nogil=True, schedule='static', num_threads=n_threads):
        if floating is double:
            ghess_avgpool_t_f64(&gy[i, 0], &gx[i, 0], &g)
        else:
            ghess_avgpool_t_f32(&gy[i, 0], &gx[i, 0], &g)
