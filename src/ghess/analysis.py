"""Curvature analysis on any symmetric operator: spectra, traces, diagonals, densities.

Every function takes a symmetric ``scipy.sparse.linalg.LinearOperator`` (a
ghess GGN or Hessian operator, or any other), needs only products with it, and
uses ``matmat`` to push blocks of vectors through at once.

Data-parallel (MPI): a ghess operator built with ``comm=`` gives every rank the
same products, and these functions draw their random vectors on rank 0 and
broadcast them (``comm``, by default the operator's own), so an SPMD call gives
every rank the same result whatever ``seed``; ``progress`` shows on rank 0 only.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from . import _engine
from ._config import computing
from ._distributed import check_comm, sum_in_rank_order
from ._engine.plan import chunk_size_for
from ._problem import Problem, check_memory_budget
from ._progress import Progress
from ._typing import Data
from ._validation import as_array, check_nonnegative, check_positive_int

if TYPE_CHECKING:
    import os

    from matplotlib.figure import Figure

    from .nn.losses import Loss
    from .nn.sequential import Sequential

__all__ = [
    "top_eigenvalues",
    "bottom_eigenvalues",
    "hutchinson_trace",
    "hutchpp_trace",
    "hutchinson_diagonal",
    "ggn_diagonal",
    "spectral_density",
    "plot_spectral_density",
]


def _check_operator(op):
    shape = getattr(op, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1] or not hasattr(op, "matmat"):
        raise TypeError(f"expected a square LinearOperator, got {type(op).__name__} "
                        f"with shape {shape}")
    return shape[0]


def _rng(seed):
    """Return a Generator from ``seed`` (None, an int >= 0 or a Generator), checked by name."""
    if seed is None or isinstance(seed, (np.random.Generator, np.random.BitGenerator)) or (
            isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed >= 0):
        return np.random.default_rng(seed)
    raise TypeError(f"seed must be None, an int >= 0 or a numpy Generator, got {seed!r}")


def _comm_of(op, comm):
    """Return the communicator to share random vectors over: ``comm``, else the op's."""
    return check_comm(comm if comm is not None else getattr(op, "comm", None))


def _shared(comm, array):
    """``array`` as rank 0 drew it, on every rank: an SPMD call's vectors must agree."""
    if comm is None or comm.Get_size() == 1:
        return array
    array = np.ascontiguousarray(array)
    comm.Bcast(array, root=0)
    return array


def _probes(rng, n, k, dtype, comm=None):
    """Rademacher vectors (n, k): E[v v^T] = I with the least variance for traces."""
    return _shared(comm, rng.choice(np.array([-1.0, 1.0], dtype=dtype), size=(n, k)))


