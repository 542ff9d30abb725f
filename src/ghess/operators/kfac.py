"""KFAC: the Kronecker-factored approximation of the GGN or Fisher, and its inverse."""

from __future__ import annotations

import numpy as np
from scipy.sparse.linalg import LinearOperator

from .._config import computing
from .._distributed import sum_all_in_rank_order
from .._engine.kfac import ekfac_chunk, kfac_chunk, kronecker_layers
from .._kernels import dense
from .._parallel import run_workers, worker_runs
from .._problem import Problem, check_loss, default_memory_budget, format_bytes
from .._validation import check_damping, check_positive_int
from .base import BLOCK_COLUMNS, BatchedMatvec, check_vectors
from .fisher import (
    check_seed,
    check_skippable_draws,
    empirical_columns,
    mc_columns,
    target_stream,
    type2_columns,
)

__all__ = ["KFACLinearOperator", "KFACInverseLinearOperator", "EKFACLinearOperator"]

FISHER_TYPES = ("type-2", "mc", "empirical")
KFAC_APPROX = ("expand", "reduce")


def _sandwich(L, M, R, n_threads, scale=None):
    """Return ``L (M_k R) `` for each direction k of M (k, n, d), or with ``scale``
    ``L ((L^T M_k R) * scale) R^T`` (a product in an eigenbasis), by threaded GEMMs."""  # noqa: D205, D209
    out = np.empty(M.shape, dtype=M.dtype)
    right = np.empty((M.shape[1], R.shape[1]), dtype=M.dtype)
    for k in range(M.shape[0]):
        Mk = np.ascontiguousarray(M[k])
        if scale is not None:  # rotate into the basis, scale, and rotate back
            left = np.empty((L.shape[1], Mk.shape[1]), dtype=M.dtype)
            dense.gemm_rowmajor(True, False, 1.0, L, Mk, 0.0, left, n_threads)
            dense.gemm_rowmajor(False, False, 1.0, left, R, 0.0, right, n_threads)
            right *= scale
            dense.gemm_rowmajor(False, False, 1.0, L, right, 0.0, left, n_threads)
            dense.gemm_rowmajor(False, True, 1.0, left, R, 0.0, out[k], n_threads)
        else:
            dense.gemm_rowmajor(False, False, 1.0, Mk, R, 0.0, right, n_threads)
            dense.gemm_rowmajor(False, False, 1.0, L, right, 0.0, out[k], n_threads)
    return out


def _sandwich_null(Qb, M, Qr, scale, null_scale, n_threads):
    """``_sandwich(Qb, M, Q_A, n_threads, scale)`` where the columns of Q_A outside ``Qr``
    span A's null space and every entry of ``scale`` in those columns is ``null_scale``:
    ``(Qb ((Qb^T M_k Qr) * scale) - M_k Qr null_scale) Qr^T + M_k null_scale``, by GEMMs
    over ``r = Qr.shape[1]`` columns instead of all ``d_in``."""  # noqa: D205, D209
    out = np.empty(M.shape, dtype=M.dtype)
    n_out, r = M.shape[1], Qr.shape[1]
    P, left, T = (np.empty((n_out, r), dtype=M.dtype) for _ in range(3))
    for k in range(M.shape[0]):
        Mk = np.ascontiguousarray(M[k])
        dense.gemm_rowmajor(False, False, 1.0, Mk, Qr, 0.0, P, n_threads)
        dense.gemm_rowmajor(True, False, 1.0, Qb, P, 0.0, left, n_threads)
        left *= scale
        np.multiply(P, -null_scale, out=T)
        dense.gemm_rowmajor(False, False, 1.0, Qb, left, 1.0, T, n_threads)
        np.multiply(Mk, null_scale, out=out[k])
        dense.gemm_rowmajor(False, True, 1.0, T, Qr, 1.0, out[k], n_threads)
    return out


class _FactoredOperator(BatchedMatvec, LinearOperator):
    """A symmetric operator applied block by block from KFAC's factors (``_apply_rows``)."""

    def _apply_rows(self, V):
        raise NotImplementedError

    def _matmat(self, X):
        V = check_vectors(X, self.shape[1], self.dtype)
        if V.shape[0] == 0:  # no columns: an empty result, as SciPy's operators give
            return np.zeros((self.shape[0], 0), dtype=self.dtype)
        with computing():
            return self._apply_rows(V).T

    def _adjoint(self):
        return self

    _transpose = _adjoint


