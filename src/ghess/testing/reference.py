"""The pure-NumPy reference: forward, loss, gradient, Jacobians, GGN and Hessian.

Slow and written to be obviously correct: one sample at a time, one layer at a
time, in float64, independent of the fast engine (see ``ghess.testing``).
"""


import numpy as np
import scipy.special

from ..nn import (
    ELU,
    GELU,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    BCEWithLogitsLoss,
    Conv2d,
    CrossEntropyLoss,
    Flatten,
    Identity,
    LeakyReLU,
    Linear,
    MaxPool2d,
    MSELoss,
    ReLU,
    Residual,
    Sigmoid,
    SiLU,
    Softplus,
    Tanh,
)

__all__ = [
    "reference_forward",
    "reference_loss",
    "reference_loss_and_grad",
    "reference_per_sample_jacobians",
    "reference_ggn",
    "reference_hessian",
    "reference_empirical_fisher",
    "reference_fisher_mc",
    "reference_kfac",
    "reference_ekfac",
    "reference_ggn_matvec",
    "reference_hessian_matvec",
    "register_reference_activation",
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
    single = isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], tuple)
    items = [data] if single else list(data)
    if not items:
        raise ValueError("data is empty: got no batches")
    batches = []
    for X, y in items:
        X = _inputs64(model, X)
        batches.append((X, _targets(loss, y, X.shape[0], model.n_outputs)))
    return batches


def _scale(loss, n_samples, n_outputs):
    """Return the loss's factor c: its ``factor`` over the reduction's normaliser."""
    if loss.reduction == "sum":
        return loss.factor
    if isinstance(loss, CrossEntropyLoss):
        return loss.factor / n_samples
    return loss.factor / (n_samples * n_outputs)


# ---------------------------------------------------------------------------
# Activations: value, first and second derivative, elementwise
# ---------------------------------------------------------------------------
def _sigmoid_parts(x):
    """sigma(x) and 1 - sigma(x), each accurate for large |x|."""
    return np.exp(-np.logaddexp(0.0, -x)), np.exp(-np.logaddexp(0.0, x))


#: activations defined outside ghess: ``{layer class: fn(layer, s) -> (f, f', f'')}``
_REGISTERED_ACTIVATIONS = {}


def register_reference_activation(layer_type, fn):
    """Teach the reference an elementwise activation defined outside ghess.

    ``fn(layer, s)`` returns ``f(s), f'(s), f''(s)`` for a float64 array ``s``,
    written independently of the layer's own code (the point of a reference).
    """
    _REGISTERED_ACTIVATIONS[layer_type] = fn


def _activation(layer, s):
    """Return ``f(s), f'(s), f''(s)`` for an activation layer."""
    registered = _REGISTERED_ACTIVATIONS.get(type(layer))
    if registered is not None:
        return registered(layer, s)
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
    if isinstance(layer, SiLU):
        p, q = _sigmoid_parts(s)
        # (s sigma)' = sigma + s sigma (1 - sigma); (s sigma)'' = 2 sigma' + s sigma''
        return s * p, p + s * p * q, 2 * p * q + s * p * q * (q - p)
    if isinstance(layer, ELU):
        alpha, positive = layer.alpha, s > 0
        e = np.exp(np.minimum(s, 0.0))
        # ELU'(0) = alpha, as in PyTorch
        return (np.where(positive, s, alpha * np.expm1(np.minimum(s, 0.0))),
                np.where(positive, 1.0, alpha * e), np.where(positive, 0.0, alpha * e))
    if isinstance(layer, GELU) and layer.approximate == "none":
        cdf = 0.5 * scipy.special.erfc(-s / np.sqrt(2.0))
        pdf = np.exp(-0.5 * s * s) / np.sqrt(2.0 * np.pi)
        # (s Phi)' = Phi + s phi; (s Phi)'' = 2 phi + s phi' = phi (2 - s^2)
        return s * cdf, cdf + s * pdf, pdf * (2.0 - s * s)
    if isinstance(layer, GELU):
        k = np.sqrt(2.0 / np.pi)
        u = k * (s + 0.044715 * s ** 3)
        du, d2u = k * (1 + 3 * 0.044715 * s ** 2), k * 6 * 0.044715 * s
        # (1 + tanh(u)) / 2 = p and 1 - tanh(u)^2 = 4 p q with p, q = sigma(+-2u): no
        # cancellation where tanh(u) rounds to -1 (x < -5)
        p, q = _sigmoid_parts(2.0 * u)
        t, sech2 = p - q, 4.0 * p * q
        # y = s (1 + t) / 2; y' = (1 + t)/2 + s sech2 du / 2;
        # y'' = sech2 du + s (sech2 d2u - 2 t sech2 du^2) / 2
        return (s * p, p + 0.5 * s * sech2 * du,
                sech2 * du + 0.5 * s * (sech2 * d2u - 2.0 * t * sech2 * du ** 2))
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
# Convolution and pooling: direct sums over the kernel offsets
# ---------------------------------------------------------------------------
# Arrays are (..., C, H, W): one sample (C, H, W) or a batch (N, C, H, W).
# The window of output position (i, j) reads, at kernel offset (a, b), the
# zero-padded input at row i*sh + a*dh and column j*sw + b*dw. For one offset,
# those positions over all (i, j) form a single strided slice of the padded
# input (``_tap``), so each layer below is the textbook sum written as a Python
# loop over the kernel offsets, an explicit sum over channels, and the output
# positions taken all at once by that slice. No unfolding (im2col) and no
# engine code: this is a different method from the fast path's on purpose.
def _dilation(layer):
    return getattr(layer, "dilation", (1, 1))  # the poolings are undilated


