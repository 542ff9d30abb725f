"""Stored per-sample Jacobian factors: built once per chunk, reused by every product.

``jacobian_factors`` back-propagates the K output unit vectors once per chunk
and keeps, per parametrised layer, its input and ``D = dz/ds`` (n, K, width),
or D after the layer's activation and pooling when that is smaller
(``plan.factor_plan``). ``factor_jvp``, ``factor_vjp`` and ``factor_ggn`` then
give ``J v``, ``J^T u`` and ``J^T B J v`` without any pass through the network;
``factor_sample_jacobians`` expands them into dense per-sample Jacobians.
"""

import math

import numpy as np

from .._kernels import dense
from .plan import plan_for

__all__ = ["LayerFactor", "ChunkFactors", "jacobian_factors", "identity_factor",
           "factor_sample_jacobians", "factor_jvp", "factor_vjp", "factor_ggn", "step_context"]


class LayerFactor:
    """One parametrised layer's share of the stored Jacobian factors of a chunk.

    ``ctx`` holds what the layer's parameter derivatives need (a dense layer's
    input, a convolution's input or unfolded input). ``D[n, c, o] = dz[n, c] /
    dp[n, o]`` is taken at a point p after the layer: its output s, or, when
    that is smaller, the end of the parameter-free layers that follow it
    (``path``, as ``(step, context)`` pairs: ``plan.factor_plan``). After a
    convolution, ReLU and 2x2 max-pooling, D at the pooled output is a quarter
    of D at s, and the path keeps f' and the argmax at the pooled positions
    only. ``D`` of shape (K, width) is the same for every sample: the weight of
    the last dense layer, when p is its input. ``D`` None means the identity
    (p is the network output, reached through identity layers only).
    """

    __slots__ = ("index", "ctx", "D", "path")

    def __init__(self, index, ctx, D, path):
        self.index = index
        self.ctx = ctx
        self.D = D
        self.path = path


class ChunkFactors:
    """The :class:`LayerFactor` of every parametrised layer for one chunk of n samples."""

    __slots__ = ("n", "layers", "loss_state", "dtype")

    def __init__(self, n, layers, dtype, loss_state=None):
        self.n = n
        self.layers = layers
        self.dtype = dtype
        self.loss_state = loss_state

    def nbytes(self, exclude=()):
        """Bytes of the distinct buffers that the stored arrays hold.

        Views count their base's buffer, once. ``exclude``: arrays whose buffers
        are not the factors' own (the data and the parameters they view).
        """
        arrays = held_arrays([(f.ctx, f.D, [ctx for _, ctx in f.path]) for f in self.layers]
                             + [self.loss_state])
        return buffer_bytes(arrays, exclude)


def buffer_bytes(arrays, exclude=()):
    """Bytes of the distinct buffers under ``arrays``, except those of ``exclude``."""
    roots = {}
    for x in arrays:
        while isinstance(x.base, np.ndarray):
            x = x.base
        roots[id(x)] = x
    return sum(root.nbytes for root in roots.values()
               if not any(np.shares_memory(root, e) for e in exclude))


