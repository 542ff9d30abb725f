"""Pure-NumPy reference implementations and finite-difference checkers.

Everything here is slow and written to be obviously correct: one sample at a
time, one layer at a time, in float64, with the mathematics spelled out. It is
deliberately independent of the fast engine: it reads only the *specs* of the
model (``model.layers``, ``model.param_slots``, ``model.unflatten``) and of the
loss (its type and ``reduction``), never the Cython kernels or the operators.
Use it to test the fast path, and for small problems where speed does not
matter.

Notation: sample ``n`` has input ``x_n`` and network output ``z_n`` (K,); the
loss is ``L = c * sum_n l(z_n, y_n)`` with ``c = 1`` for ``reduction="sum"``
and ``c = 1/(N K)`` (MSE, BCE) or ``1/N`` (cross-entropy) for ``"mean"``,
where N counts the samples of all batches together. ``r_n = c dl/dz_n`` and
``B_n = c d^2l/dz_n^2``; ``J_n = dz_n/dtheta`` (K, n_params).

- forward / loss / gradient: per-sample forward pass and plain backprop;
- per-sample Jacobians: back-propagate each output unit vector e_k;
- GGN: ``sum_n J_n^T B_n J_n`` built densely;
- Hessian: exact, one column per parameter direction e_j by Pearlmutter's
  R-operator (forward-mode differentiation of the backprop of one sample);
- finite differences: central, 2nd or 4th order, for scalar, vector and
  gradient functions.

Examples
--------
>>> import numpy as np
>>> import ghess
>>> from ghess import testing
>>> model = ghess.Sequential(ghess.Linear(3, 2), ghess.Tanh(), ghess.Linear(2, 2),
...                          input_shape=(3,))
>>> theta = model.init_params(seed=0)
>>> X = np.ones((4, 3)); y = np.array([0, 1, 1, 0])
>>> value, grad = testing.reference_loss_and_grad(model, ghess.CrossEntropyLoss(), theta,
...                                              (X, y))
>>> fd = testing.finite_difference_gradient(
...     lambda t: testing.reference_loss(model, ghess.CrossEntropyLoss(), t, (X, y)), theta)
>>> testing.assert_allclose_rel(grad, fd, rtol=1e-8)
"""

import numpy as np

from .layers import Identity, LeakyReLU, Linear, ReLU, Sigmoid, Softplus, Tanh
from .losses import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss

__all__ = [
    "reference_forward",
    "reference_loss",
    "reference_loss_and_grad",
    "reference_per_sample_jacobians",
    "reference_ggn",
    "reference_hessian",
    "reference_ggn_matvec",
    "reference_hessian_matvec",
    "finite_difference_gradient",
    "finite_difference_jvp",
    "finite_difference_hvp",
    "assert_allclose_rel",
]


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------
def _theta64(model, theta):
    theta = np.asarray(theta, dtype=np.float64)
    if theta.shape != (model.n_params,):
        raise ValueError(f"theta must have shape ({model.n_params},), got {theta.shape}")
    return theta


def _inputs64(model, X):
    X = np.asarray(X, dtype=np.float64)
    expected = tuple(model.input_shape)
    if X.ndim != 1 + len(expected) or X.shape[1:] != expected:
        raise ValueError(f"X must have shape (n_samples, {', '.join(map(str, expected))}), "
                         f"got {X.shape}")
    return X


def _targets(loss, y, n_samples, n_outputs):
    if isinstance(loss, CrossEntropyLoss):
        y = np.asarray(y)
        if y.dtype.kind not in "iu" or y.shape != (n_samples,):
            raise ValueError(f"CrossEntropyLoss needs integer labels of shape ({n_samples},), "
                             f"got dtype {y.dtype} and shape {y.shape}")
        return y.astype(np.intp)
    y = np.asarray(y, dtype=np.float64)
    if y.shape != (n_samples, n_outputs):
        raise ValueError(f"targets must have shape ({n_samples}, {n_outputs}), got {y.shape}")
    return y


