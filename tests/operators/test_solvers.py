"""SciPy solvers run directly on the operators and agree with dense linear algebra."""

import numpy as np
import pytest
from conftest import Case
from numpy.testing import assert_allclose
from scipy.sparse.linalg import cg, eigsh, lobpcg, lsmr, minres

import ghess


@pytest.fixture(scope="module")
def problem():
    c = Case("tanh-ce", n_samples=40)
    G = ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data, damping=1e-2)
    H = ghess.HessianLinearOperator(c.model, c.loss, c.theta, c.data, damping=1e-2)
    b = np.random.default_rng(0).normal(size=G.shape[0])
    return c, G, H, b


def test_cg_on_ggn(problem):
    _, G, _, b = problem
    x, info = cg(G, b, rtol=1e-12, maxiter=2000)
    assert info == 0
    assert_allclose(x, np.linalg.solve(G.todense(), b), rtol=1e-8)


def test_minres_on_hessian(problem):
    _, _, H, b = problem
    x, info = minres(H, b, rtol=1e-12, maxiter=2000)
    Hd = H.todense()
    assert info == 0
    # H is indefinite and ill-conditioned here: compare with the dense solve to
    # within what its condition number allows
    expected = np.linalg.solve(Hd, b)
    cond = np.linalg.cond(Hd)
    assert np.linalg.norm(x - expected) <= 1e-10 * cond * np.linalg.norm(expected)


@pytest.mark.parametrize("name", ["ggn", "hessian"])
def test_eigsh_top_eigenvalues(problem, name):
    _, G, H, _ = problem
    op = G if name == "ggn" else H
    values = eigsh(op, k=3, which="LA", return_eigenvectors=False, tol=1e-12)
    dense = np.linalg.eigvalsh(op.todense())
    assert_allclose(np.sort(values), dense[-3:], rtol=1e-9)


def test_lobpcg_top_eigenvalues(problem):
    _, G, _, _ = problem
    X0 = np.random.default_rng(1).normal(size=(G.shape[0], 2))
    values, _ = lobpcg(G, X0, largest=True, tol=1e-9, maxiter=500)
    dense = np.linalg.eigvalsh(G.todense())
    assert_allclose(np.sort(values), dense[-2:], rtol=1e-7)


def test_lsmr_on_jacobian(problem):
    c, _, _, _ = problem
    J = ghess.JacobianLinearOperator(c.model, c.theta, c.X)
    w = np.random.default_rng(2).normal(size=J.shape[0])
    x = lsmr(J, w, atol=1e-14, btol=1e-14, maxiter=5000)[0]
    Jd = J @ np.eye(J.shape[1])
    expected = np.linalg.lstsq(Jd, w, rcond=None)[0]
    # compare the residuals' normal equations, which determine least-squares solutions
    assert np.linalg.norm(Jd.T @ (Jd @ x - w)) <= 1e-8 * np.linalg.norm(Jd.T @ w)
    assert_allclose(Jd @ x, Jd @ expected, rtol=1e-6, atol=1e-9)
