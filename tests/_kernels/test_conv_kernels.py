"""im2col / col2im kernels against a naive loop over many geometries.

The kernels compute the valid column range once per kernel column instead of
testing every element, so the edge cases (padding wider than the kernel reach,
strides that skip the border, dilation) are checked here directly.
"""

import itertools

import numpy as np
import pytest

from ghess._kernels import conv as _conv


def _naive_cols(x, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w):
    cols = np.zeros((C * kh * kw, out_h * out_w), dtype=x.dtype)
    for c, a, b, i, j in itertools.product(range(C), range(kh), range(kw),
                                           range(out_h), range(out_w)):
        ih, iw = i * sh - ph + a * dh, j * sw - pw + b * dw
        if 0 <= ih < H and 0 <= iw < W:
            cols[(c * kh + a) * kw + b, i * out_w + j] = x[(c * H + ih) * W + iw]
    return cols


def _geometries():
    rng = np.random.default_rng(0)
    out = []
    for _ in range(60):
        C, H, W = rng.integers(1, 3), rng.integers(1, 8), rng.integers(1, 8)
        kh, kw = rng.integers(1, 4), rng.integers(1, 4)
        sh, sw = rng.integers(1, 4), rng.integers(1, 4)
        ph, pw = rng.integers(0, 4), rng.integers(0, 4)
        dh, dw = rng.integers(1, 3), rng.integers(1, 3)
        out_h = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        out_w = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if out_h >= 1 and out_w >= 1:
            out.append(tuple(int(v) for v in (C, H, W, kh, kw, sh, sw, ph, pw, dh, dw,
                                              out_h, out_w)))
    return out


@pytest.mark.parametrize("geom", _geometries())
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_unfold_and_col2im_match_naive_loops(geom, dtype):
    C, H, W, kh, kw = geom[:5]
    P = geom[11] * geom[12]
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, C * H * W)).astype(dtype)
    cols = np.full((2, C * kh * kw, P), np.nan, dtype=dtype)
    _conv.unfold(x, cols, geom, 1)
    for i in range(2):
        np.testing.assert_array_equal(cols[i], _naive_cols(x[i], *geom))

    # col2im is the transpose: <unfold(x), G> == <x, col2im(G)> for a conv with W = I
    M = C * kh * kw
    weights = np.eye(M, dtype=dtype)[None]
    g = rng.normal(size=(2, 1, M * P)).astype(dtype)
    gx = np.full((2, 1, C * H * W), np.nan, dtype=dtype)
    work = np.empty((1, M, P), dtype=dtype)
    _conv.conv_input_grad(weights, g, weights[:0], g, gx, work, geom, False, 1)
    for i in range(2):
        expected = np.zeros(C * H * W)
        naive = _naive_cols(np.arange(C * H * W, dtype=np.float64), *geom)
        mask = _naive_cols(np.ones(C * H * W), *geom)
        gi = g[i, 0].reshape(M, P).astype(np.float64)
        np.add.at(expected, naive[mask == 1].astype(int), gi[mask == 1])
        np.testing.assert_allclose(gx[i, 0], expected, rtol=1e-5 if dtype == np.float32
                                   else 1e-13, atol=1e-5 if dtype == np.float32 else 1e-13)


def _naive_maxpool(x, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w):
    y = np.empty(C * out_h * out_w, dtype=x.dtype)
    arg = np.empty(C * out_h * out_w, dtype=np.intp)
    for c, i, j in itertools.product(range(C), range(out_h), range(out_w)):
        best, best_index = None, None
        for a, b in itertools.product(range(kh), range(kw)):  # row-major window order
            ih, iw = i * sh - ph + a * dh, j * sw - pw + b * dw
            if 0 <= ih < H and 0 <= iw < W:
                index = (c * H + ih) * W + iw
                if best is None or x[index] > best:  # first maximum wins
                    best, best_index = x[index], index
        o = (c * out_h + i) * out_w + j
        y[o], arg[o] = best, best_index
    return y, arg


