"""Bad input: a clear ValueError/TypeError naming expected and received, before any work."""

import numpy as np
import pytest
from conftest import Case
from numpy.testing import assert_array_equal

import ghess

OPERATORS = [ghess.GGNLinearOperator, ghess.HessianLinearOperator]


def build(kind, c, theta=None, data=None, **kw):
    theta = c.theta if theta is None else theta
    if kind == "jacobian":
        X = c.X if data is None else data[0]
        return ghess.JacobianLinearOperator(c.model, theta, X, **kw)
    if kind == "loss_and_grad":
        return ghess.loss_and_grad(c.model, c.loss, theta, c.data if data is None else data)
    cls = {"ggn": ghess.GGNLinearOperator, "hessian": ghess.HessianLinearOperator}[kind]
    return cls(c.model, c.loss, theta, c.data if data is None else data, **kw)


KINDS = ["ggn", "hessian", "jacobian", "loss_and_grad"]


@pytest.mark.parametrize("kind", KINDS)
def test_params_wrong_length_shape_dtype_or_nonfinite(kind):
    c = Case("tanh-ce")
    n = c.model.n_params
    with pytest.raises(ValueError, match=rf"length {n}.*got {n - 1}"):
        build(kind, c, theta=c.theta[:-1])
    with pytest.raises(ValueError, match="1-D"):
        build(kind, c, theta=c.theta.reshape(1, -1))
    with pytest.raises(TypeError, match="complex"):
        build(kind, c, theta=c.theta.astype(complex))
    with pytest.raises(TypeError, match="float32 or float64"):
        build(kind, c, theta=c.theta.astype(object))
    bad = c.theta.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match=r"params contains NaN or Inf \(first at index \(3,\)"):
        build(kind, c, theta=bad)
    bad[3] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        build(kind, c, theta=bad)


@pytest.mark.parametrize("kind", KINDS)
def test_inputs_wrong_shape_nonfinite_or_empty(kind):
    c = Case("tanh-ce")
    with pytest.raises(ValueError, match=r"X must have shape \(n_samples, 4\), got \(9, 5\)"):
        build(kind, c, data=(np.ones((9, 5)), c.y))
    with pytest.raises(ValueError, match=r"X must have shape"):
        build(kind, c, data=(np.ones(9), c.y))
    X = c.X.copy()
    X[2, 1] = np.nan
    with pytest.raises(ValueError, match="X contains NaN or Inf"):
        build(kind, c, data=(X, c.y))
    with pytest.raises(ValueError, match="empty"):
        build(kind, c, data=(np.ones((0, 4)), c.y[:0]))
    with pytest.raises(TypeError, match="X must hold real numbers"):
        build(kind, c, data=(c.X.astype(str), c.y))


@pytest.mark.parametrize("kind", ["ggn", "hessian", "loss_and_grad"])
def test_targets_checked(kind):
    c = Case("tanh-ce")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*got label 3"):
        build(kind, c, data=(c.X, np.full(9, 3)))
    with pytest.raises(ValueError, match="got label -1"):
        build(kind, c, data=(c.X, np.full(9, -1)))
    with pytest.raises(TypeError, match="labels must be integers"):
        build(kind, c, data=(c.X, c.y.astype(float)))
    with pytest.raises(ValueError, match=r"labels must have shape \(9,\), got \(8,\)"):
        build(kind, c, data=(c.X, c.y[:8]))
    m = Case("sigmoid-mse")
    with pytest.raises(ValueError, match=r"targets must have the outputs' shape \(9, 3\), "
                                         r"got \(9,\)"):
        build(kind, m, data=(m.X, m.y[:, 0]))
    y = m.y.copy()
    y[0, 0] = np.inf
    with pytest.raises(ValueError, match="targets contains NaN or Inf"):
        build(kind, m, data=(m.X, y))
    b = Case("softplus-bce")
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 1\]"):
        build(kind, b, data=(b.X, b.y + 1.5))


@pytest.mark.parametrize("kind", ["ggn", "hessian", "loss_and_grad"])
def test_data_container_errors(kind):
    c = Case("tanh-ce")
    with pytest.raises(ValueError, match="data is empty"):
        build(kind, c, data=[])
    with pytest.raises(TypeError, match="pair"):
        build(kind, c, data=[c.X])
    with pytest.raises(TypeError, match="iterable"):
        build(kind, c, data=c.X)
    with pytest.raises(ValueError, match=r"\(batch 1\)"):
        build(kind, c, data=[(c.X, c.y), (c.X[:, :2], c.y)])


