"""Layers: parameter specs, shape checks, and per-layer propagation rules.

Every layer maps an input ``x`` to an output ``y``. Besides its spec (parameter
names and shapes, output shape), a layer knows four propagation rules, used by
``ghess._engine`` on one chunk of ``n`` samples at a time:

- ``forward``: ``y = f(x)``, storing in ``ctx`` what the other rules need;
- ``jvp``: ``R{y} = (df/dx) R{x} + (df/dw) v`` for ``k`` directions at once;
- ``vjp``: ``dL/dx = (df/dx)^T dL/dy`` and ``dL/dw += (df/dw)^T dL/dy``;
- ``rvjp``: the R-operator of ``vjp`` (Pearlmutter), for Hessian products.

Direction-dependent arrays have shape ``(n, k, width)``; the others ``(n, width)``.
``None`` stands for an exactly zero direction-dependent array (``R{x}`` of the
network input), so that no work is spent on it.
"""

import numbers

import numpy as np
import scipy.special

from ._kernels import dense
from ._kernels.dense import ActivationKind

__all__ = [
    "Layer",
    "Linear",
    "Activation",
    "ReLU",
    "LeakyReLU",
    "Tanh",
    "Sigmoid",
    "Softplus",
    "Identity",
]


def _positive_int(value, name, owner):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{owner}: {name} must be positive, got {value}")
    return int(value)


def _finite_real(value, name, owner):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value}")
    return float(value)


class Layer:
    """Base class of the layers of a :class:`ghess.Sequential`."""

    #: whether ``rvjp`` has a second-order term of its own (f'' != 0)
    has_curvature = False
    #: whether ``rvjp`` reads g = dL/dy: a Hessian product's stored trace keeps g
    #: at the output of exactly these layers
    uses_output_grad = True
    #: whether the layer passes its input through unchanged (no arrays of its own)
    is_identity = False
    #: whether dy/dx is the same (out_width, in_width) matrix for every sample and
    #: ``input_jacobian`` returns it (a dense layer: its weight)
    has_shared_input_jacobian = False

    def kept_bytes(self, input_shape, itemsize, input_is_data):
        """Bytes per sample that ``forward`` keeps in its context for Hessian products."""
        return 0

    def factor_bytes(self, input_shape, itemsize, input_is_data):
        """Bytes per sample that the stored-Jacobian path keeps for this layer.

        A parametrised layer's factor context; for a parameter-free layer, its
        first-order context when a factor path runs through it (``_engine.factor_plan``).
        """
        return 0

    def work_elements(self, input_shape):
        """Scalars per sample of temporaries beyond the activations (for chunk sizing)."""
        return 0

    def param_shapes(self, input_shape):
        """Return ``[(name, shape), ...]`` of the parameters, in PyTorch's order."""
        return []

    def output_shape(self, input_shape):
        """Return the output shape for one sample, or raise ``ValueError``."""
        return tuple(input_shape)

    def init_params(self, input_shape, rng, dtype):
        """Return PyTorch-style initial values, as ``{name: array}``."""
        return {}

    def __repr__(self):
        return f"{type(self).__name__}()"


