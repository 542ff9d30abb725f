"""First-order passes over one chunk, and the per-layer parameter accumulators.

Every function works on ONE chunk of samples and delegates each layer's math
to the layer (``ghess.nn``). The forward pass itself is the model's
(``Sequential.forward_chunk``): it returns the outputs and each layer's context.
"""

from .plan import plan_for

__all__ = ["prepare_tangents", "Accumulators", "new_accumulators", "accumulators_to_flat",
           "jvp_chunk", "vjp_chunk"]


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
        if not model.layer_slots[i]:
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
    first = plan_for(model, gz.dtype.itemsize).first
    g = gz
    for i in range(len(model.layers) - 1, first - 1, -1):
        g = model.layers[i].vjp(lparams[i], ctxs[i], g, accs[i], i > first, n_threads)
