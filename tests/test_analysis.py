"""Curvature analysis against dense linear algebra."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import Case
from numpy.testing import assert_allclose
from scipy.sparse.linalg import aslinearoperator

import ghess
from ghess.testing import assert_allclose_rel


@pytest.fixture(scope="module")
def ops():
    c = Case("tanh-ce", n_samples=30)
    G = ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data)
    H = ghess.HessianLinearOperator(c.model, c.loss, c.theta, c.data)
    return c, G, H, G.todense(), H.todense()


def test_extreme_eigenvalues_and_vectors(ops):
    _, G, H, Gd, Hd = ops
    values, vectors = ghess.top_eigenvalues(H, k=4, return_eigenvectors=True)
    dense = np.linalg.eigvalsh(Hd)
    assert_allclose(values, dense[::-1][:4], rtol=1e-8)
    assert_allclose(Hd @ vectors, vectors * values, atol=1e-7 * abs(values).max())
    bottom = ghess.bottom_eigenvalues(H, k=3)
    assert_allclose(bottom, dense[:3], rtol=1e-6, atol=1e-10)
    assert bottom[0] < 0  # the Hessian of this network is indefinite
    assert_allclose(ghess.top_eigenvalues(G, k=2), np.linalg.eigvalsh(Gd)[::-1][:2],
                    rtol=1e-8)


def test_hutchinson_trace_is_unbiased_and_seeded(ops):
    _, G, _, Gd, _ = ops
    estimate, error = ghess.hutchinson_trace(G, n_samples=2000, seed=1)
    assert abs(estimate - np.trace(Gd)) < 4 * error
    assert error < 0.1 * np.trace(Gd)
    assert ghess.hutchinson_trace(G, 50, seed=3) == ghess.hutchinson_trace(G, 50, seed=3)


def test_hutchpp_exact_for_low_rank_and_better_than_hutchinson(ops):
    # N * K = 8 * 3 = 24 < n_params: the GGN has rank <= 24, so Hutch++ with 3 * 24
    # products captures it exactly
    c = Case("tanh-ce", n_samples=8)
    G = ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data)
    assert_allclose(ghess.hutchpp_trace(G, n_matvecs=75), np.trace(G.todense()), rtol=1e-10)
    _, G30, _, Gd, _ = ops
    errors_pp = [abs(ghess.hutchpp_trace(G30, 60, seed=s) - np.trace(Gd)) for s in range(10)]
    errors_h = [abs(ghess.hutchinson_trace(G30, 60, seed=s)[0] - np.trace(Gd))
                for s in range(10)]
    assert np.mean(errors_pp) < np.mean(errors_h)


def test_hutchinson_diagonal_converges(ops):
    _, G, _, Gd, _ = ops
    few = ghess.hutchinson_diagonal(G, 20, seed=0)
    many = ghess.hutchinson_diagonal(G, 2000, seed=0)
    assert np.linalg.norm(many - np.diag(Gd)) < np.linalg.norm(few - np.diag(Gd))
    assert np.linalg.norm(many - np.diag(Gd)) < 0.2 * np.linalg.norm(Gd)


@pytest.mark.parametrize("case_name", ["tanh-ce", "softplus-bce", "leakyrelu-mse-sum",
                                       "linear-linear-bce"], ids=lambda n: f"case={n}")
def test_exact_ggn_diagonal(case_name):
    c = Case(case_name, n_samples=11)
    dense = ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data).todense()
    diag = ghess.ggn_diagonal(c.model, c.loss, c.theta, c.data, chunk_size=4)
    assert_allclose_rel(diag, np.diag(dense), 1e-12)


def test_exact_ggn_diagonal_conv():
    from conftest import ConvCase

    c = ConvCase("conv-relu-maxpool-ce", n_samples=6)
    dense = ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data).todense()
    assert_allclose_rel(ghess.ggn_diagonal(c.model, c.loss, c.theta, c.data, chunk_size=4),
                        np.diag(dense), 1e-12)


def test_spectral_density_moments_are_exact(ops):
    """Gauss quadrature: sum_j tau_j^2 theta_j^m = v^T A^m v / |v|^2 for m < 2 * steps."""
    _, _, H, _, Hd = ops
    grid, density, nodes, weights = ghess.spectral_density(H, n_vectors=3, n_lanczos=12,
                                                           seed=5)
    rng = np.random.default_rng(5)
    n = H.shape[0]
    for i in range(3):
        v = rng.choice(np.array([-1.0, 1.0]), size=(n, 1))[:, 0]
        for m in range(6):
            expected = v @ np.linalg.matrix_power(Hd, m) @ v / (v @ v)
            assert_allclose(np.sum(weights[i] * nodes[i] ** m), expected, rtol=1e-8,
                            atol=1e-12)
    assert_allclose(np.trapezoid(density, grid), 1.0, rtol=1e-3)
    # with as many Lanczos steps as the size, the nodes are the eigenvalues
    small = aslinearoperator(np.diag(np.arange(1.0, 6.0)))
    _, _, nodes, weights = ghess.spectral_density(small, n_vectors=1, n_lanczos=5)
    assert_allclose(np.sort(nodes[0]), np.arange(1.0, 6.0), rtol=1e-10)
    assert_allclose(weights[0], np.full(5, 0.2), rtol=1e-10)


def test_plot_spectral_density(tmp_path, ops):
    pytest.importorskip("matplotlib")
    _, _, H, _, _ = ops
    grid, density, _, _ = ghess.spectral_density(H, n_vectors=2, n_lanczos=10)
    path = tmp_path / "density.png"
    ghess.analysis.plot_spectral_density(grid, density, path)
    assert path.stat().st_size > 1000


def test_plot_spectral_density_leaves_the_backend_alone(tmp_path):
    """Top-level export; the caller's matplotlib backend and pyplot state are untouched."""
    pytest.importorskip("matplotlib")
    script = (
        "import matplotlib; matplotlib.use('svg'); import matplotlib.pyplot as plt; "
        "import numpy as np, ghess; "
        f"fig = ghess.plot_spectral_density(np.linspace(0, 1, 5), np.ones(5), "
        f"{str(tmp_path / 'd.png')!r}); "
        "print(matplotlib.get_backend(), len(plt.get_fignums()), type(fig).__name__)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["svg", "0", "Figure"]
    assert (tmp_path / "d.png").stat().st_size > 500


def test_import_ghess_reaches_testing():
    done = subprocess.run([sys.executable, "-c", "import ghess; print(ghess.testing.__name__)"],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ghess.testing", done.stderr


def test_bad_operators_are_refused(ops):
    _, G, _, _, _ = ops
    with pytest.raises(TypeError, match="square LinearOperator"):
        ghess.hutchinson_trace(np.ones(3))
    with pytest.raises(ValueError, match="k must be smaller"):
        ghess.top_eigenvalues(G, k=G.shape[0])
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        ghess.hutchinson_trace(G, n_samples=0)


# -- regressions: defects found in review, each once a wrong or unclear result --


def test_bottom_eigenvalues_of_a_ggn_with_a_null_space():
    rng = np.random.default_rng(0)
    model = ghess.Sequential(ghess.Linear(4, 5), ghess.Tanh(), ghess.Linear(5, 3),
                             input_shape=(4,))
    G = ghess.GGNLinearOperator(model, ghess.CrossEntropyLoss(), model.init_params(),
                                (rng.normal(size=(6, 4)), rng.integers(0, 3, 6)))
    assert_allclose(ghess.bottom_eigenvalues(G, 3), 0.0, atol=1e-10)


def test_progress_callbacks_count_the_products(ops, capsys, monkeypatch):
    _, G, H, _, Hd = ops
    seen = []

    def record(done, total):
        seen.append((done, total))

    values = ghess.top_eigenvalues(H, k=2, callback=record)
    assert_allclose(values, np.linalg.eigvalsh(Hd)[::-1][:2], rtol=1e-8)
    assert seen and [d for d, _ in seen] == list(range(1, len(seen) + 1))
    assert {t for _, t in seen} == {None}
    for fn, kwargs, total in ((ghess.hutchinson_trace, {"n_samples": 20, "block": 8}, 20),
                              (ghess.hutchinson_diagonal, {"n_samples": 20, "block": 8}, 20),
                              (ghess.hutchpp_trace, {"n_matvecs": 30}, 30),
                              (ghess.spectral_density, {"n_vectors": 2, "n_lanczos": 10}, 20)):
        seen.clear()
        fn(G, **kwargs, callback=record)
        assert seen[-1] == (total, total), fn.__name__
    # the same numbers with and without reporting
    assert ghess.hutchpp_trace(G, 30, callback=record) == ghess.hutchpp_trace(G, 30)
    # progress=True without tqdm: one text line on stderr
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)
    monkeypatch.setitem(__import__("sys").modules, "tqdm.auto", None)
    ghess.hutchinson_trace(G, 16, progress=True)
    assert "Hutchinson trace: 16/16" in capsys.readouterr().err
    with pytest.raises(TypeError, match="callback must be callable"):
        ghess.hutchinson_trace(G, 4, callback=3)


def test_newton_cg_progress_line(capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)
    monkeypatch.setitem(__import__("sys").modules, "tqdm.auto", None)
    c = Case("tanh-ce", n_samples=40)
    opt = ghess.NewtonCG(c.model, c.loss, subsample=0.5, seed=0)
    opt.fit(c.theta, c.data, n_iterations=2, verbose=False, progress=True)
    assert "Newton-CG: 2/2" in capsys.readouterr().err
