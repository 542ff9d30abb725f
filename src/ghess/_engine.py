"""The propagation engine: chunk-level passes through a Sequential.

All functions work on ONE chunk of samples and delegate each layer's math to
the layer's rules (``ghess.layers``), which call the Cython kernels. Passes:

- ``forward_chunk``: outputs and per-layer contexts (inputs, f', f'').
- ``jvp_chunk``: ``J v`` for k directions (R-forward).
- ``vjp_chunk``: ``J^T u`` accumulated into per-layer parameter accumulators.
- ``jacobian_factors``: per parametrised layer, its input and ``D = dz/ds`` (n, K, out),
  or D after the layer's activation/pooling when smaller (``factor_plan``):
  the stored-Jacobian path of DESIGN.md, reused for every product.
- ``factor_jvp`` / ``factor_vjp`` / ``factor_ggn``: ``J v``, ``J^T u`` and
  ``J^T B J v`` from those factors, without any pass through the network.
- ``gradient_trace`` / ``hvp_chunk``: what the Hessian product keeps per chunk
  and the R-operator backward that uses it.
"""

import math

import numpy as np

from ._kernels import dense
from .conv import ActivationMaxPool


def param_layer_indices(model):
    """Return the indices of the layers that own parameters."""
    return [i for i, slots in enumerate(model._layer_slots) if slots]


# ---------------------------------------------------------------------------
# forward and first-order passes
# ---------------------------------------------------------------------------

def forward_chunk(model, lparams, X, need, n_threads):
    """Forward pass; ``need`` = 0 (outputs), 1 (+ f'), 2 (+ f'')."""
    ctxs = []
    x = X.reshape(X.shape[0], -1)  # activations are kept flat per sample (C order)
    for layer, params in zip(model.layers, lparams):
        ctx = {}
        x = layer.forward(params, x, ctx, need, n_threads)
        ctxs.append(ctx)
    return ctxs, x


def forward_outputs(model, theta, X, n_threads, chunk_size=4096):
    """Network outputs (N, K) in theta's dtype, chunk by chunk."""
    from ._config import computing, resolve_n_threads

    lparams = model.layer_params(theta)
    out = np.empty((X.shape[0], model.n_outputs), dtype=theta.dtype)
    omp = resolve_n_threads(n_threads)
    with computing():
        for start in range(0, X.shape[0], chunk_size):
            _, z = forward_chunk(model, lparams, X[start:start + chunk_size], 0, omp)
            out[start:start + z.shape[0]] = z
    return out


def prepare_tangents(model, V):
    """Per layer, the GEMM-ready pieces of the directions V (k, n_params)."""
    tangents = []
    for i, layer in enumerate(model.layers):
        start, stop = model.layer_range(i)
        tangents.append(layer.split_tangent(V[:, start:stop]) if stop > start else None)
    return tangents


class Accumulators(list):
    """Per-layer parameter accumulators (None for layers without parameters).

    ``into`` is the flat (1, n_params) output they are views of, or None.
    """

    into = None


def new_accumulators(model, k, dtype, out=None):
    """Zeroed per-layer parameter accumulators for k directions.

    With ``out`` (k, n_params), zeroed and C-contiguous, and k = 1, they are
    views of ``out``: products and gradients accumulate in place, with no
    zeroing and no copy of their own (``accumulators_to_flat`` adds nothing).
    """
    in_place = out is not None and k == 1 and out.flags.c_contiguous
    accs = Accumulators()
    for i, layer in enumerate(model.layers):
        if not model._layer_slots[i]:
            accs.append(None)
            continue
        start, stop = model.layer_range(i)
        accs.append(layer.new_accumulator(k, dtype, out[0, start:stop] if in_place else None))
    accs.into = out if in_place else None
    return accs


def accumulators_to_flat(model, accs, out):
    """Add per-layer accumulators into ``out`` (k, n_params), unless they are its views."""
    if accs.into is out:
        return
    for i, layer in enumerate(model.layers):
        if accs[i] is not None:
            start, stop = model.layer_range(i)
            layer.accumulator_to_flat(accs[i], out[:, start:stop])