@pytest.mark.parametrize("cls", OPERATORS)
def test_vectors_checked(cls):
    c = Case("tanh-ce")
    op = cls(c.model, c.loss, c.theta, c.data)
    n = op.shape[0]
    with pytest.raises(ValueError, match=rf"vector must have shape \({n},\), \({n}, 1\) or "
                                         rf"\(k, {n}\), got \({n + 1},\)"):
        op @ np.ones(n + 1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        op @ np.full(n, np.nan)
    with pytest.raises(TypeError, match="must be real"):
        op @ (np.ones(n) * 1j)
    with pytest.raises(ValueError, match="rows|dimension"):
        op.matmat(np.ones((n + 2, 3)))
    v = np.ones(n)
    op @ v
    assert_array_equal(v, np.ones(n))


def test_jacobian_vectors_checked():
    c = Case("tanh-ce")
    J = ghess.JacobianLinearOperator(c.model, c.theta, c.X)
    with pytest.raises(ValueError):
        J.rmatvec(np.ones(J.shape[0] + 1))
    with pytest.raises(ValueError, match="NaN or Inf"):
        J.rmatvec(np.full(J.shape[0], np.inf))


@pytest.mark.parametrize("cls", OPERATORS)
def test_options_checked(cls):
    c = Case("tanh-ce")
    with pytest.raises(ValueError, match="damping must be finite and >= 0, got -1"):
        cls(c.model, c.loss, c.theta, c.data, damping=-1)
    with pytest.raises(ValueError, match="mode must be one of"):
        cls(c.model, c.loss, c.theta, c.data, mode="fast")
    with pytest.raises(ValueError, match="n_threads must be >= 1"):
        cls(c.model, c.loss, c.theta, c.data, n_threads=0)
    with pytest.raises(TypeError, match="n_threads must be a positive int"):
        cls(c.model, c.loss, c.theta, c.data, n_threads=1.5)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        cls(c.model, c.loss, c.theta, c.data, chunk_size=0)
    with pytest.raises(TypeError, match="loss must be a loss instance"):
        cls(c.model, ghess.MSELoss, c.theta, c.data)
    with pytest.raises(TypeError, match="model must be a ghess.Sequential"):
        cls(ghess.Linear(4, 3), c.loss, c.theta, c.data)
    op = cls(c.model, c.loss, c.theta, c.data)
    with pytest.raises(ValueError, match=r"unknown parameter '9.weight'.*'0.weight'"):
        op.block("9.weight")


def test_loss_reduction_checked():
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'none'"):
        ghess.CrossEntropyLoss(reduction="none")


def test_failed_calls_leave_inputs_untouched():
    c = Case("tanh-ce")
    X, y, theta = c.X.copy(), c.y.copy(), c.theta.copy()
    with pytest.raises(ValueError):
        ghess.GGNLinearOperator(c.model, c.loss, c.theta, (c.X, np.full(9, 7)))
    assert_array_equal(c.X, X)
    assert_array_equal(c.y, y)
    assert_array_equal(c.theta, theta)


def test_finiteness_check_takes_large_finite_values_and_finds_every_nonfinite():
    """The finiteness check sums first, and that changes no verdict.

    A sum that overflows must not reject finite data, and a NaN or Inf anywhere
    (also +Inf next to -Inf) must still be found, at its index.
    """
    import warnings

    from ghess._validation import as_float_array

    for dtype in (np.float32, np.float64):
        big = np.full((3, 4), np.finfo(dtype).max / 2, dtype=dtype)
        with np.errstate(over="ignore"):
            assert np.isinf(big.sum())  # the quick sum overflows
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # and valid data gets no RuntimeWarning for it
            assert as_float_array(big, "X") is big
        for bad in (np.nan, np.inf, -np.inf):
            x = np.ones((3, 4), dtype=dtype)
            x[1, 2] = bad
            with pytest.raises(ValueError, match=r"X contains NaN or Inf \(first at index "
                                                 r"\(1, 2\)\)"):
                as_float_array(x, "X")
        x = np.zeros(5, dtype=dtype)
        x[1], x[3] = np.inf, -np.inf  # sums to NaN
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match=r"first at index \(1,\)"):
                as_float_array(x, "X")


# -- regressions: defects found in review, each once a wrong or unclear result --


def test_argument_validation_gaps():
    with pytest.raises(TypeError, match="input_shape must be a tuple of ints"):
        ghess.Sequential(ghess.Linear(3, 4), input_shape=(3.7,))
    with pytest.raises(TypeError, match="input_shape must be a tuple of ints"):
        ghess.Sequential(ghess.Linear(3, 4), input_shape="3")
    model = ghess.Sequential(ghess.Linear(3, 4), input_shape=(3,))
    loss = ghess.MSELoss()
    with pytest.raises(TypeError, match="damping must be a real number"):
        ghess.NewtonCG(model, loss, damping="a")
    with pytest.raises(TypeError, match="ratio_low must be a real number"):
        ghess.NewtonCG(model, loss, ratio_low="a")
    with pytest.raises(ValueError, match="need increase >= 1 and decrease <= 1"):
        ghess.NewtonCG(model, loss, increase=0.5)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        ghess.GGNLinearOperator.memory_required(model, 10, dtype="complex128")
    G = ghess.GGNLinearOperator(model, loss, model.init_params(), (np.ones((4, 3)),
                                                                   np.ones((4, 4))))
    with pytest.raises(ValueError, match="block must be >= 1"):
        ghess.hutchinson_trace(G, 10, block=0)
    with pytest.raises(ValueError, match=r"needs \d+ bytes .* memory_budget of 1 bytes"):
        ghess.GGNLinearOperator(model, loss, model.init_params(), (np.ones((4, 3)),
                                np.ones((4, 4))), mode="stored", memory_budget=1)


