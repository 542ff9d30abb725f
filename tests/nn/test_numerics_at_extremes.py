"""Losses and sigmoid at saturated logits: values, gradients and curvature stay exact.

Each of these once cancelled: BCE's output curvature and sigmoid's derivatives as
s (1 - s) (zero above z ~ 36.7 in float64, ~17 in float32, where the exact value is
e^-|z|), and the softmax cross-entropy's B = diag(p) - p p^T through p^T x (indefinite
in float32 once p_top rounds to 1).
"""

import numpy as np
import pytest
from numpy.testing import assert_allclose

import ghess

LOGITS = {np.float64: [-700.0, -100.0, -40.0, -36.0, -1.0, 0.0, 2.5, 36.0, 36.8, 40.0,
                       100.0, 700.0],
          np.float32: [-80.0, -40.0, -17.5, -1.0, 0.0, 2.5, 17.5, 40.0, 80.0]}
DTYPES = [np.float64, np.float32]
RTOL = {np.float64: 1e-12, np.float32: 2e-6}


def sigmoid_derivative(z):
    """sigma'(z) = e / (1 + e)^2 with e = exp(-|z|): exact at any |z| (float64)."""
    e = np.exp(-np.abs(np.asarray(z, dtype=np.float64)))
    return e / (1 + e) ** 2


