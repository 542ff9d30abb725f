"""Closed-form curvature: linear least squares, and the two-layer sigmoid network."""

import numpy as np
from numpy.testing import assert_allclose

import ghess


def test_linear_least_squares_hessian_is_closed_form():
    """For z = W x + b and sum (z - y)^2: H = GGN = 2 [[I kron X^T X, I kron X^T 1], [., N I]]."""
    rng = np.random.default_rng(0)
    N, d, K = 13, 4, 3
    X, Y = rng.normal(size=(N, d)), rng.normal(size=(N, K))
    model = ghess.Sequential(ghess.Linear(d, K), input_shape=(d,))
    loss = ghess.MSELoss(reduction="sum")
    expected = 2 * np.block([
        [np.kron(np.eye(K), X.T @ X), np.kron(np.eye(K), X.sum(axis=0)[:, None])],
        [np.kron(np.eye(K), X.sum(axis=0)[None, :]), N * np.eye(K)],
    ])
    for seed in (0, 1):  # the Hessian of a quadratic does not depend on theta
        theta = model.init_params(seed=seed)
        H = ghess.HessianLinearOperator(model, loss, theta, (X, Y)).todense()
        G = ghess.GGNLinearOperator(model, loss, theta, (X, Y)).todense()
        assert_allclose(H, expected, rtol=1e-13, atol=1e-12)
        assert_allclose(G, expected, rtol=1e-13, atol=1e-12)


def test_two_layer_sigmoid_output_block_closed_form():
    """J = 1/2 sum (y - yhat)^2 with yhat = s(W2 s(W1 x)): the d2J/dW2^2 block by hand.

    dJ/dW2[k, j] = e_k s'(a_k) h_j with e = yhat - y, a = W2 h, h = s(W1 x), so
    d2J/dW2[k, j] dW2[k', j'] = delta_kk' (s'(a_k)^2 + e_k s''(a_k)) h_j h_j'.
    """
    rng = np.random.default_rng(1)
    N, d, m, K = 6, 3, 4, 2
    X, Y = rng.normal(size=(N, d)), rng.uniform(size=(N, K))
    model = ghess.Sequential(ghess.Linear(d, m, bias=False), ghess.Sigmoid(),
                             ghess.Linear(m, K, bias=False), ghess.Sigmoid(), input_shape=(d,))
    W1, W2 = 2 * rng.normal(size=(m, d)), 2 * rng.normal(size=(K, m))
    theta = model.flatten({"0.weight": W1, "2.weight": W2})
    # 1/2 sum (y - yhat)^2 is half of MSELoss(reduction="sum")
    H = ghess.HessianLinearOperator(model, ghess.MSELoss(reduction="sum"), theta, (X, Y))
    block = 0.5 * H.block("2.weight", "2.weight")

    def s(t):
        return 1 / (1 + np.exp(-t))

    expected = np.zeros((K * m, K * m))
    for x, y in zip(X, Y):
        h = s(W1 @ x)
        a = W2 @ h
        e = s(a) - y
        d1 = s(a) * (1 - s(a))
        d2 = d1 * (1 - 2 * s(a))
        for k in range(K):
            expected[k * m:(k + 1) * m, k * m:(k + 1) * m] += (d1[k] ** 2 + e[k] * d2[k]) * \
                np.outer(h, h)
    assert_allclose(block, expected, rtol=1e-13, atol=1e-15)