def _batches(model, loss, data):
    """Return ``data`` as a list of float64 ``(X, y)`` pairs."""
    single = (isinstance(data, tuple) and len(data) == 2
              and not isinstance(data[0], (tuple, list)))
    items = [data] if single else list(data)
    if not items:
        raise ValueError("data is empty: got no batches")
    batches = []
    for X, y in items:
        X = _inputs64(model, X)
        batches.append((X, _targets(loss, y, X.shape[0], model.n_outputs)))
    return batches


def _scale(loss, n_samples, n_outputs):
    """Return the reduction's factor c (PyTorch semantics)."""
    if loss.reduction == "sum":
        return 1.0
    if isinstance(loss, CrossEntropyLoss):
        return 1.0 / n_samples
    return 1.0 / (n_samples * n_outputs)


# ---------------------------------------------------------------------------
# Activations: value, first and second derivative, elementwise
# ---------------------------------------------------------------------------
def _sigmoid_parts(x):
    """sigma(x) and 1 - sigma(x), each accurate for large |x|."""
    return np.exp(-np.logaddexp(0.0, -x)), np.exp(-np.logaddexp(0.0, x))


def _activation(layer, s):
    """Return ``f(s), f'(s), f''(s)`` for an activation layer."""
    if isinstance(layer, Identity):
        return s.copy(), np.ones_like(s), np.zeros_like(s)
    if isinstance(layer, LeakyReLU):
        slope = layer.negative_slope
        positive = s > 0
        # derivative at 0 is negative_slope, as in PyTorch
        return (np.where(positive, s, slope * s), np.where(positive, 1.0, slope),
                np.zeros_like(s))
    if isinstance(layer, ReLU):
        positive = s > 0
        # ReLU'(0) = 0, as in PyTorch
        return np.where(positive, s, 0.0), np.where(positive, 1.0, 0.0), np.zeros_like(s)
    if isinstance(layer, Tanh):
        t = np.tanh(s)
        d1 = 1.0 - t * t
        return t, d1, -2.0 * t * d1
    if isinstance(layer, Sigmoid):
        p, q = _sigmoid_parts(s)
        return p, p * q, p * q * (q - p)
    if isinstance(layer, Softplus):
        beta, threshold = layer.beta, layer.threshold
        bs = beta * s
        linear = bs > threshold  # torch.nn.Softplus returns x itself there
        p, q = _sigmoid_parts(bs)
        value = np.where(linear, s, np.logaddexp(0.0, bs) / beta)
        return (value, np.where(linear, 1.0, p), np.where(linear, 0.0, beta * p * q))
    raise TypeError(f"ghess.testing: layer {layer!r} is not supported by the reference")


# ---------------------------------------------------------------------------
# Losses: per-sample value, dl/dz and d2l/dz2 (unscaled)
# ---------------------------------------------------------------------------
def _sample_loss(loss, z, y):
    """Return ``l(z, y)``, ``dl/dz`` (K,) and ``d2l/dz2`` (K, K) for one sample."""
    K = z.shape[0]
    if isinstance(loss, MSELoss):
        diff = z - y
        return float(diff @ diff), 2.0 * diff, 2.0 * np.eye(K)
    if isinstance(loss, CrossEntropyLoss):
        m = z.max()
        lse = m + np.log(np.sum(np.exp(z - m)))
        p = np.exp(z - lse)
        onehot = np.zeros(K)
        onehot[y] = 1.0
        return float(lse - z[y]), p - onehot, np.diag(p) - np.outer(p, p)
    if isinstance(loss, BCEWithLogitsLoss):
        p, q = _sigmoid_parts(z)
        value = np.sum(np.logaddexp(0.0, z) - y * z)
        return float(value), p - y, np.diag(p * q)
    raise TypeError(f"ghess.testing: loss {loss!r} is not supported by the reference")


# ---------------------------------------------------------------------------
# One sample through the network
# ---------------------------------------------------------------------------
def _layer_params(model, params, i):
    return params[f"{i}.weight"], params.get(f"{i}.bias")


def _sample_forward(model, params, x):
    """Output z of one sample, and per layer what the backward pass needs."""
    a = x.reshape(-1)
    caches = []
    for i, layer in enumerate(model.layers):
        if isinstance(layer, Linear):
            W, b = _layer_params(model, params, i)
            s = W @ a
            if b is not None:
                s = s + b
            caches.append({"a": a})
            a = s
        else:
            f, d1, d2 = _activation(layer, a)
            caches.append({"s": a, "d1": d1, "d2": d2})
            a = f
    return a, caches


