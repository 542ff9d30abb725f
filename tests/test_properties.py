"""Property-based: random dense and conv networks agree with the pure-NumPy reference.

Hypothesis draws the architecture (widths, activations, kernel geometry, pooling,
bias), the loss and its reduction, the data and the direction; every operator and
the gradient must match ``ghess.testing`` to float64 rounding. Derandomized, so CI
runs the same examples every time.
"""

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ghess  # noqa: E402
from ghess.testing import (  # noqa: E402
    assert_allclose_rel,
    reference_ggn_matvec,
    reference_hessian_matvec,
    reference_loss_and_grad,
    reference_per_sample_jacobians,
)

ACTIVATIONS = [ghess.ReLU, ghess.Tanh, ghess.Sigmoid, ghess.Softplus, ghess.Identity,
               lambda: ghess.LeakyReLU(0.1), ghess.GELU, lambda: ghess.GELU("tanh"),
               ghess.SiLU, lambda: ghess.ELU(0.8), lambda: ghess.Dropout(0.3)]
LOSSES = [ghess.MSELoss, ghess.CrossEntropyLoss, ghess.BCEWithLogitsLoss]
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None)


@st.composite
def dense_networks(draw):
    d = draw(st.integers(1, 5))
    layers, width = [], d
    for _ in range(draw(st.integers(0, 2))):
        out = draw(st.integers(1, 6))
        layers.append(ghess.Linear(width, out, bias=draw(st.booleans())))
        if draw(st.booleans()):  # batch norm with drawn running statistics
            layers.append(ghess.BatchNorm1d(
                out, eps=draw(st.sampled_from([1e-5, 1e-2])), affine=draw(st.booleans()),
                running_mean=draw(st.lists(st.floats(-1, 1), min_size=out, max_size=out)),
                running_var=draw(st.lists(st.floats(0.25, 4), min_size=out, max_size=out))))
        layers.append(draw(st.sampled_from(ACTIVATIONS))())
        width = out
        if draw(st.booleans()):  # a residual block: identity or dense shortcut
            body = [ghess.Linear(width, width), draw(st.sampled_from(ACTIVATIONS))()]
            if draw(st.booleans()):
                body.append(ghess.Linear(width, width, bias=draw(st.booleans())))
            shortcut = draw(st.sampled_from([None, "linear"]))
            layers.append(ghess.Residual(*body, shortcut=None if shortcut is None else
                                         [ghess.Linear(width, width, bias=False)]))
    layers.append(ghess.Linear(width, draw(st.integers(2, 4)), bias=draw(st.booleans())))
    return ghess.Sequential(*layers, input_shape=(d,))


@st.composite
def conv_networks(draw):
    channels, size = draw(st.integers(1, 3)), draw(st.integers(4, 7))
    kernel = draw(st.integers(1, 3))
    padding = draw(st.integers(0, kernel // 2 + 1))
    stride = draw(st.integers(1, 2))
    out_channels = draw(st.integers(1, 3))
    layers = [ghess.Conv2d(channels, out_channels, kernel, stride=stride, padding=padding,
                           bias=draw(st.booleans()))]
    if draw(st.booleans()):
        layers.append(ghess.BatchNorm2d(
            out_channels,
            running_mean=draw(st.lists(st.floats(-1, 1), min_size=out_channels,
                                       max_size=out_channels)),
            running_var=draw(st.lists(st.floats(0.25, 4), min_size=out_channels,
                                      max_size=out_channels))))
    layers.append(draw(st.sampled_from(ACTIVATIONS))())
    if draw(st.booleans()):  # a residual block: conv (+ batch norm) + activation
        body = [ghess.Conv2d(out_channels, out_channels, 3, padding=1, bias=draw(st.booleans()))]
        if draw(st.booleans()):
            body.append(ghess.BatchNorm2d(out_channels, affine=draw(st.booleans()),
                                          running_var=np.full(out_channels, 1.5)))
        body.append(draw(st.sampled_from(ACTIVATIONS))())
        layers.append(ghess.Residual(*body, shortcut=draw(st.sampled_from(
            [None, [ghess.Conv2d(out_channels, out_channels, 1, bias=False)]]))))
    pool = draw(st.sampled_from([None, ghess.MaxPool2d, ghess.AvgPool2d, "adaptive"]))
    if pool == "adaptive":
        layers.append(ghess.AdaptiveAvgPool2d(1))
    elif pool is not None:
        layers.append(pool(2, stride=1))
    layers.append(ghess.Flatten())
    try:
        probe = ghess.Sequential(*layers, input_shape=(channels, size, size))
    except ValueError:  # a 2x2 pooling window on a 1x1 map: not a network
        assume(False)
    layers.append(ghess.Linear(probe.n_outputs, draw(st.integers(2, 3))))
    return ghess.Sequential(*layers, input_shape=(channels, size, size))


@st.composite
def problems(draw, networks):
    model = draw(networks)
    loss = draw(st.sampled_from(LOSSES))(reduction=draw(st.sampled_from(["mean", "sum"])))
    seed = draw(st.integers(0, 2**16))
    n = draw(st.integers(1, 6))
    rng = np.random.default_rng(seed)
    theta = model.init_params(seed=seed) * 1.5
    X = rng.normal(size=(n,) + model.input_shape)
    K = model.n_outputs
    if isinstance(loss, ghess.CrossEntropyLoss):
        y = rng.integers(0, K, size=n)
    elif isinstance(loss, ghess.BCEWithLogitsLoss):
        y = rng.uniform(size=(n, K))
    else:
        y = rng.normal(size=(n, K))
    return model, loss, theta, (X, y), rng.normal(size=model.n_params)


def check_against_reference(model, loss, theta, data, v):
    value, grad = ghess.loss_and_grad(model, loss, theta, data)
    ref_value, ref_grad = reference_loss_and_grad(model, loss, theta, data)
    assert abs(value - ref_value) <= 1e-12 * max(abs(ref_value), 1e-300)
    assert_allclose_rel(grad, ref_grad, 1e-11)
    for mode in ("stored", "recompute"):
        G = ghess.GGNLinearOperator(model, loss, theta, data, mode=mode, chunk_size=4)
        H = ghess.HessianLinearOperator(model, loss, theta, data, mode=mode, chunk_size=4)
        assert_allclose_rel(G @ v, reference_ggn_matvec(model, loss, theta, data, v), 1e-11)
        assert_allclose_rel(H @ v, reference_hessian_matvec(model, loss, theta, data, v), 1e-11)
    J = ghess.per_sample_jacobians(model, theta, data[0])
    assert_allclose_rel(J, reference_per_sample_jacobians(model, theta, data[0]), 1e-11)


@SETTINGS
@given(problems(dense_networks()))
def test_random_dense_networks_match_the_reference(problem):
    check_against_reference(*problem)


@SETTINGS
@given(problems(conv_networks()))
def test_random_conv_networks_match_the_reference(problem):
    check_against_reference(*problem)