def _out_size(layer, height, width):
    """``(out_h, out_w)``: floor((H + 2 p - d (k - 1) - 1) / s) + 1 per axis, as PyTorch."""
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in
                 zip((height, width), layer.kernel_size, layer.stride, layer.padding,
                     _dilation(layer)))


def _kernel_offsets(layer):
    """Every kernel offset (a, b), in row-major order."""
    kh, kw = layer.kernel_size
    return [(a, b) for a in range(kh) for b in range(kw)]


def _tap(layer, a, b, out_hw):
    """Rows and columns of the padded input that offset (a, b) reads, over all outputs."""
    (sh, sw), (dh, dw), (out_h, out_w) = layer.stride, _dilation(layer), out_hw
    return (slice(a * dh, a * dh + sh * (out_h - 1) + 1, sh),
            slice(b * dw, b * dw + sw * (out_w - 1) + 1, sw))


def _pad(x, padding, fill):
    """``x`` (..., H, W) surrounded by ``padding`` rows and columns of ``fill``."""
    (ph, pw), (H, W) = padding, x.shape[-2:]
    out = np.full(x.shape[:-2] + (H + 2 * ph, W + 2 * pw), fill, dtype=x.dtype)
    out[..., ph:ph + H, pw:pw + W] = x
    return out


def _unpad(xpad, padding, in_hw):
    (ph, pw), (H, W) = padding, in_hw
    return xpad[..., ph:ph + H, pw:pw + W].copy()


def _conv2d(x, weight, layer):
    """``s[o, i, j] = sum_{c, a, b} W[o, c, a, b] xpad[c, i sh + a dh, j sw + b dw]`` (no bias)."""
    out_hw = _out_size(layer, *x.shape[-2:])
    xpad = _pad(x, layer.padding, 0.0)
    s = np.zeros(x.shape[:-3] + (weight.shape[0],) + out_hw, dtype=np.result_type(x, weight))
    for a, b in _kernel_offsets(layer):
        rows, cols = _tap(layer, a, b, out_hw)
        s += np.einsum("oc,...cij->...oij", weight[:, :, a, b], xpad[..., rows, cols])
    return s


def _conv2d_transpose(g, weight, layer, in_shape):
    """Adjoint of ``_conv2d`` in x: each offset adds ``W[o, c, a, b] g[o, i, j]`` where it read."""
    C, H, W = in_shape
    out_hw = g.shape[-2:]
    gpad = _pad(np.zeros(g.shape[:-3] + (C, H, W), dtype=np.result_type(g, weight)),
                layer.padding, 0.0)
    for a, b in _kernel_offsets(layer):
        rows, cols = _tap(layer, a, b, out_hw)
        gpad[..., rows, cols] += np.einsum("oc,...oij->...cij", weight[:, :, a, b], g)
    return _unpad(gpad, layer.padding, (H, W))  # what reached the padding is dropped


def _conv2d_weight_grad(g, x, layer):
    """Adjoint of ``_conv2d`` in W, summed over samples.

    ``dW[o, c, a, b] = sum_{n, i, j} g[n, o, i, j] xpad[n, c, i sh + a dh, j sw + b dw]``.
    """
    g = g.reshape((-1,) + g.shape[-3:])
    xpad = _pad(x.reshape((-1,) + x.shape[-3:]), layer.padding, 0.0)
    out_hw = g.shape[-2:]
    dW = np.zeros((g.shape[1], xpad.shape[1]) + layer.kernel_size, dtype=np.result_type(g, x))
    for a, b in _kernel_offsets(layer):
        rows, cols = _tap(layer, a, b, out_hw)
        dW[:, :, a, b] = np.einsum("noij,ncij->oc", g, xpad[:, :, rows, cols])
    return dW


def _maxpool_argmax(x, layer):
    """Flat index into (H, W) of the first maximum of every window (..., C, out_h, out_w).

    The offsets are visited in row-major order and a later one wins only if it
    is strictly larger, so a tie goes to the first maximum, as in PyTorch.
    Padding is -inf with index -1 and never wins; like PyTorch, the search
    starts from the window's first in-bounds element (which matters only when
    all of them are -inf).
    """
    H, W = x.shape[-2:]
    out_hw = _out_size(layer, H, W)
    xpad = _pad(x, layer.padding, -np.inf)
    index_pad = _pad(np.arange(H * W).reshape(H, W), layer.padding, -1)
    best = np.full(x.shape[:-2] + out_hw, -np.inf, dtype=x.dtype)
    argmax = np.full(best.shape, -1, dtype=np.intp)
    for a, b in _kernel_offsets(layer):
        rows, cols = _tap(layer, a, b, out_hw)
        value, index = xpad[..., rows, cols], index_pad[rows, cols]
        wins = (value > best) | ((argmax < 0) & (index >= 0))
        best = np.where(wins, value, best)
        argmax = np.where(wins, index, argmax)
    return argmax