class Linear(Layer):
    """Dense layer ``y = x W^T + b``, as ``torch.nn.Linear``.

    Parameters
    ----------
    in_features, out_features : int
        Input and output widths. ``weight`` has shape ``(out_features, in_features)``.
    bias : bool, default=True
        Whether the layer has a bias of shape ``(out_features,)``.
    """

    has_shared_input_jacobian = True

    def __init__(self, in_features, out_features, bias=True):
        self.in_features = _positive_int(in_features, "in_features", "Linear")
        self.out_features = _positive_int(out_features, "out_features", "Linear")
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"Linear: bias must be a bool, got {bias!r}")
        self.bias = bool(bias)

    def __repr__(self):
        return (f"Linear(in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias})")

    def param_shapes(self, input_shape):  # noqa: D102
        shapes = [("weight", (self.out_features, self.in_features))]
        if self.bias:
            shapes.append(("bias", (self.out_features,)))
        return shapes

    def output_shape(self, input_shape):  # noqa: D102
        if len(input_shape) != 1:
            raise ValueError(
                f"{self!r} expects a flat input of {self.in_features} features per sample, "
                f"got per-sample shape {tuple(input_shape)}: add a Flatten() before it")
        if input_shape[0] != self.in_features:
            raise ValueError(
                f"{self!r} expects {self.in_features} input features, "
                f"but the previous layer produces {input_shape[0]}")
        return (self.out_features,)

    def init_params(self, input_shape, rng, dtype):  # noqa: D102
        # PyTorch: kaiming_uniform_(a=sqrt(5)) for the weight, i.e. U(-1/sqrt(fan_in), ...),
        # and U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the bias.
        bound = 1.0 / np.sqrt(self.in_features)
        params = {"weight": rng.uniform(-bound, bound, (self.out_features, self.in_features))}
        if self.bias:
            params["bias"] = rng.uniform(-bound, bound, self.out_features)
        return {name: value.astype(dtype) for name, value in params.items()}

    # -- propagation ------------------------------------------------------
    def forward(self, params, x, ctx, need, n_threads):
        """Y = x W^T + b; keeps ``x`` for the parameter derivatives."""
        W = params["weight"]
        y = np.empty((x.shape[0], self.out_features), dtype=x.dtype)
        dense.gemm_rowmajor(False, True, 1.0, x, W, 0.0, y, n_threads)
        if self.bias:
            dense.add_grouped_rows(y[:, None, :], params["bias"][None, :], n_threads)
        ctx["x"] = x
        return y

    def factor_context(self, ctx, n_threads=1):
        """Return what the stored-Jacobian path keeps: the layer input."""
        return {"x": ctx["x"]}

    def input_jacobian(self, params):
        """dy/dx, the same (out, in) matrix for every sample: the weight."""
        return params["weight"]

    def kept_bytes(self, input_shape, itemsize, input_is_data):
        """Count the input, unless it is the network input itself."""
        return 0 if input_is_data else self.in_features * itemsize

    factor_bytes = kept_bytes

    def split_tangent(self, V):
        """Cut this layer's slice ``V`` (k, n_params_layer) into GEMM-ready pieces."""
        k = V.shape[0]
        n_w = self.out_features * self.in_features
        tangent = {"weight": np.ascontiguousarray(V[:, :n_w]).reshape(k * self.out_features,
                                                                        self.in_features)}
        if self.bias:
            tangent["bias"] = np.ascontiguousarray(V[:, n_w:])
        return tangent

    def jvp(self, params, tangent, ctx, rx, n_threads):
        """R{y} = x V_W^T + R{x} W^T + v_b, for k directions."""
        x = ctx["x"]
        n = x.shape[0]
        Vw = tangent["weight"]
        k = Vw.shape[0] // self.out_features
        ry = np.empty((n, k, self.out_features), dtype=x.dtype)
        # (n, in) @ (in, k*out): all k directions in one GEMM
        dense.gemm_rowmajor(False, True, 1.0, x, Vw, 0.0, ry.reshape(n, -1), n_threads)
        if rx is not None:
            dense.gemm_rowmajor(False, True, 1.0, rx.reshape(n * k, -1), params["weight"],
                                1.0, ry.reshape(n * k, -1), n_threads)
        if self.bias:
            dense.add_grouped_rows(ry, tangent["bias"], n_threads)
        return ry

    def new_accumulator(self, k, dtype, into=None):
        """Zeroed parameter-gradient accumulators for k directions.

        ``into``: for k = 1, this layer's zeroed slice of a flat vector, which the
        accumulators are then views of.
        """
        n_w = self.out_features * self.in_features
        if into is not None:
            acc = {"weight": into[:n_w].reshape(self.out_features, self.in_features)}
            if self.bias:
                acc["bias"] = into[n_w:]
            return acc
        acc = {"weight": np.zeros((k * self.out_features, self.in_features), dtype=dtype)}
        if self.bias:
            acc["bias"] = np.zeros(k * self.out_features, dtype=dtype)
        return acc

    def accumulator_to_flat(self, acc, out):
        """Add the accumulators to ``out`` (k, n_params_layer)."""
        k = out.shape[0]
        n_w = self.out_features * self.in_features
        out[:, :n_w] += acc["weight"].reshape(k, n_w)
        if self.bias:
            out[:, n_w:] += acc["bias"].reshape(k, self.out_features)

    def param_vjp(self, ctx, gy, acc, n_threads):
        """dL/dW += gy^T x and dL/db += sum(gy), for k directions."""
        x = ctx["x"]
        n = x.shape[0]
        g2 = gy.reshape(n, -1)
        dense.gemm_rowmajor(True, False, 1.0, g2, x, 1.0, acc["weight"], n_threads)
        if self.bias:
            dense.sum_rows_into(g2, acc["bias"], n_threads)

    def vjp(self, params, ctx, gy, acc, need_input_grad, n_threads):
        """Accumulate parameter gradients; return dL/dx = gy W (or None)."""
        if acc is not None:
            self.param_vjp(ctx, gy, acc, n_threads)
        if not need_input_grad:
            return None
        n, k = gy.shape[0], gy.shape[1]
        gx = np.empty((n, k, self.in_features), dtype=gy.dtype)
        dense.gemm_rowmajor(False, False, 1.0, gy.reshape(n * k, -1), params["weight"],
                            0.0, gx.reshape(n * k, -1), n_threads)
        return gx

    def rvjp(self, params, tangent, ctx, g, rx, rgy, acc, need_input_grad, n_threads):
        """R-operator of ``vjp`` given g = dL/dy (n, out) and R{dL/dy} (n, k, out).

        R{dL/dW} = R{g}^T x + g^T R{x},  R{dL/db} = sum R{g},
        R{dL/dx} = R{g} W + g V_W.
        """
        x = ctx["x"]
        n, k = rgy.shape[0], rgy.shape[1]
        self.param_vjp(ctx, rgy, acc, n_threads)
        if rx is not None and k == 1:  # g^T R{x} straight into the accumulator
            dense.gemm_rowmajor(True, False, 1.0, g, rx.reshape(n, -1), 1.0, acc["weight"],
                                n_threads)
        elif rx is not None:
            # g^T R{x}: (out, n) @ (n, k*in), then reorder to (k, out, in)
            cross = np.empty((self.out_features, k * self.in_features), dtype=x.dtype)
            dense.gemm_rowmajor(True, False, 1.0, g, rx.reshape(n, -1), 0.0, cross, n_threads)
            acc["weight"].reshape(k, self.out_features, self.in_features)[...] += (
                cross.reshape(self.out_features, k, self.in_features).transpose(1, 0, 2))
        if not need_input_grad:
            return None
        rgx = np.empty((n, k, self.in_features), dtype=x.dtype)
        dense.gemm_rowmajor(False, False, 1.0, rgy.reshape(n * k, -1), params["weight"],
                            0.0, rgx.reshape(n * k, -1), n_threads)
        # g V_W for all k at once: V_W rearranged as (out, k*in)
        v_cat = tangent.get("weight_by_output")
        if v_cat is None:
            v_cat = np.ascontiguousarray(
                tangent["weight"].reshape(k, self.out_features, self.in_features)
                .transpose(1, 0, 2)).reshape(self.out_features, k * self.in_features)
            tangent["weight_by_output"] = v_cat
        dense.gemm_rowmajor(False, False, 1.0, g, v_cat, 1.0, rgx.reshape(n, -1), n_threads)
        return rgx

    def input_grad(self, params, gy, ctx, n_threads):
        """dL/dx = gy W for direction-free gy (n, out)."""
        gx = np.empty((gy.shape[0], self.in_features), dtype=gy.dtype)
        dense.gemm_rowmajor(False, False, 1.0, gy, params["weight"], 0.0, gx, n_threads)
        return gx

    def sample_jacobian(self, ctx, D, offset, J_out, n_threads):
        """Write this layer's columns of the per-sample Jacobians ``J_out``."""
        dense.linear_sample_jacobian(D, ctx["x"], self.bias, offset, J_out, n_threads)


