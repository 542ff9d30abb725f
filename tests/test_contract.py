"""The stored-factor contractions (J v and J^T w per sample) against einsum.

The C kernels take four rows of D per pass with a remainder loop, so K values
around multiples of 4, empty widths and several directions are checked here
directly, in both dtypes, with and without accumulation.
"""

import numpy as np
import pytest

from ghess import _kernels


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("K", [1, 3, 4, 5, 8, 10])
@pytest.mark.parametrize("m", [0, 1, 7, 1030, 2100])
@pytest.mark.parametrize("k", [1, 3])
def test_contractions_match_einsum(dtype, K, m, k):
    rng = np.random.default_rng(K * 1000 + m + k)
    n = 3
    D = rng.normal(size=(n, K, m)).astype(dtype)
    u = rng.normal(size=(n, k, m)).astype(dtype)
    w = rng.normal(size=(n, k, K)).astype(dtype)
    rtol = 1e-4 if dtype == np.float32 else 1e-12
    D64, u64, w64 = (a.astype(np.float64) for a in (D, u, w))

    start = rng.normal(size=(n, k, K)).astype(dtype)
    out = start.copy()
    _kernels.contract_factor(D, u, out, True, 2)
    expected = start + np.einsum("ncm,njm->njc", D64, u64)
    np.testing.assert_allclose(out, expected, rtol=rtol, atol=rtol * (1 + np.sqrt(m)))
    out = np.full((n, k, K), np.nan, dtype=dtype)
    _kernels.contract_factor(D, u, out, False, 1)
    np.testing.assert_allclose(out, expected - start, rtol=rtol, atol=rtol * (1 + np.sqrt(m)))

    out_t = np.full((n, k, m), np.nan, dtype=dtype)
    _kernels.contract_factor_t(D, w, out_t, 2)
    np.testing.assert_allclose(out_t, np.einsum("ncm,njc->njm", D64, w64), rtol=rtol,
                               atol=rtol * (1 + np.sqrt(K)))


def test_contractions_are_the_same_on_any_thread_count():
    rng = np.random.default_rng(0)
    D = rng.normal(size=(9, 10, 600))
    u = rng.normal(size=(9, 2, 600))
    w = rng.normal(size=(9, 2, 10))
    results = []
    for threads in (1, 2):
        out, out_t = np.zeros((9, 2, 10)), np.empty((9, 2, 600))
        _kernels.contract_factor(D, u, out, False, threads)
        _kernels.contract_factor_t(D, w, out_t, threads)
        results.append((out, out_t))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