def _maxpool_gather(x, argmax):
    """``y[c, i, j] = x[c].ravel()[argmax[c, i, j]]``: max-pooling, given the argmax."""
    flat = x.reshape(x.shape[:-2] + (-1,))
    index = argmax.reshape(argmax.shape[:-2] + (-1,))
    return np.take_along_axis(flat, index, axis=-1).reshape(argmax.shape)


def _maxpool_scatter(g, argmax, in_hw):
    """Adjoint of the gather: ``g[c, i, j]`` is added to input ``(c, argmax[c, i, j])``."""
    H, W = in_hw
    g_rows = g.reshape(-1, g.shape[-2] * g.shape[-1])
    out = np.zeros((g_rows.shape[0], H * W), dtype=g.dtype)
    # add.at accumulates: overlapping windows may route several outputs to one input
    np.add.at(out, (np.arange(g_rows.shape[0])[:, None], argmax.reshape(g_rows.shape)), g_rows)
    return out.reshape(g.shape[:-2] + (H, W))


def _avgpool(x, layer):
    """``y[c, i, j] = sum_{a, b} xpad[c, i sh + a, j sw + b] / (kh kw)`` (padded zeros count)."""
    out_hw = _out_size(layer, *x.shape[-2:])
    xpad = _pad(x, layer.padding, 0.0)
    y = np.zeros(x.shape[:-2] + out_hw, dtype=x.dtype)
    for a, b in _kernel_offsets(layer):
        rows, cols = _tap(layer, a, b, out_hw)
        y += xpad[..., rows, cols]
    return y / (layer.kernel_size[0] * layer.kernel_size[1])


def _avgpool_transpose(g, layer, in_hw):
    """Adjoint of ``_avgpool``: every window spreads ``g / (kh kw)`` over its elements."""
    gpad = _pad(np.zeros(g.shape[:-2] + tuple(in_hw), dtype=g.dtype), layer.padding, 0.0)
    for a, b in _kernel_offsets(layer):
        rows, cols = _tap(layer, a, b, g.shape[-2:])
        gpad[..., rows, cols] += g
    return _unpad(gpad, layer.padding, in_hw) / (layer.kernel_size[0] * layer.kernel_size[1])


# ---------------------------------------------------------------------------
# Layers that are linear in their input: Linear, Conv2d, batch norm, poolings, Flatten
# ---------------------------------------------------------------------------
# Each computes s = A(W) a + b with A linear in a and in W (bilinear), or, for
# the parameter-free layers, s = A a with A fixed (max-pooling: fixed by the
# argmax of the forward pass). The rules below work on one sample or a batch.
# Batch norm (evaluation mode) is s = A(gamma) (a - mean) + beta with
# A(W) x = W x / sigma per channel: bilinear in (gamma, a - mean), so its cache
# keeps the centred input a - mean in place of a.
_BATCH_NORM = (BatchNorm1d, BatchNorm2d)
_LINEAR_IN_INPUT = (Linear, Conv2d, MaxPool2d, AvgPool2d, Flatten) + _BATCH_NORM


def _per_channel(values, ndim):
    """Shape ``values`` (C,) to broadcast over the channel axis (the first of ``ndim``)."""
    return np.asarray(values, dtype=np.float64).reshape((-1,) + (1,) * (ndim - 1))


def _bn_apply(node, weight, x):
    """A(weight) x = weight x / sigma per channel (batch norm's bilinear part).

    Without affine parameters (weight None) the map is x / sigma.
    """
    layer, ndim = node.layer, len(node.shape)
    sigma = np.sqrt(layer.running_var + layer.eps)
    return x * _per_channel((1.0 if weight is None else weight) / sigma, ndim)


def _layer_params(node, params):
    """``(weight, bias)`` of a node's layer, None where absent."""
    return params.get(node.prefix + "weight"), params.get(node.prefix + "bias")


def _add_to(out, model, name, value):
    slot = model.param_slots[name]
    out[slot.start:slot.stop] += value.ravel()


def _apply(node, weight, a, cache):
    """``A(weight) a``: the layer's output without bias (for pools and Flatten, weight is None)."""
    layer = node.layer
    if isinstance(layer, Linear):
        return a @ weight.T
    if isinstance(layer, Conv2d):
        return _conv2d(a, weight, layer)
    if isinstance(layer, _BATCH_NORM):
        return _bn_apply(node, weight, a)
    if isinstance(layer, MaxPool2d):
        return _maxpool_gather(a, cache["argmax"])
    if isinstance(layer, AvgPool2d):
        return _avgpool(a, layer)
    # Flatten: (..., C, H, W) -> (..., C*H*W), C order
    return a.reshape(a.shape[:a.ndim - len(node.shape)] + (-1,))


def _apply_transpose(node, weight, g, cache):
    """``A(weight)^T g``: the gradient with respect to the layer input."""
    layer, in_shape = node.layer, node.shape
    if isinstance(layer, Linear):
        return g @ weight
    if isinstance(layer, Conv2d):
        return _conv2d_transpose(g, weight, layer, in_shape)
    if isinstance(layer, _BATCH_NORM):  # a diagonal map: its own transpose
        return _bn_apply(node, weight, g)
    if isinstance(layer, MaxPool2d):
        return _maxpool_scatter(g, cache["argmax"], in_shape[1:])
    if isinstance(layer, AvgPool2d):
        return _avgpool_transpose(g, layer, in_shape[1:])
    return g.reshape(g.shape[:-1] + in_shape)  # Flatten