class Activation(Layer):
    """Elementwise activation ``y = f(x)`` (no parameters)."""

    _kind = ActivationKind.IDENTITY
    _p0 = 0.0
    _p1 = 0.0

    @property
    def is_identity(self):  # noqa: D102
        return self._kind == ActivationKind.IDENTITY

    @property
    def uses_output_grad(self):  # noqa: D102  (only the f'' term reads g)
        return self.has_curvature

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
        if self._kind == ActivationKind.IDENTITY:
            return x
        flat = x.reshape(-1)
        y = np.empty_like(x)
        empty = np.empty(0, dtype=x.dtype)
        d1 = np.empty_like(x) if need >= 1 else None
        d2 = np.empty_like(x) if need >= 2 and self.has_curvature else None
        d1_flat = empty if d1 is None else d1.reshape(-1)
        d2_flat = empty if d2 is None else d2.reshape(-1)
        ufunc = _FLOAT32_UFUNCS.get(self._kind) if x.dtype == np.float32 else None
        if ufunc is not None:
            ufunc(x, out=y)
            dense.activation_derivatives_from_output(self._kind, y.reshape(-1), d1_flat,
                                                     d2_flat, n_threads)
        else:
            dense.activation_forward(self._kind, self._p0, self._p1, flat, y.reshape(-1),
                                     d1_flat, d2_flat, n_threads)
        ctx["d1"] = d1
        ctx["d2"] = d2
        return y

    def jvp(self, params, tangent, ctx, rx, n_threads):
        """R{y} = f'(x) R{x}."""
        if rx is None or self._kind == ActivationKind.IDENTITY:
            return rx
        ry = np.empty_like(rx)
        dense.scale_grouped(ctx["d1"], rx, ry, n_threads)
        return ry

    def vjp(self, params, ctx, gy, acc, need_input_grad, n_threads):
        """dL/dx = f'(x) dL/dy."""
        if not need_input_grad or self._kind == ActivationKind.IDENTITY:
            return gy
        gx = np.empty_like(gy)
        dense.scale_grouped(ctx["d1"], gy, gx, n_threads)
        return gx

    def rvjp(self, params, tangent, ctx, g, rx, rgy, acc, need_input_grad, n_threads):
        """R{dL/dx} = f'(x) R{dL/dy} + f''(x) (dL/dy) R{x}."""
        if self._kind == ActivationKind.IDENTITY:
            return rgy
        out = np.empty_like(rgy)
        if rx is None or ctx["d2"] is None:
            dense.scale_grouped(ctx["d1"], rgy, out, n_threads)
        else:
            dense.activation_rbackward(ctx["d1"], ctx["d2"], g, rx, rgy, out, n_threads)
        return out

    def input_grad(self, params, gy, ctx, n_threads):
        """dL/dx = f'(x) dL/dy for direction-free gy (n, width)."""
        if self._kind == ActivationKind.IDENTITY:
            return gy
        return ctx["d1"] * gy


