"""Loss and gradient, and dense per-sample Jacobians."""

import numpy as np

from . import _engine
from ._base import check_loss, check_model, default_chunk_size
from ._config import computing, resolve_n_threads
from ._data import as_batches, as_input_batches
from ._validation import check_n_threads, check_out, check_params, check_positive_int

__all__ = ["loss_and_grad", "per_sample_jacobians"]


def loss_and_grad(model, loss, params, data, *, chunk_size=None, n_threads=None):
    """Loss value and its gradient with respect to the flat parameters.

    Parameters
    ----------
    model : Sequential
    loss : Loss
    params : ndarray of shape (n_params,)
    data : (X, y) or iterable of (X, y)
        With ``reduction="mean"``, the mean runs over all samples of all batches.
    chunk_size : int, optional
        Samples per forward/backward pass (bounds the memory); by default about
        64 MiB of temporaries (128 MiB without convolutions), as for the operators.
    n_threads : int, optional

    Returns
    -------
    value : float
    grad : ndarray of shape (n_params,), in params' dtype
    """
    check_model(model)
    check_loss(loss)
    theta = check_params(params, model.n_params)
    n_threads = check_n_threads(n_threads)
    chunk_size = (default_chunk_size(model, theta.dtype.itemsize) if chunk_size is None
                  else check_positive_int(chunk_size, "chunk_size"))
    batches = as_batches(model, loss, data, theta.dtype)
    scale = loss.scale(batches.n_samples, model.n_outputs)
    lparams = model.layer_params(theta)
    omp = resolve_n_threads(n_threads)
    grad = np.zeros((1, model.n_params), dtype=theta.dtype)
    accs = _engine.new_accumulators(model, 1, theta.dtype, grad)  # views of grad
    total = 0.0
    with computing():
        for X, y in batches.chunks(chunk_size):
            ctxs, z = _engine.forward_chunk(model, lparams, X, 1, omp)
            value, r, _ = loss.value_grad(z, y, scale, omp)
            total += value
            _engine.vjp_chunk(model, lparams, ctxs, r[:, None, :], accs, omp)
    _engine.accumulators_to_flat(model, accs, grad)
    return float(scale * total), grad[0]


def per_sample_jacobians(model, params, X, *, chunk_size=None, n_threads=None, out=None):
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
        temporaries (128 MiB without convolutions) for the K directions pulled back.
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
    theta = check_params(params, model.n_params)
    n_threads = check_n_threads(n_threads)
    chunk_size = (default_chunk_size(model, theta.dtype.itemsize, k=model.n_outputs, minimum=4)
                  if chunk_size is None else check_positive_int(chunk_size, "chunk_size"))
    batches = as_input_batches(model, X, theta.dtype)
    shape = (batches.n_samples, model.n_outputs, model.n_params)
    if out is None:
        J = np.empty(shape, dtype=theta.dtype)  # every element is written below
    else:
        J = check_out(out, shape, theta.dtype, inputs=(X, params))
    lparams = model.layer_params(theta)
    omp = resolve_n_threads(n_threads)
    start = 0
    with computing():
        for Xc, _ in batches.chunks(chunk_size):
            n = Xc.shape[0]
            ctxs, _ = _engine.forward_chunk(model, lparams, Xc, 1, omp)
            factors = _engine.jacobian_factors(model, lparams, ctxs, n, theta.dtype, omp,
                                               paths=False)
            _engine.factor_sample_jacobians(model, factors, J[start:start + n], omp)
            start += n
    return J