class KFACLinearOperator(_FactoredOperator):
    r"""Kronecker-factored approximate curvature (KFAC) of the GGN or Fisher.

    Each Linear or Conv2d layer's block of the curvature is approximated by a
    Kronecker product :math:`B \otimes A` (the weight flattened in PyTorch's
    row-major order); other blocks are zero. With :math:`a` a layer's input
    (for a convolution: its unfolded patches, one per output pixel, KFC) and
    :math:`g` the gradient at its output back-propagated from output columns
    :math:`s` of each sample,

    .. math::

        A = \frac{1}{N T} \sum_{n,t} a_{nt} a_{nt}^\top, \qquad
        B = \sum_{n,t} \sum_{s} g_{nts} g_{nts}^\top

    (``kfac_approx="expand"``; :math:`T` the output pixels, 1 for Linear), or with
    :math:`a` averaged and :math:`g` summed over the pixels (``"reduce"``,
    :math:`T = 1`). The columns :math:`s` set what is approximated:
    ``fisher_type="type-2"`` a square root of the loss Hessian :math:`B_n` (the
    GGN), ``"mc"`` ``mc_samples`` gradients at targets drawn from the model
    (:class:`ghess.FisherMCLinearOperator`), ``"empirical"`` the gradient at the
    true target (:class:`ghess.EmpiricalFisherLinearOperator`); each scaled by the
    loss's reduction as those operators are. These are curvlinops' conventions
    (its ``KFACLinearOperator``): the matrices agree. The bias's block is
    :math:`B` (``separate_weight_and_bias=True``), or the bias joins the weight
    as a column of ones in :math:`a`.

    One pass over the data builds every factor: a forward pass per chunk, and
    one backward pass of its columns (as the stored GGN factors are built).
    Products then cost two small GEMMs per layer; :meth:`inverse` inverts
    through the factors' eigendecompositions.

    Parameters
    ----------
    model, loss, params, data
        As for :class:`ghess.GGNLinearOperator`. Every parametrised layer must
        be Linear or Conv2d (others have no Kronecker factors: ValueError).
    fisher_type : {"type-2", "mc", "empirical"}, default="type-2"
    kfac_approx : {"expand", "reduce"}, default="expand"
    mc_samples : int, default=1
        Targets drawn per sample for ``"mc"`` (1 for the others).
    seed : int, default=0
        Seed of the draws (``numpy.random.default_rng``), sample by sample.
    separate_weight_and_bias : bool, default=True
    damping : float, default=0.0
        Added multiple of the identity.
    chunk_size, n_threads, check_deterministic
        As for :class:`ghess.GGNLinearOperator`.
    comm : mpi4py communicator, optional
        ``data`` is this rank's shard: the factors are summed over the ranks (in
        rank order, bit-identical on every rank) and ``"mc"`` draws what one
        process draws on the concatenated shards.

    Attributes
    ----------
    input_factors, gradient_factors : dict
        :math:`A` and :math:`B` per layer index.
    trace, logdet, det, frobenius_norm : float
        From the factors' eigenvalues, damping included (curvlinops' properties).
    """

    def __init__(self, model, loss, params, data, *, fisher_type="type-2",
                 kfac_approx="expand", mc_samples=1, seed=0, separate_weight_and_bias=True,
                 damping=0.0, chunk_size=None, n_threads=None, check_deterministic=True,
                 comm=None):
        check_loss(loss)
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
        if kfac_approx not in KFAC_APPROX:
            raise ValueError(f"kfac_approx must be one of {KFAC_APPROX}, got {kfac_approx!r}")
        self.mc_samples = check_positive_int(mc_samples, "mc_samples")
        if fisher_type != "mc" and self.mc_samples != 1:
            raise ValueError(f"mc_samples must be 1 for fisher_type={fisher_type!r} (it counts "
                             f"the Monte-Carlo draws of 'mc'), got {mc_samples}")
        self.seed = check_seed(seed)
        if fisher_type == "mc":
            check_skippable_draws(loss, model, comm)
        self.layers = kronecker_layers(model)
        problem = Problem(model, loss, params, data, chunk_size=chunk_size,
                          n_threads=n_threads, private=True,
                          check_deterministic=check_deterministic, comm=comm)
        damping = check_damping(damping, model.n_params, problem.dtype)
        if np.ndim(damping):
            raise ValueError("KFACLinearOperator takes a scalar damping")
        self.damping = float(damping)
        self.fisher_type, self.kfac_approx = fisher_type, kfac_approx
        self.separate_weight_and_bias = bool(separate_weight_and_bias)
        self.problem, self.model, self.loss = problem, model, problem.loss
        self.n_samples, self.comm = problem.n_samples, problem.comm
        super().__init__(dtype=problem.dtype, shape=(model.n_params, model.n_params))
        self.joint = {i for i in self.layers
                      if not self.separate_weight_and_bias and model.layers[i].bias}
        self.input_factors, self.gradient_factors = self._build()
        self._eigen = None

    # -- the factors --------------------------------------------------------------
    def _columns_fn(self, rng):
        p, loss = self.problem, self.loss
        if self.fisher_type == "type-2":
            return lambda z, y: type2_columns(loss, z, y, p.scale, p.omp_threads)
        if self.fisher_type == "empirical":
            return lambda z, y: empirical_columns(loss, z, y, p.scale, p.omp_threads)
        return lambda z, y: mc_columns(loss, z, p.scale, rng, self.mc_samples, p.omp_threads)

    def _new_factor_sums(self):
        A, B = {}, {}
        for i in self.layers:
            n_out, d_in = self._weight_shape(i)
            A[i] = np.zeros((d_in + (i in self.joint),) * 2, dtype=self.dtype)
            B[i] = np.zeros((n_out, n_out), dtype=self.dtype)
        return A, B

    def _build(self):
        model, p = self.model, self.problem
        columns = self._columns_fn(self._target_stream())
        chunks = list(p.chunks())
        # the Monte-Carlo draws go chunk by chunk through one generator: in turn
        threads = 1 if self.fisher_type == "mc" else p.omp_threads
        runs = worker_runs(len(chunks), threads)

        def run(w):  # a worker's chunks in turn, into its own sums
            A, B = self._new_factor_sums()
            for i in runs[w]:
                X, y = chunks[i]
                kfac_chunk(model, p.lparams, self.layers, X, lambda z: columns(z, y),  # noqa: B023
                           self.kfac_approx, self.joint, A, B, p.omp_threads)
            return A, B

        with computing():
            parts = run_workers(len(runs), run)
        A, B = parts[0]
        for A_w, B_w in parts[1:]:  # in worker order: the same bits on every build
            for i in self.layers:
                A[i] += A_w[i]
                B[i] += B_w[i]
        if self.comm is not None:  # the sums over every rank's samples, in one reduction
            summed = sum_all_in_rank_order(self.comm, [*A.values(), *B.values()])
            A, B = dict(zip(A, summed[:len(A)])), dict(zip(B, summed[len(A):]))
        for i in self.layers:
            positions = (model.layers[i].kfac_positions() if self.kfac_approx == "expand"
                         else 1)
            A[i] /= p.n_global * positions
        return A, B

    def _target_stream(self):
        """Return the generator of ``"mc"``'s draws at this rank's first sample, else None."""
        if self.fisher_type != "mc":
            return None
        return target_stream(self.seed, self.problem, self.mc_samples)

    def _weight_shape(self, i):
        """(n_out, d_in): the weight as a matrix (a convolution's patches flattened)."""
        return self.model.layers[i].kfac_weight_shape()

    # -- products ------------------------------------------------------------------
    def _apply_blocks(self, V, weight_op, bias_op):
        """Apply per-layer maps to the rows of V (k, n_params); zero elsewhere."""
        out = np.zeros_like(V)
        k = V.shape[0]
        for i in self.layers:
            start, stop = self.model.layer_range(i)
            n_out, d_in = self._weight_shape(i)
            n_w = n_out * d_in
            W = V[:, start:start + n_w].reshape(k, n_out, d_in)
            has_bias = stop - start > n_w
            if i in self.joint:
                M = np.concatenate([W, V[:, start + n_w:stop, None]], axis=2)
                R = weight_op(i, M)
                out[:, start:start + n_w] = R[:, :, :d_in].reshape(k, -1)
                out[:, start + n_w:stop] = R[:, :, d_in]
            else:
                out[:, start:start + n_w] = weight_op(i, W).reshape(k, -1)
                if has_bias:
                    out[:, start + n_w:stop] = bias_op(i, V[:, start + n_w:stop])
        return out

    def _apply_rows(self, V):
        A, B = self.input_factors, self.gradient_factors
        t = self.problem.omp_threads
        out = self._apply_blocks(V, lambda i, M: _sandwich(B[i], M, A[i], t),
                                 lambda i, b: b @ B[i])
        if self.damping:
            out += self.damping * V
        return out

    def todense(self):
        """Return the dense matrix (n_params x n_params), BLOCK_COLUMNS unit vectors per pass."""
        n = self.shape[0]
        size = n * n * self.dtype.itemsize
        if size > default_memory_budget():
            raise ValueError(f"todense needs {format_bytes(size)}, over the default memory "
                             f"budget of {format_bytes(default_memory_budget())}; KFAC's "
                             "blocks are input_factors and gradient_factors")
        out = np.empty((n, n), dtype=self.dtype)
        for start in range(0, n, BLOCK_COLUMNS):
            stop = min(start + BLOCK_COLUMNS, n)
            E = np.zeros((stop - start, n), dtype=self.dtype)
            E[np.arange(stop - start), np.arange(start, stop)] = 1
            out[:, start:stop] = self._apply_rows(E).T
        return out

    def eigendecompositions(self):
        """Per layer index, ``((l_A, Q_A), (l_B, Q_B))`` of the factors, in float64.

        Computed once and kept: every :meth:`inverse` (any damping) reuses them.
        Eigenvalues below zero from rounding are set to zero (the factors are PSD).
        """
        if self._eigen is None:
            self._eigen = {}
            for i in self.layers:
                # float64 whatever the dtype: a damping far below the factors' scale is
                # ill-conditioned in float32 but not in float64
                la, Qa = np.linalg.eigh(self.input_factors[i].astype(np.float64))
                lb, Qb = np.linalg.eigh(self.gradient_factors[i].astype(np.float64))
                self._eigen[i] = ((np.maximum(la, 0), Qa), (np.maximum(lb, 0), Qb))
        return self._eigen

    def _block_eigenvalues(self):
        """Per layer: the eigenvalues of its weight block (n_out, d_in) and bias block
        (n_out,), in the Kronecker eigenbasis: ``l_B l_A^T`` and ``l_B``."""  # noqa: D205, D209
        return {i: (np.outer(lb, la), lb)
                for i, ((la, _), (lb, _)) in self.eigendecompositions().items()}

    def _eigenvalues(self):
        """All eigenvalues of the (damped) operator, float64: the blocks', plus the damping."""
        parts = []
        for i, (weight, bias) in self._block_eigenvalues().items():
            parts.append(weight.ravel())
            if bias is not None and i not in self.joint and self.model.layers[i].bias:
                parts.append(bias)
        return np.concatenate(parts) + self.damping

    @property
    def trace(self) -> float:
        """Trace, damping included, from the blocks' eigenvalues (no dense matrix)."""
        return float(self._eigenvalues().sum())

    @property
    def frobenius_norm(self) -> float:
        """Frobenius norm, damping included, from the blocks' eigenvalues."""
        return float(np.sqrt((self._eigenvalues() ** 2).sum()))

    @property
    def logdet(self) -> float:
        """Log-determinant, damping included (-inf when singular), from the eigenvalues."""
        values = self._eigenvalues()
        with np.errstate(divide="ignore"):
            return float(np.log(values).sum()) if values.min() >= 0 else float("nan")

    @property
    def det(self) -> float:
        """Determinant, ``exp(logdet)`` (it overflows or underflows easily: prefer logdet)."""
        with np.errstate(over="ignore"):
            return float(np.exp(self.logdet))

    def inverse(self, damping=None, *, strategy="exact"):
        """Return ``(KFAC + damping I)^-1`` (``strategy="exact"``) as a ``LinearOperator``.

        ``damping`` defaults to the operator's own. ``"heuristic"`` inverts
        ``(A + pi sqrt(d) I) (x) (B + sqrt(d) / pi I)`` instead, pi the ratio of the
        factors' mean eigenvalues (Martens and Grosse's factored damping, curvlinops'
        ``use_heuristic_damping``). Either way through the factors'
        eigendecompositions, computed here once.
        """
        return KFACInverseLinearOperator(self, self.damping if damping is None else damping,
                                         strategy=strategy)