def free_outputs(K, dtype):
    """Return a network whose outputs are its parameters (input 1): its GGN is B."""
    return ghess.Sequential(ghess.Linear(1, K, bias=False), input_shape=(1,))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_bce_value_gradient_and_curvature_at_extreme_logits(dtype):
    z = np.array(LOGITS[dtype], dtype=dtype)
    K = z.size
    model = free_outputs(K, dtype)
    X = np.ones((1, 1), dtype=dtype)
    for target in (0.0, 1.0):
        y = np.full((1, K), target, dtype=dtype)
        loss = ghess.BCEWithLogitsLoss(reduction="sum")
        value, grad = ghess.loss_and_grad(model, loss, z, (X, y))
        z64 = z.astype(np.float64)
        # log(1 + e^z) - y z, and sigma(z) - y, each in a form exact at any |z|
        expected = np.logaddexp(0.0, z64) - target * z64
        assert_allclose(value, expected.sum(), rtol=RTOL[dtype])
        s, c = np.exp(-np.logaddexp(0.0, -z64)), np.exp(-np.logaddexp(0.0, z64))
        # sigma(z) - y, as (1 - y) - sigma(-z) where sigma(z) is near 1: exact for y = 1
        expected_grad = np.where(z64 < 0, s - target, (1 - target) - c)
        assert_allclose(grad, expected_grad, rtol=RTOL[dtype], atol=1e-300)
        B = ghess.GGNLinearOperator(model, loss, z, (X, y)).todense()
        # the exact curvature, down to e^-700 = 1e-304 (float64) and e^-80 (float32)
        assert_allclose(np.diag(B), sigmoid_derivative(z64), rtol=10 * RTOL[dtype], atol=0)
        assert np.all(np.diag(B) > 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_bce_at_extreme_logits_matches_pytorch(dtype):
    torch = pytest.importorskip("torch")
    z = np.array(LOGITS[dtype], dtype=dtype)
    y = (np.arange(z.size) % 2).astype(dtype)
    model = free_outputs(z.size, dtype)
    value, grad = ghess.loss_and_grad(model, ghess.BCEWithLogitsLoss(), z,
                                      (np.ones((1, 1), dtype=dtype), y[None]))
    zt = torch.tensor(z, requires_grad=True)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(zt[None], torch.tensor(y)[None])
    ref.backward()
    assert_allclose(value, ref.item(), rtol=RTOL[dtype])
    # PyTorch forms sigma(z) - y, exact to an ulp of 1 (ghess: to an ulp of the result)
    assert_allclose(grad, zt.grad.numpy(), rtol=RTOL[dtype], atol=np.finfo(dtype).eps / z.size)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_cross_entropy_at_extreme_logits_matches_pytorch(dtype):
    torch = pytest.importorskip("torch")
    big = 700.0 if dtype == np.float64 else 80.0
    z = np.array([[big, 0.0, -big], [0.0, big, 1.0], [-big, -big, big]], dtype=dtype)
    labels = np.array([0, 2, 1])
    model = free_outputs(3, dtype)
    for n, (row, label) in enumerate(zip(z, labels)):
        value, grad = ghess.loss_and_grad(model, ghess.CrossEntropyLoss(), row,
                                          (np.ones((1, 1), dtype=dtype), labels[n:n + 1]))
        zt = torch.tensor(row, requires_grad=True)
        ref = torch.nn.functional.cross_entropy(zt[None], torch.tensor(labels[n:n + 1]))
        ref.backward()
        assert_allclose(value, ref.item(), rtol=RTOL[dtype])
        assert_allclose(grad, zt.grad.numpy(), rtol=RTOL[dtype], atol=1e-30)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_sigmoid_derivatives_at_saturation(dtype):
    """Sigma' (a Jacobian) and sigma'' (in the Hessian) at large |x|, both dtypes' paths."""
    x = np.array([v for v in LOGITS[dtype] if abs(v) <= (700 if dtype == np.float64 else 80)],
                 dtype=dtype)
    model = ghess.Sequential(ghess.Linear(1, 1, bias=False), ghess.Sigmoid(), input_shape=(1,))
    for xi in x:
        theta = np.array([xi], dtype=dtype)
        J = ghess.per_sample_jacobians(model, theta, np.ones((1, 1), dtype=dtype))
        assert_allclose(J[0, 0, 0], sigmoid_derivative(xi), rtol=10 * RTOL[dtype], atol=0)
        # H of (sigma(x) - 0)^2 is 2 sigma'^2 + 2 sigma sigma'', sigma'' = s c (c - s)
        H = ghess.HessianLinearOperator(model, ghess.MSELoss(reduction="sum"), theta,
                                        (np.ones((1, 1), dtype=dtype),
                                         np.zeros((1, 1), dtype=dtype))).todense()[0, 0]
        x64 = float(xi)
        s, c = 1 / (1 + np.exp(-x64)), 1 / (1 + np.exp(x64))
        expected = 2 * (s * c) ** 2 + 2 * s * (s * c * (c - s))
        assert_allclose(H, expected, rtol=100 * RTOL[dtype], atol=np.finfo(dtype).tiny)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_ggn_of_a_saturated_softmax_is_psd(dtype):
    """One logit 20 ahead of the others: the float32 GGN stays PSD and equals float64's."""
    rng = np.random.default_rng(0)
    K, d, n = 5, 3, 40
    model = ghess.Sequential(ghess.Linear(d, K), input_shape=(d,))
    theta = np.concatenate([rng.normal(size=K * d) * 0.1, [20.0, 0, 0, 0, 0]])
    X, y = rng.normal(size=(n, d)), np.zeros(n, dtype=int)
    dense = {}
    for dt in (np.float64, dtype):
        G = ghess.GGNLinearOperator(model, ghess.CrossEntropyLoss(), theta.astype(dt),
                                    (X.astype(dt), y))
        M = G.todense().astype(np.float64)
        dense[dt] = (M + M.T) / 2
    eigenvalues = np.linalg.eigvalsh(dense[dtype])
    assert eigenvalues[0] >= -1e-6 * eigenvalues[-1]  # float32 once gave -0.6 * the largest
    # the entries themselves, not only the sign: float32's p_top = 1 once lost them
    assert_allclose(dense[dtype], dense[np.float64], rtol=1e-4 if dtype == np.float32 else 0,
                    atol=1e-4 * np.abs(dense[np.float64]).max())


@pytest.mark.parametrize("n, size", [(4, 33), (3, 64)])
def test_conv_bias_sums_over_many_positions_are_exact(n, size):
    """A bias adds N*H*W terms, summed pairwise.

    Summed plainly, G's bias entry (exactly 2 here) was off by 1.6e-13 on 33x33 maps.
    """
    model = ghess.Sequential(ghess.Conv2d(1, 1, 1), ghess.Flatten(),
                             input_shape=(1, size, size))
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(n, 1, size, size)), rng.normal(size=(n, size * size))
    theta = model.init_params()
    e_bias = np.zeros(model.n_params)
    e_bias[-1] = 1.0
    # MSE mean: G_bb = 2 / (N K) * (sum over the N K outputs of (dz/db)^2 = 1) = 2
    G = ghess.GGNLinearOperator(model, ghess.MSELoss(), theta, (X, Y))
    assert abs((G @ e_bias)[-1] - 2.0) <= 2 * np.finfo(np.float64).eps
    # the gradient's bias entry: 2 / (N K) sum (z - y), against a pairwise (NumPy) sum
    _, grad = ghess.loss_and_grad(model, ghess.MSELoss(), theta, (X, Y))
    z = model.forward(theta, X)
    assert_allclose(grad[-1], 2 * np.sum(z - Y) / z.size, rtol=1e-14)
    J = ghess.per_sample_jacobians(model, theta, X[:1])
    assert np.all(J[0, :, -1] == 1.0)
