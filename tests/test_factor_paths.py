"""Stored Jacobian factors taken after the parameter-free layers (``_engine.factor_plan``).

A layer's factor D may be stored at the end of the activation/pooling run that
follows it, where it is smaller; products then push through that run. These
tests pin down where D goes, what it costs, and that every consumer of the
factors (GGN, Jacobian operator, per-sample Jacobians, GGN diagonal) stays exact.
"""

import numpy as np
import pytest
from conftest import RTOL, make_data

import ghess
from ghess import _engine
from ghess.testing import assert_allclose_rel, reference_ggn, reference_per_sample_jacobians

MODELS = {
    # conv -> ReLU -> 2x2 max-pool: D at the pooled output is a quarter of D at s
    "conv-relu-maxpool": (
        lambda: ghess.Sequential(ghess.Conv2d(2, 3, 3, padding=1), ghess.ReLU(),
                                 ghess.MaxPool2d(2), ghess.Conv2d(3, 4, 3, padding=1),
                                 ghess.ReLU(), ghess.MaxPool2d(2), ghess.Flatten(),
                                 ghess.Linear(4, 3), input_shape=(2, 4, 4)),
        {0: (1, 2), 3: (4, 5, 6), 7: ()}),
    # a path that ends at the network output: D is the identity, only f' is kept
    "mlp-ending-in-sigmoid": (
        lambda: ghess.Sequential(ghess.Linear(4, 5), ghess.Tanh(), ghess.Linear(5, 3),
                                 ghess.Sigmoid(), input_shape=(4,)),
        {0: (), 2: (3,)}),
    # same width before and after ReLU: D stays at the layer output
    "mlp-relu": (
        lambda: ghess.Sequential(ghess.Linear(4, 6), ghess.ReLU(), ghess.Linear(6, 3),
                                 input_shape=(4,)),
        {0: (), 2: ()}),
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
    plan = _engine.factor_plan(model, 8)
    assert {i: path for i, (path, _) in plan.items()} == MODELS[name][1]


def test_pooled_factor_bytes():
    model, _, _, _ = make_case("conv-relu-maxpool")
    K, itemsize, intp = 3, 8, np.dtype(np.intp).itemsize
    plan = _engine.factor_plan(model, itemsize)
    # layer 0: D at the pooled 3x2x2 output, ReLU's f' on 3x4x4, the argmax of 3x2x2
    assert plan[0][1] == K * 12 * itemsize + 48 * itemsize + 12 * intp
    assert plan[0][1] < K * 48 * itemsize  # D at the conv output
    # layer 3: D at the flattened 4x1x1 input of the last Linear
    assert plan[3][1] == K * 4 * itemsize + 16 * itemsize + 4 * intp
    assert plan[7][1] == 0  # the output layer's D is the identity


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
def test_memory_required_counts_the_path(name):
    model, loss, theta, data = make_case(name)
    G = ghess.GGNLinearOperator(model, loss, theta, data, mode="stored", chunk_size=3)
    held = sum(f.nbytes() for f in G._stored)
    # MSELoss keeps no loss state: memory_required counts K numbers per sample for it
    assert held == G.memory_bytes - data[0].shape[0] * model.n_outputs * 8


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dense_jacobians_from_path_factors(name):
    # per_sample_jacobians asks for D at the layer outputs; factors with paths expand
    # to the same Jacobians (the path is pulled back first)
    model, _, theta, (X, _) = make_case(name)
    lparams = model.layer_params(theta)
    ctxs, _ = _engine.forward_chunk(model, lparams, X, 1, 1)
    J = np.zeros((X.shape[0], model.n_outputs, model.n_params))
    for paths in (True, False):
        factors = _engine.jacobian_factors(model, lparams, ctxs, X.shape[0], theta.dtype, 1,
                                           paths=paths)
        J[...] = 0
        _engine.factor_sample_jacobians(model, factors, J, 1)
        assert_allclose_rel(J, reference_per_sample_jacobians(model, theta, X), 1e-12)
