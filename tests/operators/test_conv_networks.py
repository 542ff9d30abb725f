"""Convolutional networks: every capability of the core, on Conv2d/pooling/Flatten chains."""

import functools

import numpy as np
import pytest
from conftest import CONV_CASES, RTOL, ConvCase, held_bytes
from numpy.testing import assert_array_equal

import ghess
from ghess.testing import (
    assert_allclose_rel,
    finite_difference_hvp,
    reference_ggn,
    reference_hessian,
    reference_loss_and_grad,
    reference_per_sample_jacobians,
)

G = ghess

@pytest.fixture(params=sorted(CONV_CASES), ids=lambda n: f"case={n}")
def ccase(request):
    return ConvCase(request.param)


@pytest.fixture(params=["stored", "recompute"], ids=lambda m: f"mode={m}")
def mode(request):
    return request.param


@functools.lru_cache(maxsize=4)
def _reference_curvature(name):
    """Return the reference GGN and Hessian of ``ConvCase(name)``, damped by 0.1.

    Both modes compare against the same matrices: computed once, since the NumPy
    reference's Hessian of the larger cases (resnet-ce) takes tens of seconds.
    """
    c = ConvCase(name)
    return {G.GGNLinearOperator: reference_ggn(c.model, c.loss, c.theta, c.data, damping=0.1),
            G.HessianLinearOperator: reference_hessian(c.model, c.loss, c.theta, c.data,
                                                       damping=0.1)}


def test_curvature_matches_reference(ccase, mode):
    for cls, expected in _reference_curvature(ccase.name).items():
        op = cls(ccase.model, ccase.loss, ccase.theta, ccase.data, mode=mode, chunk_size=2,
                 damping=0.1)
        assert_allclose_rel(op.todense(), expected, RTOL[np.float64])


def test_jacobians_and_gradient_match_reference(ccase, mode):
    expected = reference_per_sample_jacobians(ccase.model, ccase.theta, ccase.X)
    J = G.JacobianLinearOperator(ccase.model, ccase.theta, ccase.X, mode=mode, chunk_size=2)
    n = ccase.model.n_params
    assert_allclose_rel(J @ np.eye(n), expected.reshape(-1, n), RTOL[np.float64])
    assert_allclose_rel(J.T @ np.eye(J.shape[0]), expected.reshape(-1, n).T, RTOL[np.float64])
    assert_allclose_rel(G.per_sample_jacobians(ccase.model, ccase.theta, ccase.X, chunk_size=2),
                        expected, RTOL[np.float64])
    value, grad = G.loss_and_grad(ccase.model, ccase.loss, ccase.theta, ccase.data, chunk_size=2)
    ref_value, ref_grad = reference_loss_and_grad(ccase.model, ccase.loss, ccase.theta,
                                                  ccase.data)
    assert_allclose_rel(grad, ref_grad, RTOL[np.float64])
    assert abs(value - ref_value) <= 1e-13 * abs(ref_value)


def test_float32_close_to_float64(mode):
    c64 = ConvCase("conv-odd-shapes-mse")
    c32 = ConvCase("conv-odd-shapes-mse", dtype=np.float32)
    v = np.random.default_rng(1).normal(size=c64.model.n_params)
    for cls in (G.GGNLinearOperator, G.HessianLinearOperator):
        out32 = cls(c32.model, c32.loss, c32.theta, c32.data, mode=mode) @ v.astype(np.float32)
        out64 = cls(c64.model, c64.loss, c64.theta, c64.data, mode=mode) @ v
        assert out32.dtype == np.float32
        assert_allclose_rel(out32, out64, RTOL[np.float32])


def test_batch_of_one_and_batches_equal_concatenation(mode):
    c = ConvCase("conv-relu-maxpool-ce", n_samples=7)
    one = G.HessianLinearOperator(c.model, c.loss, c.theta, (c.X[:1], c.y[:1]), mode=mode)
    assert_allclose_rel(one.todense(), reference_hessian(c.model, c.loss, c.theta,
                                                         (c.X[:1], c.y[:1])), 1e-12)
    batches = [(c.X[:1], c.y[:1]), (c.X[1:4], c.y[1:4]), (c.X[4:], c.y[4:])]
    for cls in (G.GGNLinearOperator, G.HessianLinearOperator):
        whole = cls(c.model, c.loss, c.theta, c.data, mode=mode).todense()
        split = cls(c.model, c.loss, c.theta, batches, mode=mode).todense()
        assert_allclose_rel(split, whole, 1e-13)


