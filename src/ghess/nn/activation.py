"""Elementwise activations ``y = f(x)``.

An :class:`Activation` keeps ``f'(x)`` (and ``f''(x)`` for Hessian products) in
its forward context; the first- and second-order rules are the same for every
``f``. The built-in activations compute ``f, f', f''`` in one kernel pass; a new
one only implements :meth:`Activation.evaluate`.
"""

import numpy as np

from .._kernels import dense
from .._kernels.dense import ActivationKind
from .base import Layer, finite_real

__all__ = [
    "Activation",
    "ReLU",
    "LeakyReLU",
    "Tanh",
    "Sigmoid",
    "Softplus",
    "GELU",
    "SiLU",
    "ELU",
    "Identity",
    "Dropout",
]


class Activation(Layer):
    """Elementwise activation ``y = f(x)`` (no parameters).

    Subclasses set ``has_curvature`` (whether f'' is not identically zero) and
    implement :meth:`evaluate`; the built-in ones name their kernel ``kind``
    instead.
    """

    is_elementwise = True
    #: the kernel that evaluates f, f' and f'' (``ghess._kernels.dense.ActivationKind``)
    kind: ActivationKind | None = None
    #: the kernel's two real parameters (a slope, or softplus' beta and threshold)
    _kernel_params = (0.0, 0.0)

    @property
    def uses_output_grad(self):
        """Only the f'' term of ``rvjp`` reads g = dL/dy."""
        return self.has_curvature

    def output_shape(self, input_shape):
        """Elementwise: the input's shape."""
        return tuple(input_shape)

    def evaluate(self, x: np.ndarray, y_out: np.ndarray, d1_out: np.ndarray | None,
                 d2_out: np.ndarray | None, n_threads: int) -> None:
        """Write f(x), and f'(x) and f''(x) where those outputs are not None.

        All arrays are 1-D and of x's dtype; ``d2_out`` is None unless the layer
        has curvature and a Hessian product asked for it.
        """
        empty = np.empty(0, dtype=x.dtype)
        d1 = empty if d1_out is None else d1_out
        d2 = empty if d2_out is None else d2_out
        dense.activation_forward(self.kind, *self._kernel_params, x, y_out, d1, d2, n_threads)

    def kept_bytes(self, input_shape, itemsize, input_is_data):
        """f'(x), and f''(x) when it is not identically zero."""
        if self.is_identity:
            return 0
        return int(np.prod(input_shape)) * itemsize * (2 if self.has_curvature else 1)

    def factor_bytes(self, input_shape, itemsize, input_is_data):
        """f'(x): what a stored-Jacobian factor path through this layer keeps."""
        return 0 if self.is_identity else int(np.prod(input_shape)) * itemsize

    def forward(self, params, x, ctx, need, n_threads):
        """Y = f(x); keeps f'(x) when ``need`` asks for it, and f''(x) for Hessians."""
        if self.is_identity:
            return x
        y = np.empty_like(x)
        d1 = np.empty_like(x) if need >= 1 else None
        d2 = np.empty_like(x) if need >= 2 and self.has_curvature else None
        self.evaluate(x.reshape(-1), y.reshape(-1), None if d1 is None else d1.reshape(-1),
                      None if d2 is None else d2.reshape(-1), n_threads)
        ctx["d1"] = d1
        ctx["d2"] = d2
        return y

    def jvp(self, params, tangent, ctx, rx, n_threads, rctx=None):
        """R{y} = f'(x) R{x}."""
        if rx is None or self.is_identity:
            return rx
        ry = np.empty_like(rx)
        dense.scale_grouped(ctx["d1"], rx, ry, n_threads)
        return ry

    def vjp(self, params, ctx, gy, acc, need_input_grad, n_threads):
        """dL/dx = f'(x) dL/dy."""
        if not need_input_grad or self.is_identity:
            return gy
        gx = np.empty_like(gy)
        dense.scale_grouped(ctx["d1"], gy, gx, n_threads)
        return gx

    def rvjp(self, params, tangent, ctx, g, rx, rgy, acc, need_input_grad, n_threads,
             rctx=None):
        """R{dL/dx} = f'(x) R{dL/dy} + f''(x) (dL/dy) R{x}."""
        if self.is_identity:
            return rgy
        out = np.empty_like(rgy)
        if rx is None or ctx["d2"] is None:
            dense.scale_grouped(ctx["d1"], rgy, out, n_threads)
        else:
            dense.activation_rbackward(ctx["d1"], ctx["d2"], g, rx, rgy, out, n_threads)
        return out

    def input_grad(self, params, gy, ctx, n_threads):
        """dL/dx = f'(x) dL/dy for direction-free gy (n, width)."""
        if self.is_identity:
            return gy
        return ctx["d1"] * gy