def _sample_backward(model, params, caches, g):
    """Flat ``dz/dtheta^T g`` for one sample, given ``g`` = dL/dz (K,)."""
    grad = np.zeros(model.n_params)
    for i in reversed(range(len(model.layers))):
        layer, cache = model.layers[i], caches[i]
        if isinstance(layer, Linear):
            W, b = _layer_params(model, params, i)
            slot = model.param_slots[f"{i}.weight"]
            grad[slot.start:slot.stop] = np.outer(g, cache["a"]).ravel()
            if b is not None:
                slot = model.param_slots[f"{i}.bias"]
                grad[slot.start:slot.stop] = g
            g = W.T @ g
        else:
            g = cache["d1"] * g
    return grad


def _sample_hvp(model, params, x, caches, r, B, v):
    """Flat ``R{dL/dtheta}`` of one sample in direction ``v`` (Pearlmutter's R-operator).

    ``r`` = dL/dz and ``B`` = d2L/dz2 of this sample (already scaled); ``v`` is
    the direction in unflattened form. R{.} is the directional derivative
    d/dt (.)(theta + t v) at t = 0, applied to every line of forward and backward.
    """
    n_layers = len(model.layers)
    # R-forward: R{a} of every layer input; the network input does not depend on theta.
    r_inputs = []
    ra = np.zeros(x.size)
    for i, layer in enumerate(model.layers):
        r_inputs.append(ra)
        if isinstance(layer, Linear):
            W, b = _layer_params(model, params, i)
            V, vb = _layer_params(model, v, i)
            # s = W a + b  =>  R{s} = V a + W R{a} + v_b
            ra = V @ caches[i]["a"] + W @ ra
            if b is not None:
                ra = ra + vb
        else:
            # a' = f(s)  =>  R{a'} = f'(s) R{s}
            ra = caches[i]["d1"] * ra
    # output: g = dL/dz  =>  R{g} = B R{z}
    g, rg = r, B @ ra
    hv = np.zeros(model.n_params)
    for i in reversed(range(n_layers)):
        layer, cache = model.layers[i], caches[i]
        if isinstance(layer, Linear):
            W, b = _layer_params(model, params, i)
            V, _ = _layer_params(model, v, i)
            a, r_a = cache["a"], r_inputs[i]
            # dW = g a^T  =>  R{dW} = R{g} a^T + g R{a}^T;  db = g  =>  R{db} = R{g}
            slot = model.param_slots[f"{i}.weight"]
            hv[slot.start:slot.stop] = (np.outer(rg, a) + np.outer(g, r_a)).ravel()
            if b is not None:
                slot = model.param_slots[f"{i}.bias"]
                hv[slot.start:slot.stop] = rg
            # g_in = W^T g  =>  R{g_in} = V^T g + W^T R{g}
            g, rg = W.T @ g, V.T @ g + W.T @ rg
        else:
            # g_in = f'(s) g  =>  R{g_in} = f''(s) R{s} g + f'(s) R{g}
            g, rg = cache["d1"] * g, cache["d2"] * r_inputs[i] * g + cache["d1"] * rg
    return hv


# ---------------------------------------------------------------------------
# Public reference functions
# ---------------------------------------------------------------------------
def reference_forward(model, theta, X):
    """Network outputs, one sample at a time.

    Parameters
    ----------
    model : Sequential
    theta : array_like of shape (n_params,)
    X : array_like of shape (n_samples, *model.input_shape)

    Returns
    -------
    z : ndarray of shape (n_samples, n_outputs), float64
    """
    theta = _theta64(model, theta)
    X = _inputs64(model, X)
    params = model.unflatten(theta)
    z = np.empty((X.shape[0], model.n_outputs))
    for n in range(X.shape[0]):
        z[n], _ = _sample_forward(model, params, X[n])
    return z