def _channel_sum(values, ndim):
    """Sum ``values`` over all but the channel axis (the first of ``ndim`` per-sample axes)."""
    axes = tuple(range(values.ndim - ndim)) + tuple(range(values.ndim - ndim + 1, values.ndim))
    return values.sum(axis=axes)


def _weight_grad(layer, g, a, ndim):
    """Adjoint of ``A(W) a`` in W, summed over samples: ``g a^T`` or ``g (*) a`` (Conv2d).

    ``ndim``: the number of per-sample axes of ``a`` (batch norm's channel axis).
    """
    if isinstance(layer, Linear):
        return g.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1])
    if isinstance(layer, _BATCH_NORM):  # sum of g a / sigma per channel
        return _channel_sum(g * a, ndim) / np.sqrt(layer.running_var + layer.eps)
    return _conv2d_weight_grad(g, a, layer)


def _bias_grad(layer, g, ndim):
    """``g`` summed over samples (and over output positions for Conv2d and batch norm)."""
    if isinstance(layer, Linear):
        return g.reshape(-1, g.shape[-1]).sum(axis=0)
    if isinstance(layer, _BATCH_NORM):
        return _channel_sum(g, ndim)
    return g.reshape((-1,) + g.shape[-3:]).sum(axis=(0, 2, 3))


def _add_bias(layer, s, b, ndim):
    if isinstance(layer, _BATCH_NORM):
        return s + _per_channel(b, ndim)
    return s + (b if isinstance(layer, Linear) else b[:, None, None])


def _layer_forward(node, params, a):
    """Output of a node's layer for input ``a``, and what the backward passes need."""
    layer = node.layer
    if isinstance(layer, Residual):  # body(a) + shortcut(a), each chain on its own
        a_body, body = _chain_forward(node.body, params, a)
        a_short, shortcut = _chain_forward(node.shortcut, params, a)
        return a_body + a_short, {"body": body, "shortcut": shortcut}
    if isinstance(layer, _LINEAR_IN_INPUT):
        W, b = _layer_params(node, params)
        cache = {"a": a}
        if isinstance(layer, _BATCH_NORM):  # bilinear in (gamma, a - mean)
            cache["a"] = a - _per_channel(layer.running_mean, len(node.shape))
        if isinstance(layer, MaxPool2d):
            cache["argmax"] = _maxpool_argmax(a, layer)
        s = _apply(node, W, cache["a"], cache)
        return (s if b is None else _add_bias(layer, s, b, len(node.shape))), cache
    f, d1, d2 = _activation(layer, a)
    return f.astype(a.dtype), {"s": a, "d1": d1.astype(a.dtype), "d2": d2.astype(a.dtype)}


# ---------------------------------------------------------------------------
# The network as chains of nodes; a residual block is a node with two chains
# ---------------------------------------------------------------------------
class _Node:
    """A layer, its per-sample input shape and its parameters' name prefix.

    A residual block's node also has its ``body`` and ``shortcut`` chains (lists
    of nodes; an empty shortcut is the identity).
    """

    def __init__(self, layer, shape, prefix):
        self.layer, self.shape, self.prefix = layer, tuple(shape), prefix
        if isinstance(layer, Residual):
            self.body = _chain(layer.body, shape, prefix + "body.")
            self.shortcut = _chain(layer.shortcut, shape, prefix + "shortcut.")


def _chain(layers, shape, prefix):
    """Nodes of a chain of layers starting at per-sample input ``shape``."""
    nodes = []
    for j, layer in enumerate(layers):
        nodes.append(_Node(layer, shape, f"{prefix}{j}."))
        shape = layer.output_shape(shape)
    return nodes


def _model_chain(model):
    return [_Node(layer, model.shapes[i], f"{i}.") for i, layer in enumerate(model.layers)]


def _chain_forward(nodes, params, a):
    caches = []
    for node in nodes:
        a, cache = _layer_forward(node, params, a)
        caches.append(cache)
    return a, caches


def _chain_backward(model, nodes, params, caches, g, grad):
    """Add ``dz/dtheta^T g`` of a chain to ``grad``; return the gradient at its input."""
    for node, cache in zip(reversed(nodes), reversed(caches)):
        layer = node.layer
        if isinstance(layer, Residual):  # both chains receive g; their input gradients add
            g = (_chain_backward(model, node.body, params, cache["body"], g, grad)
                 + _chain_backward(model, node.shortcut, params, cache["shortcut"], g, grad))
        elif isinstance(layer, _LINEAR_IN_INPUT):
            W, b = _layer_params(node, params)
            ndim = len(node.shape)
            # s = A(W) a + b  =>  dW = g (x) a (outer product or correlation), db = g
            if W is not None:
                _add_to(grad, model, node.prefix + "weight",
                        _weight_grad(layer, g, cache["a"], ndim))
            if b is not None:
                _add_to(grad, model, node.prefix + "bias", _bias_grad(layer, g, ndim))
            g = _apply_transpose(node, W, g, cache)
        else:
            g = cache["d1"] * g
    return g


