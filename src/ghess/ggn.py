"""The generalized Gauss-Newton operator."""

import numpy as np

from . import _engine
from ._base import CurvatureOperator

__all__ = ["GGNLinearOperator"]


class GGNLinearOperator(CurvatureOperator):
    r"""Generalized Gauss-Newton matrix of a loss, as a ``LinearOperator``.

    .. math::

        G = \sum_{n} J_n^\top B_n J_n + \lambda I,

    with :math:`J_n = \partial z_n / \partial \theta` the Jacobian of the network
    outputs of sample :math:`n`, :math:`B_n = \nabla^2_{z_n} \ell` the loss Hessian in
    output space (scaled by the loss's reduction: ``1/N`` or ``1/(N K)`` for
    ``"mean"``), and :math:`\lambda` = ``damping``. :math:`G` is symmetric positive
    semi-definite.

    Parameters
    ----------
    model : Sequential
    loss : MSELoss, CrossEntropyLoss or BCEWithLogitsLoss
    params : ndarray of shape (n_params,)
        Flat parameters; the operator computes in their dtype (float32 or float64)
        and keeps a private copy.
    data : (X, y) or iterable of (X, y)
        The result over several batches equals the result on their concatenation.
    damping : float, default=0.0
        Added multiple of the identity.
    mode : {"auto", "stored", "recompute"}, default="auto"
        ``"stored"`` keeps each layer's input (a convolution's unfolded input) and
        per-sample factor :math:`D_{n,l} = \partial z_n / \partial s_{n,l}`, taken
        after the layer's activation and pooling where that is smaller (a quarter,
        after 2x2 max-pooling; nothing per sample at the input of a dense output
        layer, whose weight it is); ``memory_required`` tells the bytes. A product
        then costs about two GEMMs per layer and no pass through the network.
        ``"recompute"`` runs forward, R-forward and backward passes chunk by
        chunk for every product (memory of one chunk). ``"auto"`` picks
        ``"stored"`` when it fits ``memory_budget``.
    chunk_size : int, optional
        Samples per chunk; by default about 64 MiB of temporaries, 128 MiB
        for a network without convolutions (at least 16 samples).
    memory_budget : int, optional
        Bytes the stored factors may take; default a quarter of RAM, at most 4 GiB.
    n_threads : int, optional
        Threads for the OpenMP kernels and BLAS; default OpenMP's default.

    Examples
    --------
    >>> import numpy as np, ghess
    >>> from scipy.sparse.linalg import cg
    >>> model = ghess.Sequential(ghess.Linear(3, 5), ghess.Tanh(), ghess.Linear(5, 2),
    ...                          input_shape=(3,))
    >>> theta = model.init_params(seed=0)
    >>> rng = np.random.default_rng(0)
    >>> X, y = rng.normal(size=(20, 3)), rng.integers(0, 2, size=20)
    >>> G = ghess.GGNLinearOperator(model, ghess.CrossEntropyLoss(), theta, (X, y),
    ...                             damping=1e-3)
    >>> G.shape
    (32, 32)
    >>> d, info = cg(G, np.ones(32), rtol=1e-10)
    >>> info, bool(np.allclose(G @ d, np.ones(32)))
    (0, True)
    """

    @staticmethod
    def _stored_bytes_per_sample(model, itemsize):
        return _engine.stored_factor_bytes_per_sample(model, itemsize)

    def _prepare_stored(self):
        stored = []
        for X, y in self.data.chunks(self.chunk_size):
            ctxs, z = _engine.forward_chunk(self.model, self._lparams, X, 1, self._omp_threads)
            _, _, state = self.loss.value_grad(z, y, self._scale, self._omp_threads)
            factors = _engine.jacobian_factors(self.model, self._lparams, ctxs, X.shape[0],
                                               self.dtype, self._omp_threads)
            factors.loss_state = state
            stored.append(factors)
        return stored

    def _apply_rows(self, V):
        model, k, omp = self.model, V.shape[0], self._omp_threads
        tangents = _engine.prepare_tangents(model, V)
        out = self._new_output(k)
        accs = _engine.new_accumulators(model, k, self.dtype, out)
        if self.mode == "stored":
            for factors in self._stored:
                _engine.factor_ggn(model, self._lparams, self.loss, self._scale, tangents,
                                   factors, accs, k, omp)
        else:
            for X, y in self.data.chunks(self.chunk_size):
                ctxs, z = _engine.forward_chunk(model, self._lparams, X, 1, omp)
                _, _, state = self.loss.value_grad(z, y, self._scale, omp)
                Jv = _engine.jvp_chunk(model, self._lparams, tangents, ctxs, k, omp)
                u = np.empty_like(Jv)
                self.loss.hessian_apply(state, Jv, self._scale, u, omp)
                _engine.vjp_chunk(model, self._lparams, ctxs, u, accs, omp)
        _engine.accumulators_to_flat(model, accs, out)
        return out