def reference_loss(model, loss, theta, data):
    """Loss value with PyTorch's semantics.

    Parameters
    ----------
    model : Sequential
    loss : MSELoss, CrossEntropyLoss or BCEWithLogitsLoss
    theta : array_like of shape (n_params,)
    data : (X, y) or list of (X, y)
        With ``reduction="mean"`` the mean runs over the samples of all batches.

    Returns
    -------
    value : float
    """
    return reference_loss_and_grad(model, loss, theta, data)[0]


def reference_loss_and_grad(model, loss, theta, data):
    r"""Loss value and gradient by per-sample backpropagation.

    Parameters
    ----------
    model : Sequential
    loss : MSELoss, CrossEntropyLoss or BCEWithLogitsLoss
    theta : array_like of shape (n_params,)
    data : (X, y) or list of (X, y)

    Returns
    -------
    value : float
    grad : ndarray of shape (n_params,), float64
        :math:`c \sum_n J_n^T \partial \ell_n / \partial z_n`.
    """
    theta = _theta64(model, theta)
    batches = _batches(model, loss, data)
    params = model.unflatten(theta)
    c = _scale(loss, sum(X.shape[0] for X, _ in batches), model.n_outputs)
    value = 0.0
    grad = np.zeros(model.n_params)
    for X, y in batches:
        for n in range(X.shape[0]):
            z, caches = _sample_forward(model, params, X[n])
            l_n, dl, _ = _sample_loss(loss, z, y[n])
            value += c * l_n
            grad += _sample_backward(model, params, caches, c * dl)
    return float(value), grad


def reference_per_sample_jacobians(model, theta, X):
    """Dense per-sample Jacobians of the network outputs.

    Row k of sample n is obtained by back-propagating the unit vector e_k.

    Parameters
    ----------
    model : Sequential
    theta : array_like of shape (n_params,)
    X : array_like of shape (n_samples, *model.input_shape)

    Returns
    -------
    J : ndarray of shape (n_samples, n_outputs, n_params), float64
        ``J[n, k, j] = d z[n, k] / d theta[j]``.
    """
    theta = _theta64(model, theta)
    X = _inputs64(model, X)
    params = model.unflatten(theta)
    K = model.n_outputs
    J = np.empty((X.shape[0], K, model.n_params))
    for n in range(X.shape[0]):
        _, caches = _sample_forward(model, params, X[n])
        for k in range(K):
            e_k = np.zeros(K)
            e_k[k] = 1.0
            J[n, k] = _sample_backward(model, params, caches, e_k)
    return J


def reference_ggn(model, loss, theta, data, damping=0.0):
    r"""Dense generalized Gauss-Newton matrix.

    .. math:: G = c \sum_n J_n^T \nabla^2_{z} \ell(z_n, y_n) J_n + \lambda I

    Parameters
    ----------
    model : Sequential
    loss : MSELoss, CrossEntropyLoss or BCEWithLogitsLoss
    theta : array_like of shape (n_params,)
    data : (X, y) or list of (X, y)
    damping : float, default=0.0
        :math:`\lambda`.

    Returns
    -------
    G : ndarray of shape (n_params, n_params), float64
    """
    theta = _theta64(model, theta)
    batches = _batches(model, loss, data)
    params = model.unflatten(theta)
    c = _scale(loss, sum(X.shape[0] for X, _ in batches), model.n_outputs)
    G = damping * np.eye(model.n_params)
    for X, y in batches:
        J = reference_per_sample_jacobians(model, theta, X)
        for n in range(X.shape[0]):
            z, _ = _sample_forward(model, params, X[n])
            _, _, B = _sample_loss(loss, z, y[n])
            G += J[n].T @ (c * B) @ J[n]
    return G