def _pool_geometries():
    rng = np.random.default_rng(3)
    out = []
    while len(out) < 30:
        C, H, W = rng.integers(1, 3), rng.integers(1, 8), rng.integers(1, 8)
        kh, kw = rng.integers(1, 4), rng.integers(1, 4)
        sh, sw = rng.integers(1, 4), rng.integers(1, 4)
        ph, pw = (0, 0) if len(out) % 2 else (rng.integers(0, kh // 2 + 1),
                                              rng.integers(0, kw // 2 + 1))
        out_h, out_w = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
        if out_h >= 1 and out_w >= 1:
            out.append(tuple(int(v) for v in (C, H, W, kh, kw, sh, sw, ph, pw, 1, 1,
                                              out_h, out_w)))
    # 2x2 windows at stride 2 (their own vectorised path): even and odd sizes, rows of
    # one and of more outputs than an AVX-512 vector holds
    for C, H, W in [(2, 4, 4), (1, 5, 7), (3, 2, 2), (2, 6, 40), (1, 3, 35)]:
        out.append((C, H, W, 2, 2, 2, 2, 0, 0, 1, 1, H // 2, W // 2))
    return out


@pytest.mark.parametrize("geom", _pool_geometries())
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_maxpool_forward_matches_naive_loop(geom, dtype):
    # pooling as ghess allows it (padding at most half the kernel, no dilation), padded
    # and unpadded: the unpadded ones take the branch-free kernel;
    # integer-valued inputs make ties common, which must go to the first maximum
    C, H, W = geom[:3]
    rng = np.random.default_rng(2)
    x = rng.integers(-2, 3, size=(3, C * H * W)).astype(dtype)
    m = C * geom[11] * geom[12]
    y = np.full((3, m), np.nan, dtype=dtype)
    arg = np.full((3, m), -1, dtype=np.int32)
    _conv.maxpool_forward(x, y, arg, geom, 2)
    for i in range(3):
        want_y, want_arg = _naive_maxpool(x[i], *geom)
        np.testing.assert_array_equal(y[i], want_y)
        np.testing.assert_array_equal(arg[i], want_arg)


def _same_width_geometries():
    """Stride 1 with out_w == W: the contiguous-copy path of im2col.

    Paddings from none to wider than the kernel's reach (rows with no valid
    input), dilations 1 and 2, out_h above, equal to and below H.
    """
    out = []
    for C, H, W, kh, kw, dh, dw, ph in [(1, 5, 5, 3, 3, 1, 1, 1), (2, 4, 6, 3, 3, 1, 1, 0),
                                         (3, 6, 4, 5, 5, 1, 1, 2), (2, 5, 5, 3, 3, 2, 2, 2),
                                         (1, 3, 7, 1, 1, 1, 1, 3), (2, 8, 8, 3, 3, 1, 1, 4),
                                         (1, 2, 3, 3, 3, 1, 1, 1), (2, 4, 1, 3, 1, 1, 1, 1),
                                         (1, 1, 5, 1, 5, 1, 1, 0), (1, 6, 6, 2, 3, 3, 1, 0)]:
        pw = dw * (kw - 1) // 2
        if dw * (kw - 1) % 2:
            continue
        out_h = H + 2 * ph - dh * (kh - 1)
        if out_h >= 1:
            out.append((C, H, W, kh, kw, 1, 1, ph, pw, dh, dw, out_h, W))
    return out


@pytest.mark.parametrize("geom", _same_width_geometries())
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_unfold_same_width_path_matches_naive_and_reads_in_bounds(geom, dtype):
    C, H, W, kh, kw = geom[:5]
    P = geom[11] * geom[12]
    rng = np.random.default_rng(2)
    # each sample row sits between NaN rows: a read outside it would show as NaN
    buf = np.full((5, C * H * W), np.nan, dtype=dtype)
    buf[1:4:2] = rng.normal(size=(2, C * H * W))
    for x in (buf[1:2], buf[3:4]):
        cols = np.full((1, C * kh * kw, P), np.nan, dtype=dtype)
        _conv.unfold(x, cols, geom, 1)
        np.testing.assert_array_equal(cols[0], _naive_cols(x[0], *geom))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("with_gain", [False, True])
@pytest.mark.parametrize("distinct", [False, True])
def test_gather_and_scatter_add_against_loops(dtype, with_gain, distinct):
    # the max-pooling JVP/VJP, and with a gain the fused activation + max-pooling step
    # of factor paths; repeated indices (overlapping windows) must add up, and distinct
    # ones (disjoint windows: the kernel's vectorised path) land once each
    rng = np.random.default_rng(1)
    n, k, in_width, out_width = 3, 2, 37, 21
    if distinct:
        index = np.stack([rng.permutation(in_width)[:out_width] for _ in range(n)])
    else:
        index = rng.integers(0, in_width, size=(n, out_width))
        index[:, 1] = index[:, 0]  # a repeated argmax in every sample
    index = index.astype(np.int32)
    gain = (rng.normal(size=(n, out_width)).astype(dtype) if with_gain
            else np.empty((0, 0), dtype=dtype))
    scale = gain if with_gain else np.ones((n, out_width), dtype=dtype)
    x = rng.normal(size=(n, k, in_width)).astype(dtype)
    out = np.full((n, k, out_width), np.nan, dtype=dtype)
    _conv.gather(x, index, gain, out, 1)
    expected = np.array([[[scale[i, o] * x[i, j, index[i, o]] for o in range(out_width)]
                          for j in range(k)] for i in range(n)])
    np.testing.assert_array_equal(out, expected.astype(dtype))

    g = rng.normal(size=(n, k, out_width)).astype(dtype)
    back = np.full((n, k, in_width), np.nan, dtype=dtype)  # zeroed by the kernel
    _conv.scatter_add(g, index, gain, back, distinct, 2)
    expected = np.zeros((n, k, in_width), dtype=np.float64)
    for i, j, o in itertools.product(range(n), range(k), range(out_width)):
        expected[i, j, index[i, o]] += scale[i, o] * g[i, j, o]
    np.testing.assert_allclose(back, expected, rtol=1e-6 if dtype == np.float32 else 1e-15)
    with pytest.raises(ValueError, match="gain"):
        _conv.gather(x, index, np.ones((n, out_width + 1), dtype=dtype), out, 1)
