"""Tests of ``ghess.testing`` itself, against truths that do not share its code.

The reference implementations are what every other test trusts, so each is
checked here against something independent: finite differences of a simpler
reference function, closed forms, vectorised formulas written out in the test,
and structural properties (symmetry, PSD, batch invariance).
"""

import numpy as np
import pytest
from conftest import make_targets

import ghess
from ghess import testing

# Finite differences in float64: 4th-order central steps. With eps = 1e-3 the
# truncation error (~eps^4) and the rounding error (~1e-16 / eps) are both
# around 1e-12 relative for these O(1) functions.
FD_EPS = 1e-3
RTOL_FD = 1e-7
RTOL_EXACT = 1e-12
# pre-activations are kept this far from kinks, so FD steps never cross one
KINK_MARGIN = 0.05


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------
def _mlp(activation, bias):
    return [ghess.Linear(3, 4, bias=bias), activation, ghess.Linear(4, 3)]


# name -> (layers(bias), kink locations of the activations' pre-activations)
NETS = {
    "tanh": (lambda bias: _mlp(ghess.Tanh(), bias), ()),
    "sigmoid": (lambda bias: _mlp(ghess.Sigmoid(), bias), ()),
    "softplus": (lambda bias: _mlp(ghess.Softplus(beta=1.5), bias), ()),
    # threshold 1 with beta 2: units on both sides of the switch at s = 0.5
    "softplus-threshold": (lambda bias: _mlp(ghess.Softplus(beta=2.0, threshold=1.0), bias),
                           (0.5,)),
    "leakyrelu": (lambda bias: _mlp(ghess.LeakyReLU(0.1), bias), (0.0,)),
    "relu": (lambda bias: _mlp(ghess.ReLU(), bias), (0.0,)),
    "identity": (lambda bias: _mlp(ghess.Identity(), bias), ()),
    "linear-linear": (lambda bias: [ghess.Linear(3, 4, bias=bias), ghess.Linear(4, 3)], ()),
    "tanh-sigmoid-deep": (lambda bias: [ghess.Linear(3, 4), ghess.Tanh(),
                                        ghess.Linear(4, 3, bias=bias), ghess.Sigmoid(),
                                        ghess.Linear(3, 3, bias=bias)], ()),
}
LOSSES = {"mse": ghess.MSELoss, "ce": ghess.CrossEntropyLoss, "bce": ghess.BCEWithLogitsLoss}


def _pre_activations(model, theta, X, index):
    """Return the inputs of layer ``index`` (via a prefix of the model)."""
    prefix = ghess.Sequential(*model.layers[:index], input_shape=model.input_shape)
    return testing.reference_forward(prefix, theta[:prefix.n_params], X)


def _inputs_away_from_kinks(model, theta, kinks, n_samples, rng):
    """Draw inputs until ``n_samples`` keep every kinked pre-activation clear of its kink."""
    X = rng.normal(size=(50 * n_samples,) + model.input_shape)
    keep = np.ones(X.shape[0], dtype=bool)
    for i, layer in enumerate(model.layers):
        if kinks and isinstance(layer, ghess.nn.Activation):
            s = _pre_activations(model, theta, X, i)
            for kink in kinks:
                keep &= np.all(np.abs(s - kink) > KINK_MARGIN, axis=1)
    X = X[keep][:n_samples]
    assert X.shape[0] == n_samples, "test setup: could not draw inputs away from the kinks"
    return X


class Case:
    """A small network, loss, parameters and data."""

    def __init__(self, net, loss="mse", reduction="mean", bias=True, n_samples=5, seed=0):
        make_layers, kinks = NETS[net]
        self.model = ghess.Sequential(*make_layers(bias), input_shape=(3,))
        self.loss = LOSSES[loss](reduction=reduction)
        rng = np.random.default_rng(seed)
        # off PyTorch's small init, so that curvature terms are not tiny
        self.theta = 2.0 * self.model.init_params(seed=seed)
        self.X = _inputs_away_from_kinks(self.model, self.theta, kinks, n_samples, rng)
        self.y = make_targets(self.loss, n_samples, self.model.n_outputs, rng)
        self.data = (self.X, self.y)


CASE_PARAMS = [(net, loss, reduction, bias) for net in NETS for loss in LOSSES
               for reduction in ("mean", "sum") for bias in (True, False)]