def reference_hessian(model, loss, theta, data, damping=0.0):
    r"""Dense exact Hessian of the loss with respect to theta.

    Column j is :math:`H e_j`, computed per sample with Pearlmutter's R-operator:
    the directional derivative along :math:`e_j` of every line of the forward
    and backward pass, including the activations' second derivatives and the
    loss Hessian in output space. No finite differences are involved.

    Parameters
    ----------
    model : Sequential
    loss : MSELoss, CrossEntropyLoss or BCEWithLogitsLoss
    theta : array_like of shape (n_params,)
    data : (X, y) or list of (X, y)
    damping : float, default=0.0
        Added to the diagonal.

    Returns
    -------
    H : ndarray of shape (n_params, n_params), float64
        Not symmetrised: symmetry holds to rounding and is a useful check.
    """
    theta = _theta64(model, theta)
    batches = _batches(model, loss, data)
    params = model.unflatten(theta)
    c = _scale(loss, sum(X.shape[0] for X, _ in batches), model.n_outputs)
    n_params = model.n_params
    H = damping * np.eye(n_params)
    for X, y in batches:
        for n in range(X.shape[0]):
            z, caches = _sample_forward(model, params, X[n])
            _, dl, d2l = _sample_loss(loss, z, y[n])
            for j in range(n_params):
                e_j = np.zeros(n_params)
                e_j[j] = 1.0
                H[:, j] += _sample_hvp(model, params, X[n], caches, c * dl, c * d2l,
                                       model.unflatten(e_j))
    return H



# ---------------------------------------------------------------------------
# Batched products: what a plain NumPy implementation computes per product
# ---------------------------------------------------------------------------
def _batch_dtype(theta):
    theta = np.asarray(theta)
    return np.float32 if theta.dtype == np.float32 else np.float64


def _batch_forward(model, params, X):
    """Forward pass of a whole batch: outputs, and per layer its input, f' and f''."""
    a = X.reshape(X.shape[0], -1)
    caches = []
    for i, layer in enumerate(model.layers):
        if isinstance(layer, Linear):
            W, b = _layer_params(model, params, i)
            caches.append({"a": a})
            a = a @ W.T if b is None else a @ W.T + b
        else:
            f, d1, d2 = _activation(layer, a)
            caches.append({"s": a, "d1": d1.astype(a.dtype), "d2": d2.astype(a.dtype)})
            a = f.astype(a.dtype)
    return a, caches


def _batch_loss_grad(loss, z, y, scale):
    """Scaled dL/dz (N, K) and a function applying the scaled B_n row by row."""
    if isinstance(loss, MSELoss):
        return scale * 2.0 * (z - y), lambda u: scale * 2.0 * u
    if isinstance(loss, CrossEntropyLoss):
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        r = p.copy()
        r[np.arange(z.shape[0]), y] -= 1.0
        return scale * r, lambda u: scale * p * (u - np.sum(p * u, axis=1, keepdims=True))
    p, q = _sigmoid_parts(z)
    return scale * (p - y), lambda u: scale * (p * q).astype(z.dtype) * u


def _batch_r_forward(model, params, v, caches):
    """R{input} of every layer and R{z}, for direction v, of a whole batch."""
    r_inputs, ra = [], None
    for i, layer in enumerate(model.layers):
        r_inputs.append(ra)
        if isinstance(layer, Linear):
            W, b = _layer_params(model, params, i)
            V, vb = _layer_params(model, v, i)
            out = caches[i]["a"] @ V.T
            if ra is not None:
                out += ra @ W.T
            ra = out if b is None else out + vb
        elif ra is not None:
            ra = caches[i]["d1"] * ra
    return r_inputs, ra


def reference_ggn_matvec(model, loss, theta, data, v):
    """GGN-vector product ``G v`` computed batch-wise with plain NumPy.

    Forward pass, R-forward (``J v``), ``B J v``, backward (``J^T B J v``) for
    every product, vectorised over the samples of a batch: the baseline a plain
    NumPy implementation gives. Computes in float32 when theta is float32,
    else in float64.
    """
    dtype = _batch_dtype(theta)
    theta = np.asarray(theta, dtype=dtype)
    batches = _batches(model, loss, data)
    scale = _scale(loss, sum(X.shape[0] for X, _ in batches), model.n_outputs)
    params = model.unflatten(theta)
    vp = model.unflatten(np.asarray(v, dtype=dtype))
    out = np.zeros(model.n_params, dtype=dtype)
    for X, y in batches:
        X = X.astype(dtype)
        y = y if isinstance(loss, CrossEntropyLoss) else y.astype(dtype)
        z, caches = _batch_forward(model, params, X)
        _, apply_B = _batch_loss_grad(loss, z, y, scale)
        _, rz = _batch_r_forward(model, params, vp, caches)
        g = apply_B(rz)
        for i in reversed(range(len(model.layers))):
            layer = model.layers[i]
            if isinstance(layer, Linear):
                W, b = _layer_params(model, params, i)
                slot = model.param_slots[f"{i}.weight"]
                out[slot.start:slot.stop] += (g.T @ caches[i]["a"]).ravel()
                if b is not None:
                    slot = model.param_slots[f"{i}.bias"]
                    out[slot.start:slot.stop] += g.sum(axis=0)
                g = g @ W
            else:
                g = caches[i]["d1"] * g
    return out


