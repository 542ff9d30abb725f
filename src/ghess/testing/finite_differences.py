"""Central finite differences in float64: directional derivatives, gradients, HVPs."""

import numpy as np

__all__ = ["finite_difference_jvp", "finite_difference_gradient", "finite_difference_hvp"]


def _stencil(order):
    """Central-difference (offsets, weights): f'(0) ~ sum_i w_i f(o_i eps) / eps."""
    if order == 2:
        return (1.0, -1.0), (0.5, -0.5)
    if order == 4:
        return (2.0, 1.0, -1.0, -2.0), (-1.0 / 12, 8.0 / 12, -8.0 / 12, 1.0 / 12)
    raise ValueError(f"order must be 2 or 4, got {order!r}")


def finite_difference_jvp(fn, theta, v, eps=1e-5, order=4):
    """Directional derivative of ``fn`` at ``theta`` along ``v`` by central differences.

    Parameters
    ----------
    fn : callable
        ``fn(theta)`` returns a scalar or an array.
    theta, v : array_like of shape (n,)
    eps : float, default=1e-5
        Step along ``v``.
    order : {2, 4}, default=4
        Order of accuracy: 2 uses ``(f(t+eps v) - f(t-eps v)) / (2 eps)``, 4 the
        five-point stencil.

    Returns
    -------
    jvp : ndarray of fn's output shape, float64
    """
    theta = np.asarray(theta, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    if v.shape != theta.shape:
        raise ValueError(f"v must have theta's shape {theta.shape}, got {v.shape}")
    offsets, weights = _stencil(order)
    total = 0.0
    for o, w in zip(offsets, weights):
        total = total + w * np.asarray(fn(theta + (o * eps) * v), dtype=np.float64)
    return total / eps


def finite_difference_gradient(f, theta, eps=1e-5, order=4):
    """Gradient of a scalar function by central differences, one coordinate at a time.

    Parameters
    ----------
    f : callable
        ``f(theta)`` returns a float.
    theta : array_like of shape (n,)
    eps : float, default=1e-5
    order : {2, 4}, default=4

    Returns
    -------
    grad : ndarray of shape (n,), float64
    """
    theta = np.asarray(theta, dtype=np.float64)
    _stencil(order)  # validate before any work
    grad = np.empty(theta.shape[0])
    for j in range(theta.shape[0]):
        e_j = np.zeros_like(theta)
        e_j[j] = 1.0
        grad[j] = finite_difference_jvp(f, theta, e_j, eps=eps, order=order)
    return grad


def finite_difference_hvp(grad_fn, theta, v, eps=1e-5, order=2):
    """Hessian-vector product by central differences of the gradient.

    ``(grad_fn(theta + eps v) - grad_fn(theta - eps v)) / (2 eps)`` for
    ``order=2``; the five-point stencil for ``order=4``.

    Parameters
    ----------
    grad_fn : callable
        ``grad_fn(theta)`` returns the gradient, shape (n,).
    theta, v : array_like of shape (n,)
    eps : float, default=1e-5
    order : {2, 4}, default=2

    Returns
    -------
    hvp : ndarray of shape (n,), float64
    """
    return finite_difference_jvp(grad_fn, theta, v, eps=eps, order=order)
