"""NewtonCG: exact minimisers on convex problems, the line search, damping and records."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy.optimize import minimize

import ghess


def linear_problem(loss, n=120, d=4, K=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    if isinstance(loss, ghess.CrossEntropyLoss):
        y = rng.integers(0, K, size=n)
    else:
        y = X @ rng.normal(size=(d, K)) + 0.1 * rng.normal(size=(n, K))
    model = ghess.Sequential(ghess.Linear(d, K), input_shape=(d,))
    return model, X, y


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_least_squares_reaches_the_exact_minimiser(reduction):
    loss = ghess.MSELoss(reduction=reduction)
    model, X, y = linear_problem(loss)
    C = 2.0
    theta0 = model.init_params(seed=1)
    # f is quadratic: its minimiser solves (H + I/C) theta* = (H + I/C) theta0 - grad f(theta0)
    H = ghess.HessianLinearOperator(model, loss, theta0, (X, y)).todense() + np.eye(
        model.n_params) / C
    value, grad = ghess.loss_and_grad(model, loss, theta0, (X, y))
    theta_star = theta0 - np.linalg.solve(H, grad + theta0 / C)
    opt = ghess.NewtonCG(model, loss, C=C, subsample=1.0, cg_rtol=1e-12, damping=0.0,
                         seed=0)
    theta, history = opt.fit(theta0, (X, y), n_iterations=3, verbose=False)
    assert_allclose(theta, theta_star, rtol=1e-9, atol=1e-11)
    assert history[-1].grad_norm < 1e-9


def test_logistic_regression_reaches_the_minimiser():
    loss = ghess.CrossEntropyLoss()
    model, X, y = linear_problem(loss)
    opt = ghess.NewtonCG(model, loss, C=5.0, subsample=1.0, cg_rtol=1e-10, seed=0)
    theta, history = opt.fit(model.init_params(seed=2), (X, y), n_iterations=25,
                             verbose=False)
    reference = minimize(lambda t: opt.objective(t, (X, y)), model.init_params(seed=2),
                         jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 0})
    assert history[-1].grad_norm < 1e-8
    assert_allclose(theta, reference.x, rtol=1e-5, atol=1e-6)
    assert history[-1].objective <= reference.fun + 1e-12


def test_subsampled_training_decreases_the_objective_monotonically():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 6))
    y = (X[:, 0] * X[:, 1] > 0).astype(int)
    model = ghess.Sequential(ghess.Linear(6, 16), ghess.Tanh(), ghess.Linear(16, 2),
                             input_shape=(6,))
    opt = ghess.NewtonCG(model, ghess.CrossEntropyLoss(), C=100.0, subsample=0.3, seed=1)
    theta, history = opt.fit(model.init_params(seed=0), (X, y), n_iterations=15,
                             verbose=False, validation=(X[:50], y[:50]))
    objectives = [r.objective for r in history]
    assert all(b <= a for a, b in zip(objectives, objectives[1:]))
    assert history[-1].validation > 0.8


def test_records_are_consistent():
    loss = ghess.CrossEntropyLoss()
    model, X, y = linear_problem(loss)
    opt = ghess.NewtonCG(model, loss, C=1.0, subsample=40, cg_maxiter=3, seed=0)
    theta = model.init_params(seed=3)
    for _ in range(4):
        lam = opt.damping
        new_theta, record = opt.step(theta, (X, y))
        value, grad = opt.objective(new_theta, (X, y))
        assert set(record) == {"objective", "grad_norm", "grad_max", "cg_iterations", "damping",
                               "step_size", "accepted", "backtracks", "ratio",
                               "predicted_decrease", "time"}
        assert_allclose(record.objective, value, rtol=1e-14)
        assert_allclose(record.grad_norm, np.linalg.norm(grad), rtol=1e-12)
        assert_allclose(record.grad_max, np.max(np.abs(grad)), rtol=1e-12)
        assert 1 <= record.cg_iterations <= 3
        assert record.damping == lam
        assert record.accepted and record.step_size == 0.5 ** record.backtracks
        assert record.time > 0
        # Levenberg-Marquardt update from the ratio
        factor = 1.5 if record.ratio < 0.25 else (2 / 3 if record.ratio > 0.75 else 1.0)
        assert_allclose(opt.damping, lam * factor, rtol=1e-15)
        theta = new_theta


def test_line_search_terminates_with_zero_damping():
    """Lambda = 0 on a non-convex net with a crude CG: every step ends, f never increases."""
    rng = np.random.default_rng(4)
    X, y = rng.normal(size=(80, 3)), rng.integers(0, 3, size=80)
    model = ghess.Sequential(ghess.Linear(3, 8), ghess.ReLU(), ghess.Linear(8, 3),
                             input_shape=(3,))
    opt = ghess.NewtonCG(model, ghess.CrossEntropyLoss(), C=1e6, damping=0.0, increase=1.0,
                         decrease=1.0, subsample=10, cg_maxiter=2, max_backtracks=8, seed=0)
    theta = model.init_params(seed=0) * 3
    value = opt.objective(theta, (X, y))[0]
    for _ in range(10):
        theta, record = opt.step(theta, (X, y))
        assert record.damping == 0.0
        assert record.backtracks <= 8
        assert record.objective <= value
        value = record.objective


def test_keyboard_interrupt_returns_the_last_accepted_theta():
    loss = ghess.CrossEntropyLoss()
    model, X, y = linear_problem(loss)
    opt = ghess.NewtonCG(model, loss, subsample=1.0, seed=0)
    seen = []

    def callback(theta, record):
        seen.append(theta.copy())
        if len(seen) == 3:
            raise KeyboardInterrupt

    theta0 = model.init_params(seed=0)
    kept = theta0.copy()
    theta, history = opt.fit(theta0, (X, y), n_iterations=10, verbose=False,
                             callback=callback)
    assert len(history) == 3
    assert_array_equal(theta, seen[-1])
    assert_array_equal(theta0, kept)  # the caller's array is never modified


def test_fit_prints_one_line_per_iteration():
    import io

    loss = ghess.MSELoss()
    model, X, y = linear_problem(loss)
    out = io.StringIO()
    ghess.NewtonCG(model, loss, subsample=0.5, seed=0).fit(
        model.init_params(), (X, y), n_iterations=4, file=out)
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 5 and lines[0].split()[:2] == ["iter", "objective"]


def test_bad_arguments_fail_before_any_work():
    loss = ghess.CrossEntropyLoss()
    model, X, y = linear_problem(loss)
    with pytest.raises(ValueError, match="C must be finite and > 0"):
        ghess.NewtonCG(model, loss, C=0)
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\]"):
        ghess.NewtonCG(model, loss, subsample=1.5)
    with pytest.raises(ValueError, match="count >= 1"):
        ghess.NewtonCG(model, loss, subsample=0)
    with pytest.raises(ValueError, match="cg_maxiter must be >= 1"):
        ghess.NewtonCG(model, loss, cg_maxiter=0)
    with pytest.raises(ValueError, match="damping"):
        ghess.NewtonCG(model, loss, damping=-1.0)
    opt = ghess.NewtonCG(model, loss, subsample=500)
    with pytest.raises(ValueError, match="subsample of 500 samples exceeds the 120"):
        opt.fit(model.init_params(), (X, y), n_iterations=1, verbose=False)
    X_bad = X.copy()
    X_bad[5, 1] = np.nan
    with pytest.raises(ValueError, match="X contains NaN"):
        ghess.NewtonCG(model, loss).fit(model.init_params(), (X_bad, y), verbose=False)


def test_newton_cg_without_l2_and_with_a_diagonal_damping():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 5))
    y = (X[:, 0] > 0).astype(int)
    model = ghess.Sequential(ghess.Linear(5, 2), input_shape=(5,))
    theta0 = model.init_params()
    loss = ghess.CrossEntropyLoss()
    opt = ghess.NewtonCG(model, loss, C=np.inf, subsample=1.0, seed=0,
                         damping=0.5 * model.parameter_mask("weight"))
    value, grad = opt.objective(theta0, (X, y))
    assert (value, grad.tolist()) == (lambda r: (r[0], r[1].tolist()))(
        ghess.loss_and_grad(model, loss, theta0, (X, y)))
    theta, history = opt.fit(theta0, (X, y), n_iterations=4, verbose=False)
    assert history[-1].objective < history[0].objective
    assert np.shape(history[0].damping) == (model.n_params,)
    with pytest.raises(ValueError, match="must have length"):
        ghess.NewtonCG(model, loss, damping=np.ones(3))


def test_newton_cg_with_a_per_parameter_C():
    """C as an array: theta_i^2 / (2 C_i), inf unpenalised; the dtype of theta is kept."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(150, 4))
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    model = ghess.Sequential(ghess.Linear(4, 6), ghess.Tanh(), ghess.Linear(6, 2),
                             input_shape=(4,))
    loss = ghess.CrossEntropyLoss()
    weights = model.parameter_mask("weight")
    with np.errstate(divide="ignore"):
        C = 3.0 / weights  # 3 on the weights, inf on the biases
    opt = ghess.NewtonCG(model, loss, C=C, subsample=1.0, seed=0)
    theta = model.init_params(seed=1)
    value, grad = opt.objective(theta, (X, y))
    plain, plain_grad = ghess.loss_and_grad(model, loss, theta, (X, y))
    assert_allclose(value, plain + float((weights * theta) @ theta) / 6, rtol=1e-14)
    assert_allclose(grad, plain_grad + weights * theta / 3, rtol=1e-14)
    # the Newton system carries the same diagonal: one exact step on a quadratic
    theta32 = theta.astype(np.float32)
    opt32 = ghess.NewtonCG(model, loss, C=C, subsample=1.0, seed=0,
                           damping=0.1 * weights)
    final, history = opt32.fit(theta32, (X.astype(np.float32), y), n_iterations=3,
                               verbose=False)
    assert final.dtype == np.float32 and history[-1].objective < history[0].objective
    with pytest.raises(ValueError, match=r"length 44 \(the model.s n_params\), got 3"):
        ghess.NewtonCG(model, loss, C=np.ones(3))
    with pytest.raises(ValueError, match=r"C must be > 0 everywhere"):
        ghess.NewtonCG(model, loss, C=np.zeros(model.n_params))
    with pytest.raises(TypeError, match=r"C must be a number > 0 or a 1-D array"):
        ghess.NewtonCG(model, loss, C="big")