def _chain_r_forward(nodes, params, v, caches, ra):
    """R{input} of every node of a chain and R{output}, from R{input of the chain} ``ra``.

    ``s = A(W) a + b  =>  R{s} = A(V) a + A(W) R{a} + v_b``;
    ``a' = f(s)  =>  R{a'} = f'(s) R{s}``; a residual block's R{output} is the sum
    of its chains'. None stands for zero.
    """
    r_inputs = []
    for node, cache in zip(nodes, caches):
        layer = node.layer
        if isinstance(layer, Residual):
            r_body, rb = _chain_r_forward(node.body, params, v, cache["body"], ra)
            r_short, rs = _chain_r_forward(node.shortcut, params, v, cache["shortcut"], ra)
            r_inputs.append({"in": ra, "body": r_body, "shortcut": r_short})
            ra = rs if rb is None else (rb if rs is None else rb + rs)
            continue
        r_inputs.append(ra)
        if isinstance(layer, _LINEAR_IN_INPUT):
            W, _ = _layer_params(node, params)
            V, vb = _layer_params(node, v)
            out = None if V is None else _apply(node, V, cache["a"], cache)
            if ra is not None:
                term = _apply(node, W, ra, cache)
                out = term if out is None else out + term
            ra = out if vb is None else _add_bias(layer, out, vb, len(node.shape))
        elif ra is not None:
            ra = cache["d1"] * ra
    return r_inputs, ra


def _chain_r_backward(model, nodes, params, v, caches, r_inputs, g, rg, out):
    """Add a chain's ``R{dL/dtheta}`` to ``out``; return (g, R{g}) at its input.

    ``dW = g (x) a  =>  R{dW} = R{g} (x) a + g (x) R{a}``;  ``R{db} = R{g}``;
    ``g_in = A(W)^T g  =>  R{g_in} = A(W)^T R{g} + A(V)^T g``;
    ``g_in = f'(s) g  =>  R{g_in} = f''(s) R{s} g + f'(s) R{g}``;
    a residual block passes (g, R{g}) to both chains and adds what they return.
    """
    for node, cache, r_in in zip(reversed(nodes), reversed(caches), reversed(r_inputs)):
        layer = node.layer
        if isinstance(layer, Residual):
            gb, rgb = _chain_r_backward(model, node.body, params, v, cache["body"],
                                        r_in["body"], g, rg, out)
            gs, rgs = _chain_r_backward(model, node.shortcut, params, v, cache["shortcut"],
                                        r_in["shortcut"], g, rg, out)
            g, rg = gb + gs, rgb + rgs
        elif isinstance(layer, _LINEAR_IN_INPUT):
            W, b = _layer_params(node, params)
            V, _ = _layer_params(node, v)
            ndim = len(node.shape)
            if W is not None:
                rW = _weight_grad(layer, rg, cache["a"], ndim)
                if r_in is not None:
                    rW = rW + _weight_grad(layer, g, r_in, ndim)
                _add_to(out, model, node.prefix + "weight", rW)
            if b is not None:
                _add_to(out, model, node.prefix + "bias", _bias_grad(layer, rg, ndim))
            new_rg = _apply_transpose(node, W, rg, cache)
            if V is not None:
                new_rg = new_rg + _apply_transpose(node, V, g, cache)
            g, rg = _apply_transpose(node, W, g, cache), new_rg
        else:
            new_rg = cache["d1"] * rg
            if r_in is not None:
                new_rg = new_rg + cache["d2"] * r_in * g
            g, rg = cache["d1"] * g, new_rg
    return g, rg


# ---------------------------------------------------------------------------
# One sample through the network
# ---------------------------------------------------------------------------
def _sample_forward(model, params, x):
    """Output z of one sample ``x`` (of shape ``model.input_shape``), and per-layer caches.

    The layer steps also take a leading batch axis: the batched products call this too.
    """
    return _chain_forward(_model_chain(model), params, x)


def _sample_backward(model, params, caches, g):
    """Flat ``dz/dtheta^T g`` for one sample, given ``g`` = dL/dz (K,)."""
    grad = np.zeros(model.n_params)
    _chain_backward(model, _model_chain(model), params, caches, g, grad)
    return grad


def _r_forward(model, params, v, caches):
    """R{input} of every layer and R{z} for direction ``v`` (None stands for zero).

    The network input does not depend on theta, so its R{.} is zero.
    """
    return _chain_r_forward(_model_chain(model), params, v, caches, None)


def _r_backward(model, params, v, caches, r_inputs, g, rg, out):
    """Add ``R{dL/dtheta}`` to ``out``, from g = dL/dz and R{g} = B R{z}."""
    _chain_r_backward(model, _model_chain(model), params, v, caches, r_inputs, g, rg, out)
    return out


def _sample_hvp(model, params, caches, r, B, v):
    """Flat ``R{dL/dtheta}`` of one sample in direction ``v`` (Pearlmutter's R-operator).

    ``r`` = dL/dz and ``B`` = d2L/dz2 of this sample (already scaled); ``v`` is
    the direction in unflattened form. R{.} is the directional derivative
    d/dt (.)(theta + t v) at t = 0, applied to every line of forward and backward.
    Linear and Conv2d are bilinear in (W, a); pooling and Flatten are linear in
    ``a`` (max-pooling given the argmax of the forward pass, which R{.} reuses:
    the max is piecewise linear, so it has no second-order term).
    """
    r_inputs, rz = _r_forward(model, params, v, caches)
    return _r_backward(model, params, v, caches, r_inputs, r, B @ rz, np.zeros(model.n_params))


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
            if isinstance(loss, CrossEntropyLoss):
                G += c * _softmax_ggn(J[n], z)
            else:
                G += J[n].T @ (c * B) @ J[n]
    return G


