"""Flatten: a reshape that costs nothing (activations are kept flat per sample)."""

import math

from .base import Layer

__all__ = ["Flatten"]


class Flatten(Layer):
    """Flatten (C, H, W) to C * H * W features in C order, as ``torch.nn.Flatten``.

    ghess keeps activations flattened per sample already, so this costs nothing.
    """

    is_identity = True
    uses_output_grad = False

    def output_shape(self, input_shape):
        """(C * H * W,)."""
        return (math.prod(input_shape),)

    def forward(self, params, x, ctx, need, n_threads):
        """Pass x through."""
        return x

    def jvp(self, params, tangent, ctx, rx, n_threads, rctx=None):
        """Pass R{x} through."""
        return rx

    def vjp(self, params, ctx, gy, acc, need_input_grad, n_threads):
        """Pass dL/dy through."""
        return gy

    def rvjp(self, params, tangent, ctx, g, rx, rgy, acc, need_input_grad, n_threads,
             rctx=None):
        """Pass R{dL/dy} through."""
        return rgy

    def input_grad(self, params, gy, ctx, n_threads):
        """Pass dL/dy through."""
        return gy