# -- preconditioned CG ------------------------------------------------------------------

def _mlp_problem(n=150, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6))
    y = (X[:, 0] + X[:, 1] ** 2 > 1).astype(int) + (X[:, 2] > 0.5)
    model = ghess.Sequential(ghess.Linear(6, 8), ghess.Tanh(), ghess.Linear(8, 3),
                             input_shape=(6,))
    return model, X, y


@pytest.mark.parametrize("preconditioner", ["diag", "kfac"])
def test_preconditioner_is_the_inverse_it_claims(preconditioner):
    """The operator CG gets: (scale KFAC + d I)^-1, or 1 / (scale diag(G) + shift)."""
    model, X, y = _mlp_problem()
    loss = ghess.CrossEntropyLoss(reduction="sum")
    opt = ghess.NewtonCG(model, loss, C=10.0, preconditioner=preconditioner, seed=0)
    theta = model.init_params(seed=1)
    v = np.random.default_rng(2).normal(size=model.n_params)
    scale, shift = 3.0, 0.5
    M = opt._cg_preconditioner(theta, (X, y), scale, shift)
    if preconditioner == "kfac":
        K = ghess.KFACLinearOperator(model, loss, theta, (X, y))
        assert_allclose(M @ (scale * (K @ v) + shift * v), v, rtol=1e-10)
    else:
        d = ghess.analysis.ggn_diagonal(model, loss, theta, (X, y))
        assert_allclose(M @ v, v / (scale * d + shift), rtol=1e-13)