def test_one_and_two_threads_agree_and_repeat_bit_for_bit(mode):
    c = ConvCase("conv-relu-maxpool-ce", n_samples=40)
    V = np.random.default_rng(2).normal(size=(c.model.n_params, 3))
    for cls in (G.GGNLinearOperator, G.HessianLinearOperator):
        one = cls(c.model, c.loss, c.theta, c.data, mode=mode, n_threads=1)
        two = cls(c.model, c.loss, c.theta, c.data, mode=mode, n_threads=2)
        assert_allclose_rel(one @ V, two @ V, 1e-13)
        assert_array_equal(two @ V, two @ V)


def test_maxpool_ties_go_to_the_first_maximum():
    """After ReLU, windows of zeros are common: the derivative goes to the top-left element."""
    model = G.Sequential(G.Conv2d(1, 1, 1, bias=False), G.ReLU(), G.MaxPool2d(2), G.Flatten(),
                         input_shape=(1, 2, 2))
    X = np.array([[[[-1.0, -2.0], [-3.0, -4.0]]], [[[5.0, 5.0], [5.0, 1.0]]]])
    theta = np.array([1.0])
    J = G.per_sample_jacobians(model, theta, X)
    assert_array_equal(J[:, 0, 0], [0.0, 5.0])  # zeros window: ReLU'(x<0) = 0; tie: first 5
    J_ref = reference_per_sample_jacobians(model, theta, X)
    assert_array_equal(J, J_ref)
    # which element receives the derivative shows in the input gradient of a conv below it
    deep = G.Sequential(G.Conv2d(1, 1, 1), G.MaxPool2d(2), G.Flatten(), input_shape=(1, 2, 2))
    th = np.array([1.0, 0.0])
    Jd = G.JacobianLinearOperator(deep, th, X[1:])
    assert_allclose_rel(Jd @ np.array([1.0, 0.0]), np.array([5.0]), 0)


def test_hessian_vector_product_matches_finite_differences(ccase):
    H = G.HessianLinearOperator(ccase.model, ccase.loss, ccase.theta, ccase.data)
    v = np.random.default_rng(5).normal(size=H.shape[1])

    def grad(theta):
        return G.loss_and_grad(ccase.model, ccase.loss, theta, ccase.data)[1]

    assert_allclose_rel(H @ v, finite_difference_hvp(grad, ccase.theta, v, eps=1e-4), 1e-6)


def test_hessian_trace_fuses_only_curvature_free_activation_pooling():
    """ReLU + max-pooling is one Hessian step with f' at the argmax; tanh + max-pooling not.

    Tanh's R-backward needs f'' and dL/df on the whole pooling input. The trace
    keeps dL/d(output) only where a step's R-backward reads it.
    """
    from ghess import _engine
    from ghess._engine.plan import path_steps

    c = ConvCase("conv-tanh-maxpool-relu-maxpool-ce", n_samples=6)
    kinds = [type(layer).__name__ for layer in c.model.layers]
    assert kinds == ["Conv2d", "Tanh", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten",
                     "Linear"]
    steps = [(type(step).__name__, indices)
             for step, indices in _engine.plan_for(c.model, 8).hessian_steps]
    assert steps == [("Conv2d", (0,)), ("Tanh", (1,)), ("MaxPool2d", (2,)), ("Conv2d", (3,)),
                     ("ActivationMaxPool", (4, 5)), ("Flatten", (6,)), ("Linear", (7,))]
    # first-order factor paths fuse both pairs
    path = path_steps(c.model, (1, 2))
    assert [type(step).__name__ for step, _ in path] == ["ActivationMaxPool"]

    H = G.HessianLinearOperator(c.model, c.loss, c.theta, c.data, mode="stored")
    (trace,) = H._stored
    assert [set(ctx) for ctx in trace.ctxs] == [
        {"x"}, {"d1", "d2"}, {"argmax"}, {"x"}, {"argmax", "gain"}, set(), set(), {"x"}]
    assert [g is not None for g in trace.grads] == [True, True, False, True, False, False,
                                                     False, True]
    # f' at the argmax: what the unfused ReLU and pool would have applied
    ctxs, _ = c.model.forward_chunk(c.model.layer_params(c.theta), c.X, 2, 1)
    argmax = ctxs[5]["argmax"]
    np.testing.assert_array_equal(trace.ctxs[4]["argmax"], argmax)
    np.testing.assert_array_equal(trace.ctxs[4]["gain"],
                                  np.take_along_axis(ctxs[4]["d1"], argmax, axis=1))


@pytest.mark.parametrize("case_name", sorted(CONV_CASES), ids=lambda n: f"case={n}")
def test_memory_bytes_is_what_is_held(case_name):
    c = ConvCase(case_name, n_samples=12)
    G_op = G.GGNLinearOperator(c.model, c.loss, c.theta, c.data, mode="stored", chunk_size=5)
    # MSELoss keeps no loss state: memory_bytes counts K numbers per sample for it
    slack = c.X.shape[0] * c.model.n_outputs * 8 if isinstance(c.loss, G.MSELoss) else 0
    assert held_bytes(G_op) == G_op.memory_bytes - slack
    H = G.HessianLinearOperator(c.model, c.loss, c.theta, c.data, mode="stored", chunk_size=5)
    assert held_bytes(H) == H.memory_bytes - slack


