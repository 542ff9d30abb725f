"""loss_and_grad, forward and per-sample Jacobians."""

import numpy as np
import pytest
from conftest import RTOL, Case
from numpy.testing import assert_allclose

import ghess
from ghess.testing import (
    assert_allclose_rel,
    finite_difference_gradient,
    reference_forward,
    reference_loss_and_grad,
)


def test_loss_and_grad_matches_reference(case):
    value, grad = ghess.loss_and_grad(case.model, case.loss, case.theta, case.data, chunk_size=4)
    ref_value, ref_grad = reference_loss_and_grad(case.model, case.loss, case.theta, case.data)
    assert isinstance(value, float)
    assert_allclose(value, ref_value, rtol=1e-13)
    assert_allclose_rel(grad, ref_grad, RTOL[np.float64])


def test_gradient_matches_finite_differences(case):
    _, grad = ghess.loss_and_grad(case.model, case.loss, case.theta, case.data)

    def f(theta):
        return ghess.loss_and_grad(case.model, case.loss, theta, case.data)[0]

    assert_allclose_rel(grad, finite_difference_gradient(f, case.theta, eps=1e-4), 1e-8)


def test_forward_matches_reference(case):
    z = case.model.forward(case.theta, case.X)
    assert z.shape == (case.X.shape[0], case.model.n_outputs)
    assert_allclose_rel(z, reference_forward(case.model, case.theta, case.X), 1e-14)


def test_float32_stays_float32(dtype):
    c = Case("softplus-bce", dtype=dtype)
    value, grad = ghess.loss_and_grad(c.model, c.loss, c.theta, c.data)
    assert grad.dtype == dtype
    assert c.model.forward(c.theta, c.X).dtype == dtype
    assert ghess.per_sample_jacobians(c.model, c.theta, c.X).dtype == dtype
    c64 = Case("softplus-bce")
    ref_value, ref_grad = ghess.loss_and_grad(c64.model, c64.loss, c64.theta, c64.data)
    assert_allclose(value, ref_value, rtol=1e-5 if dtype == np.float32 else 1e-14)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_batches_equal_concatenation(reduction):
    c = Case("sigmoid-mse", n_samples=10)
    loss = ghess.MSELoss(reduction=reduction)
    whole = ghess.loss_and_grad(c.model, loss, c.theta, (c.X, c.y))
    parts = ghess.loss_and_grad(c.model, loss, c.theta, [(c.X[:3], c.y[:3]),
                                                         (c.X[3:], c.y[3:])])
    assert_allclose(parts[0], whole[0], rtol=1e-14)
    assert_allclose_rel(parts[1], whole[1], 1e-14)


def test_losses_match_closed_forms():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 3))
    y = rng.normal(size=(5, 3))
    assert_allclose(ghess.MSELoss()(z, y), np.mean((z - y) ** 2), rtol=1e-14)
    assert_allclose(ghess.MSELoss(reduction="sum")(z, y), np.sum((z - y) ** 2), rtol=1e-14)
    labels = np.array([0, 2, 1, 1, 0])
    lse = np.log(np.exp(z).sum(axis=1))
    assert_allclose(ghess.CrossEntropyLoss()(z, labels),
                    np.mean(lse - z[np.arange(5), labels]), rtol=1e-14)
    t = rng.uniform(size=(5, 3))
    bce = np.log1p(np.exp(z)) - t * z
    assert_allclose(ghess.BCEWithLogitsLoss()(z, t), bce.mean(), rtol=1e-13)
    # stable for large logits
    big = np.array([[800.0, -800.0]])
    assert np.isfinite(ghess.BCEWithLogitsLoss()(big, np.array([[0.0, 1.0]])))
    assert_allclose(ghess.CrossEntropyLoss()(big, np.array([1])), 1600.0, rtol=1e-14)


def test_activation_derivatives_at_kinks():
    """ReLU'(0) = 0 and LeakyReLU'(0) = slope, as in PyTorch."""
    X = np.zeros((1, 1))
    for act, slope in ((ghess.ReLU(), 0.0), (ghess.LeakyReLU(0.3), 0.3)):
        model = ghess.Sequential(ghess.Linear(1, 1, bias=False), act, input_shape=(1,))
        J = ghess.per_sample_jacobians(model, np.array([1.0]), np.array([[1.0]]) * 0 + 1)
        assert_allclose(J[0, 0, 0], 1.0)
        theta = np.array([0.0])  # pre-activation exactly 0
        J0 = ghess.per_sample_jacobians(model, theta, X + 1)
        assert_allclose(J0[0, 0, 0], slope)


def test_softplus_threshold_matches_pytorch_definition():
    model = ghess.Sequential(ghess.Linear(1, 1, bias=False), ghess.Softplus(beta=2.0,
                             threshold=5.0), input_shape=(1,))
    X = np.array([[1.0], [2.0], [3.0]])
    z = model.forward(np.array([1.0]), X)[:, 0]
    expected = np.where(2 * X[:, 0] > 5, X[:, 0], np.log1p(np.exp(2 * X[:, 0])) / 2)
    assert_allclose(z, expected, rtol=1e-15)


# -- regressions: defects found in review, each once a wrong or unclear result --


def test_float32_bias_gradient_accumulates_in_double():
    rng = np.random.default_rng(0)
    model = ghess.Sequential(ghess.Linear(2, 1), input_shape=(2,))
    N = 300_000
    X = np.ones((N, 2), dtype=np.float32)
    y = (-1 + 0.01 * rng.normal(size=(N, 1))).astype(np.float32)
    g32 = ghess.loss_and_grad(model, ghess.MSELoss(), np.zeros(3, np.float32), (X, y),
                              chunk_size=N)[1]
    g64 = ghess.loss_and_grad(model, ghess.MSELoss(), np.zeros(3), (X, y), chunk_size=N)[1]
    assert_allclose(g32, g64, rtol=1e-5)


def test_big_endian_float32_stays_float32_and_nested_lists_are_one_batch():
    model = ghess.Sequential(ghess.Linear(3, 4), input_shape=(3,))
    X, y = np.random.default_rng(0).normal(size=(5, 3)), np.ones((5, 4))
    theta = model.init_params()
    grad = ghess.loss_and_grad(model, ghess.MSELoss(), theta.astype(">f4"), (X, y))[1]
    assert grad.dtype == np.float32
    as_lists = ghess.loss_and_grad(model, ghess.MSELoss(), theta, (X.tolist(), y.tolist()))
    as_arrays = ghess.loss_and_grad(model, ghess.MSELoss(), theta, (X, y))
    assert as_lists[0] == as_arrays[0]
