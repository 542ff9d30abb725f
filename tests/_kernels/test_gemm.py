"""The GEMM and bias sum of every dense layer against float64 NumPy.

In ``dense.gemm_rowmajor``, ``a^T b`` with at most 12 columns in ``a`` (the
weight gradient of a layer with few outputs) skips BLAS for the kernel of
include/skinny.h; the sizes here straddle that bound, its four-row blocks and its
column blocks, for every transposition, both dtypes, beta 0 and 1, and one and two
threads. ``sum_rows_into`` takes four rows per pass, then the remainder, and splits
columns over threads.
"""

import numpy as np
import pytest

from ghess._kernels import dense


def _operands(rng, trans_a, trans_b, m, k, n, dtype):
    a = rng.normal(size=(k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.normal(size=(n, k) if trans_b else (k, n)).astype(dtype)
    return a, b


def _expected(a, b, trans_a, trans_b, alpha, beta, c0):
    A = a.astype(np.float64).T if trans_a else a.astype(np.float64)
    B = b.astype(np.float64).T if trans_b else b.astype(np.float64)
    return alpha * (A @ B) + beta * c0.astype(np.float64)


SHAPES = [  # (m, k, n): m at, below or above 12; k off the four-row blocks; n off a column block
    (10, 1030, 613), (12, 5, 3000), (13, 64, 64), (1, 7, 3), (5, 3, 1), (3, 9, 1),
    (300, 513, 10), (257, 10, 700), (16, 17, 300),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False),
                                             (True, True)])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_gemm_rowmajor_matches_numpy(dtype, trans_a, trans_b, m, k, n):
    rng = np.random.default_rng(m * 7919 + k * 31 + n)
    a, b = _operands(rng, trans_a, trans_b, m, k, n, dtype)
    a0, b0 = a.copy(), b.copy()
    c0 = rng.normal(size=(m, n)).astype(dtype)
    rtol = 2e-5 if dtype == np.float32 else 1e-13
    scale = np.sqrt(k) + 1
    for alpha, beta in [(1.0, 0.0), (1.0, 1.0), (-0.5, 2.0)]:
        expected = _expected(a, b, trans_a, trans_b, alpha, beta, c0)
        for threads in (1, 2):
            c = c0.copy() if beta else np.full((m, n), np.nan, dtype=dtype)
            dense.gemm_rowmajor(trans_a, trans_b, alpha, a, b, beta, c, threads)
            np.testing.assert_allclose(c, expected, rtol=rtol, atol=rtol * scale * (1 + beta))
    np.testing.assert_array_equal(a, a0)  # inputs untouched
    np.testing.assert_array_equal(b, b0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_skinny_weight_gradient_is_the_same_on_any_thread_count(dtype):
    # gy^T x of a 10-output layer: a sum over 4001 rows, split over columns by threads
    rng = np.random.default_rng(1)
    a, b = _operands(rng, True, False, 10, 4001, 513, dtype)
    results = []
    for threads in (1, 2, 3):
        c = np.zeros((10, 513), dtype)
        dense.gemm_rowmajor(True, False, 1.0, a, b, 0.0, c, threads)
        results.append(c)
    for c in results[1:]:
        np.testing.assert_array_equal(c, results[0])
    rtol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(results[0], _expected(a, b, True, False, 1.0, 0.0, c),
                               rtol=rtol, atol=rtol * np.sqrt(4001))


def test_gemm_rowmajor_empty_dimensions():
    a = np.ones((0, 3))
    c = np.full((3, 4), 2.0)
    dense.gemm_rowmajor(True, False, 1.0, a, np.ones((0, 4)), 0.5, c, 2)
    np.testing.assert_array_equal(c, 1.0)  # k = 0: c := beta c
    dense.gemm_rowmajor(False, False, 1.0, np.ones((0, 5)), np.ones((5, 4)), 0.0,
                        np.ones((0, 4)), 2)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n,m", [(0, 37), (1, 37), (3, 37), (4, 37), (5, 37), (9, 37),
                                 (1027, 37), (1027, 300), (401, 513)])
def test_sum_rows_into_adds_the_column_sums(dtype, n, m):
    # the bias gradient beside the GEMMs: four rows per pass, then the remainder; threads
    # take blocks of columns (from 1e5 elements on), so every thread count gives the same bits
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, m)).astype(dtype)
    start = rng.normal(size=m).astype(dtype)
    expected = start.astype(np.float64) + x.astype(np.float64).sum(0)
    rtol = 1e-6 if dtype == np.float32 else 1e-14
    results = []
    for threads in (1, 2, 3):
        out = start.copy()
        dense.sum_rows_into(x, out, threads)
        np.testing.assert_allclose(out, expected, rtol=rtol, atol=rtol * 10 * np.sqrt(n + 1))
        results.append(out)
    for out in results[1:]:
        np.testing.assert_array_equal(out, results[0])


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-4)])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("batch, rows, cols", [  # the last two split over 2 threads either way
    (3, 37, 70), (1, 300, 33), (2, 1, 1), (40, 20, 3), (64, 40, 100)])
def test_gram_sum_adds_the_full_symmetric_gram_matrix(batch, rows, cols, transpose, n_threads,
                                                      dtype, rtol):
    # KFAC's factors: out += sum_b X_b X_b^T (or X_b^T X_b over the flattened rows), by SYRK
    # into the lower triangle, mirrored; a thread count splits the units into buffers
    rng = np.random.default_rng(batch + rows)
    X = rng.normal(size=(batch, rows, cols)).astype(dtype)
    d = cols if transpose else rows
    start = rng.normal(size=(d, d)).astype(dtype)
    start = start + start.T  # out accumulates: a symmetric start stays symmetric
    out = start.copy()
    dense.gram_sum(X, transpose, out, n_threads)
    X64 = X.astype(np.float64)
    flat = X64.reshape(-1, cols)
    expected = start + (flat.T @ flat if transpose else np.einsum("bij,bkj->ik", X64, X64))
    np.testing.assert_allclose(out, expected, rtol=rtol, atol=rtol * np.abs(expected).max())
    assert np.array_equal(out, out.T)
    again = start.copy()
    dense.gram_sum(X, transpose, again, n_threads)
    assert np.array_equal(again, out)  # a fixed thread count gives the same bits
    empty = start.copy()
    dense.gram_sum(X[:0], transpose, empty, n_threads)
    assert np.array_equal(empty, start)