def _softmax_ggn(J, z):
    """``J^T (diag(p) - p p^T) J`` as ``sum_{j<k} p_j p_k (J_j - J_k)^T (J_j - J_k)``.

    The same matrix (B's rows sum to zero), written without the cancellation of
    ``diag(p) - p p^T`` when the softmax saturates (p_max = 1 - 1e-8 loses eight
    digits there): every term is a product of positive numbers.
    """
    p = np.exp(z - z.max())
    p /= p.sum()
    G = np.zeros((J.shape[1], J.shape[1]))
    for j in range(J.shape[0]):
        for k in range(j + 1, J.shape[0]):
            d = J[j] - J[k]
            G += p[j] * p[k] * np.outer(d, d)
    return G


def reference_empirical_fisher(model, loss, theta, data, damping=0.0):
    r"""Dense empirical Fisher: the uncentered covariance of the per-sample gradients.

    .. math:: F = c \sum_n \nabla_\theta \ell_n \nabla_\theta \ell_n^\top + \lambda I

    with :math:`\ell_n` the loss of sample n (times the loss's ``factor``) and
    :math:`c` the reduction (1/N or 1/(N K) for ``"mean"``, 1 for ``"sum"``), as
    curvlinops' ``EFLinearOperator``. Each gradient is back-propagated on its own.

    Returns
    -------
    F : ndarray of shape (n_params, n_params), float64
    """
    theta = _theta64(model, theta)
    batches = _batches(model, loss, data)
    params = model.unflatten(theta)
    n_samples = sum(X.shape[0] for X, _ in batches)
    if loss.reduction == "sum":
        c = 1.0
    elif isinstance(loss, CrossEntropyLoss):
        c = 1.0 / n_samples
    else:  # the mean over all N K outputs, as PyTorch's MSE and BCE
        c = 1.0 / (n_samples * model.n_outputs)
    F = damping * np.eye(model.n_params)
    for X, y in batches:
        for n in range(X.shape[0]):
            z, caches = _sample_forward(model, params, X[n])
            _, dl, _ = _sample_loss(loss, z, y[n])
            g = _sample_backward(model, params, caches, loss.factor * dl)
            F += c * np.outer(g, g)
    return F


def reference_fisher_mc(model, loss, theta, data, mc_samples=1, seed=0, damping=0.0):
    r"""Dense Monte-Carlo Fisher.

    .. math:: F = c \sum_n \frac{1}{M} \sum_m J_n^\top \nabla_z \ell(z_n, \tilde y_{nm})
              \nabla_z \ell(z_n, \tilde y_{nm})^\top J_n + \lambda I

    with ``mc_samples`` targets per sample drawn by ``loss.sample_targets`` (the
    loss's predictive distribution: its specification) from
    ``numpy.random.default_rng(seed)``, sample by sample in data order, and
    :math:`c` the loss's scale (as for the GGN).

    Returns
    -------
    F : ndarray of shape (n_params, n_params), float64
    """
    theta = _theta64(model, theta)
    batches = _batches(model, loss, data)
    params = model.unflatten(theta)
    c = _scale(loss, sum(X.shape[0] for X, _ in batches), model.n_outputs)
    rng = np.random.default_rng(seed)
    F = damping * np.eye(model.n_params)
    for X, _ in batches:
        J = reference_per_sample_jacobians(model, theta, X)
        for n in range(X.shape[0]):
            z, _ = _sample_forward(model, params, X[n])
            draws = loss.sample_targets(z[None, :], rng, mc_samples)
            for m in range(mc_samples):
                _, dl, _ = _sample_loss(loss, z, draws[m, 0])
                g = J[n].T @ dl
                F += (c / mc_samples) * np.outer(g, g)
    return F


def _patches(layer, x):
    """Unfolded patches of one input (C, H, W): (P, C*kh*kw), rows in output order.

    A patch lists ``xpad[c, i sh + a dh, j sw + b dw]`` for c, a, b in C order
    (PyTorch's weight layout).
    """
    out_hw = _out_size(layer, *x.shape[-2:])
    xpad = _pad(x, layer.padding, 0.0)
    taps = [xpad[:, rows, cols] for rows, cols in
            (_tap(layer, a, b, out_hw) for a, b in _kernel_offsets(layer))]
    patch = np.stack(taps, axis=1)  # (C, kh*kw, out_h, out_w)
    return patch.reshape(patch.shape[0] * patch.shape[1], -1).T


def _output_columns(loss, fisher_type, z, y, c, mc_samples, rng):
    """Columns s (K, m) of a sample: S S^T is the output-space matrix KFAC approximates."""
    value, dl, H = _sample_loss(loss, z, y)
    if fisher_type == "type-2":  # any square root of c H: the symmetric one
        w, Q = np.linalg.eigh(c * H)
        return Q * np.sqrt(np.maximum(w, 0.0))
    if fisher_type == "empirical":  # c / factor times (factor dl)(factor dl)^T
        return np.sqrt(c * loss.factor) * dl[:, None]
    draws = loss.sample_targets(z[None, :], rng, mc_samples)
    return np.stack([_sample_loss(loss, z, draws[m, 0])[1] for m in range(mc_samples)],
                    axis=1) * np.sqrt(c / mc_samples)