class KFACInverseLinearOperator(_FactoredOperator):
    """The inverse of a damped :class:`KFACLinearOperator` (see its ``inverse``)."""

    def __init__(self, kfac, damping, *, strategy="exact"):
        if strategy not in ("exact", "heuristic"):
            raise ValueError(f"strategy must be 'exact' or 'heuristic', got {strategy!r}")
        damping = float(check_damping(damping, kfac.shape[0], kfac.dtype))
        if damping <= 0 and strategy == "heuristic":
            raise ValueError(f"the heuristic damping needs damping > 0, got {damping}")
        self.kfac, self.damping, self.strategy = kfac, damping, strategy
        super().__init__(dtype=kfac.dtype, shape=kfac.shape)
        self._eigen = {}
        eigenvalues = kfac._block_eigenvalues()
        # KFAC's exact inverse: its weight block's eigenvalues are l_B l_A^T + damping
        exact_kfac = (strategy == "exact" and damping > 0
                      and not isinstance(kfac, EKFACLinearOperator))
        for i, ((la, Qa), (lb, Qb)) in kfac.eigendecompositions().items():
            weight, bias = eigenvalues[i]
            # the bias's block (B alone in KFAC) is damped exactly; none: a placeholder
            bias = (lb if bias is None else bias) + damping
            if strategy == "heuristic":
                if isinstance(kfac, EKFACLinearOperator):
                    raise ValueError("EKFAC's inverse takes strategy='exact' only: its "
                                     "eigenvalues are not a product of the factors'")
                pi = np.sqrt((la.mean() + 1e-300) / (lb.mean() + 1e-300))
                weight = np.outer(lb + np.sqrt(damping) / pi, la + pi * np.sqrt(damping))
            else:
                weight = weight + damping
            for block in (weight, bias):  # singular to rounding
                if block.min() <= block.size * np.finfo(np.float64).eps * block.max():
                    raise ValueError(f"KFAC's block of layer {i} plus damping={damping:g} is "
                                     "singular to rounding: pass a larger damping")
            dtype = kfac.dtype
            kept = self._input_range(la) if exact_kfac else None
            if kept is not None:  # A's null space: B l_A + d is d there, exactly
                Qa, weight = Qa[:, kept], weight[:, kept]
            # C order for the GEMM wrapper (a boolean column selection is not)
            self._eigen[i] = (np.ascontiguousarray(Qa, dtype=dtype), Qb.astype(dtype),
                              (1.0 / weight).astype(dtype), (1.0 / bias).astype(dtype),
                              kept is not None)

    @staticmethod
    def _input_range(la):
        """Return the input factor's eigenvectors outside its null space (None: all).

        An eigenvalue within ``d_in`` ulp of the largest is zero to the accuracy of the
        eigendecomposition (a factor summed from fewer vectors than its size, as on a
        subsample, has such a null space); in those directions the damped block is the
        damping alone, so the inverse product runs its GEMMs over the other ``r``
        columns only (``_sandwich_null``), when ``r`` is below 90% of ``d_in``.
        """
        kept = la > la.size * np.finfo(np.float64).eps * la.max()
        return kept if 0 < kept.sum() < 0.9 * la.size else None

    def _apply_rows(self, V):
        def weight_op(i, M):
            Qa, Qb, inv_w, _, null = self._eigen[i]
            if null:
                return _sandwich_null(Qb, M, Qa, inv_w, M.dtype.type(1.0 / self.damping),
                                      self.kfac.problem.omp_threads)
            return _sandwich(Qb, M, Qa, self.kfac.problem.omp_threads, inv_w)

        def bias_op(i, b):
            _, Qb, _, inv_b, _ = self._eigen[i]
            return ((b @ Qb) * inv_b) @ Qb.T

        return self.kfac._apply_blocks(V, weight_op, bias_op)


