"""The exact Hessian operator (Pearlmutter's R-operator)."""

from . import _engine
from ._base import CurvatureOperator

__all__ = ["HessianLinearOperator"]


class HessianLinearOperator(CurvatureOperator):
    r"""Exact Hessian of a loss with respect to the flat parameters, as a ``LinearOperator``.

    .. math::

        H = \sum_n J_n^\top B_n J_n + \sum_n \sum_k \frac{\partial \ell_n}{\partial z_{nk}}
            \nabla^2_\theta z_{nk} + \lambda I,

    computed by Hessian-vector products (an R-forward pass, :math:`B_n R\{z_n\}`,
    then the R-backward pass) that include the second derivatives of the
    activations and of the loss. :math:`H` is symmetric but indefinite in general,
    also for ReLU networks (cross-layer terms).

    Parameters are those of :class:`ghess.GGNLinearOperator`. In ``"stored"``
    mode the operator keeps, for every sample, what does not depend on the
    direction: layer inputs, activation derivatives f' and f'', and the gradient
    of the loss at the outputs of the layers whose R-backward reads it (those
    with parameters, and activations with f'' != 0). An activation with f'' = 0
    (ReLU) followed by max-pooling is one step that keeps f' at each window's
    argmax only, a quarter of it after 2x2 pooling.

    Examples
    --------
    >>> import numpy as np, ghess
    >>> model = ghess.Sequential(ghess.Linear(2, 3), ghess.Sigmoid(), ghess.Linear(3, 1),
    ...                          input_shape=(2,))
    >>> theta = model.init_params(seed=1)
    >>> X, y = np.ones((4, 2)), np.zeros((4, 1))
    >>> H = ghess.HessianLinearOperator(model, ghess.MSELoss(reduction="sum"), theta, (X, y))
    >>> H.block("0.weight", "2.weight").shape
    (6, 3)
    """

    @staticmethod
    def _stored_bytes_per_sample(model, itemsize):
        return _engine.gradient_trace_bytes_per_sample(model, itemsize)

    def _trace(self, X, y):
        return _engine.gradient_trace(self.model, self._lparams, self.loss, X, y,
                                      self._scale, self._omp_threads)

    def _prepare_stored(self):
        return [self._trace(X, y) for X, y in self.data.chunks(self.chunk_size)]

    def _apply_rows(self, V):
        model, k, omp = self.model, V.shape[0], self._omp_threads
        tangents = _engine.prepare_tangents(model, V)
        out = self._new_output(k)
        accs = _engine.new_accumulators(model, k, self.dtype, out)
        traces = (self._stored if self.mode == "stored"
                  else (self._trace(X, y) for X, y in self.data.chunks(self.chunk_size)))
        for trace in traces:
            _engine.hvp_chunk(model, self._lparams, self.loss, tangents, trace, self._scale,
                              accs, k, omp)
        _engine.accumulators_to_flat(model, accs, out)
        return out
