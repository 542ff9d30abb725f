"""The Jacobian of the network outputs with respect to the parameters."""

import numpy as np
from scipy.sparse.linalg import LinearOperator

from . import _engine
from ._base import (
    VectorOperatorMixin,
    check_mode,
    check_model,
    count_samples,
    default_memory_budget,
    format_bytes,
)
from ._config import computing, resolve_n_threads
from ._data import as_input_batches
from ._validation import check_n_threads, check_params, check_positive_int

__all__ = ["JacobianLinearOperator"]


class JacobianLinearOperator(VectorOperatorMixin, LinearOperator):
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

    def __init__(self, model, params, X, *, mode="auto", chunk_size=None, memory_budget=None,
                 n_threads=None):
        self.model = check_model(model)
        self.params = check_params(params, model.n_params).copy()
        self.params.flags.writeable = False
        self.n_threads = check_n_threads(n_threads)
        self._omp_threads = resolve_n_threads(self.n_threads)
        self.data = as_input_batches(model, X, self.params.dtype, copy=True)
        self.n_samples = self.data.n_samples
        self._lparams = model.layer_params(self.params)
        self.chunk_size = check_positive_int(chunk_size, "chunk_size", allow_none=True) or 256
        self.memory_budget = (default_memory_budget() if memory_budget is None
                              else check_positive_int(memory_budget, "memory_budget"))
        mode = check_mode(mode)
        needed = self.n_samples * _engine.stored_factor_bytes_per_sample(
            model, self.params.itemsize)
        self.stored_bytes = needed
        if mode == "auto":
            mode = "stored" if needed <= self.memory_budget else "recompute"
        elif mode == "stored" and needed > self.memory_budget:
            raise ValueError(f"mode='stored' needs {format_bytes(needed)}, over the "
                             f"memory_budget of {format_bytes(self.memory_budget)}: raise "
                             "memory_budget or use mode='recompute'")
        self.mode = mode
        K = model.n_outputs
        super().__init__(dtype=self.params.dtype, shape=(self.n_samples * K, model.n_params))
        self._stored = None
        if mode == "stored":
            with computing():
                self._stored = [self._factors(X) for X, _ in self.data.chunks(self.chunk_size)]

    def _factors(self, X):
        ctxs, _ = _engine.forward_chunk(self.model, self._lparams, X, 1, self._omp_threads)
        return _engine.jacobian_factors(self.model, self._lparams, ctxs, X.shape[0],
                                        self.params.dtype, self._omp_threads)

    def _chunks(self):
        if self.mode == "stored":
            return iter(self._stored)
        return (self._factors(X) for X, _ in self.data.chunks(self.chunk_size))

    def _matmat(self, X):
        V = self._check_vectors(X, self.shape[1])
        k, K = V.shape[0], self.model.n_outputs
        out = np.empty((k, self.shape[0]), dtype=self.dtype)
        start = 0
        with computing():
            tangents = _engine.prepare_tangents(self.model, V)
            for factors in self._chunks():
                Jv = _engine.factor_jvp(self.model, self._lparams, tangents, factors, k,
                                        self._omp_threads)
                stop = start + factors.n * K
                out[:, start:stop] = Jv.transpose(1, 0, 2).reshape(k, -1)
                start = stop
        return out.T

    def _rmatmat(self, X):
        W = self._check_vectors(X, self.shape[0])
        k, K = W.shape[0], self.model.n_outputs
        out = np.zeros((k, self.shape[1]), dtype=self.dtype)
        accs = _engine.new_accumulators(self.model, k, self.dtype, out)
        start = 0
        with computing():
            for factors in self._chunks():
                stop = start + factors.n * K
                u = np.ascontiguousarray(
                    W[:, start:stop].reshape(k, factors.n, K).transpose(1, 0, 2))
                _engine.factor_vjp(self.model, factors, u, accs, self._omp_threads)
                start = stop
        _engine.accumulators_to_flat(self.model, accs, out)
        return out.T

    @staticmethod
    def memory_required(model, X, mode="stored", *, dtype=np.float64):
        """Bytes the stored factors take for inputs ``X`` (or ``n_samples``); 0 to recompute."""
        check_model(model)
        if check_mode(mode) == "recompute":
            return 0
        n = count_samples(X)
        return n * _engine.stored_factor_bytes_per_sample(model, np.dtype(dtype).itemsize)

    @property
    def memory_bytes(self):
        """Bytes held by the stored factors (0 in recompute mode)."""
        return 0 if self.mode == "recompute" else self.stored_bytes

    def todense(self):
        """Return the full (N*K, n_params) matrix; refuse above ``memory_budget``."""
        size = self.shape[0] * self.shape[1] * self.dtype.itemsize
        if size > self.memory_budget:
            raise ValueError(f"todense needs {format_bytes(size)}, over the memory_budget of "
                             f"{format_bytes(self.memory_budget)}")
        return self.matmat(np.eye(self.shape[1], dtype=self.dtype))

    def _adjoint(self):
        return _JacobianAdjoint(self)

    _transpose = _adjoint


class _JacobianAdjoint(VectorOperatorMixin, LinearOperator):
    """J^T, with the same batched matvec and input checks as J."""

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
