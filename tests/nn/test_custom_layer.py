"""A layer defined outside the package, by docs/design.md's checklist, works everywhere.

``conftest.Hardtanh`` subclasses ``ghess.nn.Activation`` and implements only
``evaluate``; the cases ``hardtanh-ce`` (conftest.CASES) and
``conv-hardtanh-maxpool-mse`` (operators/test_conv_networks.py) run it through every
exactness test of the built-in layers. The tests here cover what those do not:
the contract itself, the analysis helpers, blocks by name, the fused
activation + max-pooling step, and PyTorch.
"""

import numpy as np
import pytest
from conftest import RTOL, Case, Hardtanh, make_data

import ghess
from ghess import _engine
from ghess.testing import (
    assert_allclose_rel,
    reference_forward,
    reference_ggn,
    reference_hessian,
)


def conv_case(dtype=np.float64, n_samples=6):
    model = ghess.Sequential(ghess.Conv2d(2, 3, 3, padding=1), Hardtanh(), ghess.MaxPool2d(2),
                             ghess.Flatten(), ghess.Linear(27, 3), input_shape=(2, 6, 6))
    loss = ghess.CrossEntropyLoss()
    theta = model.init_params(seed=2, dtype=dtype) * dtype(2.0)
    X, y = make_data(loss, n_samples, model, np.random.default_rng(2), dtype)
    return model, loss, theta, (X, y)


def test_layer_contract_is_declared():
    """A layer missing a rule of the contract cannot be instantiated."""

    class NoRules(ghess.nn.Layer):
        def output_shape(self, input_shape):
            return input_shape

    with pytest.raises(TypeError, match="abstract"):
        NoRules()

    class NoParameterRules(ghess.nn.ParametricLayer):
        def output_shape(self, input_shape):
            return input_shape

        forward = jvp = vjp = rvjp = ghess.Flatten.forward

    with pytest.raises(TypeError, match="abstract"):
        NoParameterRules()
    assert Hardtanh().is_elementwise and not Hardtanh().has_curvature


def test_hardtanh_forward_matches_definition():
    model = ghess.Sequential(Hardtanh(-0.5, 2.0), ghess.Linear(4, 2), input_shape=(4,))
    X = np.array([[-3.0, -0.5, 1.0, 2.5], [0.0, 2.0, -0.25, 7.0]])
    theta = model.init_params(seed=0)
    clipped = np.clip(X, -0.5, 2.0)
    W, b = model.unflatten(theta)["1.weight"], model.unflatten(theta)["1.bias"]
    np.testing.assert_allclose(model.forward(theta, X), clipped @ W.T + b, rtol=1e-15)
    np.testing.assert_allclose(reference_forward(model, theta, X), clipped @ W.T + b,
                               rtol=1e-15)


@pytest.mark.parametrize("mode", ["stored", "recompute"])
def test_conv_hardtanh_maxpool_in_every_operator(mode):
    model, loss, theta, data = conv_case()
    G = ghess.GGNLinearOperator(model, loss, theta, data, mode=mode, chunk_size=4)
    H = ghess.HessianLinearOperator(model, loss, theta, data, mode=mode, chunk_size=4)
    G_ref = reference_ggn(model, loss, theta, data)
    H_ref = reference_hessian(model, loss, theta, data)
    assert_allclose_rel(G.todense(), G_ref, RTOL[np.float64])
    assert_allclose_rel(H.todense(), H_ref, RTOL[np.float64])
    slot_a, slot_b = model.param_slots["0.weight"], model.param_slots["4.weight"]
    assert_allclose_rel(H.block("0.weight", "4.weight"),
                        H_ref[slot_a.start:slot_a.stop, slot_b.start:slot_b.stop],
                        RTOL[np.float64])
    assert_allclose_rel(ghess.ggn_diagonal(model, loss, theta, data, chunk_size=4),
                        np.diag(G_ref), RTOL[np.float64])


def test_hardtanh_then_max_pooling_is_one_fused_step():
    """The planner fuses it with the pooling after it, as the built-in activations."""
    model, loss, theta, data = conv_case()
    plan = _engine.plan_for(model, 8)
    steps = [(type(step).__name__, indices) for step, indices in plan.hessian_steps]
    assert ("ActivationMaxPool", (1, 2)) in steps
    assert plan.factors[0].layers == (1, 2, 3)


@pytest.mark.parametrize("operator", [ghess.GGNLinearOperator, ghess.HessianLinearOperator])
@pytest.mark.parametrize("mode", ["stored", "recompute"])
def test_hardtanh_float32_close_to_float64_and_threads_agree(operator, mode):
    v = np.random.default_rng(1).normal(size=Case("hardtanh-ce").model.n_params)
    c64, c32 = Case("hardtanh-ce"), Case("hardtanh-ce", dtype=np.float32)
    out64 = operator(c64.model, c64.loss, c64.theta, c64.data, mode=mode) @ v
    out32 = operator(c32.model, c32.loss, c32.theta, c32.data, mode=mode) @ v.astype(np.float32)
    assert out32.dtype == np.float32
    assert_allclose_rel(out32, out64, RTOL[np.float32])
    model, loss, theta, data = conv_case()
    w = np.random.default_rng(2).normal(size=model.n_params)
    one, two = (operator(model, loss, theta, data, mode=mode, n_threads=t) @ w for t in (1, 2))
    assert_allclose_rel(two, one, 1e-13)


def test_dense_hardtanh_analysis_helpers():
    c = Case("hardtanh-ce", n_samples=12)
    G_ref = reference_ggn(c.model, c.loss, c.theta, c.data)
    assert_allclose_rel(ghess.ggn_diagonal(c.model, c.loss, c.theta, c.data), np.diag(G_ref),
                        RTOL[np.float64])
    G = ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data)
    top = ghess.top_eigenvalues(G, 2)
    assert_allclose_rel(np.sort(top), np.linalg.eigvalsh(G_ref)[-2:], 1e-8)


def test_hardtanh_matches_pytorch():
    torch = pytest.importorskip("torch")
    from ghess.testing import torch_sequential

    model, loss, theta, (X, y) = conv_case()
    seq = torch_sequential(model, params=theta)
    assert isinstance(seq[1], torch.nn.Hardtanh)
    value, grad = ghess.loss_and_grad(model, loss, theta, (X, y))
    out = torch.nn.functional.cross_entropy(seq(torch.as_tensor(X)), torch.as_tensor(y))
    out.backward()
    torch_grad = torch.cat([p.grad.reshape(-1) for p in seq.parameters()]).numpy()
    assert abs(value - out.item()) <= 1e-13 * abs(value)
    assert_allclose_rel(grad, torch_grad, RTOL[np.float64])
