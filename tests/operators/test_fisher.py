"""The empirical Fisher against the NumPy reference, PyTorch's per-sample gradients, and itself."""

import numpy as np
import pytest
from conftest import CASES, CONV_CASES, Case, ConvCase, held_bytes

import ghess
from ghess.testing import assert_allclose_rel, reference_empirical_fisher


def make(name, **kwargs):
    return Case(name, **kwargs) if name in CASES else ConvCase(name, **kwargs)


@pytest.mark.parametrize("name", sorted(CASES) + sorted(CONV_CASES))
def test_matches_the_reference_in_both_modes(name):
    c = make(name)
    expected = reference_empirical_fisher(c.model, c.loss, c.theta, c.data)
    for mode in ("stored", "recompute"):
        F = ghess.EmpiricalFisherLinearOperator(c.model, c.loss, c.theta, c.data, mode=mode,
                                                chunk_size=3)
        assert_allclose_rel(F.todense(), expected, 1e-12)


@pytest.mark.parametrize("name", ["tanh-ce", "softplus-bce", "residual-tanh-mse",
                                  "conv-bn-relu-bn1d-ce", "relu-ce-sum"])
def test_is_the_gradient_covariance(name):
    """F = c sum_n g_n g_n^T: psd, its quadratic form from the per-sample gradients."""
    c = make(name)
    F = ghess.EmpiricalFisherLinearOperator(c.model, c.loss, c.theta, c.data, damping=0.5)
    dense = F.todense()
    assert_allclose_rel(dense, dense.T, 1e-14)
    assert np.linalg.eigvalsh(dense).min() >= 0.5 * (1 - 1e-10)  # psd plus the damping
    # per-sample gradients of the summed loss on one sample each: g_n
    loss_sum = type(c.loss)(reduction="sum", factor=c.loss.factor)
    grads = np.array([ghess.loss_and_grad(c.model, loss_sum, c.theta,
                                          (c.X[n:n + 1], c.y[n:n + 1]))[1]
                      for n in range(c.X.shape[0])])
    N, K = c.X.shape[0], c.model.n_outputs
    scale = (1.0 if c.loss.reduction == "sum" else
             1.0 / N if isinstance(c.loss, ghess.CrossEntropyLoss) else 1.0 / (N * K))
    v = np.random.default_rng(0).normal(size=c.model.n_params)
    expected = scale * grads.T @ (grads @ v) + 0.5 * v
    assert_allclose_rel(F @ v, expected, 1e-12)


def test_float32_memory_and_threads():
    c = ConvCase("resnet-ce", n_samples=10)
    F = ghess.EmpiricalFisherLinearOperator(c.model, c.loss, c.theta, c.data, mode="stored",
                                            chunk_size=4)
    assert held_bytes(F) == F.memory_bytes < \
        ghess.EmpiricalFisherLinearOperator.memory_required(c.model, c.data, chunk_size=4)
    v = np.random.default_rng(1).normal(size=(c.model.n_params, 3))
    two = ghess.EmpiricalFisherLinearOperator(c.model, c.loss, c.theta, c.data, n_threads=2,
                                              chunk_size=4)
    assert_allclose_rel(two @ v, F @ v, 1e-13)
    f32 = ConvCase("resnet-ce", n_samples=10, dtype=np.float32)
    F32 = ghess.EmpiricalFisherLinearOperator(f32.model, f32.loss, f32.theta, f32.data)
    assert (F32 @ v.astype(np.float32)).dtype == np.float32
    assert_allclose_rel(F32 @ v.astype(np.float32), F @ v, 2e-4)
