"""The base of the ghess ``LinearOperator`` classes: the loop over chunks and its reduction.

:class:`ChunkedOperator` holds a :class:`ghess._problem.Problem`, chooses the
mode (``"stored"``: per-chunk states kept for every product; ``"recompute"``:
rebuilt for each), and owns the one loop over chunks and the reduction of
their contributions into the flat result (:meth:`ChunkedOperator._reduce`).
Each operator supplies what a chunk keeps (``_chunk_state``) and its
per-chunk product. :class:`CurvatureOperator` adds the symmetric
n_params x n_params operators' damping, ``block`` and ``todense``.

SciPy's ``LinearOperator`` does the rest from ``_matmat`` and ``_adjoint``;
ghess adds batched ``matvec`` on ``(..., n)`` where the installed SciPy
(< 1.18) lacks it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt
import scipy
from scipy.sparse.linalg import LinearOperator

from .. import _engine
from .._config import computing, requested_threads
from .._distributed import sum_in_rank_order
from .._parallel import first_samples, map_chunks, run_workers, worker_count, worker_runs
from .._problem import (
    Problem,
    batch_sizes,
    check_dtype,
    check_loss,
    check_memory_budget,
    check_mode,
    check_model,
    default_memory_budget,
    format_bytes,
    memory_limit,
)
from .._typing import Batch, Data, Mode
from .._validation import (
    all_finite,
    as_array,
    cast_finite,
    check_damping,
    check_n_threads,
    check_positive_int,
)
from ..nn.losses import CrossEntropyLoss
from . import _memory

if TYPE_CHECKING:
    from ..nn.losses import Loss
    from ..nn.sequential import Sequential

__all__ = ["ChunkedOperator", "CurvatureOperator", "BLOCK_COLUMNS"]

#: directions per pass: the per-chunk temporaries grow with their number, and
#: past ~16 the GEMMs gain nothing more (docs/design.md, "Measurements")
BLOCK_COLUMNS = 16

_SCIPY_BATCHES_MATVEC = tuple(int(p) for p in scipy.__version__.split(".")[:2]) >= (1, 18)


class _BatchedMatvec:
    """``matvec``/``rmatvec`` on batched ``(..., n)`` input, for SciPy < 1.18."""

    def matvec(self, x):
        """Apply the operator to ``x`` of shape (n,), (n, 1), or batched (..., n)."""
        return _vector_product(x, self.shape[1], self.shape[0], self.matmat,
                               super().matvec)

    def rmatvec(self, x):
        """Apply the adjoint to ``x`` of shape (m,), (m, 1), or batched (..., m)."""
        return _vector_product(x, self.shape[0], self.shape[1], self.rmatmat,
                               super().rmatvec)


def _vector_product(x, n, m, matmat, single):
    x = x if isinstance(x, np.ndarray) else as_array(x)
    if x.dtype.kind not in "iuf":
        raise TypeError(f"vector must be real numbers, got {type(x).__name__} of dtype "
                        f"{x.dtype}")
    if x.ndim >= 2 and x.shape[-1] == n and not (x.ndim == 2 and x.shape == (n, 1)):
        y = matmat(x.reshape(-1, n).T).T
        return y.reshape(x.shape[:-1] + (m,))
    if x.shape not in ((n,), (n, 1)):
        raise ValueError(f"vector must have shape ({n},), ({n}, 1) or (k, {n}), "
                         f"got {x.shape}")
    return single(x)


class _NoBackport:
    pass


#: mixin of every ghess operator: SciPy's own batched matvec from 1.18 on
BatchedMatvec = _NoBackport if _SCIPY_BATCHES_MATVEC else _BatchedMatvec


def _probe_arguments(model, mode, dtype, n_directions):
    """Check ``memory_required``'s arguments; return mode, dtype, and the probes' params and
    directions (n_params, n_directions)."""  # noqa: D205, D209
    check_model(model)
    mode = check_mode(mode)
    if mode == "auto":
        raise ValueError("memory_required needs mode 'stored' or 'recompute'")
    dtype = check_dtype(dtype)
    k = check_positive_int(n_directions, "n_directions")
    V = np.random.default_rng(1).standard_normal((model.n_params, k)).astype(dtype)
    return mode, dtype, model.init_params(seed=0, dtype=dtype), V


def _peak_bytes(model, data, dtype, chunk_size, n_threads, probe_at, output_bytes_per_sample=0,
                in_any_order=True):
    """``memory_required``'s figure: probes on the chunking and threads of ``data``.

    ``probe_at(c, threads)`` measures an operator on c samples in one chunk. Where
    the chunks go to several workers (``_parallel``; ``in_any_order``: the operator
    lets them), each worker's chunk runs on one thread: the probes run so, and
    their temporaries count once per worker.
    """
    sizes = batch_sizes(data)
    threads = requested_threads(check_n_threads(n_threads))
    plan = _engine.plan_for(model, dtype.itemsize)
    chunk = (plan.chunk_size(threads=threads, batch_sizes=sizes) if chunk_size is None
             else check_positive_int(chunk_size, "chunk_size"))
    workers = worker_count(_engine.chunk_count(sizes, chunk), threads) if in_any_order else 1
    probe_threads = 1 if workers > 1 else threads
    return _memory.peak_bytes(lambda c: probe_at(c, probe_threads), sum(sizes),
                              _memory.largest_chunk(sizes, chunk), probe_threads,
                              output_bytes_per_sample, workers)


def check_vectors(X, n, dtype, name="vector"):
    """Validate X of shape (n, k); return contiguous directions (k, n) in ``dtype``."""
    X = as_array(X)
    if X.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be real (the operator's dtype is {dtype}), "
                        f"got dtype {X.dtype}")
    if X.ndim != 2 or X.shape[0] != n:
        raise ValueError(f"{name} must have {n} rows, got shape {X.shape}")
    with np.errstate(over="ignore"):  # an overflow in the cast is reported below, by name
        V = np.ascontiguousarray(X.T, dtype=dtype)  # one copy, in the kernels' layout
    if not all_finite(V):
        cast_finite(X, dtype, name)  # raises, naming the entry and whether it overflowed
    return V


class ChunkedOperator(BatchedMatvec, LinearOperator):
    """A ``LinearOperator`` over a data set, computed chunk by chunk.

    Subclasses set ``_stored_bytes_per_sample(plan)`` (bytes a stored chunk
    keeps per sample) and ``_chunk_state(X, y)`` (what a chunk keeps), and use
    :meth:`_chunk_states` and :meth:`_reduce` in their products.
    """

    #: whether the chunks may run out of order, on several workers (``_parallel``);
    #: False where a chunk's work depends on the chunks before it (random draws in turn)
    _chunks_in_any_order = True

    def _setup(self, problem, mode, memory_budget, shape):
        """Decide the mode under the memory budget and build the stored chunk states."""
        self.problem = problem
        self.comm = problem.comm
        self.data = problem.batches  # the operator's private copy
        self.model = problem.model
        self.params = problem.params
        self.n_threads = problem.n_threads
        self.n_samples = problem.n_samples
        self.chunk_size = problem.chunk_size
        self.memory_budget = (default_memory_budget() if memory_budget is None
                              else check_memory_budget(memory_budget))
        self.stored_bytes = self.n_samples * self._stored_bytes_per_sample(problem.plan)
        mode = check_mode(mode)
        if mode == "auto":
            mode = "stored" if self.stored_bytes <= self.memory_budget else "recompute"
        elif mode == "stored" and self.stored_bytes > self.memory_budget:
            raise ValueError(
                f"mode='stored' needs {format_bytes(self.stored_bytes)} for {self.n_samples} "
                f"samples, over the memory_budget of {format_bytes(self.memory_budget)}: "
                "raise memory_budget or use mode='recompute'")
        self.mode = mode
        LinearOperator.__init__(self, dtype=problem.dtype, shape=shape)
        self._stored = None
        if mode == "stored":
            with computing():
                self._stored = map_chunks(problem.chunks(), lambda c: self._chunk_state(*c),
                                          self._chunk_threads())

    @staticmethod
    def _stored_bytes_per_sample(plan):
        raise NotImplementedError

    def _chunk_state(self, X, y):
        raise NotImplementedError

    def _recompute_state(self, X, y):
        """Return what a product needs of a chunk in recompute mode (default: its stored state)."""
        return self._chunk_state(X, y)

    def _jacobian_factors(self, X, ctxs=None, loss_state=None):
        """Return the chunk's per-sample Jacobian factors (after its forward pass, or ``ctxs``)."""
        p = self.problem
        if ctxs is None:
            ctxs, _ = _engine.checked_forward(self.model, p.lparams, X, 1, p.omp_threads)
        return _engine.jacobian_factors(self.model, p.lparams, ctxs, X.shape[0], p.dtype,
                                        p.omp_threads, loss_state=loss_state)

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the stored chunk states (0 in recompute mode).

        Not counted: the operator's private copy of the data, the size of the data.
        """
        return 0 if self.mode == "recompute" else self.stored_bytes

    def _chunk_states(self):
        """Return the chunks' states in order: the stored ones, or each rebuilt in turn."""
        if self._stored is not None:
            return iter(self._stored)
        return (self._recompute_state(X, y) for X, y in self.problem.chunks())

    def _chunk_threads(self):
        """Threads that may share out this operator's chunks (``_parallel``): the
        kernels' threads, or 1 where a chunk's work depends on the ones before it."""  # noqa: D205, D209
        return self.problem.omp_threads if self._chunks_in_any_order else 1

    def _reduce(self, k, chunk_product):
        """Sum ``chunk_product(state, accumulators, start)`` over the chunks into (k, n_params).

        ``start`` is the chunk's first sample. The accumulators are per-layer
        (``_engine.new_accumulators``). With T threads and at least T chunks, T
        workers each sum a contiguous run of the chunks in order into their own,
        added in worker order (``_parallel``): the same bits on every call.
        """
        model = self.model
        chunks = list(self.problem.chunks())
        starts = first_samples(X.shape[0] for X, _ in chunks)
        stored = self._stored
        runs = worker_runs(len(chunks), self._chunk_threads())

        def run(w):
            out = np.zeros((k, model.n_params), dtype=self.dtype)
            accs = _engine.new_accumulators(model, k, self.dtype, out)
            # one worker: the chunks in turn, through _chunk_states (which may start a
            # pass, as the Monte-Carlo Fisher's draws do)
            states = (self._chunk_states() if len(runs) == 1 else
                      (stored[i] if stored is not None else self._recompute_state(*chunks[i])
                       for i in runs[w]))
            # a plain loop: zip() and enumerate() keep their last pair until the next
            # item is made, and a recomputed state must go before the next is built
            i = runs[w].start
            for state in states:
                chunk_product(state, accs, starts[i])
                del state
                i += 1
            _engine.accumulators_to_flat(model, accs, out)
            return out

        outs = run_workers(len(runs), run)
        out = outs[0]
        for part in outs[1:]:
            out += part
        return sum_in_rank_order(self.comm, out)  # the whole data's, with a comm

    def matmat(self, X):
        """Apply the operator to the columns of X, ``(shape[1], k)``."""
        if np.ndim(X) != 2:
            raise ValueError(f"matmat: X must be 2-D of shape ({self.shape[1]}, k), got shape "
                             f"{np.shape(X)}")
        return super().matmat(X)

    def _check_vectors(self, X, n, name="vector"):
        return check_vectors(X, n, self.dtype, name)

    def _check_dense_fits(self):
        size = self.shape[0] * self.shape[1] * self.dtype.itemsize
        if size > self.memory_budget:
            raise ValueError(f"todense needs {format_bytes(size)}, over the memory_budget of "
                             f"{format_bytes(self.memory_budget)}")

    def _unit_columns(self, columns, apply_rows, rows=slice(None)):
        """``rows`` of the operator's ``columns``, BLOCK_COLUMNS unit vectors per pass.

        ``apply_rows(E)`` applies the operator to the rows of E (k, n_cols); no
        identity of the operator's size is ever built.
        """
        columns = np.asarray(columns, dtype=np.intp)
        n_rows = len(range(*rows.indices(self.shape[0])))
        out = np.empty((n_rows, len(columns)), dtype=self.dtype)
        for start in range(0, len(columns), BLOCK_COLUMNS):
            block = columns[start:start + BLOCK_COLUMNS]
            E = np.zeros((len(block), self.shape[1]), dtype=self.dtype)
            E[np.arange(len(block)), block] = 1
            out[:, start:start + len(block)] = apply_rows(E)[:, rows].T
        return out