def _case_id(p):
    net, loss, reduction, bias = p
    return f"case={net}-{loss}-{reduction}-{'bias' if bias else 'nobias'}"


# the curvature tests are the slow ones: there bias goes with the reduction
CURVATURE_PARAMS = [p for p in CASE_PARAMS if p[3] == (p[2] == "mean")]


@pytest.fixture(params=CASE_PARAMS, ids=_case_id)
def ref_case(request):
    """Every network x loss x reduction x bias."""
    return Case(*request.param)


@pytest.fixture(params=CURVATURE_PARAMS, ids=_case_id)
def curvature_case(request):
    """Every network x loss x (mean with biases, sum without hidden biases)."""
    return Case(*request.param)


@pytest.fixture(params=[(net, bias) for net in NETS for bias in (True, False)],
                ids=lambda p: f"case={p[0]}-{'bias' if p[1] else 'nobias'}")
def net_case(request):
    """Every network x bias (for loss-free quantities)."""
    net, bias = request.param
    return Case(net, bias=bias)


def _unit(n, j):
    e = np.zeros(n)
    e[j] = 1.0
    return e


# ---------------------------------------------------------------------------
# Forward and loss against vectorised formulas written out here
# ---------------------------------------------------------------------------
def _vectorised_forward(model, theta, X):
    params = model.unflatten(theta)
    a = np.asarray(X, dtype=np.float64)
    for i, layer in enumerate(model.layers):
        if isinstance(layer, ghess.Linear):
            a = a @ params[f"{i}.weight"].T
            if layer.bias:
                a = a + params[f"{i}.bias"]
        elif isinstance(layer, ghess.Tanh):
            a = np.tanh(a)
        elif isinstance(layer, ghess.Sigmoid):
            a = 1.0 / (1.0 + np.exp(-a))
        elif isinstance(layer, ghess.Softplus):
            b = layer.beta
            a = np.where(b * a > layer.threshold, a, np.log1p(np.exp(b * a)) / b)
        elif isinstance(layer, ghess.LeakyReLU):
            a = np.where(a > 0, a, layer.negative_slope * a)
        elif isinstance(layer, ghess.ReLU):
            a = np.maximum(a, 0.0)
        else:
            assert isinstance(layer, ghess.Identity)
    return a


def test_reference_forward_matches_vectorised_formulas(net_case):
    """The per-sample forward equals a vectorised forward written here."""
    c = net_case
    z = testing.reference_forward(c.model, c.theta, c.X)
    assert z.shape == (c.X.shape[0], c.model.n_outputs) and z.dtype == np.float64
    testing.assert_allclose_rel(z, _vectorised_forward(c.model, c.theta, c.X), RTOL_EXACT)


def _torch_semantics_loss(loss, z, y):
    if isinstance(loss, ghess.MSELoss):
        each = (z - y) ** 2
    elif isinstance(loss, ghess.CrossEntropyLoss):
        m = z.max(axis=1)
        each = m + np.log(np.exp(z - m[:, None]).sum(axis=1)) - z[np.arange(len(y)), y]
    else:
        each = np.logaddexp(0.0, z) - y * z
    return each.mean() if loss.reduction == "mean" else each.sum()


@pytest.mark.parametrize("reduction", ["mean", "sum"], ids=lambda r: f"reduction={r}")
@pytest.mark.parametrize("loss_name", sorted(LOSSES), ids=lambda s: f"loss={s}")
def test_reference_loss_matches_pytorch_formulas(loss_name, reduction):
    """Loss values follow PyTorch's formulas and reductions."""
    c = Case("tanh", loss_name, reduction, n_samples=7)
    z = _vectorised_forward(c.model, c.theta, c.X)
    expected = _torch_semantics_loss(c.loss, z, c.y)
    np.testing.assert_allclose(testing.reference_loss(c.model, c.loss, c.theta, c.data),
                               expected, rtol=RTOL_EXACT)