def _kfac_terms(model, loss, theta, data, fisher_type, mc_samples, seed):
    """Yield, per sample, ``{layer: (a (T, d_in), g (m, T, d_out))}`` for KFAC and EKFAC.

    ``a`` the layer input's patches (Linear: the input, T = 1), ``g`` each output
    column back-propagated to the layer output: ``g = D^T s`` with ``D`` the
    Jacobian of the network output with respect to the layer output (one unit
    vector e_k back-propagated at a time).
    """
    theta = _theta64(model, theta)
    batches = _batches(model, loss, data)
    params = model.unflatten(theta)
    c = _scale(loss, sum(X.shape[0] for X, _ in batches), model.n_outputs)
    K = model.n_outputs
    nodes = _model_chain(model)
    layers = [i for i, slots in enumerate(model.layer_slots) if slots]
    for i in layers:
        if not isinstance(model.layers[i], (Linear, Conv2d)):
            raise ValueError(f"reference KFAC: layer {i} ({model.layers[i]!r}) has no "
                             "Kronecker factors")
    rng = np.random.default_rng(seed)
    for X, y in batches:
        for n in range(X.shape[0]):
            z, caches = _sample_forward(model, params, X[n])
            S = _output_columns(loss, fisher_type, z, y[n], c, mc_samples, rng)
            terms = {}
            for i in layers:
                layer = model.layers[i]
                D = np.stack([_chain_backward(model, nodes[i + 1:], params, caches[i + 1:],
                                              np.eye(K)[k], np.zeros(model.n_params))
                              for k in range(K)])
                G = np.tensordot(S.T, D, axes=1)  # (m, *out_shape)
                if isinstance(layer, Linear):
                    terms[i] = (caches[i]["a"][None, :], G[:, None, :])
                else:
                    terms[i] = (_patches(layer, caches[i]["a"]),
                                G.reshape(G.shape[0], G.shape[1], -1).transpose(0, 2, 1))
            yield terms


def _kfac_layout(model, i, joint, block):
    """Place a layer's (weight, bias) block matrices in parameter order; returns (index, M)."""
    prefix = f"{i}."
    w = model.param_slots[prefix + "weight"]
    if i in joint:
        b = model.param_slots[prefix + "bias"]
        n_out = b.stop - b.start
        d = (w.stop - w.start) // n_out
        # the joint index (o, j) of [W | b]: j < d the weight's (o, j), j = d the bias
        index = np.empty((n_out, d + 1), dtype=np.intp)
        index[:, :d] = np.arange(w.start, w.stop).reshape(n_out, d)
        index[:, d] = np.arange(b.start, b.stop)
        return [(index.ravel(), block[0])]
    places = [(np.arange(w.start, w.stop), block[0])]
    if prefix + "bias" in model.param_slots:
        b = model.param_slots[prefix + "bias"]
        places.append((np.arange(b.start, b.stop), block[1]))
    return places


def _kfac_factors(model, loss, theta, data, fisher_type, kfac_approx, mc_samples, seed,
                  joint):
    """KFAC's A and B per layer (see ``reference_kfac``)."""
    n_samples = sum(X.shape[0] for X, _ in _batches(model, loss, data))
    A, B = {}, {}
    for terms in _kfac_terms(model, loss, theta, data, fisher_type, mc_samples, seed):
        for i, (a, g) in terms.items():
            if kfac_approx == "reduce":
                a, g = a.mean(axis=0, keepdims=True), g.sum(axis=1, keepdims=True)
            if i in joint:
                a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
            A[i] = A.get(i, 0.0) + a.T @ a / (n_samples * a.shape[0])
            g = g.reshape(-1, g.shape[-1])
            B[i] = B.get(i, 0.0) + g.T @ g
    return A, B


def reference_kfac(model, loss, theta, data, fisher_type="type-2", kfac_approx="expand",
                   mc_samples=1, seed=0, separate_weight_and_bias=True):
    r"""Dense KFAC matrix: per Linear or Conv2d layer a Kronecker block, zero elsewhere.

    For each sample, each of its output columns s (``S S^T`` is ``c`` times the
    loss Hessian for ``"type-2"``; a scaled gradient at the true target for
    ``"empirical"``, at drawn targets for ``"mc"``) is back-propagated to the
    layer's output: ``g = D^T s`` with ``D`` the Jacobian of the network output
    with respect to the layer output (one unit vector e_k back-propagated at a
    time). With the layer input's patches a_t (Linear: the input, T = 1):

    - ``"expand"``: ``A = 1/(N T) sum_{n,t} a a^T``, ``B = sum_{n,s,t} g_t g_t^T``;
    - ``"reduce"``: a averaged and g summed over the T positions first, ``A = 1/N sum``.

    The weight block is ``kron(B, A)`` in the weight's row-major order, the bias
    block ``B``; or, with ``separate_weight_and_bias=False``, a ones entry
    appended to every a and the joint block ``kron(B, A)`` over (weight, bias).
    Every parametrised layer must be a Linear or Conv2d at the top level.
    """
    joint = set() if separate_weight_and_bias else {
        i for i, layer in enumerate(model.layers) if model.layer_slots[i] and layer.bias}
    A, B = _kfac_factors(model, loss, theta, data, fisher_type, kfac_approx, mc_samples, seed,
                         joint)
    KF = np.zeros((model.n_params, model.n_params))
    for i in A:
        for index, block in _kfac_layout(model, i, joint, (np.kron(B[i], A[i]), B[i])):
            KF[np.ix_(index, index)] = block
    return KF


