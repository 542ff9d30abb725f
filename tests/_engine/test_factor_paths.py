"""Stored Jacobian factors taken after the parameter-free layers (``_engine.plan.factor_plan``).

A layer's factor D may be stored at the end of the activation/pooling run that
follows it, where it is smaller; products then push through that run. These
tests pin down where D goes, what it costs, and that every consumer of the
factors (GGN, Jacobian operator, per-sample Jacobians, GGN diagonal) stays exact.
"""

import numpy as np
import pytest
from conftest import RTOL, held_bytes, make_data

import ghess
from ghess import _engine
from ghess._engine.plan import path_steps
from ghess.testing import assert_allclose_rel, reference_ggn, reference_per_sample_jacobians

# name -> (model factory, {parametrised layer: (factor path, D shared by all samples)})
MODELS = {
    # conv -> ReLU -> 2x2 max-pool: D at the pooled output is a quarter of D at s; the
    # last conv's D, at the input of the output layer, is that layer's weight
    "conv-relu-maxpool": (
        lambda: ghess.Sequential(ghess.Conv2d(2, 3, 3, padding=1), ghess.ReLU(),
                                 ghess.MaxPool2d(2), ghess.Conv2d(3, 4, 3, padding=1),
                                 ghess.ReLU(), ghess.MaxPool2d(2), ghess.Flatten(),
                                 ghess.Linear(4, 3), input_shape=(2, 4, 4)),
        {0: ((1, 2), False), 3: ((4, 5, 6), True), 7: ((), False)}),
    # a path that ends at the network output: D is the identity, only f' is kept; the
    # first layer's D is per sample (the Sigmoid after the last layer depends on it)
    "mlp-ending-in-sigmoid": (
        lambda: ghess.Sequential(ghess.Linear(4, 5), ghess.Tanh(), ghess.Linear(5, 3),
                                 ghess.Sigmoid(), input_shape=(4,)),
        {0: ((), False), 2: ((3,), False)}),
    # D at the last layer's input is its weight: only ReLU's f' is kept per sample
    "mlp-relu": (
        lambda: ghess.Sequential(ghess.Linear(4, 6), ghess.ReLU(), ghess.Linear(6, 3),
                                 input_shape=(4,)),
        {0: ((1,), True), 2: ((), False)}),
    # two dense layers in a row, identity layers after: nothing per sample for the first
    "linear-linear-identity": (
        lambda: ghess.Sequential(ghess.Linear(4, 6), ghess.Linear(6, 3), ghess.Identity(),
                                 input_shape=(4,)),
        {0: ((), True), 1: ((), False)}),
    # Tanh then overlapping max-pooling (3x3, stride 2): one path step whose scatter
    # adds; max-pooling then ReLU: two steps (the pair fuses only in that order)
    "conv-tanh-overlapping-pool": (
        lambda: ghess.Sequential(ghess.Conv2d(2, 3, 3, padding=1), ghess.Tanh(),
                                 ghess.MaxPool2d(3, stride=2, padding=1),
                                 ghess.Conv2d(3, 4, 3, padding=1), ghess.MaxPool2d(2),
                                 ghess.ReLU(), ghess.Flatten(), ghess.Linear(4, 3),
                                 input_shape=(2, 4, 4)),
        {0: ((1, 2), False), 3: ((4, 5, 6), True), 7: ((), False)}),
    # one output: the weight (1 x 6) costs no more per sample than f', D stays per sample
    "mlp-one-output": (
        lambda: ghess.Sequential(ghess.Linear(4, 6), ghess.Tanh(), ghess.Linear(6, 1),
                                 input_shape=(4,)),
        {0: ((), False), 2: ((), False)}),
}


def make_case(name, dtype=np.float64, n=7):
    make_model, _ = MODELS[name]
    model = make_model()
    loss = ghess.MSELoss()
    rng = np.random.default_rng(3)
    theta = model.init_params(seed=3, dtype=dtype)
    return model, loss, theta, make_data(loss, n, model, rng, dtype)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_plan_puts_D_where_it_is_smallest(name):
    model, _, _, _ = make_case(name)
    plan = _engine.plan_for(model, 8).factors
    assert {i: (p.layers, p.shared) for i, p in plan.items()} == MODELS[name][1]
    # per-sample Jacobians ask for D at the layer outputs, per sample
    plain = _engine.plan_for(model, 8).dense_factors
    assert all(p.layers == () and not p.shared for p in plain.values())


