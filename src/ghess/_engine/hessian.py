"""Hessian products (Pearlmutter's R-operator) over one chunk.

``gradient_trace`` keeps what a product needs of a chunk independently of the
direction (forward contexts with f' and f'', and dL/d(output) where an
R-backward reads it); ``hvp_chunk`` runs the R-forward, B R{z} and the
R-backward from it.
"""

import numpy as np

from .factors import step_context
from .passes import checked_forward, checked_loss
from .plan import plan_for

__all__ = ["GradientTrace", "gradient_trace", "hvp_chunk"]


class GradientTrace:
    """What a Hessian product needs of one chunk, independent of the direction.

    Per step of ``hessian_steps``, at the index of its first layer: ``ctxs``,
    the step's context (a fused activation + max-pooling keeps the argmax and
    f' there; its second layer's entry is empty), and ``grads``, dL/d(output)
    where the step's R-backward reads it (``uses_output_grad``), else None.
    """

    __slots__ = ("ctxs", "grads", "loss_state", "loss_sum", "dtype")

    def __init__(self, ctxs, grads, loss_state, loss_sum, dtype):
        self.ctxs = ctxs
        self.grads = grads
        self.loss_state = loss_state
        self.loss_sum = loss_sum
        self.dtype = dtype

def gradient_trace(model, lparams, loss, X, y, scale, n_threads):
    """Forward with f' and f'', then dL/d(output) of every layer (n, width).

    Keeps, per step of ``hessian_steps``, its context and the gradient at its
    output where its R-backward needs it (see ``GradientTrace``).
    """
    plan = plan_for(model, X.dtype.itemsize)
    ctxs, z = checked_forward(model, lparams, X, 2, n_threads)
    loss_sum, g, state = checked_loss(loss, z, y, scale, n_threads)
    first = plan.first
    grads = [None] * len(model.layers)
    for i in range(len(model.layers) - 1, first - 1, -1):
        grads[i] = g
        if i > first or model.layers[i].keeps_inner_grads:
            g = model.layers[i].input_grad(lparams[i], g, ctxs[i], n_threads)
    for step, indices in plan.hessian_steps:
        if len(indices) == 2:
            ctxs[indices[0]] = step_context(step, indices, ctxs, n_threads)
            ctxs[indices[1]] = {}
        for i in indices:
            if not step.uses_output_grad:
                grads[i] = None
    return GradientTrace(ctxs, grads, state, loss_sum, X.dtype)


def hvp_chunk(model, lparams, loss, tangents, trace, scale, accs, k, n_threads):
    """Accumulate H v for one chunk: R-forward, B R{z}, then the R-backward.

    Each step gets a scratch dict (``rctx``) in its R-forward that its
    R-backward receives: work of the former that the latter reuses.
    """
    plan = plan_for(model, trace.dtype.itemsize)
    first, steps = plan.first, plan.hessian_steps
    rins = []
    rctxs = []
    rx = None
    for step, indices in steps:
        i = indices[0]
        rins.append(rx)
        rctxs.append({})
        rx = step.jvp(lparams[i], tangents[i], trace.ctxs[i], rx, n_threads, rctxs[-1])
    rg = np.empty_like(rx)
    loss.hessian_apply(trace.loss_state, rx, scale, rg, n_threads)
    for (step, indices), rin, rctx in zip(reversed(steps), reversed(rins), reversed(rctxs)):
        i = indices[0]
        if i < first:
            break  # nothing before the first parametrised layer has parameters
        rg = step.rvjp(lparams[i], tangents[i], trace.ctxs[i], trace.grads[indices[-1]], rin,
                       rg, accs[i], i > first, n_threads, rctx)