def test_every_error_names_its_argument():
    """Each of these once named no argument, or was checked only after the work.

    A curvature without a loss read as "X must be an array", a bad seed failed inside
    numpy, a 3-D matmat inside SciPy, and spectral_density checked its grid after the
    Lanczos products.
    """
    model = ghess.Sequential(ghess.Linear(4, 5), ghess.Tanh(), ghess.Linear(5, 3),
                             input_shape=(4,))
    theta, X, y = model.init_params(), np.ones((6, 4)), np.arange(6) % 3
    for cls in (ghess.GGNLinearOperator, ghess.HessianLinearOperator):
        with pytest.raises(TypeError, match="loss must be a ghess loss .* got NoneType"):
            cls(model, None, theta, (X, y))
    G = ghess.GGNLinearOperator(model, ghess.CrossEntropyLoss(), theta, (X, y))
    with pytest.raises(ValueError, match=r"matmat: X must be 2-D of shape \(43, k\), got "
                                         r"shape \(2, 2, 2\)"):
        G.matmat(np.ones((2, 2, 2)))
    for call in (lambda: ghess.top_eigenvalues(G, k=1, seed="x"),
                 lambda: ghess.hutchinson_trace(G, 4, seed=-1),
                 lambda: ghess.spectral_density(G, seed=2.5)):
        with pytest.raises(TypeError, match="seed must be None, an int >= 0 or a numpy "
                                            "Generator"):
            call()

    products = []
    for kwargs, match in [(dict(grid=5), "grid must be a non-empty 1-D array"),
                          (dict(grid=[0.0, np.nan]), "grid must be a non-empty 1-D array"),
                          (dict(sigma=-1.0), "sigma must be a finite number > 0"),
                          (dict(n_grid=0), "n_grid must be >= 1")]:
        with pytest.raises((TypeError, ValueError), match=match):
            ghess.spectral_density(G, n_lanczos=3, n_vectors=1, **kwargs,
                                   callback=lambda done, total: products.append(done))
    assert products == []  # refused before the first product


def test_comm_must_be_a_communicator():
    model = ghess.Sequential(ghess.Linear(3, 2), input_shape=(3,))
    X, y = np.ones((4, 3)), np.zeros(4, dtype=int)
    with pytest.raises(TypeError, match="comm must be an mpi4py communicator"):
        ghess.loss_and_grad(model, ghess.CrossEntropyLoss(), model.init_params(), (X, y),
                            comm="world")
    for cls in (ghess.FisherMCLinearOperator, ghess.KFACLinearOperator):
        with pytest.raises(TypeError, match="comm must be an mpi4py communicator"):
            cls(model, ghess.CrossEntropyLoss(), model.init_params(), (X, y), comm=object())
    G = ghess.GGNLinearOperator(model, ghess.CrossEntropyLoss(), model.init_params(), (X, y))
    with pytest.raises(TypeError, match="comm must be an mpi4py communicator"):
        ghess.top_eigenvalues(G, k=1, comm=1)


def test_distributed_draws_need_a_loss_that_says_what_a_target_draws():
    # refused before any collective, on every rank alike (a rank with an empty shard makes
    # no draw and would otherwise wait for the others)
    class OneRank:  # the methods of an mpi4py communicator, one rank
        Allgather = Alltoallv = Allgatherv = Bcast = allgather = None

        def Get_rank(self):  # noqa: N802
            return 0

        def Get_size(self):  # noqa: N802
            return 1

    class Unsaid(ghess.MSELoss):
        random_draws_per_target = ghess.nn.Loss.random_draws_per_target

    model = ghess.Sequential(ghess.Linear(3, 2), input_shape=(3,))
    data = (np.ones((4, 3)), np.zeros((4, 2)))
    for make in (lambda: ghess.FisherMCLinearOperator(model, Unsaid(), model.init_params(),
                                                      data, comm=OneRank()),
                 lambda: ghess.KFACLinearOperator(model, Unsaid(), model.init_params(), data,
                                                  fisher_type="mc", comm=OneRank())):
        with pytest.raises(NotImplementedError, match="define random_draws_per_target"):
            make()
    # without comm nothing is skipped, and nothing is asked
    ghess.FisherMCLinearOperator(model, Unsaid(), model.init_params(), data)


def test_newton_cg_comm_is_checked():
    model = ghess.Sequential(ghess.Linear(3, 2), input_shape=(3,))
    with pytest.raises(TypeError, match="comm must be an mpi4py communicator"):
        ghess.NewtonCG(model, ghess.CrossEntropyLoss(), comm=3)