# -- the networks that must run -----------------------------------------------

def activation_pattern(model, theta, X):
    """ReLU signs and max-pool argmaxes: where the network is not smooth."""
    ctxs, _ = model.forward_chunk(model.layer_params(theta), X, 1, 1)
    return [ctx["d1"].copy() if isinstance(layer, (G.ReLU, G.LeakyReLU)) else ctx["argmax"]
            for layer, ctx in zip(model.layers, ctxs)
            if isinstance(layer, (G.ReLU, G.LeakyReLU, G.MaxPool2d))]


def smooth_step(model, theta, X, v, eps=1e-3):
    """Find the largest eps = 1e-3 / 4^j for which theta +- 2 eps v keep the pattern.

    Finite differences across a ReLU kink or an argmax switch are invalid: the
    gradient jumps there. Along a segment with one pattern the loss is smooth.
    """
    base = activation_pattern(model, theta, X)
    while eps > 1e-10:
        if all(all(np.array_equal(a, b) for a, b in
                   zip(base, activation_pattern(model, theta + s * eps * v, X)))
               for s in (-2, -1, 1, 2)):
            return eps
        eps /= 4
    pytest.skip("no smooth segment found along v")

def wang_tan_lin_3layer():
    """Build Wang, Tan and Lin's CNN: 3 x (conv, ReLU, 2x2 max-pool) on 3x32x32, dense 10."""
    return G.Sequential(
        G.Conv2d(3, 32, 5, padding=2), G.ReLU(), G.MaxPool2d(2),
        G.Conv2d(32, 64, 3, padding=1), G.ReLU(), G.MaxPool2d(2),
        G.Conv2d(64, 64, 3, padding=1), G.ReLU(), G.MaxPool2d(2),
        G.Flatten(), G.Linear(64 * 4 * 4, 10), input_shape=(3, 32, 32))


def wang_tan_lin_7layer():
    """Build a deeper variant of the same style: 6 conv layers and a dense layer."""
    return G.Sequential(
        G.Conv2d(3, 32, 3, padding=1), G.ReLU(), G.Conv2d(32, 32, 3, padding=1), G.ReLU(),
        G.MaxPool2d(2),
        G.Conv2d(32, 64, 3, padding=1), G.ReLU(), G.Conv2d(64, 64, 3, padding=1), G.ReLU(),
        G.MaxPool2d(2),
        G.Conv2d(64, 64, 3, padding=1), G.ReLU(), G.Conv2d(64, 64, 3, padding=1), G.ReLU(),
        G.MaxPool2d(2),
        G.Flatten(), G.Linear(64 * 4 * 4, 10), input_shape=(3, 32, 32))


def lenet_like():
    """Build a LeNet-like net on 1x28x28 with a strided convolution and average pooling."""
    return G.Sequential(
        G.Conv2d(1, 6, 5, padding=2), G.Tanh(), G.AvgPool2d(2),
        G.Conv2d(6, 16, 5, stride=2, padding=2), G.Tanh(), G.AvgPool2d(2, padding=1),
        G.Flatten(), G.Linear(16 * 4 * 4, 120), G.Tanh(), G.Linear(120, 84), G.Tanh(),
        G.Linear(84, 10), input_shape=(1, 28, 28))


NETWORKS = {"wang-tan-lin-3": (wang_tan_lin_3layer, 3 * 32 * 25 + 32 + 32 * 64 * 9 + 64
                               + 64 * 64 * 9 + 64 + 1024 * 10 + 10),
            "wang-tan-lin-7": (wang_tan_lin_7layer, None),
            "lenet-like": (lenet_like, 6 * 25 + 6 + 16 * 6 * 25 + 16 + 256 * 120 + 120
                           + 120 * 84 + 84 + 84 * 10 + 10)}