def jvp_chunk(model, lparams, tangents, ctxs, k, n_threads):
    """R-forward: J v for k directions, shape (n, k, K)."""
    rx = None
    for layer, params, tangent, ctx in zip(model.layers, lparams, tangents, ctxs):
        rx = layer.jvp(params, tangent, ctx, rx, n_threads)
    return rx  # never None: the operators refuse models without parameters


def vjp_chunk(model, lparams, ctxs, gz, accs, n_threads):
    """Backward: accumulate J^T gz (gz of shape (n, k, K)) into ``accs``."""
    first = param_layer_indices(model)[0]
    g = gz
    for i in range(len(model.layers) - 1, first - 1, -1):
        g = model.layers[i].vjp(lparams[i], ctxs[i], g, accs[i], i > first, n_threads)


# ---------------------------------------------------------------------------
# stored per-sample Jacobian factors
# ---------------------------------------------------------------------------

class LayerFactor:
    """One parametrised layer's share of the stored Jacobian factors of a chunk.

    ``ctx`` holds what the layer's parameter derivatives need (a dense layer's
    input, a convolution's input or unfolded input). ``D[n, c, o] = dz[n, c] /
    dp[n, o]`` is taken at a point p after the layer: its output s, or, when
    that is smaller, the end of the parameter-free layers that follow it
    (``path``, as ``(step, context)`` pairs: ``path_steps``). After a
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

    def nbytes(self):
        """Bytes held by the stored arrays (inputs that are views of data excluded)."""
        arrays = []
        for f in self.layers:
            arrays.extend(f.ctx.values())
            arrays.append(f.D)
            for _, ctx in f.path:
                arrays.extend(ctx.values())
        arrays.append(self.loss_state)
        return sum(x.nbytes for x in arrays
                   if x is not None and (x.base is None or x.flags.owndata))


def _shared_end(model, nxt):
    """Whether D at the input of layer ``nxt`` is one matrix for every sample.

    True when ``nxt`` is the last parametrised layer, its input Jacobian is
    sample-independent (a dense layer: its weight) and only identity layers
    follow it: then D there is that weight, and a factor ending there keeps no
    per-sample D at all.
    """
    return (nxt < len(model.layers) and model.layers[nxt].has_shared_input_jacobian
            and all(layer.is_identity for layer in model.layers[nxt + 1:]))


def factor_plan(model, itemsize, paths=True):
    """Where each parametrised layer's factor D is taken, and the bytes per sample it costs.

    Returns ``{layer index: (path, bytes, shared)}``: ``path`` is the tuple of
    parameter-free layers after the layer that D is pushed through (empty: D at
    the layer's output), ``bytes`` what D and the path's contexts keep per
    sample, ``shared`` whether D at the end of the path is the next layer's
    sample-independent input Jacobian (``_shared_end``). D goes to the end of
    the path when that keeps fewer bytes, and ``paths=False`` keeps every D at
    its layer's output, per sample.
    """
    K = model.n_outputs
    n_layers = len(model.layers)
    param_layers = param_layer_indices(model)
    plan = {}
    for i, nxt in zip(param_layers, param_layers[1:] + [n_layers]):
        after = model.layers[i + 1:]
        at_output_bytes = (0 if all(layer.is_identity for layer in after)
                           else K * int(np.prod(model.shapes[i + 1])) * itemsize)
        path = tuple(range(i + 1, nxt))
        shared = paths and _shared_end(model, nxt)
        end_bytes = (0 if nxt == n_layers or shared
                     else K * int(np.prod(model.shapes[nxt])) * itemsize)  # D at its end
        kept = end_bytes + path_bytes(model, path, itemsize)
        if paths and (path or shared) and kept < at_output_bytes:
            plan[i] = (path, kept, shared)
        else:
            plan[i] = ((), at_output_bytes, False)
    return plan


def path_steps(model, path, second_order=False):
    """Return the steps of a factor path, as ``(step, layer indices)`` pairs.

    A step is a layer, or an activation and the max-pooling after it fused
    into one (``conv.ActivationMaxPool``); ``second_order`` fuses only pairs
    whose Hessian R-backward is linear too (f'' = 0).
    """
    steps = []
    j = 0
    while j < len(path):
        layer = model.layers[path[j]]
        if j + 1 < len(path) and ActivationMaxPool.fuses(layer, model.layers[path[j + 1]],
                                                         second_order):
            steps.append((ActivationMaxPool(layer, model.layers[path[j + 1]]),
                          (path[j], path[j + 1])))
            j += 2
        else:
            steps.append((layer, (path[j],)))
            j += 1
    return steps


def path_bytes(model, path, itemsize):
    """Bytes per sample that a factor path's steps keep."""
    return sum(step.factor_bytes(model.shapes[indices[0]], itemsize, False)
               for step, indices in path_steps(model, path))


def _step_context(step, indices, ctxs, n_threads):
    """Return a step's context: its layer's forward context, or a fused pair's own."""
    if len(indices) == 2:
        return step.context(ctxs[indices[0]], ctxs[indices[1]], n_threads)
    return ctxs[indices[0]]


def _path_contexts(model, path, ctxs, n_threads):
    """Return the ``(step, context)`` pairs a stored factor keeps for its path."""
    return tuple((step, _step_context(step, indices, ctxs, n_threads))
                 for step, indices in path_steps(model, path))


def jacobian_factors(model, lparams, ctxs, n, dtype, n_threads, paths=True):
    """Back-propagate the K output unit vectors once; keep each layer's D (see factor_plan).

    ``paths=False`` for factors that are expanded into dense Jacobians at once
    (``factor_sample_jacobians`` needs D at the layer output: a path would only
    be pushed back through again).
    """
    plan = factor_plan(model, np.dtype(dtype).itemsize, paths)
    first = param_layer_indices(model)[0]
    D = None  # identity
    D_at_input = {len(model.layers): None}  # D at the input of the parametrised layers
    layers = []
    for i in range(len(model.layers) - 1, first - 1, -1):
        layer, ctx = model.layers[i], ctxs[i]
        if i in plan:
            path, _, shared = plan[i]
            end = path[-1] + 1 if path else i + 1  # the layer whose input D is taken at
            if shared:  # the next layer's weight, the same for every sample
                kept = model.layers[end].input_jacobian(lparams[end])
            else:
                kept = D_at_input[end] if path else D
            layers.append(LayerFactor(i, layer.factor_context(ctx, n_threads), kept,
                                      _path_contexts(model, path, ctxs, n_threads)))
        if i == first:
            break
        if D is None:
            if layer.is_identity:
                continue  # the identity stays the identity
            D = identity_factor(n, int(np.prod(model.shapes[i + 1])), dtype)
        D = layer.vjp(lparams[i], ctx, D, None, True, n_threads)
        if i in plan:
            D_at_input[i] = D
    layers.reverse()
    return ChunkFactors(n, layers, dtype)


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


# ---------------------------------------------------------------------------
# Hessian products
# ---------------------------------------------------------------------------

class GradientTrace:
    """What a Hessian product needs of one chunk, independent of the direction.

    Per step of ``hessian_steps``, at the index of its first layer: ``ctxs``,
    the step's context (a fused activation + max-pooling keeps the argmax and
    f' there; its second layer's entry is empty), and ``grads``, dL/d(output)
    where the step's R-backward reads it (``uses_output_grad``), else None.
    """

    __slots__ = ("ctxs", "grads", "loss_state", "loss_sum")

    def __init__(self, ctxs, grads, loss_state, loss_sum):
        self.ctxs = ctxs
        self.grads = grads
        self.loss_state = loss_state
        self.loss_sum = loss_sum


def hessian_steps(model):
    """Return the steps of a Hessian product, as ``(step, layer indices)`` pairs.

    The layers, with an activation whose f'' is zero and the max-pooling after
    it fused into one step (``path_steps(..., second_order=True)``).
    """
    return path_steps(model, range(len(model.layers)), second_order=True)


def gradient_trace(model, lparams, loss, X, y, scale, n_threads):
    """Forward with f' and f'', then dL/d(output) of every layer (n, width).

    Keeps, per step of ``hessian_steps``, its context and the gradient at its
    output where its R-backward needs it (see ``GradientTrace``).
    """
    ctxs, z = forward_chunk(model, lparams, X, 2, n_threads)
    loss_sum, g, state = loss.value_grad(z, y, scale, n_threads)
    first = param_layer_indices(model)[0]
    grads = [None] * len(model.layers)
    for i in range(len(model.layers) - 1, first - 1, -1):
        grads[i] = g
        if i > first:
            g = model.layers[i].input_grad(lparams[i], g, ctxs[i], n_threads)
    for step, indices in hessian_steps(model):
        if len(indices) == 2:
            ctxs[indices[0]] = _step_context(step, indices, ctxs, n_threads)
            ctxs[indices[1]] = {}
        for i in indices:
            if not step.uses_output_grad:
                grads[i] = None
    return GradientTrace(ctxs, grads, state, loss_sum)


def hvp_chunk(model, lparams, loss, tangents, trace, scale, accs, k, n_threads):
    """Accumulate H v for one chunk: R-forward, B R{z}, then the R-backward."""
    first = param_layer_indices(model)[0]
    steps = hessian_steps(model)
    rins = []
    rx = None
    for step, indices in steps:
        i = indices[0]
        rins.append(rx)
        rx = step.jvp(lparams[i], tangents[i], trace.ctxs[i], rx, n_threads)
    rg = np.empty_like(rx)
    loss.hessian_apply(trace.loss_state, rx, scale, rg, n_threads)
    for (step, indices), rin in zip(reversed(steps), reversed(rins)):
        i = indices[0]
        if i < first:
            break  # nothing before the first parametrised layer has parameters
        rg = step.rvjp(lparams[i], tangents[i], trace.ctxs[i], trace.grads[indices[-1]], rin,
                       rg, accs[i], i > first, n_threads)


# ---------------------------------------------------------------------------
# memory planning
# ---------------------------------------------------------------------------

def _input_is_data(model, i):
    """Whether layer i's input is the network input itself (no array of its own)."""
    return all(layer.is_identity for layer in model.layers[:i])


def stored_factor_bytes_per_sample(model, itemsize):
    """Bytes per sample kept by the stored-Jacobian path (GGN and Jacobian)."""
    total = model.n_outputs * itemsize  # loss state (softmax or sigma') per sample
    for i, (_, factor_bytes, _) in factor_plan(model, itemsize).items():
        total += factor_bytes + model.layers[i].factor_bytes(model.shapes[i], itemsize,
                                                               _input_is_data(model, i))
    return total


def gradient_trace_bytes_per_sample(model, itemsize):
    """Bytes per sample kept by a Hessian product's stored traces.

    Exact for CrossEntropyLoss and BCEWithLogitsLoss; MSELoss keeps no loss
    state, so the figure is K numbers per sample above what it holds.
    """
    first = param_layer_indices(model)[0]
    total = model.n_outputs * itemsize  # loss state (softmax or sigma')
    for step, indices in hessian_steps(model):
        i, last = indices[0], indices[-1]
        if step.is_identity:
            continue
        total += step.kept_bytes(model.shapes[i], itemsize, _input_is_data(model, i))
        if step.uses_output_grad and i >= first:
            total += math.prod(model.shapes[last + 1]) * itemsize  # dL/d(output)
    return total


def working_bytes_per_sample(model, itemsize, k):
    """Bytes per sample of the temporaries of one pass over a chunk, k directions."""
    widths = sum(math.prod(s) for s in model.shapes)  # (math.prod: 20x np.prod's speed here)
    work = sum(layer.work_elements(model.shapes[i]) for i, layer in enumerate(model.layers))
    return (4 * widths + 3 * k * widths + 4 * k * model.n_outputs
            + (1 + k) * work) * itemsize
