"""Tests of ``ghess.testing`` on convolutional networks, against independent truths.

The reference's convolution is a loop over kernel offsets of strided slices;
here it is checked against formulations that share none of its code (windows of
``sliding_window_view`` contracted by one ``einsum``; ``scipy.signal.correlate``
with a dilated kernel, subsampled), the poolings against hand-computed cases,
the derivatives against finite differences and closed forms, and everything
against PyTorch when it is installed.
"""

import numpy as np
import pytest
from conftest import make_targets
from numpy.lib.stride_tricks import sliding_window_view

import ghess
from ghess import testing
from ghess.testing import reference

# 4th-order central differences in float64, as in test_testing.py
FD_EPS = 1e-3
RTOL_FD = 1e-7
RTOL_EXACT = 1e-12
# ReLU pre-activations and the gap between a window's two largest values are
# kept this far from 0: FD steps (<= 2 eps along one coordinate) move them by
# far less, so no step crosses a kink or changes an argmax.
KINK_MARGIN = 0.05


def _unit(n, j):
    e = np.zeros(n)
    e[j] = 1.0
    return e


def _flat_model(*layers, input_shape):
    """``layers`` followed by Flatten, so that the output is (N, K) as Sequential requires."""
    return ghess.Sequential(*layers, ghess.Flatten(), input_shape=input_shape)


