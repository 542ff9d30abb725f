"""Fisher matrices: the empirical Fisher and the Monte-Carlo Fisher.

Both are GGNs whose output-space matrix is a sum of outer products,
``sum_m w_nm w_nm^T`` for each sample n: the empirical Fisher's one column is
the scaled gradient of the loss at the true target, the Monte-Carlo Fisher's
``mc_samples`` columns are gradients at targets drawn from the model's
predictive distribution. They run on the GGN's stored factors, with the
columns ``W`` (n, m, K), or their Gram matrix, kept where the GGN keeps the loss
state.
"""

import numpy as np

from .. import _engine
from .._problem import check_loss, check_model
from .._validation import check_positive_int
from .base import CurvatureOperator
from .ggn import _ForwardState

__all__ = ["EmpiricalFisherLinearOperator", "FisherMCLinearOperator", "empirical_columns",
           "mc_columns", "type2_columns", "check_seed"]


class _LowRankOutputOperator(CurvatureOperator):
    """``sum_n J_n^T (sum_m w_nm w_nm^T) J_n``: subclasses give the columns (``_columns``)."""

    #: columns per sample (``_columns``' m)
    _n_columns = 1

    def _columns(self, z, y):
        """Return W (n, m, K) for the chunk's outputs z and targets y."""
        raise NotImplementedError

    @classmethod
    def _stored_bytes_per_sample(cls, plan):
        return _low_rank_bytes(plan, cls._n_columns)

    def _chunk_state(self, X, y):
        """Return the chunk's stored factors, with its columns as their loss state."""
        forward = self._recompute_state(X, y)
        return self._jacobian_factors(X, forward.ctxs, forward.loss_state)

    def _recompute_state(self, X, y):
        p = self.problem
        ctxs, z = _engine.checked_forward(self.model, p.lparams, X, 1, p.omp_threads)
        # the GGN's recompute state, the kept columns in place of the loss state
        return _ForwardState(ctxs, _output_matrix(self._columns(z, y)))

    def _chunk_product(self, state, tangents, accs, k):
        p, model = self.problem, self.model
        if isinstance(state, _ForwardState):  # recompute mode: passes
            Jv = _engine.jvp_chunk(model, p.lparams, tangents, state.ctxs, k, p.omp_threads)
            u = _low_rank_apply(state.loss_state, Jv)
            _engine.vjp_chunk(model, p.lparams, state.ctxs, u, accs, p.omp_threads)
        else:
            Jv = _engine.factor_jvp(model, p.lparams, tangents, state, k, p.omp_threads)
            _engine.factor_vjp(model, state, _low_rank_apply(state.loss_state, Jv), accs,
                               p.omp_threads)


def _output_matrix(W):
    """Return what a chunk keeps of its columns W (n, m, K).

    W itself, or ``W^T W`` (n, K, K) when that is smaller (more columns than outputs).
    """
    if W.shape[1] <= W.shape[2]:
        return {"columns": W}
    return {"gram": np.matmul(W.transpose(0, 2, 1), W)}


def _low_rank_bytes(plan, m):
    """Return the stored bytes per sample for m columns.

    The GGN's factors, with min(m, K) rows of K numbers where it keeps its loss state.
    """
    K = plan.loss_state_bytes // plan.itemsize
    return plan.stored_factor_bytes + (min(m, K) - 1) * plan.loss_state_bytes


def _low_rank_apply(kept, Jv):
    """Return ``sum_m w_m (w_m . J v)`` per sample and direction: (n, k, K)."""
    if "gram" in kept:
        return np.matmul(Jv, kept["gram"])
    W = kept["columns"]
    return np.matmul(np.matmul(Jv, W.transpose(0, 2, 1)), W)


class EmpiricalFisherLinearOperator(_LowRankOutputOperator):
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

    def _columns(self, z, y):
        p = self.problem
        return empirical_columns(self.loss, z, y, p.scale, p.omp_threads)