class Identity(Activation):
    """``y = x``, as ``torch.nn.Identity``."""

    kind = ActivationKind.IDENTITY
    is_identity = True


class ReLU(Activation):
    """``max(x, 0)`` with ReLU'(0) = 0, as ``torch.nn.ReLU``."""

    kind = ActivationKind.RELU


class LeakyReLU(Activation):
    """``x`` for x > 0, ``negative_slope * x`` otherwise, as ``torch.nn.LeakyReLU``."""

    kind = ActivationKind.LEAKY_RELU

    def __init__(self, negative_slope: float = 0.01) -> None:
        self.negative_slope = finite_real(negative_slope, "negative_slope", "LeakyReLU")
        self._kernel_params = (self.negative_slope, 0.0)

    def __repr__(self):
        return f"LeakyReLU(negative_slope={self.negative_slope})"


class Tanh(Activation):
    """Hyperbolic tangent, as ``torch.nn.Tanh``."""

    kind = ActivationKind.TANH
    has_curvature = True


class Sigmoid(Activation):
    """Logistic sigmoid, as ``torch.nn.Sigmoid``."""

    kind = ActivationKind.SIGMOID
    has_curvature = True


class Softplus(Activation):
    """``log(1 + exp(beta x)) / beta``, linear where ``beta x > threshold``.

    As ``torch.nn.Softplus(beta=1.0, threshold=20.0)``.
    """

    kind = ActivationKind.SOFTPLUS
    has_curvature = True

    def __init__(self, beta: float = 1.0, threshold: float = 20.0) -> None:
        self.beta = finite_real(beta, "beta", "Softplus")
        if self.beta <= 0:
            raise ValueError(f"Softplus: beta must be positive, got {self.beta}")
        self.threshold = finite_real(threshold, "threshold", "Softplus")
        self._kernel_params = (self.beta, self.threshold)

    def __repr__(self):
        return f"Softplus(beta={self.beta}, threshold={self.threshold})"


class GELU(Activation):
    """``x Phi(x)`` (``approximate="none"``) or its tanh form, as ``torch.nn.GELU``.

    ``approximate="tanh"``: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.
    """

    has_curvature = True

    def __init__(self, approximate: str = "none") -> None:
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate
        self.kind = ActivationKind.GELU if approximate == "none" else ActivationKind.GELU_TANH

    def __repr__(self):
        return f"GELU(approximate={self.approximate!r})"


class SiLU(Activation):
    """``x sigma(x)`` (swish), as ``torch.nn.SiLU``."""

    kind = ActivationKind.SILU
    has_curvature = True


class ELU(Activation):
    """``x`` for x > 0, ``alpha (exp(x) - 1)`` otherwise, as ``torch.nn.ELU``.

    ELU'(0) = alpha, as in PyTorch.
    """

    kind = ActivationKind.ELU
    has_curvature = True

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = finite_real(alpha, "alpha", "ELU")
        self._kernel_params = (self.alpha, 0.0)

    def __repr__(self):
        return f"ELU(alpha={self.alpha})"


class Dropout(Identity):
    """``torch.nn.Dropout(p)`` in evaluation mode: the identity.

    Curvature is that of the network in evaluation mode, as every peer computes it;
    ``p`` is kept for the conversion to and from PyTorch.
    """

    def __init__(self, p: float = 0.5) -> None:
        p = finite_real(p, "p", "Dropout")
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p must lie in [0, 1), got {p}")
        self.p = p

    def __repr__(self):
        return f"Dropout(p={self.p})"