def test_path_steps_fuse_an_activation_and_the_max_pooling_after_it():
    model, _, _, _ = make_case("conv-tanh-overlapping-pool")
    steps = [(type(step).__name__, indices)
             for step, indices in path_steps(model, (1, 2))]
    assert steps == [("ActivationMaxPool", (1, 2))]
    steps = [(type(step).__name__, indices)
             for step, indices in path_steps(model, (4, 5, 6))]
    assert steps == [("MaxPool2d", (4,)), ("ReLU", (5,)), ("Flatten", (6,))]


def test_pooled_factor_bytes():
    model, _, _, _ = make_case("conv-relu-maxpool")
    K, itemsize, index = 3, 8, 4  # argmax: int32
    plan = _engine.plan_for(model, itemsize).factors
    # layer 0: D at the pooled 3x2x2 output; ReLU and max-pooling are one path step,
    # which keeps the argmax of 3x2x2 and ReLU's f' there
    assert plan[0].bytes == K * 12 * itemsize + 12 * (itemsize + index)
    assert plan[0].bytes < K * 48 * itemsize  # D at the conv output
    # layer 3: D at the flattened 4x1x1 input of the last Linear is its weight: only
    # the argmax of 4x1x1 and f' there are kept per sample
    assert plan[3].bytes == 4 * (itemsize + index)
    assert plan[7].bytes == 0  # the output layer's D is the identity


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_products_through_factor_paths_are_exact(name, dtype):
    model, loss, theta, data = make_case(name, dtype)
    rtol = RTOL[dtype]
    G_ref = reference_ggn(model, loss, theta.astype(np.float64),
                          tuple(a.astype(np.float64) for a in data))
    G = ghess.GGNLinearOperator(model, loss, theta, data, mode="stored", chunk_size=3)
    assert G.mode == "stored"
    V = np.random.default_rng(0).normal(size=(G.shape[1], 2)).astype(dtype)
    assert_allclose_rel(G.matmat(V), G_ref @ V, rtol)
    assert_allclose_rel(ghess.ggn_diagonal(model, loss, theta, data), np.diag(G_ref), rtol)

    J_ref = reference_per_sample_jacobians(model, theta.astype(np.float64),
                                           data[0].astype(np.float64))
    assert_allclose_rel(ghess.per_sample_jacobians(model, theta, data[0]), J_ref, rtol)
    J = ghess.JacobianLinearOperator(model, theta, data[0], mode="stored", chunk_size=3)
    flat = J_ref.reshape(-1, J_ref.shape[2])
    assert_allclose_rel(J @ V[:, 0], flat @ V[:, 0], rtol)
    w = np.random.default_rng(1).normal(size=J.shape[0]).astype(dtype)
    assert_allclose_rel(J.rmatvec(w), flat.T @ w, rtol)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_memory_bytes_counts_the_path(name):
    model, loss, theta, data = make_case(name)
    G = ghess.GGNLinearOperator(model, loss, theta, data, mode="stored", chunk_size=3)
    held = held_bytes(G)
    # MSELoss keeps no loss state: memory_bytes counts K numbers per sample for it
    assert held == G.memory_bytes - data[0].shape[0] * model.n_outputs * 8


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dense_jacobians_from_path_factors(name):
    # per_sample_jacobians asks for D at the layer outputs; factors with paths expand
    # to the same Jacobians (the path is pulled back first)
    model, _, theta, (X, _) = make_case(name)
    lparams = model.layer_params(theta)
    ctxs, _ = model.forward_chunk(lparams, X, 1, 1)
    J = np.zeros((X.shape[0], model.n_outputs, model.n_params))
    for paths in (True, False):
        factors = _engine.jacobian_factors(model, lparams, ctxs, X.shape[0], theta.dtype, 1,
                                           paths=paths)
        J[...] = 0
        _engine.factor_sample_jacobians(model, factors, J, 1)
        assert_allclose_rel(J, reference_per_sample_jacobians(model, theta, X), 1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_shared_factor_is_the_output_layers_weight(dtype):
    # the factor at the last dense layer's input is that layer's weight, a view of the
    # operator's own parameters: no per-sample copy of it is stored
    model, loss, theta, data = make_case("conv-relu-maxpool", dtype)
    G = ghess.GGNLinearOperator(model, loss, theta, data, mode="stored", chunk_size=3)
    weight = model.layer_params(G.params)[7]["weight"]
    for chunk in G._stored:
        factor = chunk.layers[1]
        assert factor.index == 3 and factor.D.shape == (3, 4)
        assert np.shares_memory(factor.D, G.params)
        np.testing.assert_array_equal(factor.D, weight)