def held_arrays(obj):
    """Yield the arrays in nested dicts, lists and tuples (a residual block's contexts)."""
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from held_arrays(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from held_arrays(value)


def step_context(step, indices, ctxs, n_threads):
    """Return a step's context: its layer's forward context, or a fused pair's own."""
    if len(indices) == 2:
        return step.context(ctxs[indices[0]], ctxs[indices[1]], n_threads)
    return ctxs[indices[0]]


def _path_contexts(path, ctxs, n_threads):
    """Return the ``(step, context)`` pairs a stored factor keeps for its path."""
    return tuple((step, step_context(step, indices, ctxs, n_threads)) for step, indices in path)


def jacobian_factors(model, lparams, ctxs, n, dtype, n_threads, paths=True, loss_state=None):
    """Back-propagate the K output unit vectors once; keep each layer's D (see factor_plan).

    ``paths=False`` for factors that are expanded into dense Jacobians at once
    (``factor_sample_jacobians`` needs D at the layer output: a path would only
    be pushed back through again). ``loss_state`` is kept with the factors (the
    GGN's B needs it).
    """
    model_plan = plan_for(model, np.dtype(dtype).itemsize)
    plan = model_plan.factors if paths else model_plan.dense_factors
    first = model_plan.first
    D = None  # identity
    D_at_input = {len(model.layers): None}  # D at the input of the parametrised layers
    layers = []
    for i in range(len(model.layers) - 1, first - 1, -1):
        layer, ctx = model.layers[i], ctxs[i]
        place = plan.get(i)
        if place is not None:
            if place.shared:  # the next layer's weight, the same for every sample
                kept = model.layers[place.end].input_jacobian(lparams[place.end])
            else:
                kept = D_at_input[place.end] if place.path else D
            layers.append(LayerFactor(i, layer.factor_context(ctx, n_threads), kept,
                                      _path_contexts(place.path, ctxs, n_threads)))
        if i == first:
            break
        if D is None:
            if layer.is_identity:
                continue  # the identity stays the identity
            D = identity_factor(n, math.prod(model.shapes[i + 1]), dtype)
        D = layer.vjp(lparams[i], ctx, D, None, True, n_threads)
        if i in plan:
            D_at_input[i] = D
    layers.reverse()
    return ChunkFactors(n, layers, dtype, loss_state)


def identity_factor(n, width, dtype):
    """D = I (n, width, width): the factor of the network output itself."""
    return np.ascontiguousarray(np.broadcast_to(np.eye(width, dtype=dtype), (n, width, width)))


def _path_jvp(path, U, n_threads):
    """Push a layer-output tangent U (n, k, width) through its factor path."""
    for step, ctx in path:
        U = step.jvp({}, None, ctx, U, n_threads)
    return U


def _path_vjp(path, S, n_threads):
    """Pull a cotangent at the end of a factor path back to the layer output."""
    for step, ctx in reversed(path):
        S = step.vjp({}, ctx, S, None, True, n_threads)
    return S


def factor_sample_jacobians(model, factors, J_out, n_threads):
    """Write the dense per-sample Jacobians (n, K, n_params) of a chunk from its factors."""
    for f in factors.layers:
        D = f.D
        if D is None:
            D = identity_factor(factors.n, model.n_outputs, factors.dtype)
        elif D.ndim == 2:  # shared by all samples
            D = np.ascontiguousarray(np.broadcast_to(D, (factors.n,) + D.shape))
        D = _path_vjp(f.path, D, n_threads)  # D at the layer's output
        model.layers[f.index].sample_jacobian(f.ctx, D, model.layer_range(f.index)[0], J_out,
                                              n_threads)


def _factor_tangent(model, lparams, tangents, f, n_threads):
    """Return (dp/dw) v at the factor's point p: the layer's (df/dw) v through the path."""
    i = f.index
    U = model.layers[i].jvp(lparams[i], tangents[i], f.ctx, None, n_threads)
    return _path_jvp(f.path, U, n_threads)


def _add_shared_jvp(f, U, Jv, n_threads):
    """Jv += D U for a factor D that is the identity (None) or shared by all samples."""
    if f.D is None:
        Jv += U
    else:  # one GEMM
        dense.gemm_rowmajor(False, True, 1.0, U.reshape(-1, U.shape[2]), f.D, 1.0,
                            Jv.reshape(-1, Jv.shape[2]), n_threads)


def _shared_vjp(f, u, n_threads):
    """D^T u for a factor D that is the identity (None) or shared by all samples."""
    if f.D is None:
        return u
    n, k = u.shape[0], u.shape[1]
    S = np.empty((n, k, f.D.shape[1]), dtype=u.dtype)
    dense.gemm_rowmajor(False, False, 1.0, u.reshape(n * k, -1), f.D, 0.0,
                        S.reshape(n * k, -1), n_threads)
    return S


def _per_sample(f):
    """Whether a factor keeps a D of its own for every sample, (n, K, width)."""
    return f.D is not None and f.D.ndim == 3


def factor_jvp(model, lparams, tangents, factors, k, n_threads):
    """J v (n, k, K) from stored factors: per layer U = (dp/dw) v, then D U."""
    Jv = np.zeros((factors.n, k, model.n_outputs), dtype=factors.dtype)
    for f in factors.layers:
        U = _factor_tangent(model, lparams, tangents, f, n_threads)
        if _per_sample(f):
            dense.contract_factor(f.D, U, Jv, True, n_threads)
        else:
            _add_shared_jvp(f, U, Jv, n_threads)
    return Jv


def factor_vjp(model, factors, u, accs, n_threads):
    """Accumulate J^T u from stored factors: per layer S = D^T u, then (dp/dw)^T S."""
    n, k = u.shape[0], u.shape[1]
    for f in factors.layers:
        if _per_sample(f):
            S = np.empty((n, k, f.D.shape[2]), dtype=u.dtype)
            dense.contract_factor_t(f.D, u, S, n_threads)
        else:
            S = _shared_vjp(f, u, n_threads)
        S = _path_vjp(f.path, S, n_threads)
        model.layers[f.index].param_vjp(f.ctx, S, accs[f.index], n_threads)


def factor_ggn(model, lparams, loss, scale, tangents, factors, accs, k, n_threads):
    """Accumulate J^T B J v from stored factors.

    As ``factor_jvp``, ``loss.hessian_apply`` and ``factor_vjp``, but the
    per-sample factors meet J v, B and J^T in one pass over the samples
    (``dense.ggn_factor_core``): each sample's D is read from memory once.
    """
    Jv = np.zeros((factors.n, k, model.n_outputs), dtype=factors.dtype)
    tangent_at = [_factor_tangent(model, lparams, tangents, f, n_threads)
                  for f in factors.layers]
    for f, U in zip(factors.layers, tangent_at):
        if not _per_sample(f):
            _add_shared_jvp(f, U, Jv, n_threads)
    own = [j for j, f in enumerate(factors.layers) if _per_sample(f)]
    cotangent_at = {j: np.empty_like(tangent_at[j]) for j in own}
    u = np.empty_like(Jv)
    kind, state, factor = loss.hessian_kernel_args(factors.loss_state, scale, factors.dtype)
    dense.ggn_factor_core(tuple(factors.layers[j].D for j in own),
                          tuple(tangent_at[j] for j in own),
                          tuple(cotangent_at[j] for j in own),
                          Jv, u, kind, state, factor, n_threads)
    del tangent_at  # free before the backward's temporaries
    for j, f in enumerate(factors.layers):
        S = cotangent_at.pop(j) if j in cotangent_at else _shared_vjp(f, u, n_threads)
        S = _path_vjp(f.path, S, n_threads)
        model.layers[f.index].param_vjp(f.ctx, S, accs[f.index], n_threads)