def reference_ekfac(model, loss, theta, data, fisher_type="type-2", kfac_approx="expand",
                    mc_samples=1, seed=0, separate_weight_and_bias=True):
    r"""Dense eigenvalue-corrected KFAC: KFAC's eigenbasis, per-sample gradient moments.

    With ``A = Q_A diag(.) Q_A^T`` and ``B = Q_B diag(.) Q_B^T`` the factors of
    :func:`reference_kfac`, each layer's weight block is ``(Q_B (x) Q_A) diag(E)
    (Q_B (x) Q_A)^T`` with ``E = sum_{n,s} (Q_B^T G_{ns} Q_A)^2`` elementwise and
    ``G_{ns} = sum_t g_{nst} a_{nt}^T`` the gradient of sample n for column s
    (its patches and output gradients, all T positions); the bias's block is
    ``Q_B diag(sum_{n,s} (Q_B^T sum_t g_{nst})^2) Q_B^T``. The draws of ``"mc"``
    are the same in both passes.
    """
    joint = set() if separate_weight_and_bias else {
        i for i, layer in enumerate(model.layers) if model.layer_slots[i] and layer.bias}
    A, B = _kfac_factors(model, loss, theta, data, fisher_type, kfac_approx, mc_samples, seed,
                         joint)
    Q = {i: (np.linalg.eigh(A[i])[1], np.linalg.eigh(B[i])[1]) for i in A}
    E = {}
    for terms in _kfac_terms(model, loss, theta, data, fisher_type, mc_samples, seed):
        for i, (a, g) in terms.items():
            Qa, Qb = Q[i]
            if i in joint:
                a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
            for s in range(g.shape[0]):
                G = g[s].T @ a  # (d_out, d_in): sum over the positions
                Ew, Eb = E.get(i, (0.0, 0.0))
                E[i] = (Ew + (Qb.T @ G @ Qa) ** 2, Eb + (Qb.T @ g[s].sum(axis=0)) ** 2)
    EK = np.zeros((model.n_params, model.n_params))
    for i in A:
        Qa, Qb = Q[i]
        Qw = np.kron(Qb, Qa)
        weight = Qw @ np.diag(E[i][0].ravel()) @ Qw.T
        bias = Qb @ np.diag(E[i][1]) @ Qb.T
        for index, block in _kfac_layout(model, i, joint, (weight, bias)):
            EK[np.ix_(index, index)] = block
    return EK


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
                H[:, j] += _sample_hvp(model, params, caches, c * dl, c * d2l,
                                       model.unflatten(e_j))
    return H


# ---------------------------------------------------------------------------
# Batched products: what a plain NumPy implementation computes per product
# ---------------------------------------------------------------------------
def _batch_dtype(theta):
    theta = np.asarray(theta)
    return np.float32 if theta.dtype == np.float32 else np.float64


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


def _batched_setup(model, loss, theta, data, v):
    """Shared set-up of the batched products: parameters, direction, scale, output, batches.

    Computes in float32 when theta is float32, else in float64.
    """
    dtype = _batch_dtype(theta)
    theta = np.asarray(theta, dtype=dtype)
    batches = _batches(model, loss, data)
    scale = _scale(loss, sum(X.shape[0] for X, _ in batches), model.n_outputs)
    params = model.unflatten(theta)
    vp = model.unflatten(np.asarray(v, dtype=dtype))
    out = np.zeros(model.n_params, dtype=dtype)
    batches = [(X.astype(dtype), y if isinstance(loss, CrossEntropyLoss) else y.astype(dtype))
               for X, y in batches]
    return params, vp, scale, out, batches


def reference_ggn_matvec(model, loss, theta, data, v):
    """GGN-vector product ``G v`` computed batch-wise with plain NumPy.

    Forward pass, R-forward (``J v``), ``B J v``, backward (``J^T B J v``) for
    every product, vectorised over the samples of a batch: the baseline a plain
    NumPy implementation gives. Computes in float32 when theta is float32,
    else in float64.
    """
    params, vp, scale, out, batches = _batched_setup(model, loss, theta, data, v)
    for X, y in batches:
        z, caches = _sample_forward(model, params, X)
        _, apply_B = _batch_loss_grad(loss, z, y, scale)
        _, rz = _r_forward(model, params, vp, caches)
        # the backward steps are those of one sample; they sum over a batch axis
        out += _sample_backward(model, params, caches, apply_B(rz)).astype(out.dtype)
    return out


def reference_hessian_matvec(model, loss, theta, data, v):
    """Hessian-vector product ``H v`` batch-wise with plain NumPy (R-operator).

    Forward, backward (the gradients of every layer), R-forward and R-backward
    for every product, vectorised over the samples of a batch. Computes in
    float32 when theta is float32, else in float64.
    """
    params, vp, scale, out, batches = _batched_setup(model, loss, theta, data, v)
    for X, y in batches:
        z, caches = _sample_forward(model, params, X)
        g, apply_B = _batch_loss_grad(loss, z, y, scale)
        r_inputs, rz = _r_forward(model, params, vp, caches)
        _r_backward(model, params, vp, caches, r_inputs, g, apply_B(rz), out)
    return out
