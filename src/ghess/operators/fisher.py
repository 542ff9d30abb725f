"""The empirical Fisher: the uncentered covariance of the per-sample gradients."""

import numpy as np

from .. import _engine
from .base import CurvatureOperator

__all__ = ["EmpiricalFisherLinearOperator"]


class EmpiricalFisherLinearOperator(CurvatureOperator):
    r"""Empirical Fisher (uncentered gradient covariance) of a loss, as a ``LinearOperator``.

    With the loss :math:`L = c \sum_n \ell_n` (:math:`c` its reduction: ``1/N``
    for cross-entropy with ``reduction="mean"``, ``1/(N K)`` for the mean squared
    error and BCE, 1 for ``"sum"``; a ``factor`` multiplies every :math:`\ell_n`),

    .. math::

        F = c \sum_n \nabla_\theta \ell_n \, \nabla_\theta \ell_n^\top + \lambda I
          = c \sum_n J_n^\top g_n g_n^\top J_n + \lambda I,

    with :math:`g_n = \partial \ell_n / \partial z_n`: curvlinops' convention for
    its ``EFLinearOperator``. It is the GGN with the rank-one output-space matrix
    :math:`g_n g_n^\top` in place of the loss Hessian :math:`B_n`, and runs on the
    same stored factors: ``"stored"`` keeps each chunk's factors and :math:`g`
    (the bytes of the GGN's stored mode), and a product costs what a GGN product
    does. :math:`F` is symmetric positive semi-definite.

    Parameters are those of :class:`ghess.GGNLinearOperator`.

    Examples
    --------
    >>> import numpy as np, ghess
    >>> model = ghess.Sequential(ghess.Linear(3, 4), ghess.Tanh(), ghess.Linear(4, 2),
    ...                          input_shape=(3,))
    >>> theta = model.init_params(seed=0)
    >>> rng = np.random.default_rng(0)
    >>> X, y = rng.normal(size=(10, 3)), rng.integers(0, 2, size=10)
    >>> F = ghess.EmpiricalFisherLinearOperator(model, ghess.CrossEntropyLoss(), theta, (X, y))
    >>> value, grad = ghess.loss_and_grad(model, ghess.CrossEntropyLoss(), theta, (X, y))
    >>> bool(grad @ (F @ grad) >= 0)
    True
    """

    @staticmethod
    def _stored_bytes_per_sample(plan):
        # the factors, and g (n, K) where the GGN keeps the loss state (also K numbers)
        return plan.stored_factor_bytes

    def _chunk_state(self, X, y):
        """Return the chunk's stored factors, with its scaled output gradients."""
        ctxs, r = self._recompute_state(X, y)
        return self._jacobian_factors(X, ctxs, r)

    def _recompute_state(self, X, y):
        """Return the chunk's forward contexts and ``c dl/dz`` (n, K)."""
        p = self.problem
        ctxs, z = _engine.checked_forward(self.model, p.lparams, X, 1, p.omp_threads)
        _, r, _ = _engine.checked_loss(self.loss, z, y, p.scale, p.omp_threads)
        return ctxs, r

    def _rank_one(self, r, Jv):
        """Return ``c g (g . J v)`` per sample and direction, from ``r = scale * dl/dz``.

        ``Loss.scale`` is ``factor / normaliser`` and each per-sample loss carries
        ``factor``: with g = factor dl/dz and c = 1 / normaliser, ``c g g^T`` is
        ``(factor / scale) r r^T``.
        """
        s = np.einsum("nk,njk->nj", r, Jv)
        return (self.loss.factor / self.problem.scale) * (s[:, :, None] * r[:, None, :])

    def _chunk_product(self, state, tangents, accs, k):
        p, model = self.problem, self.model
        if isinstance(state, tuple):  # recompute mode: passes
            ctxs, r = state
            Jv = _engine.jvp_chunk(model, p.lparams, tangents, ctxs, k, p.omp_threads)
            _engine.vjp_chunk(model, p.lparams, ctxs, self._rank_one(r, Jv), accs,
                              p.omp_threads)
        else:
            Jv = _engine.factor_jvp(model, p.lparams, tangents, state, k, p.omp_threads)
            _engine.factor_vjp(model, state, self._rank_one(state.loss_state, Jv), accs,
                               p.omp_threads)