def reference_hessian_matvec(model, loss, theta, data, v):
    """Hessian-vector product ``H v`` batch-wise with plain NumPy (R-operator).

    Forward, backward (the gradients of every layer), R-forward and R-backward
    for every product, vectorised over the samples of a batch. Computes in
    float32 when theta is float32, else in float64.
    """
    dtype = _batch_dtype(theta)
    theta = np.asarray(theta, dtype=dtype)
    batches = _batches(model, loss, data)
    scale = _scale(loss, sum(X.shape[0] for X, _ in batches), model.n_outputs)
    params = model.unflatten(theta)
    vp = model.unflatten(np.asarray(v, dtype=dtype))
    out = np.zeros(model.n_params, dtype=dtype)
    for X, y in batches:
        X = X.astype(dtype)
        y = y if isinstance(loss, CrossEntropyLoss) else y.astype(dtype)
        z, caches = _batch_forward(model, params, X)
        g, apply_B = _batch_loss_grad(loss, z, y, scale)
        r_inputs, rz = _batch_r_forward(model, params, vp, caches)
        rg = apply_B(rz)
        for i in reversed(range(len(model.layers))):
            layer, cache, r_in = model.layers[i], caches[i], r_inputs[i]
            if isinstance(layer, Linear):
                W, b = _layer_params(model, params, i)
                V, _ = _layer_params(model, vp, i)
                a = cache["a"]
                slot = model.param_slots[f"{i}.weight"]
                rW = rg.T @ a
                if r_in is not None:
                    rW += g.T @ r_in
                out[slot.start:slot.stop] += rW.ravel()
                if b is not None:
                    slot = model.param_slots[f"{i}.bias"]
                    out[slot.start:slot.stop] += rg.sum(axis=0)
                g, rg = g @ W, rg @ W + g @ V
            else:
                new_rg = cache["d1"] * rg
                if r_in is not None:
                    new_rg += cache["d2"] * r_in * g
                g, rg = cache["d1"] * g, new_rg
    return out


# ---------------------------------------------------------------------------
# Finite differences
# ---------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------
# Assertions
# ---------------------------------------------------------------------------
def assert_allclose_rel(actual, desired, rtol, err_msg=""):
    """Assert ``||actual - desired|| <= rtol * max(||desired||, tiny)`` (Frobenius norms).

    A norm-wise relative check: unlike ``numpy.testing.assert_allclose`` it does
    not fail on entries that are tiny next to the rest of the array.

    Parameters
    ----------
    actual, desired : array_like of the same shape
    rtol : float
    err_msg : str, optional
        Prepended to the failure message.

    Raises
    ------
    AssertionError
        On a shape mismatch, non-finite values, or a relative error above ``rtol``.
    """
    actual = np.asarray(actual, dtype=np.float64)
    desired = np.asarray(desired, dtype=np.float64)
    prefix = f"{err_msg}: " if err_msg else ""
    if actual.shape != desired.shape:
        raise AssertionError(f"{prefix}shape mismatch: actual {actual.shape}, "
                             f"desired {desired.shape}")
    err = np.linalg.norm((actual - desired).ravel())
    ref = np.linalg.norm(desired.ravel())
    rel = err / max(ref, np.finfo(np.float64).tiny)
    if not rel <= rtol:  # also fails on NaN
        raise AssertionError(f"{prefix}relative error {rel:.3e} exceeds rtol {rtol:.1e} "
                             f"(||actual - desired|| = {err:.3e}, ||desired|| = {ref:.3e})")
