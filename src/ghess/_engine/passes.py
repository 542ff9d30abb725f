"""First-order passes over one chunk, and the per-layer parameter accumulators.

Every function works on ONE chunk of samples and delegates each layer's math
to the layer (``ghess.nn``). The forward pass itself is the model's
(``Sequential.forward_chunk``): it returns the outputs and each layer's context.
"""

import numpy as np

from .._validation import all_finite
from .plan import plan_for

__all__ = ["checked_forward", "checked_loss", "check_finite_result", "prepare_tangents",
           "Accumulators", "new_accumulators", "accumulators_to_flat",
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


# -- non-finite results from finite inputs -------------------------------------
# Inputs are checked for NaN/Inf on every call, so a non-finite number found here
# arose inside the computation (an overflow, mostly in float32): each stage says so
# instead of passing it on silently.

def checked_forward(model, lparams, X, need, n_threads):
    """``model.forward_chunk``, raising ``FloatingPointError`` on non-finite outputs."""
    ctxs, z = model.forward_chunk(lparams, X, need, n_threads)
    if not all_finite(z):
        raise FloatingPointError(_forward_overflow(model, lparams, X, n_threads))
    return ctxs, z


def _forward_overflow(model, lparams, X, n_threads):
    """Name the first layer whose outputs are not finite (run again, layer by layer)."""
    x = X.reshape(X.shape[0], -1)
    for i, (layer, params) in enumerate(zip(model.layers, lparams)):
        x = layer.forward(params, x, {}, 0, n_threads)
        if not all_finite(x):
            return (f"the forward pass overflowed at layer {i} ({layer!r}): its outputs are "
                    f"not finite in {X.dtype}, though the inputs and parameters are finite")
    return "the forward pass gave non-finite outputs from finite inputs"


def checked_loss(loss, z, y, scale, n_threads):
    """``loss.value_grad``, raising ``FloatingPointError`` when it is not finite."""
    value, r, state = loss.value_grad(z, y, scale, n_threads)
    if not (np.isfinite(value) and all_finite(r)):
        raise FloatingPointError(
            f"{loss!r} overflowed: its value or gradient is not finite in {z.dtype}, though "
            "the network outputs are finite")
    return value, r, state


def check_finite_result(result, what):
    """Raise ``FloatingPointError`` if ``result`` (computed from finite inputs) is not finite."""
    if not all_finite(result):
        raise FloatingPointError(
            f"{what} is not finite, though its inputs are: an overflow in {result.dtype} "
            "(scale the parameters or inputs down, or compute in float64)")
