"""Loss and gradient, and dense per-sample Jacobians."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from . import _engine
from ._config import computing
from ._distributed import sum_in_rank_order
from ._parallel import first_samples, run_workers, worker_runs
from ._problem import Problem, check_model
from ._typing import Data
from ._validation import check_out

if TYPE_CHECKING:
    from .nn.losses import Loss
    from .nn.sequential import Sequential

__all__ = ["loss_and_grad", "per_sample_jacobians"]


def loss_and_grad(model: Sequential, loss: Loss, params: npt.ArrayLike, data: Data, *,
                  chunk_size: int | None = None, n_threads: int | None = None,
                  check_deterministic: bool = True, comm=None) -> tuple[float, np.ndarray]:
    """Loss value and its gradient with respect to the flat parameters.

    Parameters
    ----------
    model : Sequential
    loss : Loss
    params : ndarray of shape (n_params,)
    data : (X, y) or iterable of (X, y)
        With ``reduction="mean"``, the mean runs over all samples of all batches.
        Arrays or PyTorch tensors; the iterable may be a ``DataLoader``.
    chunk_size : int, optional
        Samples per forward/backward pass (bounds the memory); by default about
        64 MiB of temporaries per thread (128 MiB without convolutions), as for
        the operators.
    n_threads : int, optional
    check_deterministic : bool, default=True
        Read a re-iterable ``data`` (not a list or tuple) twice and raise
        ``ValueError`` if the passes differ (a shuffling loader).
    comm : mpi4py communicator, optional
        Data-parallel: ``data`` is this rank's shard (it may be empty) and the
        result is the whole data's, the same bits on every rank (see
        ``docs/design.md``, "MPI").

    Returns
    -------
    value : float
    grad : ndarray of shape (n_params,), in params' dtype
    """
    p = Problem(model, loss, params, data, chunk_size=chunk_size, n_threads=n_threads,
                check_deterministic=check_deterministic, comm=comm)
    grad = np.zeros((1, model.n_params), dtype=p.dtype)
    chunks = list(p.chunks())
    runs = worker_runs(len(chunks), p.omp_threads)

    def run(w):  # a worker's chunks in turn: its loss sum, its gradient in grad's layout
        part = grad if w == 0 else np.zeros_like(grad)
        accs = _engine.new_accumulators(model, 1, p.dtype, part)  # views of part
        total = 0.0
        for i in runs[w]:
            X, y = chunks[i]
            ctxs, z = _engine.checked_forward(model, p.lparams, X, 1, p.omp_threads)
            value, r, _ = _engine.checked_loss(loss, z, y, p.scale, p.omp_threads)
            total += value
            _engine.vjp_chunk(model, p.lparams, ctxs, r[:, None, :], accs, p.omp_threads)
            del ctxs, z, r  # this chunk's temporaries go before the next chunk's
        _engine.accumulators_to_flat(model, accs, part)
        return total, part

    with computing():
        parts = run_workers(len(runs), run)
    total = parts[0][0]
    for value, part in parts[1:]:  # in worker order: the same bits on every call
        total += value
        grad += part
    if p.comm is not None:  # the whole data's: summed over the ranks in rank order
        grad = sum_in_rank_order(p.comm, grad)
        total = float(sum_in_rank_order(p.comm, np.array([total]))[0])
    _engine.check_finite_result(grad, "the gradient (backward pass)")
    if not np.isfinite(p.scale * total):
        raise FloatingPointError(f"the loss summed over {p.n_global} samples overflows")
    return float(p.scale * total), grad[0]


def per_sample_jacobians(model: Sequential, params: npt.ArrayLike, X: npt.ArrayLike, *,
                         chunk_size: int | None = None, n_threads: int | None = None,
                         out: np.ndarray | None = None) -> np.ndarray:
    """Dense per-sample Jacobians of the outputs, shape (N, K, n_params).

    ``J[n, c, :]`` is the gradient of output ``c`` of sample ``n`` with respect to
    the flat parameters. This allocates ``N * K * n_params`` numbers; for products
    use :class:`ghess.JacobianLinearOperator` instead.

    Parameters
    ----------
    model : Sequential
    params : ndarray of shape (n_params,)
    X : ndarray of shape (N, *model.input_shape)
    chunk_size : int, optional
        Samples per forward/backward pass; by default about 64 MiB of
        temporaries per thread (128 MiB without convolutions) for the K directions
        pulled back.
    n_threads : int, optional
    out : ndarray of shape (N, K, n_params), optional
        A C-contiguous buffer of params' dtype to write into (every element is
        overwritten) and return. Reusing one buffer across calls saves the
        allocation, which for large outputs is mostly the kernel's first-touch
        page faults, not ghess's work.

    Returns
    -------
    J : ndarray of shape (N, K, n_params), in params' dtype (``out`` when given)
    """
    check_model(model)
    p = Problem(model, None, params, X, chunk_size=chunk_size,
                chunk_directions=model.n_outputs, min_chunk=4, n_threads=n_threads)
    shape = (p.n_samples, model.n_outputs, model.n_params)
    if out is None:
        J = np.empty(shape, dtype=p.dtype)  # every element is written below
    else:
        J = check_out(out, shape, p.dtype, inputs=(X, params))
    chunks = [Xc for Xc, _ in p.chunks()]
    starts = first_samples(Xc.shape[0] for Xc in chunks)
    runs = worker_runs(len(chunks), p.omp_threads)

    def run(w):  # each chunk writes its own rows of J
        for i in runs[w]:
            Xc, start = chunks[i], starts[i]
            n = Xc.shape[0]
            ctxs, _ = _engine.checked_forward(model, p.lparams, Xc, 1, p.omp_threads)
            factors = _engine.jacobian_factors(model, p.lparams, ctxs, n, p.dtype,
                                               p.omp_threads, paths=False)
            del ctxs
            _engine.factor_sample_jacobians(model, factors, J[start:start + n], p.omp_threads)
            del factors
            _engine.check_finite_result(J[start:start + n], "the per-sample Jacobians")

    with computing():
        run_workers(len(runs), run)
    return J