def test_reference_loss_known_values_at_zero_outputs():
    """At z = 0: CE = log K, BCE = log 2 per element, MSE = mean y^2."""
    model = ghess.Sequential(ghess.Linear(2, 4), input_shape=(2,))
    theta = np.zeros(model.n_params)
    X = np.ones((3, 2))
    labels = np.array([0, 3, 1])
    targets = np.full((3, 4), 0.5)
    for reduction, ce, bce, mse in [("mean", np.log(4), np.log(2), 0.25),
                                    ("sum", 3 * np.log(4), 12 * np.log(2), 3.0)]:
        np.testing.assert_allclose(testing.reference_loss(
            model, ghess.CrossEntropyLoss(reduction), theta, (X, labels)), ce, rtol=1e-15)
        np.testing.assert_allclose(testing.reference_loss(
            model, ghess.BCEWithLogitsLoss(reduction), theta, (X, targets)), bce, rtol=1e-15)
        np.testing.assert_allclose(testing.reference_loss(
            model, ghess.MSELoss(reduction), theta, (X, targets)), mse, rtol=1e-15)


def test_reference_loss_is_stable_for_huge_logits():
    """Logits of +-800 (which overflow a naive exp) give exact finite values."""
    # z = W x with x = 1: logits of +-800 overflow a naive exp
    model = ghess.Sequential(ghess.Linear(1, 2, bias=False), input_shape=(1,))
    theta = np.array([800.0, 0.0])
    X = np.ones((1, 1))
    value, grad = testing.reference_loss_and_grad(
        model, ghess.CrossEntropyLoss("sum"), theta, (X, np.array([1])))
    assert value == 800.0
    np.testing.assert_allclose(grad, [1.0, -1.0], atol=1e-300)
    theta = np.array([800.0, -800.0])
    value, grad = testing.reference_loss_and_grad(
        model, ghess.BCEWithLogitsLoss("sum"), theta, (X, np.array([[0.0, 1.0]])))
    assert value == 1600.0
    np.testing.assert_allclose(grad, [1.0, -1.0], atol=1e-300)
    H = testing.reference_hessian(model, ghess.BCEWithLogitsLoss("sum"), theta,
                                  (X, np.array([[0.0, 1.0]])))
    assert np.all(np.isfinite(H)) and np.all(H >= 0)


# ---------------------------------------------------------------------------
# Derivatives against finite differences
# ---------------------------------------------------------------------------
def test_reference_loss_and_grad_matches_finite_differences(ref_case):
    """The gradient equals 4th-order FD of reference_loss."""
    c = ref_case
    value, grad = testing.reference_loss_and_grad(c.model, c.loss, c.theta, c.data)
    assert value == testing.reference_loss(c.model, c.loss, c.theta, c.data)
    assert grad.shape == (c.model.n_params,) and grad.dtype == np.float64
    fd = testing.finite_difference_gradient(
        lambda t: testing.reference_loss(c.model, c.loss, t, c.data), c.theta, eps=FD_EPS)
    testing.assert_allclose_rel(grad, fd, RTOL_FD)


def test_reference_per_sample_jacobians_match_finite_differences(net_case):
    """Jacobian columns equal FD of reference_forward along e_j."""
    c = net_case
    J = testing.reference_per_sample_jacobians(c.model, c.theta, c.X)
    assert J.shape == (c.X.shape[0], c.model.n_outputs, c.model.n_params)
    fd = np.stack([testing.finite_difference_jvp(
        lambda t: testing.reference_forward(c.model, t, c.X), c.theta,
        _unit(c.model.n_params, j), eps=FD_EPS) for j in range(c.model.n_params)], axis=-1)
    testing.assert_allclose_rel(J, fd, RTOL_FD)


def test_reference_hessian_matches_finite_differences_of_gradient(curvature_case):
    """Hessian columns equal FD of the reference gradient; H is symmetric."""
    c = curvature_case
    H = testing.reference_hessian(c.model, c.loss, c.theta, c.data)
    n = c.model.n_params
    assert H.shape == (n, n)
    fd = np.stack([testing.finite_difference_hvp(
        lambda t: testing.reference_loss_and_grad(c.model, c.loss, t, c.data)[1], c.theta,
        _unit(n, j), eps=FD_EPS, order=4) for j in range(n)], axis=1)
    testing.assert_allclose_rel(H, fd, RTOL_FD)
    testing.assert_allclose_rel(H, H.T, RTOL_EXACT, err_msg="Hessian not symmetric")


