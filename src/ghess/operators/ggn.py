"""The generalized Gauss-Newton operator."""

import numpy as np

from .. import _engine
from .base import CurvatureOperator

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
    damping : float or ndarray of shape (n_params,), default=0.0
        Added multiple of the identity, or a diagonal (e.g. an L2 term on the
        weights only: ``alpha * model.parameter_mask("weight")``).
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
        Samples per chunk; by default about 64 MiB of temporaries per thread
        (at least 16 samples per thread), 128 MiB for a network without
        convolutions (at least 16 samples).
    memory_budget : int, optional
        Bytes the stored factors may take; default a quarter of the memory this
        process may use (physical memory within its RLIMIT_AS and cgroup limit), at
        most 4 GiB. A budget above that limit warns.
    n_threads : int, optional
        Threads for the OpenMP kernels and BLAS; default OpenMP's default.
    check_deterministic : bool, default=True
        A re-iterable ``data`` that is not a list or tuple (a ``DataLoader``) is
        read twice and refused if the passes differ (a shuffling loader).
    comm : mpi4py communicator, optional
        Data-parallel: ``data`` is this rank's shard (shards may differ in size,
        one may be empty), and every product is the whole data's, summed over the
        ranks in rank order: the same bits on every rank, so SciPy's solvers run
        unchanged on each (``docs/design.md``, "MPI"). The ranks must pass the same
        model, loss and parameters (checked before any work).

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
    def _stored_bytes_per_sample(plan):
        return plan.stored_factor_bytes

    def _chunk_state(self, X, y):
        """Return the chunk's stored factors, with the loss state B needs."""
        forward = self._recompute_state(X, y)
        return self._jacobian_factors(X, forward.ctxs, forward.loss_state)

    def _recompute_state(self, X, y):
        """Return the chunk's forward contexts and loss state (passes cost less than factors)."""
        p = self.problem
        ctxs, z = _engine.checked_forward(self.model, p.lparams, X, 1, p.omp_threads)
        _, _, state = _engine.checked_loss(self.loss, z, y, p.scale, p.omp_threads)
        return _ForwardState(ctxs, state)

    def _chunk_product(self, state, tangents, accs, k):
        p, model = self.problem, self.model
        if isinstance(state, _ForwardState):  # J v, B J v, J^T B J v by passes
            Jv = _engine.jvp_chunk(model, p.lparams, tangents, state.ctxs, k, p.omp_threads)
            u = np.empty_like(Jv)
            self.loss.hessian_apply(state.loss_state, Jv, p.scale, u, p.omp_threads)
            _engine.vjp_chunk(model, p.lparams, state.ctxs, u, accs, p.omp_threads)
        else:
            _engine.factor_ggn(model, p.lparams, self.loss, p.scale, tangents, state, accs, k,
                               p.omp_threads)


class _ForwardState:
    """A chunk's forward contexts and loss state (recompute mode)."""

    __slots__ = ("ctxs", "loss_state")

    def __init__(self, ctxs, loss_state):
        self.ctxs = ctxs
        self.loss_state = loss_state