@pytest.mark.parametrize("name", sorted(NETWORKS), ids=lambda n: f"net={n}")
def test_required_networks_run_and_are_exact(name):
    """Products on the required networks agree with finite differences and with J^T B J."""
    make, n_params = NETWORKS[name]
    model = make()
    if n_params is not None:
        assert model.n_params == n_params
    rng = np.random.default_rng(0)
    theta = model.init_params(seed=0)
    X = rng.normal(size=(3,) + model.input_shape)
    y = rng.integers(0, 10, size=3)
    loss = G.CrossEntropyLoss()
    H = G.HessianLinearOperator(model, loss, theta, (X, y))
    Gop = G.GGNLinearOperator(model, loss, theta, (X, y))
    Gr = G.GGNLinearOperator(model, loss, theta, (X, y), mode="recompute", chunk_size=2)
    J = G.JacobianLinearOperator(model, theta, X)
    v = rng.normal(size=model.n_params)
    v /= np.linalg.norm(v)

    def grad(t):
        return G.loss_and_grad(model, loss, t, (X, y))[1]

    eps = smooth_step(model, theta, X, v)
    assert_allclose_rel(H @ v, finite_difference_hvp(grad, theta, v, eps=eps, order=4), 1e-6)
    # G v = J^T B J v with B from the softmax, through the Jacobian operator
    z = model.forward(theta, X)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    Jv = (J @ v).reshape(3, 10)
    BJv = (p * Jv - p * (p * Jv).sum(axis=1, keepdims=True)) / 3
    assert_allclose_rel(Gop @ v, J.T @ BJv.ravel(), 1e-12)
    assert_allclose_rel(Gr @ v, Gop @ v, 1e-12)
    # and in float32
    G32 = G.GGNLinearOperator(model, loss, theta.astype(np.float32), (X.astype(np.float32), y))
    assert_allclose_rel(G32 @ v.astype(np.float32), Gop @ v, 1e-4)


@pytest.mark.parametrize("build, message", [
    (lambda: G.Sequential(G.Conv2d(3, 4, 3), G.Linear(4 * 6 * 6, 2), input_shape=(3, 8, 8)),
     r"layer 1: Linear.*per-sample shape \(4, 6, 6\): add a Flatten\(\) before it"),
    (lambda: G.Sequential(G.Conv2d(3, 4, 9), input_shape=(3, 8, 8)),
     r"layer 0: Conv2d.*window spans 9x9 but the padded input is only 8x8"),
    (lambda: G.Sequential(G.Conv2d(2, 4, 3), input_shape=(3, 8, 8)),
     r"layer 0: Conv2d.*expects 2 input channels, but its input has 3"),
    (lambda: G.Sequential(G.Conv2d(3, 4, 3), G.ReLU(), G.Conv2d(5, 2, 3),
                          input_shape=(3, 8, 8)),
     r"layer 2: Conv2d.*expects 5 input channels, but its input has 4"),
    (lambda: G.Sequential(G.Conv2d(3, 4, 3), input_shape=(8, 8)),
     r"layer 0: Conv2d.*expects inputs of shape \(channels, height, width\)"),
    (lambda: G.Sequential(G.Conv2d(3, 4, 3), G.MaxPool2d(7), input_shape=(3, 8, 8)),
     r"layer 1: MaxPool2d.*window spans 7x7 but the padded input is only 6x6"),
    (lambda: G.Conv2d(3, 4, 0), r"kernel_size must be >= 1, got 0"),
    (lambda: G.Conv2d(3, 4, 3, stride=(1, 0)), r"stride must be >= 1"),
    (lambda: G.Conv2d(3, 4, 3, padding=-1), r"padding must be >= 0"),
    (lambda: G.Conv2d(0, 4, 3), r"in_channels must be positive"),
    (lambda: G.Conv2d(3, 4, (3, 3, 3)), r"kernel_size must be an int or a pair"),
    (lambda: G.MaxPool2d(2, padding=2), r"padding must be at most half the kernel size"),
    (lambda: G.AvgPool2d(0), r"kernel_size must be >= 1"),
], ids=["flatten-missing", "kernel-too-large", "channels-input", "channels-chain",
        "input-not-spatial", "pool-too-large", "kernel-zero", "stride-zero", "padding-negative",
        "channels-zero", "kernel-triple", "pool-padding", "avgpool-kernel-zero"])
def test_construction_errors_name_the_layer(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_conv_inputs_checked_at_call_time():
    c = ConvCase("conv-relu-maxpool-ce")
    with pytest.raises(ValueError, match=r"X must have shape \(n_samples, 2, 6, 6\), "
                                         r"got \(5, 6, 6, 2\)"):
        G.GGNLinearOperator(c.model, c.loss, c.theta, (c.X.transpose(0, 2, 3, 1), c.y))
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
        G.Conv2d(1, 1, 3, stride=1.5)


def test_named_blocks_on_a_conv_net():
    c = ConvCase("conv-relu-maxpool-ce")
    H = G.HessianLinearOperator(c.model, c.loss, c.theta, c.data)
    dense = H.todense()
    a, b = c.model.param_slots["0.weight"], c.model.param_slots["4.weight"]
    assert_allclose_rel(H.block("0.weight", "4.weight"), dense[a.start:a.stop, b.start:b.stop],
                        1e-14)
    assert H.block("0.bias", "0.weight").shape == (3, 2 * 3 * 3 * 3)