def _output_space_hessians(loss, Z, y):
    """Per-sample d2 loss / dz2 by FD of the reference gradient of a 'free output' model.

    With ``Linear(1, K, bias=False)`` and input 1, the network output is theta
    itself, so the loss Hessian in theta is the one in output space.
    """
    K = Z.shape[1]
    free = ghess.Sequential(ghess.Linear(1, K, bias=False), input_shape=(1,))
    unscaled = type(loss)(reduction="sum")
    B = []
    for z, y_n in zip(Z, y):
        data = (np.ones((1, 1)), y_n[None])
        B.append(np.stack([testing.finite_difference_hvp(
            lambda t: testing.reference_loss_and_grad(free, unscaled, t, data)[1], z,
            _unit(K, k), eps=FD_EPS, order=4) for k in range(K)], axis=1))
    n_samples = Z.shape[0]
    if loss.reduction == "sum":
        scale = loss.factor
    elif isinstance(loss, ghess.CrossEntropyLoss):
        scale = loss.factor / n_samples
    else:
        scale = loss.factor / (n_samples * K)
    return scale * np.array(B)


def test_reference_ggn_matches_fd_jacobians_and_output_hessians(curvature_case):
    """G = sum_n J_n^T B_n J_n with J and B both from finite differences."""
    c = curvature_case
    n = c.model.n_params
    J = np.stack([testing.finite_difference_jvp(
        lambda t: testing.reference_forward(c.model, t, c.X), c.theta, _unit(n, j),
        eps=FD_EPS) for j in range(n)], axis=-1)
    B = _output_space_hessians(c.loss, testing.reference_forward(c.model, c.theta, c.X), c.y)
    expected = np.einsum("nki,nkl,nlj->ij", J, B, J)
    testing.assert_allclose_rel(testing.reference_ggn(c.model, c.loss, c.theta, c.data),
                                expected, RTOL_FD)


def test_reference_ggn_is_symmetric_psd(curvature_case):
    """The GGN is symmetric positive semi-definite."""
    c = curvature_case
    G = testing.reference_ggn(c.model, c.loss, c.theta, c.data)
    testing.assert_allclose_rel(G, G.T, RTOL_EXACT, err_msg="GGN not symmetric")
    eigenvalues = np.linalg.eigvalsh(G)
    assert eigenvalues.min() >= -1e-12 * eigenvalues.max()


# ---------------------------------------------------------------------------
# Closed forms and structure
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False], ids=lambda b: f"bias={b}")
def test_single_linear_mse_sum_closed_form(bias):
    """One Linear layer with squared error: J, H, G and grad in closed form."""
    # z_n = W x_n + b, loss sum ||z_n - y_n||^2, theta = [vec(W) row-major, b]:
    # dz_n/dtheta = [I_K kron x_n^T, I_K], so H = G = 2 sum_n J_n^T J_n =
    # 2 [[I kron X^T X, I kron X^T 1], [I kron 1^T X, N I]].
    d, K, N = 3, 2, 6
    rng = np.random.default_rng(1)
    model = ghess.Sequential(ghess.Linear(d, K, bias=bias), input_shape=(d,))
    theta = rng.normal(size=model.n_params)
    X, y = rng.normal(size=(N, d)), rng.normal(size=(N, K))
    I_K = np.eye(K)
    col_sums = X.sum(axis=0)[:, None]
    if bias:
        closed = 2.0 * np.block([[np.kron(I_K, X.T @ X), np.kron(I_K, col_sums)],
                                 [np.kron(I_K, col_sums.T), N * I_K]])
    else:
        closed = 2.0 * np.kron(I_K, X.T @ X)
    J_closed = np.stack([np.hstack([np.kron(I_K, x[None, :])] + ([I_K] if bias else []))
                         for x in X])
    testing.assert_allclose_rel(testing.reference_per_sample_jacobians(model, theta, X),
                                J_closed, RTOL_EXACT)
    for reduction, scale in [("sum", 1.0), ("mean", 1.0 / (N * K))]:
        loss = ghess.MSELoss(reduction)
        testing.assert_allclose_rel(testing.reference_hessian(model, loss, theta, (X, y)),
                                    scale * closed, RTOL_EXACT)
        testing.assert_allclose_rel(testing.reference_ggn(model, loss, theta, (X, y)),
                                    scale * closed, RTOL_EXACT)
        # gradient: 2 sum_n J_n^T (z_n - y_n)
        residual = X @ model.unflatten(theta)["0.weight"].T - y
        if bias:
            residual += model.unflatten(theta)["0.bias"]
        expected = 2.0 * scale * np.einsum("nki,nk->i", J_closed, residual)
        testing.assert_allclose_rel(
            testing.reference_loss_and_grad(model, loss, theta, (X, y))[1], expected,
            RTOL_EXACT)


