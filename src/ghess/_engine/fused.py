"""Fused steps: two layers that the engine runs as one.

An activation and the max-pooling after it make one step in the stored-factor
paths and, when f'' = 0, in the Hessian product: through ``f`` then max-pooling,
tangents and cotangents both go "take the window's argmax, times f' there".
"""

import numpy as np

from .._kernels import conv as kernels
from ..nn.pooling import ARGMAX_DTYPE, NO_GAIN

__all__ = ["ActivationMaxPool"]


class ActivationMaxPool:
    """An activation and the max-pooling after it, as one step.

    Through ``f`` then max-pooling, tangents and cotangents both go "take the
    window's argmax, times f' there". This step keeps f' at the argmax (one
    number per pooled output) instead of f' on the whole pooling input, and
    makes one pass instead of two: after a convolution, ReLU and 2x2
    max-pooling, a quarter of the f' memory and half the traffic. It serves
    the factor paths of stored Jacobians (``plan.factor_plan``), which only
    push tangents and cotangents, and the Hessian product when ``f'' = 0``
    (``plan.hessian_steps``): then the pair's R-backward is linear too.
    It has the interface of a parameter-free layer (``jvp``/``vjp``/``rvjp``).
    """

    has_curvature = False
    is_identity = False
    uses_output_grad = False

    def __init__(self, activation, pool):
        self.activation = activation
        self.pool = pool

    @staticmethod
    def fuses(first, second, second_order=False):
        """Whether layers ``first``, ``second`` make one such step.

        ``second_order``: for a Hessian product, whose R-backward through an
        activation with ``f'' != 0`` needs f'' and the gradient on the whole
        pooling input.
        """
        return (first.is_elementwise and not first.is_identity and second.selects_argmax
                and not (second_order and first.has_curvature))

    def factor_bytes(self, input_shape, itemsize, input_is_data):
        """Bytes per sample of the step's context: the argmax and f' there."""
        return self.pool.out_width * (ARGMAX_DTYPE.itemsize + itemsize)

    kept_bytes = factor_bytes

    def context(self, activation_ctx, pool_ctx, n_threads):
        """Return {"argmax", "gain"}: the pool's argmax and f' gathered at it."""
        argmax, d1 = pool_ctx["argmax"], activation_ctx["d1"]
        gain = np.empty(argmax.shape, dtype=d1.dtype)
        kernels.gather(d1[:, None], argmax, NO_GAIN[d1.dtype.char], gain[:, None],
                       n_threads)
        return {"argmax": argmax, "gain": gain}

    def jvp(self, params, tangent, ctx, rx, n_threads, rctx=None):
        """R{y} = f'(x) R{x} at each window's argmax."""
        if rx is None:
            return None
        ry = np.empty((rx.shape[0], rx.shape[1], self.pool.out_width), dtype=rx.dtype)
        kernels.gather(rx, ctx["argmax"], ctx["gain"], ry, n_threads)
        return ry

    def vjp(self, params, ctx, gy, acc, need_input_grad, n_threads):
        """dL/dx: each output's gradient, times f', goes to its window's argmax."""
        if not need_input_grad:
            return None
        gx = np.empty((gy.shape[0], gy.shape[1], self.pool.in_width), dtype=gy.dtype)
        kernels.scatter_add(gy, ctx["argmax"], ctx["gain"], gx, self.pool.windows_disjoint,
                            n_threads)
        return gx

    def rvjp(self, params, tangent, ctx, g, rx, rgy, acc, need_input_grad, n_threads,
             rctx=None):
        """With f'' = 0 the pair is linear given f' and the argmax: the VJP of R{dL/dy}."""
        return self.vjp(params, ctx, rgy, acc, need_input_grad, n_threads)
