"""InverseLinearOperator: products that are solves, by CG, LSMR and a Neumann series."""

import numpy as np
import pytest
from conftest import Case
from scipy.sparse.linalg import aslinearoperator

import ghess
from ghess.testing import assert_allclose_rel


def _damped_ggn(damping=0.1):
    c = Case("tanh-ce", n_samples=30)
    return c, ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data, damping=damping)


@pytest.mark.parametrize("method", ["cg", "lsmr"])
def test_products_are_solves(method):
    c, G = _damped_ggn(1e-3)
    V = np.random.default_rng(0).normal(size=(G.shape[0], 3))
    inverse = ghess.InverseLinearOperator(G, method, rtol=1e-12, maxiter=10000)
    X = inverse @ V
    # LSMR stops on its normal-equation residual: a few digits short of CG's
    assert_allclose_rel(G @ X, V, 1e-9 if method == "cg" else 1e-7)
    assert_allclose_rel(X, np.linalg.solve(G.todense(), V), 1e-6)
    assert len(inverse.info) == 3 and all(i > 0 for i in inverse.info)
    assert_allclose_rel(inverse.T @ V, X, 1e-14)


def test_neumann_series_converges_for_a_well_conditioned_operator():
    c, G = _damped_ggn(1.0)
    v = np.random.default_rng(1).normal(size=G.shape[0])
    x = ghess.InverseLinearOperator(G, "neumann", terms=200) @ v
    assert_allclose_rel(x, np.linalg.solve(G.todense(), v), 1e-8)


def test_kfac_preconditioned_cg_takes_fewer_iterations():
    """Softmax regression on features of scales 1e-2 to 1e2: the GGN is ill-conditioned
    through the inputs' covariance, which KFAC's A factor captures."""  # noqa: D205, D209
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 8)) * np.logspace(-2, 2, 8)
    y = rng.integers(0, 3, size=400)
    model = ghess.Sequential(ghess.Linear(8, 3), input_shape=(8,))
    loss, theta = ghess.CrossEntropyLoss(), model.init_params(seed=0)
    G = ghess.GGNLinearOperator(model, loss, theta, (X, y), damping=1e-6)
    K = ghess.KFACLinearOperator(model, loss, theta, (X, y))
    v = rng.normal(size=G.shape[0])
    plain = ghess.InverseLinearOperator(G, rtol=1e-8, maxiter=5000)
    pre = ghess.InverseLinearOperator(G, rtol=1e-8, maxiter=5000,
                                      preconditioner=K.inverse(1e-6))
    assert_allclose_rel(pre @ v, plain @ v, 1e-5)
    assert pre.info[0] < plain.info[0] / 3


def test_stopping_short_warns_and_bad_arguments_are_refused():
    c, G = _damped_ggn(1e-6)
    with pytest.warns(RuntimeWarning, match="stopped short"):
        ghess.InverseLinearOperator(G, rtol=1e-14, maxiter=2) @ np.ones(G.shape[0])
    with pytest.raises(ValueError, match="method"):
        ghess.InverseLinearOperator(G, "gmres")
    with pytest.raises(ValueError, match="square"):
        ghess.InverseLinearOperator(aslinearoperator(np.ones((3, 4))))
    with pytest.raises(ValueError, match="rtol"):
        ghess.InverseLinearOperator(G, rtol=-1.0)
    with pytest.raises(ValueError, match="scale"):
        ghess.InverseLinearOperator(G, "neumann", scale=0.0)
    with pytest.raises(ValueError, match="vector"):
        ghess.InverseLinearOperator(G) @ np.ones(G.shape[0] + 1)