class CurvatureOperator(ChunkedOperator):
    """Base of the symmetric n_params x n_params curvature operators.

    Subclasses implement ``_chunk_product(state, tangents, accs, k)``: the
    undamped product's contribution of one chunk for k directions.
    """

    def __init__(self, model: Sequential, loss: Loss, params: npt.ArrayLike, data: Data, *,
                 damping: float | npt.ArrayLike = 0.0, mode: Mode = "auto",
                 chunk_size: int | None = None, memory_budget: int | None = None,
                 n_threads: int | None = None, check_deterministic: bool = True,
                 comm=None) -> None:
        check_loss(loss)  # a curvature needs a loss (None means "no loss" to Problem)
        problem = Problem(model, loss, params, data, chunk_size=chunk_size,
                          n_threads=n_threads, private=True,
                          check_deterministic=check_deterministic, comm=comm)
        self.damping = check_damping(damping, model.n_params, problem.dtype)
        self.loss = problem.loss
        self._setup(problem, mode, memory_budget, (model.n_params, model.n_params))

    @classmethod
    def memory_required(cls, model: Sequential, data: int | Batch | Sequence[Batch],
                        mode: Literal["stored", "recompute"] = "stored", *,
                        loss: Loss | None = None, dtype: npt.DTypeLike = np.float64,
                        chunk_size: int | None = None, n_directions: int = 1,
                        n_threads: int | None = None, **options) -> int:
        """Peak bytes of an operator on ``data`` (or ``n_samples``), before any is allocated.

        The most the operator holds at once while it is built and while it
        multiplies ``n_directions`` vectors at once (``matmat``; ``block`` and
        ``todense`` push 16 through together): in ``"stored"`` mode the stored
        states (``memory_bytes`` once built) plus one chunk's temporaries, in
        ``"recompute"`` mode one chunk's; in both the operator's private copies of
        the data and parameters. Not counted: the caller's arrays, and the result
        of ``todense`` or ``block``. The chunk is ``chunk_size``, by default the
        operator's own choice on ``n_threads`` threads (``None``: OpenMP's
        default, as for the operators).

        The figure comes from two dry runs on a few synthetic samples, measured
        exactly and scaled to the data (``docs/design.md``, "Memory"); it is an
        upper bound of the measured peak, within a few percent. ``loss``: the
        loss the operator will get (default ``CrossEntropyLoss()``; the losses
        differ by at most K numbers per sample). ``options``: the operator's own
        arguments that change its memory (``mc_samples`` of the Monte-Carlo Fisher).
        """
        mode, dtype, theta, V = _probe_arguments(model, mode, dtype, n_directions)
        loss = CrossEntropyLoss() if loss is None else check_loss(loss)

        def probe_at(c, threads):
            batch = _memory.example_batch(model, loss, c, dtype)
            return _memory.measure(
                lambda: cls(model, loss, theta, batch, mode=mode, chunk_size=c,
                            n_threads=threads, memory_budget=memory_limit(), **options),
                lambda op: op.matmat(V))

        return _peak_bytes(model, data, dtype, chunk_size, n_threads, probe_at,
                           in_any_order=cls._chunks_in_any_order)

    # -- products -----------------------------------------------------------
    def _matmat(self, X):
        V = self._check_vectors(X, self.shape[1])
        return self._apply_rows_damped(V).T

    def _adjoint(self):
        return self

    def _transpose(self):
        return self

    def _apply_rows(self, V):
        """Apply the undamped operator to the rows of V (k, n_params)."""
        k = V.shape[0]
        tangents = _engine.prepare_tangents(self.model, V)
        return self._reduce(
            k, lambda state, accs, start: self._chunk_product(state, tangents, accs, k))

    def _apply_rows_damped(self, V):
        """Operator applied to the rows of V (k, n), BLOCK_COLUMNS rows per pass."""
        if V.shape[0] == 0:
            return np.zeros_like(V)
        with computing():
            if V.shape[0] <= BLOCK_COLUMNS:
                out = self._apply_rows(V)
            else:
                out = np.empty_like(V)
                for start in range(0, V.shape[0], BLOCK_COLUMNS):
                    out[start:start + BLOCK_COLUMNS] = self._apply_rows(
                        V[start:start + BLOCK_COLUMNS])
        if np.any(self.damping):  # a scalar, or a diagonal as an (n_params,) array
            out += self.damping * V
        _engine.check_finite_result(out, f"the {type(self).__name__} product")
        return out

    def block(self, name_a: str, name_b: str | None = None) -> np.ndarray:
        """Dense block of the operator for two named parameters.

        Parameters
        ----------
        name_a, name_b : str
            Keys of ``model.param_slots`` such as ``"0.weight"``; ``name_b``
            defaults to ``name_a``.

        Returns
        -------
        ndarray of shape (size_a, size_b)
            Rows index ``name_a``'s entries, columns ``name_b``'s, each in C order
            of the parameter's shape; damping is included on the diagonal.
        """
        slot_a = self._slot(name_a)
        slot_b = self._slot(name_a if name_b is None else name_b)
        return self._unit_columns(range(slot_b.start, slot_b.stop), self._apply_rows_damped,
                                  slice(slot_a.start, slot_a.stop))

    def todense(self) -> np.ndarray:
        """Return the full matrix (n_params x n_params); refuse above ``memory_budget``."""
        self._check_dense_fits()
        return self._unit_columns(range(self.shape[1]), self._apply_rows_damped)

    def _slot(self, name):
        try:
            return self.model.param_slots[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown parameter {name!r}; the model's parameters are "
                             f"{list(self.model.param_slots)}") from None
