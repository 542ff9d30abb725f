"""The Jacobian of the network outputs with respect to the parameters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt
from scipy.sparse.linalg import LinearOperator

from .. import _engine
from .._config import computing
from .._problem import Problem, memory_limit
from .._typing import Mode
from . import _memory
from .base import BatchedMatvec, ChunkedOperator, _peak_bytes, _probe_arguments

if TYPE_CHECKING:
    from ..nn.sequential import Sequential

__all__ = ["JacobianLinearOperator"]


class JacobianLinearOperator(ChunkedOperator):
    r"""Stacked per-sample Jacobians :math:`J = [J_1; \dots; J_N]` as a ``LinearOperator``.

    Shape ``(N * K, n_params)``: row ``n * K + c`` is :math:`\partial z_{nc} / \partial\theta`,
    rows ordered sample by sample. ``J @ v`` is a forward-mode product (JVP) and
    ``J.T @ w`` (also ``.H``, ``rmatvec``, ``rmatmat``) a reverse-mode one (VJP).

    Parameters
    ----------
    model : Sequential
    params : ndarray of shape (n_params,)
    X : ndarray of shape (N, *input_shape)
    mode : {"auto", "stored", "recompute"}, default="auto"
        As for :class:`ghess.GGNLinearOperator`: ``"stored"`` keeps the per-sample
        factors, ``"recompute"`` passes through the network for every product.
    chunk_size, memory_budget, n_threads
        As for :class:`ghess.GGNLinearOperator`.

    Examples
    --------
    >>> import numpy as np, ghess
    >>> model = ghess.Sequential(ghess.Linear(3, 2), input_shape=(3,))
    >>> J = ghess.JacobianLinearOperator(model, model.init_params(), np.eye(3))
    >>> J.shape
    (6, 8)
    """

    def __init__(self, model: Sequential, params: npt.ArrayLike, X: npt.ArrayLike, *,
                 mode: Mode = "auto", chunk_size: int | None = None,
                 memory_budget: int | None = None, n_threads: int | None = None) -> None:
        problem = Problem(model, None, params, X, chunk_size=chunk_size, n_threads=n_threads,
                          private=True)
        K = model.n_outputs
        self._setup(problem, mode, memory_budget, (problem.n_samples * K, model.n_params))

    @staticmethod
    def _stored_bytes_per_sample(plan):
        # the GGN's factors less the loss state it keeps beside them (K numbers per sample)
        return plan.stored_factor_bytes - plan.loss_state_bytes

    def _chunk_state(self, X, y):
        """Return the chunk's stored Jacobian factors."""
        return self._jacobian_factors(X)

    def _matmat(self, X):
        """J V: each chunk's rows of the stacked Jacobian, in sample order."""
        V = self._check_vectors(X, self.shape[1])
        p, k, K = self.problem, V.shape[0], self.model.n_outputs
        out = np.empty((k, self.shape[0]), dtype=self.dtype)
        if k == 0:
            return out.T
        start = 0
        with computing():
            tangents = _engine.prepare_tangents(self.model, V)
            for factors in self._chunk_states():
                Jv = _engine.factor_jvp(self.model, p.lparams, tangents, factors, k,
                                        p.omp_threads)
                stop = start + factors.n * K
                out[:, start:stop] = Jv.transpose(1, 0, 2).reshape(k, -1)
                start = stop
                del factors, Jv  # recomputed factors go before the next are built
        _engine.check_finite_result(out, "the Jacobian product J v")
        return out.T

    def _rmatmat(self, X):
        """J^T W: a sum over chunks, each pulling back its rows of W."""
        W = self._check_vectors(X, self.shape[0])
        p, k, K = self.problem, W.shape[0], self.model.n_outputs
        if k == 0:
            return np.zeros((self.shape[1], 0), dtype=self.dtype)

        def pull_back(factors, accs, first_sample):
            start, stop = first_sample * K, (first_sample + factors.n) * K
            u = np.ascontiguousarray(
                W[:, start:stop].reshape(k, factors.n, K).transpose(1, 0, 2))
            _engine.factor_vjp(self.model, factors, u, accs, p.omp_threads)

        with computing():
            out = self._reduce(k, pull_back)
        _engine.check_finite_result(out, "the Jacobian product J^T w")
        return out.T

    @classmethod
    def memory_required(cls, model: Sequential, X: npt.ArrayLike | int,
                        mode: Literal["stored", "recompute"] = "stored", *,
                        dtype: npt.DTypeLike = np.float64, chunk_size: int | None = None,
                        n_directions: int = 1, n_threads: int | None = None) -> int:
        """Peak bytes of the operator on inputs ``X`` (or ``n_samples``), before any is allocated.

        As :meth:`ghess.GGNLinearOperator.memory_required`, for building the
        operator and for ``J @ V`` and ``J.T @ W`` with ``n_directions``
        columns: these products' results and vectors have a row per output of
        every sample, so they are counted for the whole data set.
        """
        mode, dtype, theta, V = _probe_arguments(model, mode, dtype, n_directions)
        k = V.shape[1]
        rng = np.random.default_rng(2)

        def probe_at(c, threads):
            X_c = _memory.example_batch(model, None, c, dtype)
            W = rng.standard_normal((c * model.n_outputs, k)).astype(dtype)

            def products(op):  # one after the other, each result dropped
                op.matmat(V)
                op.rmatmat(W)

            return _memory.measure(
                lambda: cls(model, theta, X_c, mode=mode, chunk_size=c, n_threads=threads,
                            memory_budget=memory_limit()),
                products)

        # J V's result and J^T W's copy of W: k numbers per output of every sample
        return _peak_bytes(model, X, dtype, chunk_size, n_threads, probe_at,
                           k * model.n_outputs * dtype.itemsize)

    def todense(self) -> np.ndarray:
        """Return the full (N*K, n_params) matrix; refuse above ``memory_budget``."""
        self._check_dense_fits()
        return self._unit_columns(range(self.shape[1]), lambda E: self._matmat(E.T).T)

    def _adjoint(self):
        return _JacobianAdjoint(self)

    _transpose = _adjoint


class _JacobianAdjoint(BatchedMatvec, LinearOperator):
    """J^T, with J's input checks (and batched matvec on SciPy < 1.18)."""

    def __init__(self, J):
        self.J = J
        super().__init__(dtype=J.dtype, shape=(J.shape[1], J.shape[0]))

    def _matmat(self, X):
        return self.J._rmatmat(X)

    def _rmatmat(self, X):
        return self.J._matmat(X)

    def _adjoint(self):
        return self.J

    _transpose = _adjoint