class EKFACLinearOperator(KFACLinearOperator):
    r"""Eigenvalue-corrected KFAC (George et al., 2018), with curvlinops' conventions.

    KFAC's Kronecker eigenbasis :math:`Q_B \otimes Q_A` per layer, with the
    eigenvalues replaced by the second moments of the per-sample gradients in
    that basis:

    .. math::

        E = \sum_{n,s} \big( Q_B^\top G_{ns} Q_A \big)^{\odot 2}, \qquad
        G_{ns} = \sum_t g_{nst} a_{nt}^\top,

    the sum over the samples n and output columns s of the gradients whose outer
    products KFAC's :math:`B` sums (:class:`ghess.KFACLinearOperator`), the
    weight gradient summed over the positions t; the bias's block likewise, in
    :math:`Q_B`. The operator is :math:`(Q_B \otimes Q_A)\, \mathrm{diag}(E)\,
    (Q_B \otimes Q_A)^\top` per layer, which matches the exact block's diagonal
    in that basis. A second pass over the data (a forward and a backward pass of
    the columns per chunk, the draws of ``"mc"`` repeated) computes :math:`E`;
    :meth:`inverse` is exact: ``(EKFAC + damping I)^-1``.

    Parameters and attributes are :class:`ghess.KFACLinearOperator`'s, and
    ``corrected_eigenvalues``: per layer ``{"weight": (n_out, d_in), "bias": (n_out,)}``
    (a joint bias: the last column of the weight's).
    """

    def __init__(self, model, loss, params, data, **kwargs):
        super().__init__(model, loss, params, data, **kwargs)
        self.corrected_eigenvalues = self._correct()
        self._in_dtype = None

    def _correct(self):
        model, p = self.model, self.problem
        bases, E = {}, {}
        for i, ((_, Qa), (_, Qb)) in self.eigendecompositions().items():
            bases[i] = (Qa.astype(self.dtype), Qb.astype(self.dtype))
            n_out, d_in = self._weight_shape(i)
            E[i] = {"weight": np.zeros((n_out, d_in + (i in self.joint)))}
            if model.layers[i].bias and i not in self.joint:
                E[i]["bias"] = np.zeros(n_out)
        columns = self._columns_fn(self._target_stream())  # KFAC's draws again
        with computing():
            for X, y in p.chunks():
                ekfac_chunk(model, p.lparams, self.layers, X,
                            lambda z: columns(z, y),  # noqa: B023
                            self.joint, bases, E, p.omp_threads)
        parts = [(i, name) for i in E for name in E[i]]
        summed = sum_all_in_rank_order(self.comm, [E[i][name] for i, name in parts])
        for (i, name), part in zip(parts, summed):
            E[i][name] = part
        return E

    def _block_eigenvalues(self):
        return {i: (E["weight"], E.get("bias")) for i, E in self.corrected_eigenvalues.items()}

    def _apply_rows(self, V):
        if self._in_dtype is None:  # the basis and eigenvalues in the operator's dtype, once
            self._in_dtype = {
                i: (Qa.astype(self.dtype), Qb.astype(self.dtype),
                    {name: E.astype(self.dtype) for name, E in
                     self.corrected_eigenvalues[i].items()})
                for i, ((_, Qa), (_, Qb)) in self.eigendecompositions().items()}

        def weight_op(i, M):
            Qa, Qb, E = self._in_dtype[i]
            return _sandwich(Qb, M, Qa, self.problem.omp_threads, E["weight"])

        def bias_op(i, b):
            _, Qb, E = self._in_dtype[i]
            return ((b @ Qb) * E["bias"]) @ Qb.T

        out = self._apply_blocks(V, weight_op, bias_op)
        if self.damping:
            out += self.damping * V
        return out
