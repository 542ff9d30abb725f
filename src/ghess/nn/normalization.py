"""Batch normalisation in evaluation mode: a fixed per-channel affine map with parameters.

With its running statistics, ``BatchNorm`` is ``y = gamma * (x - mean) / sqrt(var + eps)
+ beta`` per channel: the same for every sample, so the per-sample sums that every
operator relies on hold. (In training mode the batch statistics couple the samples of a
batch; ghess, like every curvature library, computes the curvature of the network in
evaluation mode, and ``from_torch`` refuses a module in training mode.)

In the engine it is bilinear in ``(gamma, x - mean)``, like ``Linear`` in ``(W, x)``:
``R{y} = V_gamma * xhat + v_beta + a * R{x}`` with ``a = gamma / sigma`` and
``xhat = (x - mean) / sigma``, and the R-operator's cross term is ``V_gamma / sigma * g``.
"""

import numpy as np

from .._kernels import conv as kernels
from .._validation import as_array
from .base import WeightBiasLayer, finite_real, positive_int

#: no shift: ``channel_affine``'s shift with no rows, per dtype
_NO_SHIFT = {np.dtype(t).char: np.empty((0, 0), dtype=t) for t in (np.float32, np.float64)}

__all__ = ["BatchNorm1d", "BatchNorm2d"]


