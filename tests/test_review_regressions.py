"""Regression tests for defects found in review (each once produced a wrong or unclear result)."""

import threading

import numpy as np
import pytest
from conftest import Case
from numpy.testing import assert_allclose, assert_array_equal

import ghess


@pytest.mark.parametrize("mode", ["stored", "recompute"])
def test_operators_own_their_data(mode):
    """Writing the next minibatch into the caller's buffer must not change an operator."""
    c = Case("tanh-ce", n_samples=20)
    X, y = c.X.copy(), c.y.copy()
    v = np.random.default_rng(0).normal(size=c.model.n_params)
    ops = [cls(c.model, c.loss, c.theta, (X, y), mode=mode)
           for cls in (ghess.GGNLinearOperator, ghess.HessianLinearOperator)]
    J = ghess.JacobianLinearOperator(c.model, c.theta, X, mode=mode)
    before = [op @ v for op in ops] + [J @ v]
    X[:] = np.random.default_rng(1).normal(size=X.shape)
    y[:] = (y + 1) % 3
    after = [op @ v for op in ops] + [J @ v]
    for b, a in zip(before, after):
        assert_array_equal(a, b)


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


def test_concurrent_products_keep_blas_threads_and_bits():
    from threadpoolctl import threadpool_info

    def blas_threads():
        return sorted(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")

    c = Case("sigmoid-mse", n_samples=200)
    H = ghess.HessianLinearOperator(c.model, c.loss, c.theta, c.data, mode="recompute")
    v = np.ones(H.shape[0])
    reference = H @ v
    before = blas_threads()
    results = []

    def work():
        for _ in range(5):
            results.append(H @ v)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert blas_threads() == before
    for r in results:
        assert_array_equal(r, reference)


def test_jacobian_adjoint_batched_and_clear_errors():
    c = Case("tanh-ce", n_samples=5)
    J = ghess.JacobianLinearOperator(c.model, c.theta, c.X)
    W = np.random.default_rng(0).normal(size=(4, J.shape[0]))
    assert_allclose(J.T.matvec(W), J.rmatvec(W), rtol=1e-14)
    assert J.T.T is J and J.H.H is J
    with pytest.raises(ValueError, match=rf"vector must have shape \({J.shape[0]},\).*got"):
        J.T @ np.ones(J.shape[0] + 1)
    G = ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data)
    with pytest.raises(ValueError, match=rf"vector must have shape \({G.shape[0]},\)"):
        G @ np.ones(G.shape[0] + 1)
    assert J.todense().shape == J.shape
    assert J.memory_bytes == ghess.JacobianLinearOperator.memory_required(c.model, c.X)


def test_argument_validation_gaps():
    with pytest.raises(TypeError, match="input_shape must be a tuple of ints"):
        ghess.Sequential(ghess.Linear(3, 4), input_shape=(3.7,))
    with pytest.raises(TypeError, match="input_shape must be a tuple of ints"):
        ghess.Sequential(ghess.Linear(3, 4), input_shape="3")
    model = ghess.Sequential(ghess.Linear(3, 4), input_shape=(3,))
    loss = ghess.MSELoss()
    with pytest.raises(TypeError, match="damping must be a real number"):
        ghess.NewtonCG(model, loss, damping="a")
    with pytest.raises(TypeError, match="ratio_low must be a real number"):
        ghess.NewtonCG(model, loss, ratio_low="a")
    with pytest.raises(ValueError, match="need increase >= 1 and decrease <= 1"):
        ghess.NewtonCG(model, loss, increase=0.5)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        ghess.GGNLinearOperator.memory_required(model, 10, dtype="complex128")
    G = ghess.GGNLinearOperator(model, loss, model.init_params(), (np.ones((4, 3)),
                                                                   np.ones((4, 4))))
    with pytest.raises(ValueError, match="block must be >= 1"):
        ghess.hutchinson_trace(G, 10, block=0)
    with pytest.raises(ValueError, match=r"needs \d+ bytes .* memory_budget of 1 bytes"):
        ghess.GGNLinearOperator(model, loss, model.init_params(), (np.ones((4, 3)),
                                np.ones((4, 4))), mode="stored", memory_budget=1)


def test_big_endian_float32_stays_float32_and_nested_lists_are_one_batch():
    model = ghess.Sequential(ghess.Linear(3, 4), input_shape=(3,))
    X, y = np.random.default_rng(0).normal(size=(5, 3)), np.ones((5, 4))
    theta = model.init_params()
    grad = ghess.loss_and_grad(model, ghess.MSELoss(), theta.astype(">f4"), (X, y))[1]
    assert grad.dtype == np.float32
    as_lists = ghess.loss_and_grad(model, ghess.MSELoss(), theta, (X.tolist(), y.tolist()))
    as_arrays = ghess.loss_and_grad(model, ghess.MSELoss(), theta, (X, y))
    assert as_lists[0] == as_arrays[0]


def test_bottom_eigenvalues_of_a_ggn_with_a_null_space():
    rng = np.random.default_rng(0)
    model = ghess.Sequential(ghess.Linear(4, 5), ghess.Tanh(), ghess.Linear(5, 3),
                             input_shape=(4,))
    G = ghess.GGNLinearOperator(model, ghess.CrossEntropyLoss(), model.init_params(),
                                (rng.normal(size=(6, 4)), rng.integers(0, 3, 6)))
    assert_allclose(ghess.bottom_eigenvalues(G, 3), 0.0, atol=1e-10)


def test_memory_required_recompute_uses_the_operators_chunk_and_directions():
    c = Case("tanh-ce", n_samples=50)
    one = ghess.HessianLinearOperator.memory_required(c.model, c.data, "recompute")
    sixteen = ghess.HessianLinearOperator.memory_required(c.model, c.data, "recompute",
                                                          n_directions=16)
    assert sixteen > 4 * one