# ---------------------------------------------------------------------------
# Independent formulations of the convolution
# ---------------------------------------------------------------------------
def _conv_by_windows(X, weight, bias, stride, padding, dilation):
    """All windows of the padded input at once, contracted with the kernel by one einsum."""
    kh, kw = weight.shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    Xpad = np.pad(X, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    # (N, C, H_out, W_out, kh, kw): window starts every s, window taps every d
    windows = sliding_window_view(Xpad, span, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    out = np.einsum("ncijab,ocab->noij", windows, weight)
    return out if bias is None else out + bias[:, None, None]


def _conv_by_scipy(X, weight, bias, stride, padding, dilation):
    """Stride-1 ``scipy.signal.correlate`` with a zero-dilated kernel, then subsampled."""
    signal = pytest.importorskip("scipy.signal")
    n_out, n_in, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    dilated = np.zeros((n_out, n_in, dh * (kh - 1) + 1, dw * (kw - 1) + 1))
    dilated[:, :, ::dh, ::dw] = weight
    Xpad = np.pad(X, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out = []
    for x in Xpad:
        planes = [sum(signal.correlate(x[c], dilated[o, c], mode="valid") for c in range(n_in))
                  for o in range(n_out)]
        out.append(np.array(planes)[:, ::sh, ::sw])
    out = np.array(out)
    return out if bias is None else out + bias[:, None, None]


# id -> (Conv2d arguments, per-sample input shape, n_samples)
CONV_GEOMETRIES = {
    "k3": (dict(in_channels=2, out_channels=3, kernel_size=3), (2, 5, 6), 3),
    "k2x3-nonsquare-pad1x0": (dict(in_channels=2, out_channels=2, kernel_size=(2, 3),
                                   padding=(1, 0)), (2, 5, 5), 2),
    "k3-stride2-pad1": (dict(in_channels=2, out_channels=2, kernel_size=3, stride=2,
                             padding=1), (2, 7, 6), 2),
    "k3-dilation2": (dict(in_channels=2, out_channels=2, kernel_size=3, dilation=2),
                     (2, 7, 8), 2),
    "k3-pad2": (dict(in_channels=1, out_channels=2, kernel_size=3, padding=2), (1, 4, 4), 2),
    "k1x1": (dict(in_channels=3, out_channels=2, kernel_size=1), (3, 4, 5), 2),
    "k1x1-stride2": (dict(in_channels=2, out_channels=2, kernel_size=1, stride=2), (2, 5, 4), 2),
    "single-channel": (dict(in_channels=1, out_channels=1, kernel_size=2), (1, 4, 3), 2),
    "batch-one": (dict(in_channels=2, out_channels=3, kernel_size=(3, 2), padding=1),
                  (2, 4, 4), 1),
    "kernel-covers-input": (dict(in_channels=2, out_channels=2, kernel_size=(3, 4)),
                            (2, 3, 4), 2),
    "mixed-nobias": (dict(in_channels=2, out_channels=3, kernel_size=(3, 2), stride=(2, 1),
                          padding=(2, 1), dilation=(1, 2), bias=False), (2, 6, 5), 2),
}


@pytest.fixture(params=sorted(CONV_GEOMETRIES), ids=lambda n: f"conv={n}")
def conv_case(request):
    """Return a one-layer conv model, random parameters, inputs and conv arguments."""
    kwargs, input_shape, n_samples = CONV_GEOMETRIES[request.param]
    conv = ghess.Conv2d(**kwargs)
    model = _flat_model(conv, input_shape=input_shape)
    rng = np.random.default_rng(len(request.param))
    theta = rng.normal(size=model.n_params)
    X = rng.normal(size=(n_samples,) + input_shape)
    params = model.unflatten(theta)
    args = (params["0.weight"], params.get("0.bias"), conv.stride, conv.padding, conv.dilation)
    return model, theta, X, args


@pytest.mark.parametrize("truth", [_conv_by_windows, _conv_by_scipy],
                         ids=["truth=windows-einsum", "truth=scipy-correlate"])
def test_conv2d_forward_matches_independent_formulation(conv_case, truth):
    """Conv2d forward (and the spec's output shape) equal an independent convolution."""
    model, theta, X, args = conv_case
    expected = truth(X, *args)
    assert model.shapes[1] == expected.shape[1:]
    z = testing.reference_forward(model, theta, X)
    testing.assert_allclose_rel(z.reshape(expected.shape), expected, RTOL_EXACT)


def test_conv2d_jacobian_is_the_unfolded_input(conv_case):
    """Conv output is linear in (W, b): its Jacobian holds the input windows and ones.

    dz[o, i, j] / dW[o', c, a, b] = [o = o'] window[c, i, j, a, b];
    dz[o, i, j] / db[o'] = [o = o'].
    """
    model, theta, X, (weight, bias, stride, padding, dilation) = conv_case
    # windows of the input, by the formulation above: the conv of X with unit kernels
    eye = np.eye(weight.size).reshape((weight.size,) + weight.shape)
    expected = []
    for e in eye:  # column of J for the weight entry e
        expected.append(_conv_by_windows(X, e, None, stride, padding, dilation))
    if bias is not None:
        for o in range(weight.shape[0]):
            column = np.zeros((X.shape[0],) + model.shapes[1])
            column[:, o] = 1.0
            expected.append(column)
    expected = np.stack([col.reshape(X.shape[0], -1) for col in expected], axis=-1)
    J = testing.reference_per_sample_jacobians(model, theta, X)
    testing.assert_allclose_rel(J, expected, RTOL_EXACT)


# ---------------------------------------------------------------------------
# Pooling: hand-computed cases and the tie rule
# ---------------------------------------------------------------------------
def _pool_forward(pool, x):
    """Forward one (C, H, W) sample through ``pool`` alone (no parameters)."""
    model = _flat_model(pool, input_shape=x.shape)
    return testing.reference_forward(model, np.zeros(0), x[None])[0].reshape(model.shapes[1])


X_4x4 = np.array([[1.0, 5.0, 2.0, 0.0],
                  [3.0, 4.0, 7.0, 6.0],
                  [9.0, -1.0, 2.0, 2.5],
                  [0.0, 8.0, 3.0, 1.0]])


@pytest.mark.parametrize("pool, x, expected", [
    pytest.param(ghess.MaxPool2d(2), X_4x4, [[5.0, 7.0], [9.0, 3.0]], id="max-k2"),
    pytest.param(ghess.MaxPool2d((1, 2), stride=(2, 1)), X_4x4,
                 [[5.0, 5.0, 2.0], [9.0, 2.0, 2.5]], id="max-k1x2-stride2x1"),
    pytest.param(ghess.MaxPool2d(3, stride=1), X_4x4, [[9.0, 7.0], [9.0, 8.0]],
                 id="max-k3-overlapping"),
    # all inputs negative: -inf padding never wins (zero padding would give 0)
    pytest.param(ghess.MaxPool2d(3, stride=2, padding=1), -1.0 - np.arange(16.0).reshape(4, 4),
                 [[-1.0, -2.0], [-5.0, -6.0]], id="max-k3-pad1-negative"),
    pytest.param(ghess.AvgPool2d(2), X_4x4, [[13 / 4, 15 / 4], [16 / 4, 8.5 / 4]],
                 id="avg-k2"),
    pytest.param(ghess.AvgPool2d(2, stride=1), np.arange(9.0).reshape(3, 3),
                 [[2.0, 3.0], [5.0, 6.0]], id="avg-k2-overlapping"),
    # padded zeros count: the divisor is always kh * kw (4, then 3)
    pytest.param(ghess.AvgPool2d(2, stride=1, padding=1), np.array([[1.0, 2.0], [3.0, 4.0]]),
                 [[0.25, 0.75, 0.5], [1.0, 2.5, 1.5], [0.75, 1.75, 1.0]], id="avg-k2-pad1"),
    pytest.param(ghess.AvgPool2d((1, 3), stride=(1, 2), padding=(0, 1)),
                 np.array([[3.0, 6.0, 9.0]]), [[3.0, 5.0]], id="avg-k1x3-pad0x1"),
])
def test_pool_forward_hand_computed(pool, x, expected):
    """Pooling forward on small cases computed by hand, per channel."""
    x = np.stack([x, 10.0 * x])  # two channels, pooled independently
    expected = np.array(expected)
    np.testing.assert_allclose(_pool_forward(pool, x), np.stack([expected, 10.0 * expected]),
                               rtol=1e-15)


def _tie_model(pool, input_hw):
    """Conv2d(2, 1, 1, bias=False) with weight (1, 1), then ``pool``: s = x0 + x1.

    Inputs with equal s but different (x0, x1) make tied window elements
    distinguishable: dz/dW = (x0, x1) of the element that the tie went to.
    """
    model = _flat_model(ghess.Conv2d(2, 1, 1, bias=False), pool, input_shape=(2,) + input_hw)
    return model, np.ones(2)


def _tie_inputs(s):
    """(1, 2, H, W) inputs with x0 + x1 = s exactly and x0 distinct (dyadic, so exact)."""
    s = np.asarray(s, dtype=float)
    x0 = np.arange(s.size, dtype=float).reshape(s.shape) / 8.0
    return np.stack([x0, s - x0])[None]


@pytest.mark.parametrize("s, first", [
    pytest.param([[1.0, 1.0], [1.0, 1.0]], (0, 0), id="all-tied"),
    pytest.param([[0.5, 1.0], [1.0, 0.5]], (0, 1), id="tie-row-major-before-column-major"),
    pytest.param([[0.5, 0.0], [1.0, 1.0]], (1, 0), id="tie-bottom-row"),
    pytest.param([[0.0, 0.0], [0.0, 0.0]], (0, 0), id="zeros"),
])
def test_maxpool_tie_goes_to_first_maximum(s, first):
    """With exact ties the derivative goes to the first maximum in row-major order."""
    model, theta = _tie_model(ghess.MaxPool2d(2), (2, 2))
    X = _tie_inputs(s)
    J = testing.reference_per_sample_jacobians(model, theta, X)
    np.testing.assert_array_equal(J[0], X[0][:, first[0], first[1]][None])
    # R{.} quantities follow the same route: for this model H = G = 2 c J^T J
    data = (X, np.zeros((1, 1)))
    loss = ghess.MSELoss("sum")
    np.testing.assert_array_equal(testing.reference_hessian(model, loss, theta, data),
                                  2.0 * J[0].T @ J[0])


def test_maxpool_tie_with_padding_goes_to_first_in_bounds_maximum():
    """Padding never wins; among tied in-bounds elements the first in row-major order does."""
    model, theta = _tie_model(ghess.MaxPool2d(3, stride=1, padding=1), (3, 3))
    X = _tie_inputs(np.ones((3, 3)))
    J = testing.reference_per_sample_jacobians(model, theta, X)
    # the window of output (i, j) covers rows i-1..i+1, columns j-1..j+1
    expected = [X[0][:, max(i - 1, 0), max(j - 1, 0)] for i in range(3) for j in range(3)]
    np.testing.assert_array_equal(J[0], np.array(expected))


def test_maxpool_after_relu_zero_window_routes_to_top_left():
    """A window of ReLU zeros has its argmax at the window's top-left element.

    Through ReLU'(s <= 0) = 0 the route cannot change a derivative, so the rule
    is checked on the argmax helper itself.
    """
    pool = ghess.MaxPool2d(2)
    relu_out = np.maximum(np.array([[[-1.0, -2.0, 3.0, -1.0],
                                     [-3.0, -0.5, 3.0, 1.0],
                                     [0.0, -1.0, -2.0, -4.0],
                                     [-1.0, 0.0, -3.0, -2.0]]]), 0.0)
    argmax = reference._maxpool_argmax(relu_out, pool)
    # flat indices into 4x4: zero windows -> top-left (0, 8, 10); tie of 3s -> index 2
    np.testing.assert_array_equal(argmax, [[[0, 2], [8, 10]]])


# ---------------------------------------------------------------------------
# Derivatives of conv networks against finite differences
# ---------------------------------------------------------------------------
# name -> (layers, per-sample input shape)
CONV_NETS = {
    "conv-relu-maxpool": (lambda: [ghess.Conv2d(2, 3, 3, padding=1), ghess.ReLU(),
                                   ghess.MaxPool2d(2), ghess.Flatten(), ghess.Linear(12, 3)],
                          (2, 4, 4)),
    # -> (2, 3, 4) -> avg (2, 4, 5) -> 40
    "conv-tanh-avgpool-strided": (
        lambda: [ghess.Conv2d(1, 2, (2, 3), stride=2, padding=(1, 2), dilation=(2, 1)),
                 ghess.Tanh(), ghess.AvgPool2d(2, stride=1, padding=1), ghess.Flatten(),
                 ghess.Linear(40, 3)], (1, 6, 5)),
    # overlapping max-pool windows route several outputs to one input
    "conv-softplus-conv-tanh-maxpool-overlap": (
        lambda: [ghess.Conv2d(2, 2, 2), ghess.Softplus(), ghess.Conv2d(2, 2, 3, padding=2,
                                                                        dilation=2),
                 ghess.Tanh(), ghess.MaxPool2d(2, stride=1), ghess.Flatten(),
                 ghess.Linear(18, 2)], (2, 5, 5)),
    "conv-leakyrelu-conv1x1-nobias": (
        lambda: [ghess.Conv2d(1, 2, 3, stride=2, padding=1, bias=False), ghess.LeakyReLU(0.1),
                 ghess.Conv2d(2, 2, 1, bias=False), ghess.Flatten(),
                 ghess.Linear(18, 2, bias=False)], (1, 5, 6)),
    "conv-flatten-linear": (lambda: [ghess.Conv2d(2, 2, 2, padding=1), ghess.Flatten(),
                                     ghess.Linear(32, 2)], (2, 3, 3)),
}
LOSSES = {"mse": ghess.MSELoss, "ce": ghess.CrossEntropyLoss, "bce": ghess.BCEWithLogitsLoss}


def _layer_inputs(model, theta, X, index):
    """Return the inputs of layer ``index``, (N, *model.shapes[index]), via a model prefix."""
    if index == 0:
        return X
    prefix = _flat_model(*model.layers[:index], input_shape=model.input_shape)
    z = testing.reference_forward(prefix, theta[:prefix.n_params], X)
    return z.reshape((X.shape[0],) + model.shapes[index])


def _pool_windows(pool, a):
    """(N, C, H_out, W_out, kh * kw) window values of a max-pool, -inf padded."""
    (ph, pw), (sh, sw) = pool.padding, pool.stride
    apad = np.pad(a, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)
    windows = sliding_window_view(apad, pool.kernel_size, axis=(2, 3))[:, :, ::sh, ::sw]
    return windows.reshape(windows.shape[:4] + (-1,))


def _kink_distance(model, theta, X):
    """Per sample, the smallest distance to a kink.

    Kinks: ReLU / LeakyReLU pre-activations at 0, and a max-pool window's
    largest value meeting its second largest.
    """
    distance = np.full(X.shape[0], np.inf)
    for i, layer in enumerate(model.layers):
        if isinstance(layer, (ghess.ReLU, ghess.LeakyReLU)):
            s = _layer_inputs(model, theta, X, i).reshape(X.shape[0], -1)
            distance = np.minimum(distance, np.abs(s).min(axis=1))
        elif isinstance(layer, ghess.MaxPool2d):
            top = -np.sort(-_pool_windows(layer, _layer_inputs(model, theta, X, i)), axis=-1)
            gap = top[..., 0] - top[..., 1]
            # a window of ReLU zeros ties at exactly 0, but its elements are clamped
            # negatives (clear of 0 by the check above) and stay 0 under small steps
            gap[top[..., 0] == 0.0] = np.inf
            distance = np.minimum(distance, gap.reshape(X.shape[0], -1).min(axis=1))
    return distance


class Case:
    """A conv network, loss, parameters and data away from kinks."""

    def __init__(self, net, loss="mse", reduction="mean", n_samples=3, seed=0):
        make_layers, input_shape = CONV_NETS[net]
        self.model = ghess.Sequential(*make_layers(), input_shape=input_shape)
        self.loss = LOSSES[loss](reduction=reduction)
        rng = np.random.default_rng(seed)
        # off PyTorch's small init, so that curvature terms are not tiny
        self.theta = 2.0 * self.model.init_params(seed=seed)
        X = rng.normal(size=(100 * n_samples,) + input_shape)
        X = X[_kink_distance(self.model, self.theta, X) > KINK_MARGIN][:n_samples]
        assert X.shape[0] == n_samples, "test setup: could not draw inputs away from kinks"
        self.X = X
        self.y = make_targets(self.loss, n_samples, self.model.n_outputs, rng)
        self.data = (self.X, self.y)


CASE_PARAMS = [
    ("conv-relu-maxpool", "ce", "mean"),
    ("conv-relu-maxpool", "mse", "sum"),
    ("conv-tanh-avgpool-strided", "bce", "mean"),
    ("conv-softplus-conv-tanh-maxpool-overlap", "ce", "sum"),
    ("conv-leakyrelu-conv1x1-nobias", "mse", "mean"),
    ("conv-flatten-linear", "mse", "mean"),
]


def _case_id(p):
    net, loss, reduction = p
    return f"case={net}-{loss}" + ("-sum" if reduction == "sum" else "")


@pytest.fixture(params=CASE_PARAMS, ids=_case_id, scope="module")
def conv_net_case(request):
    """Every conv network with one or two losses."""
    return Case(*request.param)


def test_conv_net_inputs_stay_clear_of_kinks(conv_net_case):
    """Setup check: FD steps cannot cross a kink (a step moves activations by << margin)."""
    c = conv_net_case
    assert np.all(_kink_distance(c.model, c.theta, c.X) > KINK_MARGIN)


def test_conv_net_gradient_matches_finite_differences(conv_net_case):
    """The gradient equals 4th-order FD of reference_loss."""
    c = conv_net_case
    value, grad = testing.reference_loss_and_grad(c.model, c.loss, c.theta, c.data)
    assert value == testing.reference_loss(c.model, c.loss, c.theta, c.data)
    fd = testing.finite_difference_gradient(
        lambda t: testing.reference_loss(c.model, c.loss, t, c.data), c.theta, eps=FD_EPS)
    testing.assert_allclose_rel(grad, fd, RTOL_FD)


def _fd_jacobians(c):
    n = c.model.n_params
    return np.stack([testing.finite_difference_jvp(
        lambda t: testing.reference_forward(c.model, t, c.X), c.theta, _unit(n, j),
        eps=FD_EPS) for j in range(n)], axis=-1)


def test_conv_net_jacobians_match_finite_differences(conv_net_case):
    """Per-sample Jacobian columns equal FD of reference_forward along e_j."""
    c = conv_net_case
    J = testing.reference_per_sample_jacobians(c.model, c.theta, c.X)
    assert J.shape == (c.X.shape[0], c.model.n_outputs, c.model.n_params)
    testing.assert_allclose_rel(J, _fd_jacobians(c), RTOL_FD)


def test_conv_net_hessian_matches_finite_differences_of_gradient(conv_net_case):
    """Hessian columns equal FD of the reference gradient; H is symmetric."""
    c = conv_net_case
    H = testing.reference_hessian(c.model, c.loss, c.theta, c.data)
    n = c.model.n_params
    fd = np.stack([testing.finite_difference_hvp(
        lambda t: testing.reference_loss_and_grad(c.model, c.loss, t, c.data)[1], c.theta,
        _unit(n, j), eps=FD_EPS, order=4) for j in range(n)], axis=1)
    testing.assert_allclose_rel(H, fd, RTOL_FD)
    testing.assert_allclose_rel(H, H.T, RTOL_EXACT, err_msg="Hessian not symmetric")


def _output_hessians(loss, Z):
    """Scaled d2 loss / dz2 per sample, written out here (PyTorch's reductions)."""
    N, K = Z.shape
    mean = loss.reduction == "mean"
    if isinstance(loss, ghess.MSELoss):
        return np.broadcast_to(2.0 * np.eye(K) / (N * K if mean else 1.0), (N, K, K))
    if isinstance(loss, ghess.CrossEntropyLoss):
        P = np.exp(Z - Z.max(axis=1, keepdims=True))
        P /= P.sum(axis=1, keepdims=True)
        B = np.stack([np.diag(p) - np.outer(p, p) for p in P])
        return B / (N if mean else 1.0)
    P = 1.0 / (1.0 + np.exp(-Z))
    return np.stack([np.diag(p * (1.0 - p)) for p in P]) / (N * K if mean else 1.0)


def test_conv_net_ggn_matches_fd_jacobians_and_is_symmetric_psd(conv_net_case):
    """G = sum_n J_n^T B_n J_n with FD Jacobians; symmetric positive semi-definite."""
    c = conv_net_case
    G = testing.reference_ggn(c.model, c.loss, c.theta, c.data)
    J = _fd_jacobians(c)
    B = _output_hessians(c.loss, testing.reference_forward(c.model, c.theta, c.X))
    testing.assert_allclose_rel(G, np.einsum("nki,nkl,nlj->ij", J, B, J), RTOL_FD)
    testing.assert_allclose_rel(G, G.T, RTOL_EXACT, err_msg="GGN not symmetric")
    eigenvalues = np.linalg.eigvalsh(G)
    assert eigenvalues.min() >= -1e-12 * eigenvalues.max()


def test_conv_net_batched_products_match_dense_reference(conv_net_case):
    """The batched NumPy products equal the dense per-sample reference times v."""
    c = conv_net_case
    v = np.random.default_rng(11).normal(size=c.model.n_params)
    batches = [(c.X[:2], c.y[:2]), (c.X[2:], c.y[2:])]
    G = testing.reference_ggn(c.model, c.loss, c.theta, batches)
    H = testing.reference_hessian(c.model, c.loss, c.theta, batches)
    testing.assert_allclose_rel(
        testing.reference_ggn_matvec(c.model, c.loss, c.theta, batches, v), G @ v, 1e-13)
    testing.assert_allclose_rel(
        testing.reference_hessian_matvec(c.model, c.loss, c.theta, batches, v), H @ v, 1e-13)
    for matvec, dense in [(testing.reference_ggn_matvec, G),
                          (testing.reference_hessian_matvec, H)]:
        out32 = matvec(c.model, c.loss, c.theta.astype(np.float32), batches,
                       v.astype(np.float32))
        assert out32.dtype == np.float32
        testing.assert_allclose_rel(out32, dense @ v, 1e-4)


# ---------------------------------------------------------------------------
# Exactness where the network is linear in each layer's parameters
# ---------------------------------------------------------------------------
def test_conv_flatten_linear_mse_hessian_blocks():
    """Output Linear(Flatten(Conv(x))) is linear in the conv parameters and in the Linear ones.

    So with MSE the diagonal blocks of H equal those of G exactly, and H - G is
    the cross term only: d2 z_k / d theta_conv,j d W_lin[k, m] = d flat_m / d theta_conv,j,
    hence (H - G)[j, W[k, m]] = sum_n r_nk dflat_nm / dtheta_j with r = dL/dz.
    """
    c = Case("conv-flatten-linear", "mse", "mean", n_samples=4)
    model = c.model
    H = testing.reference_hessian(model, c.loss, c.theta, c.data)
    G = testing.reference_ggn(model, c.loss, c.theta, c.data)
    conv = slice(*model.layer_range(0))
    lin = slice(*model.layer_range(2))
    testing.assert_allclose_rel(H[conv, conv], G[conv, conv], RTOL_EXACT)
    testing.assert_allclose_rel(H[lin, lin], G[lin, lin], RTOL_EXACT)
    # the cross term from pieces: the conv part's Jacobians and the MSE residuals
    prefix = ghess.Sequential(*model.layers[:2], input_shape=model.input_shape)
    J_flat = testing.reference_per_sample_jacobians(prefix, c.theta[conv], c.X)
    Z = testing.reference_forward(model, c.theta, c.X)
    N, K = Z.shape
    r = 2.0 * (Z - c.y) / (N * K)
    cross = np.zeros((conv.stop - conv.start, lin.stop - lin.start))
    weight = model.param_slots["2.weight"]
    cross[:, :weight.size] = np.einsum("nk,nmj->jkm", r, J_flat).reshape(cross.shape[0], -1)
    testing.assert_allclose_rel(H[conv, lin] - G[conv, lin], cross, 1e-11)
    testing.assert_allclose_rel(H[lin, conv] - G[lin, conv], cross.T, 1e-11)
    assert np.linalg.norm(cross) > 1e-3 * np.linalg.norm(G)  # the check is not vacuous


def test_conv_only_mse_hessian_is_constant_ggn():
    """A conv layer alone is linear in theta: H = G = 2 c sum_n J_n^T J_n at any theta."""
    model = _flat_model(ghess.Conv2d(2, 2, (2, 3), stride=(1, 2), padding=1, dilation=(2, 1)),
                        input_shape=(2, 4, 5))
    rng = np.random.default_rng(7)
    X = rng.normal(size=(3, 2, 4, 5))
    y = rng.normal(size=(3, model.n_outputs))
    loss = ghess.MSELoss("sum")
    J = testing.reference_per_sample_jacobians(model, np.zeros(model.n_params), X)
    expected = 2.0 * np.einsum("nki,nkj->ij", J, J)
    for scale in (0.0, 1.0, 10.0):
        theta = scale * rng.normal(size=model.n_params)
        testing.assert_allclose_rel(testing.reference_hessian(model, loss, theta, (X, y)),
                                    expected, RTOL_EXACT)
        testing.assert_allclose_rel(testing.reference_ggn(model, loss, theta, (X, y)),
                                    expected, RTOL_EXACT)


def test_reference_rejects_flat_inputs_for_conv_model():
    """Inputs must be (N, C, H, W) for a model with input_shape (C, H, W)."""
    c = Case("conv-relu-maxpool", n_samples=1)
    with pytest.raises(ValueError, match=r"X must have shape \(n_samples, 2, 4, 4\)"):
        testing.reference_forward(c.model, c.theta, c.X.reshape(1, -1))


# ---------------------------------------------------------------------------
# Cross-checks against PyTorch
# ---------------------------------------------------------------------------
def _to_torch(torch, model):
    return testing.torch_sequential(model)


class TorchProblem:
    """The torch twin of (model, loss, data), as functions of the flat theta."""

    def __init__(self, torch, model, loss, X, y):
        self.torch = torch
        self.net = _to_torch(torch, model)
        names = [n for n, _ in self.net.named_parameters()]
        assert names == list(model.param_slots)
        self.slots = [(name, model.param_slots[name]) for name in names]
        self.X = torch.from_numpy(X)
        self.y = torch.from_numpy(y)
        plain = getattr(torch.nn, type(loss).__name__)(reduction=loss.reduction)
        self.lossfn = lambda z, y: loss.factor * plain(z, y)

    def outputs(self, flat):
        params = {name: flat[s.start:s.stop].reshape(s.shape) for name, s in self.slots}
        return self.torch.func.functional_call(self.net, params, (self.X,))

    def objective(self, flat):
        return self.lossfn(self.outputs(flat), self.y)


def _check_against_torch(torch, model, loss, theta, X, y, rtol=1e-12):
    """Shapes, forward, Jacobians, loss, gradient and Hessian against PyTorch."""
    problem = TorchProblem(torch, model, loss, X, y)
    t = torch.from_numpy(theta)
    # the spec's per-layer shapes are PyTorch's
    a = problem.X
    params = model.unflatten(theta)
    with torch.no_grad():
        for i, module in enumerate(problem.net):
            for name, p in module.named_parameters():
                p.copy_(torch.from_numpy(params[f"{i}.{name}"]))
            a = module(a)
            assert tuple(a.shape[1:]) == model.shapes[i + 1], f"layer {i}: {module}"
    testing.assert_allclose_rel(testing.reference_forward(model, theta, X),
                                problem.outputs(t).detach().numpy(), rtol)
    J = torch.func.jacrev(problem.outputs)(t).numpy()  # (N, K, n_params)
    testing.assert_allclose_rel(testing.reference_per_sample_jacobians(model, theta, X), J,
                                rtol)
    value, grad = testing.reference_loss_and_grad(model, loss, theta, (X, y))
    np.testing.assert_allclose(value, problem.objective(t).item(), rtol=rtol)
    testing.assert_allclose_rel(grad, torch.func.grad(problem.objective)(t).numpy(), rtol)
    testing.assert_allclose_rel(testing.reference_hessian(model, loss, theta, (X, y)),
                                torch.func.hessian(problem.objective)(t).numpy(), rtol)


TORCH_NETS = {
    # every layer kind, with stride, padding and dilation on the convolution
    "conv-relu-maxpool-avgpool-ce": (
        lambda: [ghess.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(1, 2)),
                 ghess.ReLU(), ghess.MaxPool2d(2, stride=1, padding=1),
                 ghess.AvgPool2d(2, padding=1), ghess.Flatten(), ghess.Linear(36, 3)],
        (2, 6, 5), "ce", "mean"),
    "conv-tanh-avgpool-strided-bce": CONV_NETS["conv-tanh-avgpool-strided"] + ("bce", "sum"),
    "conv-softplus-conv-tanh-maxpool-overlap-mse": (
        CONV_NETS["conv-softplus-conv-tanh-maxpool-overlap"] + ("mse", "mean")),
    "conv-leakyrelu-conv1x1-nobias-ce": CONV_NETS["conv-leakyrelu-conv1x1-nobias"] + ("ce",
                                                                                      "sum"),
}


@pytest.mark.parametrize("name", sorted(TORCH_NETS), ids=lambda n: f"case={n}")
def test_conv_net_matches_torch(name):
    """Forward, Jacobians, loss, gradient and Hessian equal PyTorch's (float64)."""
    torch = pytest.importorskip("torch")
    make_layers, input_shape, loss_name, reduction = TORCH_NETS[name]
    model = ghess.Sequential(*make_layers(), input_shape=input_shape)
    loss = LOSSES[loss_name](reduction=reduction)
    rng = np.random.default_rng(3)
    theta = 2.0 * model.init_params(seed=3)
    X = rng.normal(size=(3,) + input_shape)
    y = make_targets(loss, 3, model.n_outputs, rng)
    _check_against_torch(torch, model, loss, theta, X, y)


def test_maxpool_ties_after_relu_match_torch():
    """Exact ties (ReLU zeros and equal positive values) are routed as PyTorch routes them."""
    torch = pytest.importorskip("torch")
    model = ghess.Sequential(ghess.Conv2d(2, 2, 2, padding=1), ghess.ReLU(),
                             ghess.MaxPool2d(2, stride=1), ghess.AvgPool2d(2),
                             ghess.Flatten(), ghess.Linear(8, 3), input_shape=(2, 4, 4))
    rng = np.random.default_rng(5)
    # small integers and halves: every sum is exact in any order, so ties are exact
    theta = rng.integers(-2, 3, size=model.n_params) / 2.0
    bias = model.param_slots["0.bias"]
    theta[bias.start:bias.stop] = [-4.0, 0.5]  # channel 0 mostly clamped to zero windows
    X = rng.integers(-1, 2, size=(3, 2, 4, 4)).astype(float)
    y = rng.integers(0, 3, size=3)
    # the data must contain both kinds of tie, else the test would be vacuous
    a = _layer_inputs(model, theta, X, 2)
    top = -np.sort(-_pool_windows(model.layers[2], a), axis=-1)
    tied = top[..., 0] == top[..., 1]
    assert np.any(tied & (top[..., 0] == 0.0)) and np.any(tied & (top[..., 0] > 0.0))
    _check_against_torch(torch, model, ghess.CrossEntropyLoss(), theta, X, y)


@pytest.mark.parametrize("s", [[[1.0, 1.0], [1.0, 1.0]], [[0.5, 1.0], [1.0, 0.5]],
                               [[0.5, 0.0], [1.0, 1.0]]],
                         ids=["all-tied", "tie-row-major", "tie-bottom-row"])
def test_maxpool_tie_rule_matches_torch(s):
    """Tied window elements with different dz/dW: the same one is chosen as in PyTorch."""
    torch = pytest.importorskip("torch")
    model, theta = _tie_model(ghess.MaxPool2d(2), (2, 2))
    X = _tie_inputs(s)
    _check_against_torch(torch, model, ghess.MSELoss(), theta, X, np.zeros((1, 1)))