def test_linear_least_squares_hessian_is_constant_in_theta():
    """Linear least squares has the same Hessian at any theta."""
    rng = np.random.default_rng(2)
    model = ghess.Sequential(ghess.Linear(3, 2), input_shape=(3,))
    data = (rng.normal(size=(5, 3)), rng.normal(size=(5, 2)))
    loss = ghess.MSELoss()
    H0 = testing.reference_hessian(model, loss, rng.normal(size=model.n_params), data)
    H1 = testing.reference_hessian(model, loss, 10 * rng.normal(size=model.n_params), data)
    testing.assert_allclose_rel(H1, H0, RTOL_EXACT)


@pytest.mark.parametrize("loss_name", sorted(LOSSES), ids=lambda s: f"loss={s}")
def test_hessian_equals_ggn_when_outputs_are_linear_in_theta(loss_name):
    """If z is linear in theta, H = G for every loss."""
    c = Case("linear-linear", loss_name)
    model = ghess.Sequential(ghess.Linear(3, 3), input_shape=(3,))
    theta = 2.0 * model.init_params(seed=3)
    H = testing.reference_hessian(model, c.loss, theta, c.data)
    G = testing.reference_ggn(model, c.loss, theta, c.data)
    testing.assert_allclose_rel(H, G, RTOL_EXACT)


def test_hessian_differs_from_ggn_for_relu_network():
    """ReLU'' = 0, yet the cross-layer terms sum_k r_k d2 z_k survive."""
    c = Case("relu", "ce", "sum")
    H = testing.reference_hessian(c.model, c.loss, c.theta, c.data)
    G = testing.reference_ggn(c.model, c.loss, c.theta, c.data)
    assert np.linalg.norm(H - G) > 1e-3 * np.linalg.norm(G)


def test_softplus_above_threshold_is_exactly_linear():
    """Where beta * s > threshold, Softplus is the identity (f' = 1, f'' = 0)."""
    rng = np.random.default_rng(4)
    layers = [ghess.Linear(2, 3), ghess.Softplus(beta=2.0, threshold=1.0), ghess.Linear(3, 2)]
    model = ghess.Sequential(*layers, input_shape=(2,))
    plain = ghess.Sequential(layers[0], ghess.Identity(), layers[2], input_shape=(2,))
    theta = rng.normal(scale=0.1, size=model.n_params)
    theta[model.param_slots["0.bias"].start:model.param_slots["0.bias"].stop] = 5.0
    data = (rng.normal(size=(4, 2)), rng.normal(size=(4, 2)))
    assert np.all(2.0 * _pre_activations(model, theta, data[0], 1) > 1.0)
    loss = ghess.MSELoss()
    np.testing.assert_array_equal(testing.reference_forward(model, theta, data[0]),
                                  testing.reference_forward(plain, theta, data[0]))
    np.testing.assert_array_equal(testing.reference_hessian(model, loss, theta, data),
                                  testing.reference_hessian(plain, loss, theta, data))


@pytest.mark.parametrize("activation, slope", [(ghess.ReLU(), 0.0),
                                               (ghess.LeakyReLU(0.3), 0.3)],
                         ids=["act=relu", "act=leakyrelu"])
def test_kinked_activation_derivative_at_zero_is_pytorchs(activation, slope):
    """ReLU'(0) = 0 and LeakyReLU'(0) = negative_slope, as in PyTorch."""
    # zero first layer: every pre-activation is exactly 0, so dz/db_0 = W_2 * f'(0)
    model = ghess.Sequential(ghess.Linear(2, 3), activation, ghess.Linear(3, 2, bias=False),
                             input_shape=(2,))
    theta = np.zeros(model.n_params)
    W2 = np.arange(1.0, 7.0).reshape(2, 3)
    slot = model.param_slots["2.weight"]
    theta[slot.start:slot.stop] = W2.ravel()
    J = testing.reference_per_sample_jacobians(model, theta, np.ones((1, 2)))
    bias = model.param_slots["0.bias"]
    np.testing.assert_array_equal(J[0][:, bias.start:bias.stop], slope * W2)


