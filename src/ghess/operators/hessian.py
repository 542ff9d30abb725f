"""The exact Hessian operator (Pearlmutter's R-operator)."""

from .. import _engine
from .base import CurvatureOperator

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
    def _stored_bytes_per_sample(plan):
        return plan.trace_bytes

    def _chunk_state(self, X, y):
        """Return the chunk's gradient trace: all of it that does not depend on v."""
        p = self.problem
        return _engine.gradient_trace(self.model, p.lparams, self.loss, X, y, p.scale,
                                      p.omp_threads)

    def _chunk_product(self, trace, tangents, accs, k):
        p = self.problem
        _engine.hvp_chunk(self.model, p.lparams, self.loss, tangents, trace, p.scale, accs, k,
                          p.omp_threads)