class FisherMCLinearOperator(_LowRankOutputOperator):
    r"""Monte-Carlo Fisher of a loss, as a ``LinearOperator``.

    .. math::

        F = \sum_n J_n^\top \Big( \frac{1}{M} \sum_{m=1}^{M}
            \tilde g_{nm} \tilde g_{nm}^\top \Big) J_n + \lambda I,
        \qquad \tilde g_{nm} = \sqrt{c}\, \partial \ell(z_n, \tilde y_{nm}) / \partial z_n,

    with :math:`M` = ``mc_samples`` targets :math:`\tilde y_{nm}` drawn from the
    model's predictive distribution at :math:`z_n` (categorical for
    cross-entropy, Bernoulli for BCE, Gaussian with variance 1/2 for the squared
    error, whose negative log-likelihoods the losses are) and :math:`c` the loss's
    scale (reduction and ``factor``), as the GGN's. Its expectation is the GGN,
    so it converges to it as ``mc_samples`` grows (curvlinops'
    ``FisherMCLinearOperator``).

    The targets come from ``numpy.random.default_rng(seed)``, sample by sample in
    data order: the same seed gives the same operator in both modes and for any
    chunk size (``"recompute"`` draws the same targets again for every product).
    ``"stored"`` keeps the GGN's factors and the :math:`M` columns, or their
    :math:`K \times K` Gram matrix when :math:`M > K` (:math:`\min(M, K) K` numbers
    per sample where the GGN keeps :math:`K`): a product then costs what a GGN
    product does, whatever ``mc_samples``.

    Parameters
    ----------
    model, loss, params, data
        As for :class:`ghess.GGNLinearOperator`.
    mc_samples : int, default=1
        Targets drawn per sample.
    seed : int, default=0
        Seed of the draws.
    damping, mode, chunk_size, memory_budget, n_threads, check_deterministic, comm
        As for :class:`ghess.GGNLinearOperator`. With ``comm`` each rank skips the
        draws of the samples on the ranks before it: the operator is the one that
        a single process builds on the concatenated shards.

    Examples
    --------
    >>> import numpy as np, ghess
    >>> model = ghess.Sequential(ghess.Linear(3, 4), ghess.Tanh(), ghess.Linear(4, 2),
    ...                          input_shape=(3,))
    >>> theta = model.init_params(seed=0)
    >>> rng = np.random.default_rng(0)
    >>> X, y = rng.normal(size=(10, 3)), rng.integers(0, 2, size=10)
    >>> F = ghess.FisherMCLinearOperator(model, ghess.CrossEntropyLoss(), theta, (X, y),
    ...                                  mc_samples=4, seed=1)
    >>> v = np.ones(F.shape[0])
    >>> bool(np.array_equal(F @ v, ghess.FisherMCLinearOperator(
    ...     model, ghess.CrossEntropyLoss(), theta, (X, y), mc_samples=4, seed=1) @ v))
    True
    """

    #: the draws follow the data's order: chunk by chunk from one generator
    _chunks_in_any_order = False

    def __init__(self, model, loss, params, data, *, mc_samples=1, seed=0, **kwargs):
        self.mc_samples = check_positive_int(mc_samples, "mc_samples")
        self.seed = check_seed(seed)
        check_skippable_draws(loss, model, kwargs.get("comm"))
        self._n_columns = self.mc_samples
        self._rng = None
        super().__init__(model, loss, params, data, **kwargs)

    @classmethod
    def memory_required(cls, model, data, mode="stored", *, mc_samples=1, **kwargs):
        """As :meth:`ghess.GGNLinearOperator.memory_required`, for ``mc_samples`` draws."""
        return super().memory_required(model, data, mode, mc_samples=mc_samples, **kwargs)

    def _stored_bytes_per_sample(self, plan):
        return _low_rank_bytes(plan, self._n_columns)

    def _chunk_states(self):
        self._rng = None  # the same draws for every pass
        return super()._chunk_states()

    def _columns(self, z, y):
        p = self.problem
        if self._rng is None:
            self._rng = target_stream(self.seed, p, self.mc_samples)
        return mc_columns(self.loss, z, p.scale, self._rng, self.mc_samples, p.omp_threads)


# -- output-space columns W (n, m, K), sum_m w w^T per sample -------------------------
# ``Loss.value_grad`` returns r = scale * dl/dz with scale = factor / normaliser.

def empirical_columns(loss, z, y, scale, n_threads):
    """``sqrt(c) g_n`` (n, 1, K) with g = factor dl/dz and c = 1 / normaliser.

    Each per-sample loss carries ``factor``, so ``c g g^T = (factor / scale) r r^T``
    (curvlinops' empirical Fisher).
    """
    _, r, _ = _engine.checked_loss(loss, z, y, scale, n_threads)
    return (np.sqrt(loss.factor / scale) * r)[:, None, :].astype(r.dtype)


def mc_columns(loss, z, scale, rng, n_draws, n_threads):
    """``sqrt(scale / M) dl(z, y~)/dz`` (n, M, K) for M targets y~ drawn at z from ``rng``."""
    draws = loss.sample_targets(z, rng, n_draws)
    W = np.empty((z.shape[0], n_draws, z.shape[1]), dtype=z.dtype)
    for m in range(n_draws):
        _, r, _ = _engine.checked_loss(loss, z, np.ascontiguousarray(draws[m]), scale,
                                       n_threads)
        W[:, m] = r
    W *= 1.0 / np.sqrt(scale * n_draws)
    return W


def type2_columns(loss, z, y, scale, n_threads):
    """Return the columns of a square root S of ``scale * B_n``: (n, K, K), sum s s^T = B."""
    _, _, state = _engine.checked_loss(loss, z, y, scale, n_threads)
    return np.ascontiguousarray(loss.hessian_sqrt(state, z, scale).transpose(0, 2, 1))


def target_stream(seed, problem, n_draws):
    """``numpy.random.default_rng(seed)`` at the draws of ``problem``'s first sample.

    With a ``comm``, a rank skips the draws of the samples on the ranks before
    it (``Loss.random_draws_per_target`` each), so the ranks draw the targets
    that one process draws on the concatenated data.
    """
    rng = np.random.default_rng(seed)
    if problem.comm is not None:  # asked on every rank: a loss without it fails on all
        per_sample = n_draws * problem.loss.random_draws_per_target(problem.model.n_outputs)
        rng.bit_generator.advance(problem.first_sample * per_sample)
    return rng


def check_skippable_draws(loss, model, comm):
    """Before any collective: with ``comm`` the loss must say what a target draws.

    Raised here, on every rank alike, and not at the first draw, which a rank with
    an empty shard never makes (it would wait for the others in a collective).
    """
    if comm is not None:
        check_loss(loss).random_draws_per_target(check_model(model).n_outputs)


def check_seed(seed):
    """Return ``seed`` as an int >= 0, else ValueError."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) \
            or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return int(seed)