@pytest.mark.parametrize("reduction", ["mean", "sum"], ids=lambda r: f"reduction={r}")
@pytest.mark.parametrize("loss_name", sorted(LOSSES), ids=lambda s: f"loss={s}")
def test_multi_batch_data_equals_concatenated(loss_name, reduction):
    """A list (or iterator) of batches gives the result of their concatenation."""
    c = Case("tanh", loss_name, reduction, n_samples=6)
    cuts = [0, 1, 4, 6]  # unequal batches: per-batch means would differ
    as_tuples = [(c.X[a:b], c.y[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    as_lists = [[X, y] for X, y in as_tuples]
    whole_value, whole_grad = testing.reference_loss_and_grad(c.model, c.loss, c.theta, c.data)
    whole_G = testing.reference_ggn(c.model, c.loss, c.theta, c.data)
    whole_H = testing.reference_hessian(c.model, c.loss, c.theta, c.data)
    for batches in (as_tuples, as_lists, iter(as_tuples)):
        value, grad = testing.reference_loss_and_grad(c.model, c.loss, c.theta, batches)
        np.testing.assert_allclose(value, whole_value, rtol=RTOL_EXACT)
        testing.assert_allclose_rel(grad, whole_grad, RTOL_EXACT)
    testing.assert_allclose_rel(testing.reference_ggn(c.model, c.loss, c.theta, as_tuples),
                                whole_G, RTOL_EXACT)
    testing.assert_allclose_rel(testing.reference_hessian(c.model, c.loss, c.theta, as_tuples),
                                whole_H, RTOL_EXACT)
    np.testing.assert_allclose(testing.reference_loss(c.model, c.loss, c.theta, as_tuples[:1]),
                               testing.reference_loss(c.model, c.loss, c.theta, as_tuples[0]),
                               rtol=RTOL_EXACT)


def test_damping_adds_to_the_diagonal():
    """``damping`` adds damping * I to the GGN and the Hessian."""
    c = Case("tanh", "ce")
    eye = np.eye(c.model.n_params)
    for fn in (testing.reference_ggn, testing.reference_hessian):
        testing.assert_allclose_rel(fn(c.model, c.loss, c.theta, c.data, damping=0.5),
                                    fn(c.model, c.loss, c.theta, c.data) + 0.5 * eye,
                                    RTOL_EXACT)


def test_reference_casts_to_float64():
    """float32 inputs are computed in float64."""
    c = Case("sigmoid", "bce")
    value32, grad32 = testing.reference_loss_and_grad(
        c.model, c.loss, c.theta.astype(np.float32), (c.X.astype(np.float32), c.y))
    value64, grad64 = testing.reference_loss_and_grad(
        c.model, c.loss, c.theta.astype(np.float32).astype(np.float64),
        (c.X.astype(np.float32).astype(np.float64), c.y))
    assert grad32.dtype == np.float64
    assert value32 == value64
    np.testing.assert_array_equal(grad32, grad64)


def test_reference_rejects_bad_inputs():
    """Wrong shapes, float labels and unknown layers raise clearly."""
    c = Case("tanh", "ce")
    with pytest.raises(ValueError, match="theta must have shape"):
        testing.reference_forward(c.model, c.theta[:-1], c.X)
    with pytest.raises(ValueError, match="X must have shape"):
        testing.reference_forward(c.model, c.theta, c.X[:, :2])
    with pytest.raises(ValueError, match="integer labels"):
        testing.reference_loss(c.model, c.loss, c.theta, (c.X, c.y.astype(float)))

    class Unknown(ghess.nn.Activation):
        pass

    model = ghess.Sequential(ghess.Linear(3, 2), Unknown(), input_shape=(3,))
    with pytest.raises(TypeError, match="not supported"):
        testing.reference_forward(model, np.zeros(model.n_params), c.X)


# ---------------------------------------------------------------------------
# Finite-difference helpers and the assertion
# ---------------------------------------------------------------------------
def test_finite_difference_gradient_orders():
    """FD gradients converge at orders 2 and 4; other orders are refused."""
    theta = np.array([0.3, -1.2, 2.0])

    def f(t):
        return np.sum(np.sin(t)) + t[0] ** 3 * t[1]

    exact = np.cos(theta) + np.array([3 * theta[0] ** 2 * theta[1], theta[0] ** 3, 0.0])
    err = {order: np.linalg.norm(testing.finite_difference_gradient(f, theta, 1e-2, order)
                                 - exact) for order in (2, 4)}
    assert err[4] < 1e-7 < 1e-5 < err[2] < 1e-3  # O(eps^4) against O(eps^2)
    testing.assert_allclose_rel(testing.finite_difference_gradient(f, theta), exact, 1e-9)
    with pytest.raises(ValueError, match="order must be 2 or 4"):
        testing.finite_difference_gradient(f, theta, order=3)


def test_finite_difference_jvp_of_vector_function():
    """FD JVP of a vector function against its exact derivative."""
    rng = np.random.default_rng(5)
    A = rng.normal(size=(4, 3))
    theta, v = rng.normal(size=3), rng.normal(size=3)
    fd = testing.finite_difference_jvp(lambda t: A @ t ** 3, theta, v)
    testing.assert_allclose_rel(fd, A @ (3 * theta ** 2 * v), 1e-9)
    with pytest.raises(ValueError, match="shape"):
        testing.finite_difference_jvp(lambda t: A @ t, theta, v[:2])


@pytest.mark.parametrize("order", [2, 4], ids=lambda o: f"order={o}")
def test_finite_difference_hvp_of_quadratic_is_exact(order):
    """Central differences of an affine gradient are exact to rounding."""
    rng = np.random.default_rng(6)
    M = rng.normal(size=(4, 4))
    A = M + M.T
    b = rng.normal(size=4)
    theta, v = rng.normal(size=4), rng.normal(size=4)
    fd = testing.finite_difference_hvp(lambda t: A @ t + b, theta, v, order=order)
    testing.assert_allclose_rel(fd, A @ v, 1e-9)
    # central differences of a cubic's gradient (a quadratic) are exact too
    fd = testing.finite_difference_hvp(lambda t: t ** 2, theta, v, order=order)
    testing.assert_allclose_rel(fd, 2 * theta * v, 1e-9)


def test_assert_allclose_rel():
    """The norm-wise assertion passes, fails and reports as documented."""
    desired = np.array([1.0, 1e-12, -2.0])
    testing.assert_allclose_rel(desired * (1 + 1e-9), desired, 1e-8)
    testing.assert_allclose_rel(desired + [0.0, 1e-9, 0.0], desired, 1e-8)  # norm-wise
    testing.assert_allclose_rel(np.zeros(3), np.zeros(3), 1e-12)
    with pytest.raises(AssertionError, match=r"myop: relative error 1\.0\d*e-06 exceeds"):
        testing.assert_allclose_rel(desired * (1 + 1e-6), desired, 1e-8, err_msg="myop")
    with pytest.raises(AssertionError, match="shape mismatch"):
        testing.assert_allclose_rel(desired[:2], desired, 1.0)
    with pytest.raises(AssertionError, match="relative error"):
        testing.assert_allclose_rel(np.array([np.nan, 0.0, 0.0]), desired, 1.0)
    with pytest.raises(AssertionError, match="relative error"):
        testing.assert_allclose_rel(np.ones(3), np.zeros(3), 1e-3)


@pytest.mark.parametrize("case_name", ["tanh-ce", "sigmoid-mse", "softplus-bce", "relu-ce-sum",
                                       "leakyrelu-mse-sum", "linear-linear-bce", "tanh-tail-ce"],
                         ids=lambda n: f"case={n}")
def test_batched_products_match_dense_reference(case_name):
    """The batched NumPy products equal the dense per-sample reference times v."""
    from conftest import Case

    c = Case(case_name)
    v = np.random.default_rng(11).normal(size=c.model.n_params)
    batches = [(c.X[:4], c.y[:4]), (c.X[4:], c.y[4:])]
    G = testing.reference_ggn(c.model, c.loss, c.theta, batches)
    H = testing.reference_hessian(c.model, c.loss, c.theta, batches)
    testing.assert_allclose_rel(
        testing.reference_ggn_matvec(c.model, c.loss, c.theta, batches, v), G @ v, 1e-13)
    testing.assert_allclose_rel(
        testing.reference_hessian_matvec(c.model, c.loss, c.theta, batches, v), H @ v, 1e-13)
    v32 = testing.reference_ggn_matvec(c.model, c.loss, c.theta.astype(np.float32), batches,
                                       v.astype(np.float32))
    assert v32.dtype == np.float32
    testing.assert_allclose_rel(v32, G @ v, 1e-4)
