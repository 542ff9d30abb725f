"""Residual blocks: construction, naming, and clear errors before any work."""

import numpy as np
import pytest

import ghess
from ghess.testing import assert_allclose_rel, reference_forward


def test_parameters_are_named_and_ordered_body_then_shortcut():
    block = ghess.Residual(ghess.Linear(3, 3), ghess.Tanh(), ghess.Linear(3, 3, bias=False),
                           shortcut=[ghess.Linear(3, 3)])
    model = ghess.Sequential(ghess.Linear(2, 3), block, ghess.Linear(3, 1), input_shape=(2,))
    assert list(model.param_slots) == [
        "0.weight", "0.bias", "1.body.0.weight", "1.body.0.bias", "1.body.2.weight",
        "1.shortcut.0.weight", "1.shortcut.0.bias", "2.weight", "2.bias"]
    weights = model.parameter_mask("weight")
    assert weights.sum() == 6 + 9 + 9 + 9 + 3  # every kind of weight, inner ones included
    assert repr(block).startswith("Residual(Linear(") and "shortcut=[Linear(" in repr(block)


def test_the_model_owns_copies_of_the_inner_layers():
    inner = ghess.Conv2d(2, 2, 3, padding=1)
    block = ghess.Residual(inner)
    a = ghess.Sequential(block, ghess.Flatten(), input_shape=(2, 4, 4))
    b = ghess.Sequential(block, ghess.Flatten(), input_shape=(2, 6, 6))  # other geometry
    assert a.layers[0].body[0] is not b.layers[0].body[0]
    assert inner not in (a.layers[0].body[0], b.layers[0].body[0])
    theta = a.init_params(seed=0)
    X = np.random.default_rng(0).normal(size=(3, 2, 4, 4))
    # a's block still has a's geometry after b was built from the same block
    assert_allclose_rel(a.forward(theta, X), reference_forward(a, theta, X), 1e-14)
    assert b.n_params == a.n_params


def test_bad_blocks_are_refused_before_any_work():
    with pytest.raises(ValueError, match="at least one layer in its body"):
        ghess.Residual()
    with pytest.raises(TypeError, match="body layer 1 must be a ghess layer, got str"):
        ghess.Residual(ghess.ReLU(), "tanh")
    with pytest.raises(TypeError, match="shortcut must be a layer, a list of layers or None"):
        ghess.Residual(ghess.ReLU(), shortcut="identity")
    with pytest.raises(TypeError, match="shortcut layer 0 must be a ghess layer"):
        ghess.Residual(ghess.ReLU(), shortcut=[np.eye(2)])
    with pytest.raises(ValueError, match=r"Sequential layer 0: Residual: the body's output "
                                         r"shape \(2,\) differs from the shortcut's \(3,\)"):
        ghess.Sequential(ghess.Residual(ghess.Linear(3, 2)), ghess.Linear(2, 1),
                         input_shape=(3,))
    with pytest.raises(ValueError, match=r"Sequential layer 1: Residual body layer 0: "):
        ghess.Sequential(ghess.Linear(3, 4), ghess.Residual(ghess.Linear(3, 4)),
                         input_shape=(3,))
