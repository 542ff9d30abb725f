"""The stored-factor contractions (J v and J^T w per sample) against einsum.

The C kernels take four rows of D per pass with a remainder loop, so K values
around multiples of 4, empty widths and several directions are checked here
directly, in both dtypes, with and without accumulation.
"""

import numpy as np
import pytest
from ghess._kernels.dense import OutputHessianKind

from ghess._kernels import dense
from ghess.testing import assert_allclose_rel


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
    dense.contract_factor(D, u, out, True, 2)
    expected = start + np.einsum("ncm,njm->njc", D64, u64)
    np.testing.assert_allclose(out, expected, rtol=rtol, atol=rtol * (1 + np.sqrt(m)))
    out = np.full((n, k, K), np.nan, dtype=dtype)
    dense.contract_factor(D, u, out, False, 1)
    np.testing.assert_allclose(out, expected - start, rtol=rtol, atol=rtol * (1 + np.sqrt(m)))

    out_t = np.full((n, k, m), np.nan, dtype=dtype)
    dense.contract_factor_t(D, w, out_t, 2)
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
        dense.contract_factor(D, u, out, False, threads)
        dense.contract_factor_t(D, w, out_t, threads)
        results.append((out, out_t))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def _output_hessians(kind, state, scale, n, K):
    """Return scale * B_i as dense (n, K, K) matrices, from their definitions."""
    if kind == OutputHessianKind.IDENTITY:
        return scale * np.broadcast_to(np.eye(K), (n, K, K))
    if kind == OutputHessianKind.SOFTMAX:
        return scale * np.stack([np.diag(p) - np.outer(p, p) for p in state])
    return scale * np.stack([np.diag(h) for h in state])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("widths", [(), (6,), (5, 1030, 3)])
def test_ggn_factor_core_against_einsum(dtype, kind, widths):
    # J v = base + sum_l D_l U_l, u = scale * B J v, S_l = D_l^T u, per sample
    rng = np.random.default_rng(len(widths) * 10 + kind)
    n, k, K, scale = 4, 3, 5, 0.37
    D = tuple(rng.normal(size=(n, K, m)).astype(dtype) for m in widths)
    U = tuple(rng.normal(size=(n, k, m)).astype(dtype) for m in widths)
    S = tuple(np.full((n, k, m), np.nan, dtype=dtype) for m in widths)
    p = rng.random((n, K))
    p /= p.sum(axis=1, keepdims=True)
    state = (np.empty((0, 0), dtype=dtype) if kind == OutputHessianKind.IDENTITY
             else p.astype(dtype))
    base = rng.normal(size=(n, k, K)).astype(dtype)
    Jv, u = base.copy(), np.full((n, k, K), np.nan, dtype=dtype)
    dense.ggn_factor_core(D, U, S, Jv, u, kind, state, scale, 2)

    expected_Jv = base.astype(np.float64)
    for d, a in zip(D, U):
        expected_Jv = expected_Jv + np.einsum("ncm,njm->njc", d, a, dtype=np.float64)
    B = _output_hessians(kind, state.astype(np.float64), scale, n, K)
    expected_u = np.einsum("ncd,njd->njc", B, expected_Jv)
    rtol = 1e-4 if dtype == np.float32 else 1e-12
    assert_allclose_rel(Jv, expected_Jv, rtol)
    assert_allclose_rel(u, expected_u, rtol)
    for d, s in zip(D, S):
        assert_allclose_rel(s, np.einsum("ncm,njc->njm", d, expected_u, dtype=np.float64), rtol)
    # output_hessian_apply is the same B
    out = np.full_like(u, np.nan)
    dense.output_hessian_apply(kind, state, scale, Jv, out, 1)
    np.testing.assert_array_equal(out, u)


def test_ggn_factor_core_checks_shapes():
    n, k, K = 2, 1, 3
    D, U = np.zeros((n, K, 4)), np.zeros((n, k, 4))
    Jv, u, p = np.zeros((n, k, K)), np.zeros((n, k, K)), np.full((n, K), 1 / K)
    with pytest.raises(ValueError, match="ggn_factor_core U"):
        dense.ggn_factor_core((D,), (np.zeros((n, k, 5)),), (U.copy(),), Jv, u, 1, p, 1.0, 1)
    with pytest.raises(ValueError, match="layer count"):
        dense.ggn_factor_core((D,), (U,), (), Jv, u, 1, p, 1.0, 1)
    with pytest.raises(ValueError, match="output Hessian state"):
        dense.ggn_factor_core((D,), (U,), (U.copy(),), Jv, u, 1, p[:1], 1.0, 1)
    with pytest.raises(ValueError, match="output Hessian kind"):
        dense.output_hessian_apply(7, p, 1.0, Jv, u, 1)