class _BatchNorm(WeightBiasLayer):
    """Shared code of BatchNorm1d and BatchNorm2d: channels first, then positions."""

    bias = True
    #: per-sample input ranks the layer takes (channels first)
    _ranks: tuple = ()

    def __init__(self, num_features: int, eps: float = 1e-5, *, affine: bool = True,
                 running_mean=None, running_var=None) -> None:
        owner = type(self).__name__
        self.num_features = positive_int(num_features, "num_features", owner)
        self.eps = finite_real(eps, "eps", owner)
        if self.eps <= 0:
            raise ValueError(f"{owner}: eps must be > 0, got {self.eps}")
        if not isinstance(affine, (bool, np.bool_)):
            raise TypeError(f"{owner}: affine must be a bool, got {affine!r}")
        #: with gamma and beta (the parameters); without, a fixed map with no parameters
        self.affine = bool(affine)
        #: the R-operator's cross term V_gamma / sigma * g needs g only with gamma
        self.uses_output_grad = self.affine
        self.running_mean = self._statistic(running_mean, 0.0, "running_mean")
        self.running_var = self._statistic(running_var, 1.0, "running_var")
        if np.any(self.running_var < 0):
            raise ValueError(f"{owner}: running_var must be >= 0, got a minimum of "
                             f"{self.running_var.min()}")
        # the map's fixed part, in float64: 1/sigma per channel
        self._inv_sigma = 1.0 / np.sqrt(self.running_var + self.eps)
        self._inv_sigma.flags.writeable = False
        self._fixed_by_dtype = {}
        self._positions = None

    def _statistic(self, value, default, name):
        C = self.num_features
        if value is None:
            out = np.full(C, default)
        else:
            arr = as_array(value)
            if arr.dtype.kind not in "iuf" or arr.shape != (C,):
                raise ValueError(f"{type(self).__name__}: {name} must be a real array of shape "
                                 f"({C},), got shape {arr.shape} and dtype {arr.dtype}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{type(self).__name__}: {name} contains NaN or Inf")
            out = np.array(arr, dtype=np.float64)
        out.flags.writeable = False
        return out

    def __repr__(self):
        affine = "" if self.affine else ", affine=False"
        return f"{type(self).__name__}({self.num_features}, eps={self.eps}{affine})"

    # -- spec ---------------------------------------------------------------
    def param_shapes(self, input_shape):
        """Return weight (gamma) and bias (beta), each (num_features,); none without affine."""
        if not self.affine:
            return []
        return [("weight", (self.num_features,)), ("bias", (self.num_features,))]

    def output_shape(self, input_shape):
        """Return the input's shape: (C,) or (C, L) for BatchNorm1d, (C, H, W) for 2d."""
        shape = tuple(input_shape)
        if len(shape) not in self._ranks:
            raise ValueError(f"{self!r} expects per-sample inputs of rank {self._ranks} "
                             f"(channels first), got shape {shape}")
        if shape[0] != self.num_features:
            raise ValueError(f"{self!r} expects {self.num_features} channels, but the previous "
                             f"layer produces {shape[0]} (per-sample shape {shape})")
        self._positions = int(np.prod(shape[1:], dtype=np.int64))
        return shape

    def init_params(self, input_shape, rng, dtype):
        """PyTorch's: gamma = 1, beta = 0."""
        C = self.num_features
        if not self.affine:
            return {}
        return {"weight": np.ones(C, dtype=dtype), "bias": np.zeros(C, dtype=dtype)}

    def accumulator_shapes(self, k):
        """K directions' gamma and beta as rows: (k, C) each."""
        return (k, self.num_features), (k, self.num_features)

    # -- helpers -------------------------------------------------------------
    def _channels(self, array, lead):
        """View ``array`` as (*lead, C, positions)."""
        return array.reshape(lead + (self.num_features, self._positions))

    def _fixed(self, dtype):
        """Return 1/sigma, -mean/sigma and mean as (C,) arrays of ``dtype``."""
        fixed = self._fixed_by_dtype.get(dtype.char)
        if fixed is None:
            fixed = (self._inv_sigma.astype(dtype),
                     (-self.running_mean * self._inv_sigma).astype(dtype),
                     self.running_mean.astype(dtype))
            self._fixed_by_dtype[dtype.char] = fixed
        return fixed

    def _scale(self, params, dtype):
        """Return a = gamma / sigma (1 / sigma without affine), (1, C): the slope per channel."""
        inv_sigma = self._fixed(dtype)[0]
        return (params["weight"] * inv_sigma)[None] if self.affine else inv_sigma[None]

    # -- propagation (per-channel kernels: ``_kernels.conv.channel_affine``, ``channel_dot``)
    def forward(self, params, x, ctx, need, n_threads):
        """Y = a x + (beta - a mean) per channel.

        With ``need >= 1`` keeps xhat, which every parameter derivative reads: formed
        once here, not again in each product of a stored operator.
        """
        n = x.shape[0]
        inv_sigma, shift, mean = self._fixed(x.dtype)
        a = self._scale(params, x.dtype)
        b = (params["bias"][None] - a * mean[None]) if self.affine else shift[None]
        y = np.empty_like(x)
        kernels.channel_affine(x[:, None], a, b, y[:, None], False, n_threads)
        if need >= 1 and self.affine:  # without parameters, nothing reads it
            xhat = np.empty((n, self.num_features, self._positions), dtype=x.dtype)
            kernels.channel_affine(x[:, None], inv_sigma[None], shift[None],
                                   xhat.reshape(n, 1, -1), False, n_threads)
            ctx["xhat"] = xhat
        return y

    def factor_context(self, ctx, n_threads=1):
        """Return what the stored-Jacobian path keeps: xhat."""
        return {"xhat": ctx["xhat"]}

    def kept_bytes(self, input_shape, itemsize, input_is_data):
        """Count xhat (an array of its own, even when the input is the network input)."""
        return int(np.prod(input_shape)) * itemsize if self.affine else 0

    factor_bytes = kept_bytes

    def jvp(self, params, tangent, ctx, rx, n_threads, rctx=None):
        """R{y} = V_gamma xhat + v_beta + a R{x}, for k directions."""
        if not self.affine:  # R{y} = R{x} / sigma
            return None if rx is None else self.input_vjp(params, rx, n_threads)
        xhat = ctx["xhat"]
        n = xhat.shape[0]
        Vg, Vb = tangent["weight"], tangent["bias"]
        ry = np.empty((n, Vg.shape[0], self.num_features * self._positions), dtype=xhat.dtype)
        kernels.channel_affine(xhat.reshape(n, 1, -1), Vg, Vb, ry, False, n_threads)
        if rx is not None:
            kernels.channel_affine(rx, self._scale(params, ry.dtype), _NO_SHIFT[ry.dtype.char],
                                   ry, True, n_threads)
        return ry

    def param_vjp(self, ctx, gy, acc, n_threads):
        """dL/dgamma += sum gy xhat and dL/dbeta += sum gy, per channel, for k directions."""
        xhat = ctx["xhat"]
        kernels.channel_dot(gy, xhat.reshape(xhat.shape[0], 1, -1), acc["weight"], n_threads)
        kernels.channel_bias_grad(gy, acc["bias"], n_threads)

    def input_vjp(self, params, gy, n_threads):
        """dL/dx = a gy per channel."""
        gx = np.empty_like(gy)
        kernels.channel_affine(gy, self._scale(params, gy.dtype), _NO_SHIFT[gy.dtype.char], gx,
                               False, n_threads)
        return gx

    def input_grad(self, params, gy, ctx, n_threads):
        """dL/dx = a gy for direction-free gy (n, width)."""
        return self.input_vjp(params, np.ascontiguousarray(gy)[:, None], n_threads)[:, 0]

    def rvjp(self, params, tangent, ctx, g, rx, rgy, acc, need_input_grad, n_threads,
             rctx=None):
        """R-operator of ``vjp`` given g = dL/dy (n, width) and R{dL/dy} (n, k, width).

        R{dL/dgamma} = sum R{g} xhat + sum g R{x} / sigma,  R{dL/dbeta} = sum R{g},
        R{dL/dx} = a R{g} + (V_gamma / sigma) g. Without affine: R{dL/dx} = R{g} / sigma.
        """
        if not self.affine:
            return self.input_vjp(params, rgy, n_threads) if need_input_grad else None
        self.param_vjp(ctx, rgy, acc, n_threads)
        inv_sigma = self._fixed(rgy.dtype)[0]
        g = np.ascontiguousarray(g)[:, None]
        if rx is not None:
            cross = np.zeros(acc["weight"].shape, dtype=rgy.dtype)
            kernels.channel_dot(rx, g, cross, n_threads)
            acc["weight"] += cross * inv_sigma
        if not need_input_grad:
            return None
        rgx = self.input_vjp(params, rgy, n_threads)
        kernels.channel_affine(g, tangent["weight"] * inv_sigma, _NO_SHIFT[rgx.dtype.char], rgx,
                               True, n_threads)
        return rgx

    def sample_jacobian(self, ctx, D, offset, J_out, n_threads):
        """Write this layer's columns of the per-sample Jacobians ``J_out``."""
        n, K, C = D.shape[0], D.shape[1], self.num_features
        D4 = self._channels(D, (n, K))
        J_out[:, :, offset:offset + C] = np.einsum("nkcs,ncs->nkc", D4, ctx["xhat"],
                                                   optimize=True)
        J_out[:, :, offset + C:offset + 2 * C] = D4.sum(axis=3)


class BatchNorm1d(_BatchNorm):
    """``torch.nn.BatchNorm1d`` in evaluation mode, on (N, C) or (N, C, L) inputs.

    Parameters
    ----------
    num_features : int
        C.
    eps : float, default=1e-5
    affine : bool, default=True
        With the weight gamma and the bias beta as parameters; ``False``: the
        fixed map ``(x - mean) / sqrt(var + eps)``, a layer without parameters.
    running_mean, running_var : array of shape (C,), optional
        The running statistics (PyTorch's initial zeros and ones by default);
        ``from_torch`` copies them from the module.
    """

    _ranks = (1, 2)


class BatchNorm2d(_BatchNorm):
    """``torch.nn.BatchNorm2d`` in evaluation mode, on (N, C, H, W) inputs.

    The parameters are those of :class:`BatchNorm1d`.
    """

    _ranks = (3,)