@pytest.mark.parametrize("preconditioner", ["diag", "kfac"])
def test_preconditioned_newton_cg_descends_and_refreshes_on_schedule(preconditioner):
    model, X, y = _mlp_problem()
    loss = ghess.CrossEntropyLoss()
    opt = ghess.NewtonCG(model, loss, C=100.0, subsample=0.5, seed=0,
                         preconditioner=preconditioner, preconditioner_every=3)
    builds = []
    original = opt._cg_preconditioner

    def spy(theta, subsample, scale, shift):
        before = opt._preconditioner_state
        M = original(theta, subsample, scale, shift)
        builds.append(before is None or opt._preconditioner_state[0] is not before[0])
        return M

    opt._cg_preconditioner = spy
    theta, history = opt.fit(model.init_params(seed=0), (X, y), n_iterations=7, verbose=False)
    assert builds == [True, False, False, True, False, False, True]
    objective = [h.objective for h in history]
    assert all(b <= a for a, b in zip(objective, objective[1:]))
    assert objective[-1] < 0.8 * loss(model.forward(model.init_params(seed=0), X), y)


def test_preconditioned_fit_resumes_on_the_same_trajectory():
    model, X, y = _mlp_problem()
    loss = ghess.CrossEntropyLoss()

    def make():
        return ghess.NewtonCG(model, loss, C=100.0, subsample=0.5, seed=0,
                              preconditioner="kfac", preconditioner_every=2)

    theta0 = model.init_params(seed=0)
    straight, history = make().fit(theta0, (X, y), n_iterations=5, verbose=False)
    opt = make()

    def fail_at_third(theta, record):
        if len(opt.history_) == 3:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        opt.fit(theta0, (X, y), n_iterations=5, verbose=False, callback=fail_at_third)
    resumed, more = opt.fit(opt.theta_, (X, y), n_iterations=2, verbose=False)
    assert_allclose(resumed, straight, rtol=1e-12, atol=1e-14)
    assert [r.cg_iterations for r in more] == [r.cg_iterations for r in history[3:]]


def test_preconditioner_arguments_are_checked():
    model, X, y = _mlp_problem()
    loss = ghess.CrossEntropyLoss()
    with pytest.raises(ValueError, match="preconditioner must be"):
        ghess.NewtonCG(model, loss, preconditioner="ichol")
    with pytest.raises(ValueError, match="preconditioner_every"):
        ghess.NewtonCG(model, loss, preconditioner="kfac", preconditioner_every=0)
    bn = ghess.Sequential(ghess.Linear(6, 4), ghess.BatchNorm1d(4), ghess.Linear(4, 3),
                          input_shape=(6,))
    with pytest.raises(ValueError, match="Linear and Conv2d layers only"):
        ghess.NewtonCG(bn, loss, preconditioner="kfac")


@pytest.mark.parametrize("preconditioner", ["diag", "kfac"])
def test_preconditioned_float32_fit_stays_float32(preconditioner):
    model, X, y = _mlp_problem()
    opt = ghess.NewtonCG(model, ghess.CrossEntropyLoss(), C=100.0, subsample=0.5, seed=0,
                         preconditioner=preconditioner)
    theta, history = opt.fit(model.init_params(seed=0, dtype=np.float32),
                             (X.astype(np.float32), y), n_iterations=3, verbose=False)
    assert theta.dtype == np.float32 and history[-1].objective < history[0].objective