def top_eigenvalues(op: LinearOperator, k: int = 5, *, return_eigenvectors: bool = False,
                    tol: float = 1e-8, seed: int | np.random.Generator | None = 0,
                    maxiter: int | None = None, ncv: int | None = None,
                    callback: Callable[[int, int | None], None] | None = None,
                    progress: bool = False,
                    comm=None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Largest ``k`` eigenvalues (algebraic), in decreasing order, by ``eigsh``.

    Returns ``values`` or ``(values, vectors)`` with ``vectors[:, i]`` for ``values[i]``.
    ``maxiter`` and ``ncv`` go to ``eigsh``; on no convergence one retry uses a larger
    Krylov space, then ``ArpackNoConvergence`` says how many converged.
    ``callback(products, None)`` is called after every operator product, and
    ``progress=True`` shows them (a tqdm bar where installed, else a text line).
    ``comm``: an MPI communicator over which the start vector is shared (by
    default the operator's own, see the module's notes).
    """
    return _extreme(op, k, "LA", return_eigenvectors, tol, seed, maxiter, ncv, callback,
                    progress, comm)


def bottom_eigenvalues(op: LinearOperator, k: int = 5, *, return_eigenvectors: bool = False,
                       tol: float = 1e-8, seed: int | np.random.Generator | None = 0,
                       maxiter: int | None = None, ncv: int | None = None,
                       callback: Callable[[int, int | None], None] | None = None,
                       progress: bool = False,
                       comm=None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Smallest ``k`` eigenvalues (algebraic), in increasing order, by ``eigsh``.

    For the Hessian these are its most negative curvatures. They often sit in a
    tight cluster around 0, where Lanczos converges slowly: bound the work with
    ``maxiter``, loosen ``tol``, or read the smallest Ritz value of
    :func:`spectral_density`'s nodes as a cheap estimate. ``callback`` and
    ``progress`` and ``comm`` as for :func:`top_eigenvalues`.
    """
    return _extreme(op, k, "SA", return_eigenvectors, tol, seed, maxiter, ncv, callback,
                    progress, comm)


class _Counted(LinearOperator):
    """A symmetric operator that reports each product to a :class:`Progress`."""

    def __init__(self, op, report):
        self.op, self.report = op, report
        super().__init__(dtype=op.dtype, shape=op.shape)

    def _matvec(self, x):
        y = self.op.matvec(x)
        self.report.update(1)
        return y

    def _matmat(self, X):
        Y = self.op.matmat(X)
        self.report.update(X.shape[1])
        return Y

    def _adjoint(self):
        return self


@contextlib.contextmanager
def _reporting(op, total, desc, callback, progress, comm):
    """Yield ``op`` (checked already), counting its products for ``callback``/``progress``."""
    progress = progress and (comm is None or comm.Get_rank() == 0)  # one bar, not P
    with Progress(total, desc, progress, callback) as report:
        yield _Counted(op, report) if report.active else op


def _extreme(op, k, which, return_eigenvectors, tol, seed, maxiter, ncv, callback, progress,
             comm):
    n = _check_operator(op)
    comm = _comm_of(op, comm)
    k = check_positive_int(k, "k")
    check_nonnegative(tol, "tol")
    if k >= n:
        raise ValueError(f"k must be smaller than the operator size {n}, got {k}")
    name = "top" if which == "LA" else "bottom"
    with _reporting(op, None, f"{name} eigenvalues: products", callback, progress, comm) as op:
        return _eigsh(op, n, k, which, return_eigenvectors, tol, seed, maxiter, ncv, comm)


def _eigsh(op, n, k, which, return_eigenvectors, tol, seed, maxiter, ncv, comm):
    """Run eigsh (one retry with a larger Krylov space); arguments checked by the caller."""
    v0 = _shared(comm, _rng(seed).normal(size=n).astype(op.dtype))
    try:
        values, vectors = eigsh(op, k=k, which=which, tol=tol, v0=v0, maxiter=maxiter, ncv=ncv)
    except ArpackNoConvergence:
        # clusters (e.g. the null space of a GGN) need a larger Krylov space
        try:
            values, vectors = eigsh(op, k=k, which=which, tol=tol, v0=v0, maxiter=maxiter,
                                    ncv=min(n, max(4 * k + 1, 60, ncv or 0)))
        except ArpackNoConvergence as exc:
            raise ArpackNoConvergence(
                f"eigsh did not converge to the {k} {'largest' if which == 'LA' else 'smallest'}"
                f" eigenvalues (tol={tol}); {len(exc.eigenvalues)} converged. Loosen tol or "
                "ask for fewer.", exc.eigenvalues, exc.eigenvectors) from None
    order = np.argsort(values)
    if which == "LA":
        order = order[::-1]
    values, vectors = values[order], vectors[:, order]
    return (values, vectors) if return_eigenvectors else values


def hutchinson_trace(op: LinearOperator, n_samples: int = 100, *,
                     seed: int | np.random.Generator | None = 0, block: int = 16,
                     callback: Callable[[int, int | None], None] | None = None,
                     progress: bool = False, comm=None) -> tuple[float, float]:
    """Hutchinson's estimate ``mean_i v_i^T A v_i`` with Rademacher ``v_i``.

    Returns ``(estimate, standard_error)``. ``callback(products, n_samples)``
    after each block of products; ``progress=True`` shows them. ``comm`` as for
    :func:`top_eigenvalues`.
    """
    n = _check_operator(op)
    comm = _comm_of(op, comm)
    n_samples = check_positive_int(n_samples, "n_samples")
    block = check_positive_int(block, "block")
    rng = _rng(seed)
    values = []
    with _reporting(op, n_samples, "Hutchinson trace", callback, progress, comm) as op:
        for start in range(0, n_samples, block):
            V = _probes(rng, n, min(block, n_samples - start), op.dtype, comm)
            values.extend(np.einsum("ij,ij->j", V, op.matmat(V)))
    values = np.asarray(values, dtype=np.float64)
    error = values.std(ddof=1) / np.sqrt(n_samples) if n_samples > 1 else np.inf
    return float(values.mean()), float(error)


def hutchpp_trace(op: LinearOperator, n_matvecs: int = 102, *,
                  seed: int | np.random.Generator | None = 0,
                  callback: Callable[[int, int | None], None] | None = None,
                  progress: bool = False, comm=None) -> float:
    """Hutch++ (Meyer, Musco, Musco and Woodruff, 2021): a low-rank part exactly, the rest
    by Hutchinson; ``n_matvecs`` products in all (a multiple of 3 is used).

    The error falls like 1/n_matvecs instead of 1/sqrt(n_matvecs); exact for
    operators of rank below ``n_matvecs / 3``. ``callback(products, total)`` after
    each of its three blocks of products; ``progress=True`` shows them. ``comm``
    as for :func:`top_eigenvalues`.
    """  # noqa: D205
    n = _check_operator(op)
    comm = _comm_of(op, comm)
    m = check_positive_int(n_matvecs, "n_matvecs") // 3
    if m < 1:
        raise ValueError(f"n_matvecs must be at least 3, got {n_matvecs}")
    m = min(m, n)
    rng = _rng(seed)
    with _reporting(op, 3 * m, "Hutch++ trace", callback, progress, comm) as op:
        S = _probes(rng, n, m, op.dtype, comm)
        Q, _ = np.linalg.qr(op.matmat(S))
        G = _probes(rng, n, m, op.dtype, comm)
        G -= Q @ (Q.T @ G)  # project out range(Q)
        exact = np.trace(Q.T @ op.matmat(Q))
        rest = np.einsum("ij,ij->", G, op.matmat(G)) / m
    return float(exact + rest)


def hutchinson_diagonal(op: LinearOperator, n_samples: int = 100, *,
                        seed: int | np.random.Generator | None = 0, block: int = 16,
                        callback: Callable[[int, int | None], None] | None = None,
                        progress: bool = False, comm=None) -> np.ndarray:
    """Estimate of ``diag(A)`` as ``mean_i v_i * (A v_i)`` with Rademacher ``v_i``.

    ``callback``, ``progress`` and ``comm`` as for :func:`hutchinson_trace`.
    """
    n = _check_operator(op)
    comm = _comm_of(op, comm)
    n_samples = check_positive_int(n_samples, "n_samples")
    block = check_positive_int(block, "block")
    rng = _rng(seed)
    total = np.zeros(n)
    with _reporting(op, n_samples, "Hutchinson diagonal", callback, progress, comm) as op:
        for start in range(0, n_samples, block):
            V = _probes(rng, n, min(block, n_samples - start), op.dtype, comm)
            total += np.einsum("ij,ij->i", V, op.matmat(V))
    return total / n_samples


def ggn_diagonal(model: Sequential, loss: Loss, params: npt.ArrayLike, data: Data, *,
                 chunk_size: int | None = None, n_threads: int | None = None,
                 memory_budget: int = 256 << 20,
                 check_deterministic: bool = True, comm=None) -> np.ndarray:
    r"""Exact diagonal of the GGN, :math:`\sum_n \mathrm{diag}(J_n^\top B_n J_n)`.

    Computed from the per-sample factors chunk by chunk, without the n x n
    matrix: per chunk, the per-sample Jacobians ``J`` (chunk, K, n_params) and
    ``B J``, reduced immediately. ``chunk_size`` defaults to what fits
    ``memory_budget`` bytes. ``comm``: data-parallel, as for
    :class:`ghess.GGNLinearOperator` (the whole data's diagonal on every rank).
    The estimators take the distributed operators as they are (the module's notes).
    """
    p = Problem(model, loss, params, data, chunk_size=chunk_size, n_threads=n_threads,
                check_deterministic=check_deterministic, comm=comm)
    memory_budget = check_memory_budget(memory_budget, stacklevel=3)
    K, P = model.n_outputs, model.n_params
    if chunk_size is None:  # dense per-sample J and B J: 3 K P numbers per sample
        p.chunk_size = int(chunk_size_for(3 * K * P * p.dtype.itemsize, memory_budget,
                                          maximum=None))
    omp = p.omp_threads
    diag = np.zeros(P, dtype=np.float64)
    with computing():
        for X, y in p.chunks():
            n = X.shape[0]
            ctxs, z = _engine.checked_forward(model, p.lparams, X, 1, omp)
            _, _, state = _engine.checked_loss(loss, z, y, p.scale, omp)
            factors = _engine.jacobian_factors(model, p.lparams, ctxs, n, p.dtype, omp,
                                               paths=False)
            J = np.zeros((n, K, P), dtype=p.dtype)
            _engine.factor_sample_jacobians(model, factors, J, omp)
            Jt = np.ascontiguousarray(J.transpose(0, 2, 1))  # (n, P, K): P directions
            BJt = np.empty_like(Jt)
            loss.hessian_apply(state, Jt, p.scale, BJt, omp)
            diag += np.einsum("npk,npk->p", Jt, BJt)
    diag = sum_in_rank_order(p.comm, diag)
    _engine.check_finite_result(diag, "the GGN diagonal")
    return diag.astype(p.dtype)


def _lanczos(op, v, steps):
    """Lanczos with full reorthogonalisation: tridiagonal (alpha, beta) of ``steps`` steps."""
    n = v.shape[0]
    Q = np.zeros((steps + 1, n))
    alpha, beta = np.zeros(steps), np.zeros(steps)
    Q[0] = v / np.linalg.norm(v)
    for j in range(steps):
        w = np.asarray(op.matvec(Q[j].astype(op.dtype)), dtype=np.float64)
        alpha[j] = Q[j] @ w
        w -= Q[:j + 1].T @ (Q[:j + 1] @ w)  # full reorthogonalisation, twice
        w -= Q[:j + 1].T @ (Q[:j + 1] @ w)
        beta[j] = np.linalg.norm(w)
        if beta[j] <= 1e-12 * max(1.0, abs(alpha[j])):  # invariant subspace: exact
            return alpha[:j + 1], beta[:j]
        Q[j + 1] = w / beta[j]
    return alpha, beta[:-1]


def spectral_density(op: LinearOperator, *, n_vectors: int = 10, n_lanczos: int = 80,
                     grid: npt.ArrayLike | None = None, n_grid: int = 512,
                     sigma: float | None = None, seed: int | np.random.Generator | None = 0,
                     callback: Callable[[int, int | None], None] | None = None,
                     progress: bool = False, comm=None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r"""Spectral density by stochastic Lanczos quadrature (Ghorbani, Krishnan and Xiao, 2019).

    For each Rademacher vector :math:`v`, ``n_lanczos`` Lanczos steps give nodes
    :math:`\theta_j` (Ritz values) and weights :math:`\tau_j^2` with
    :math:`\sum_j \tau_j^2 \theta_j^m = v^\top A^m v / \|v\|^2` for
    :math:`m < 2\,` ``n_lanczos``. The density is the average of these quadratures,
    smoothed by Gaussians of width ``sigma`` (default: 1% of the spectral range).

    Returns
    -------
    grid : ndarray
    density : ndarray
        Integrates to about 1 over ``grid``.
    nodes, weights : ndarray of shape (n_vectors, n_lanczos)
        The quadrature itself (weights sum to 1 per vector), for exact moments.

    ``callback(products, n_vectors * n_lanczos)`` after each product (a Lanczos
    run may stop early on an invariant subspace); ``progress=True`` shows them.
    ``comm`` as for :func:`top_eigenvalues`.
    """
    n = _check_operator(op)
    comm = _comm_of(op, comm)
    n_vectors = check_positive_int(n_vectors, "n_vectors")
    steps = min(check_positive_int(n_lanczos, "n_lanczos"), n)
    rng = _rng(seed)
    # every argument checked before the first product
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, numbers.Real)
                              or not (np.isfinite(sigma) and sigma > 0)):
        raise ValueError(f"sigma must be a finite number > 0 or None, got {sigma!r}")
    if grid is None:
        n_grid = check_positive_int(n_grid, "n_grid")
    else:
        grid = as_array(grid)
        if grid.ndim != 1 or grid.size == 0 or grid.dtype.kind not in "iuf" or not np.all(
                np.isfinite(grid)):
            raise ValueError(f"grid must be a non-empty 1-D array of finite numbers, got "
                             f"shape {grid.shape} and dtype {grid.dtype}")
    nodes = np.full((n_vectors, steps), np.nan)
    weights = np.zeros((n_vectors, steps))
    with _reporting(op, n_vectors * steps, "spectral density", callback, progress, comm) as op:
        for i in range(n_vectors):
            alpha, beta = _lanczos(op, _probes(rng, n, 1, np.float64, comm)[:, 0], steps)
            T = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
            theta, S = np.linalg.eigh(T)
            nodes[i, :len(theta)] = theta
            weights[i, :len(theta)] = S[0] ** 2
    lo, hi = np.nanmin(nodes), np.nanmax(nodes)
    width = max(hi - lo, 1e-12 * max(1.0, abs(hi)))
    if sigma is None:
        sigma = 0.01 * width
    if grid is None:
        grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, n_grid)
    grid = np.asarray(grid, dtype=np.float64)
    valid = ~np.isnan(nodes)
    diff = grid[:, None] - nodes[valid][None, :]
    kernel = np.exp(-0.5 * (diff / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
    density = kernel @ weights[valid] / n_vectors
    return grid, density, nodes, weights


def plot_spectral_density(grid: npt.ArrayLike, density: np.ndarray,
                          path: str | os.PathLike[str] | None = None, *,
                          title: str = "Spectral density", log: bool = True) -> Figure:
    """Plot a density from :func:`spectral_density` (needs matplotlib); save to ``path``.

    Returns the matplotlib Figure.
    """
    try:  # a bare Figure: no pyplot state, and the caller's backend is left alone
        from matplotlib.figure import Figure
    except ImportError as exc:  # optional dependency
        raise ImportError("plot_spectral_density needs matplotlib: "
                          "pip install 'ghess[demo]' or pip install matplotlib") from exc
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(grid, np.maximum(density, 1e-12) if log else density)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=max(1e-8, density.max() * 1e-8))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