class Identity(Activation):
    """``y = x``, as ``torch.nn.Identity``."""

    _kind = ActivationKind.IDENTITY


class ReLU(Activation):
    """``max(x, 0)`` with ReLU'(0) = 0, as ``torch.nn.ReLU``."""

    _kind = ActivationKind.RELU


class LeakyReLU(Activation):
    """``x`` for x > 0, ``negative_slope * x`` otherwise, as ``torch.nn.LeakyReLU``."""

    _kind = ActivationKind.LEAKY_RELU

    def __init__(self, negative_slope=0.01):
        self.negative_slope = _finite_real(negative_slope, "negative_slope", "LeakyReLU")
        self._p0 = self.negative_slope

    def __repr__(self):
        return f"LeakyReLU(negative_slope={self.negative_slope})"


class Tanh(Activation):
    """Hyperbolic tangent, as ``torch.nn.Tanh``."""

    _kind = ActivationKind.TANH
    has_curvature = True


class Sigmoid(Activation):
    """Logistic sigmoid, as ``torch.nn.Sigmoid``."""

    _kind = ActivationKind.SIGMOID
    has_curvature = True


class Softplus(Activation):
    """``log(1 + exp(beta x)) / beta``, linear where ``beta x > threshold``.

    As ``torch.nn.Softplus(beta=1.0, threshold=20.0)``.
    """

    _kind = ActivationKind.SOFTPLUS
    has_curvature = True

    def __init__(self, beta=1.0, threshold=20.0):
        self.beta = _finite_real(beta, "beta", "Softplus")
        if self.beta <= 0:
            raise ValueError(f"Softplus: beta must be positive, got {self.beta}")
        self.threshold = _finite_real(threshold, "threshold", "Softplus")
        self._p0, self._p1 = self.beta, self.threshold

    def __repr__(self):
        return f"Softplus(beta={self.beta}, threshold={self.threshold})"


#: float32 sigmoid through SciPy's SIMD ufunc (see activation_derivatives_from_output); tanh
#: has vectorised kernels of its own in both dtypes (_vecmath.h), and libm's float64 sigmoid
#: is no slower than the ufunc
_FLOAT32_UFUNCS = {Sigmoid._kind: scipy.special.expit}
