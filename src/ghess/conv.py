"""Convolutional layers: Conv2d, MaxPool2d, AvgPool2d and Flatten.

Activations of a convolutional network are kept per sample in NCHW order,
flattened: ``(n, C * H * W)``, and ``(n, k, C * H * W)`` for k directions, so
the engine and the elementwise layers treat them like dense activations and
``Flatten`` costs nothing. Each layer carries its geometry as a tuple of 13 ints
for the kernels of ``ghess._kernels.conv``:
``(in_channels, height, width, kernel_h, kernel_w, stride_h, stride_w,
pad_h, pad_w, dilation_h, dilation_w, out_h, out_w)``.

A convolution ``s = W * x + b`` is, per sample, the GEMM ``s_n = W phi(x_n) + b``
with ``phi(x_n)`` the unfolded input (im2col) of shape
``(in_channels * kh * kw, out_h * out_w)``; its transpose (col2im) scatters back.
With stride 1 along the width (and AVX2/FMA), the direct kernels of
``ghess._kernels.conv`` compute those GEMMs from ``x_n`` itself, for the forward pass,
``V phi(x)``, the weight gradient and (stride 1 both ways) the input gradient;
such a layer then keeps ``x`` instead of ``phi(x)``.
"""

import numbers

import numpy as np

from ._kernels import conv as _conv
from .layers import Activation, Layer, _positive_int

__all__ = ["Conv2d", "MaxPool2d", "AvgPool2d", "Flatten"]


def _pair(value, name, owner, minimum):
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{owner}: {name} must be an int or a pair, got {value!r}")
        values = tuple(value)
    else:
        values = (value, value)
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{owner}: {name} must be an int or a pair of ints, got {value!r}")
        if v < minimum:
            raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value!r}")
        out.append(int(v))
    return tuple(out)


def _spatial_input(layer, input_shape):
    if len(input_shape) != 3:
        raise ValueError(f"{layer!r} expects inputs of shape (channels, height, width), "
                         f"got per-sample shape {tuple(input_shape)}")
    return input_shape


class _Windowed(Layer):
    """Shared geometry of convolutions and poolings."""

    def _geometry(self, input_shape):
        """Return the 13-int geometry tuple for ``input_shape`` (C, H, W)."""
        C, H, W = input_shape
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph, pw = self.padding
        dh, dw = self.dilation
        span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        if span_h > H + 2 * ph or span_w > W + 2 * pw:
            raise ValueError(
                f"{self!r}: the window spans {span_h}x{span_w} but the padded input is only "
                f"{H + 2 * ph}x{W + 2 * pw} (input {H}x{W}, padding {ph}x{pw})")
        out_h = (H + 2 * ph - span_h) // sh + 1
        out_w = (W + 2 * pw - span_w) // sw + 1
        return (C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w)


class Conv2d(_Windowed):
    """2-D convolution over NCHW inputs, as ``torch.nn.Conv2d`` (zero padding).

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int or (int, int)
    stride : int or (int, int), default=1
    padding : int or (int, int), default=0
    dilation : int or (int, int), default=1
    bias : bool, default=True

    ``weight`` has shape ``(out_channels, in_channels, kh, kw)``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, bias=True):
        self.in_channels = _positive_int(in_channels, "in_channels", "Conv2d")
        self.out_channels = _positive_int(out_channels, "out_channels", "Conv2d")
        self.kernel_size = _pair(kernel_size, "kernel_size", "Conv2d", 1)
        self.stride = _pair(stride, "stride", "Conv2d", 1)
        self.padding = _pair(padding, "padding", "Conv2d", 0)
        self.dilation = _pair(dilation, "dilation", "Conv2d", 1)
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"Conv2d: bias must be a bool, got {bias!r}")
        self.bias = bool(bias)
        self._geom = None

    def __repr__(self):
        return (f"Conv2d({self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias})")

    @property
    def patch_size(self):
        """Rows of the unfolded input: in_channels * kh * kw."""
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def param_shapes(self, input_shape):  # noqa: D102
        shapes = [("weight", (self.out_channels, self.in_channels) + self.kernel_size)]
        if self.bias:
            shapes.append(("bias", (self.out_channels,)))
        return shapes

    def output_shape(self, input_shape):  # noqa: D102
        C, H, W = _spatial_input(self, input_shape)
        if C != self.in_channels:
            raise ValueError(f"{self!r} expects {self.in_channels} input channels, "
                             f"but its input has {C}")
        self._geom = self._geometry(input_shape)
        self._input_shape = tuple(input_shape)
        return (self.out_channels, self._geom[11], self._geom[12])

    def init_params(self, input_shape, rng, dtype):  # noqa: D102
        # PyTorch: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        # fan_in = in_channels * kh * kw; the same bound for the bias.
        bound = 1.0 / np.sqrt(self.patch_size)
        shape = (self.out_channels, self.in_channels) + self.kernel_size
        params = {"weight": rng.uniform(-bound, bound, shape)}
        if self.bias:
            params["bias"] = rng.uniform(-bound, bound, self.out_channels)
        return {name: value.astype(dtype) for name, value in params.items()}


    # -- propagation ------------------------------------------------------
    def _weight(self, params):
        return params["weight"].reshape(1, self.out_channels, self.patch_size)

    def _unfold(self, x, n_threads):
        """Unfolded inputs (m, C*kh*kw, P) of the rows of x (m, C*H*W)."""
        P = self._geom[11] * self._geom[12]
        cols = np.empty((x.shape[0], self.patch_size, P), dtype=x.dtype)
        _conv.unfold(x, cols, self._geom, n_threads)
        return cols

    def _work(self, dtype, n_threads, *shape):
        return np.empty((n_threads,) + shape, dtype=dtype)

    def forward(self, params, x, ctx, need, n_threads):
        """s_n = W phi(x_n) + b per sample; keeps x, or the unfolded inputs phi(x)."""
        n = x.shape[0]
        if _conv.direct_conv_supported(self._geom):
            # direct convolution (2x faster than im2col + GEMM where it applies): phi(x)
            # is built later, by _cols, only for the passes that need it
            y = np.empty((n, self.out_channels * self._geom[11] * self._geom[12]),
                         dtype=x.dtype)
            bias = params["bias"] if self.bias else np.empty(0, dtype=x.dtype)
            _conv.conv_forward_direct(params["weight"].reshape(self.out_channels, -1), bias, x,
                                      y, self._geom, n_threads)
            ctx["x"] = x
            return y
        cols = self._unfold(x, n_threads)
        y = np.empty((n, 1, self.out_channels * cols.shape[2]), dtype=x.dtype)
        _conv.conv_gemm(self._weight(params), cols[:, None], y, False, n_threads)
        if self.bias:
            _conv.channel_bias_add(y, params["bias"][None, :], n_threads)
        ctx["cols"] = cols
        return y.reshape(n, -1)

    def _cols(self, ctx, n_threads):
        """Return the unfolded inputs phi(x): kept by the im2col path, else unfolded now.

        Only per-sample Jacobians need phi(x) where the direct kernels apply; it is
        not put back into ``ctx``, which may be an operator's stored context.
        """
        cols = ctx.get("cols")
        return self._unfold(ctx["x"], n_threads) if cols is None else cols

    def _reads_input(self, ctx):
        """Whether the direct kernels serve this context (they read x, not phi(x))."""
        return "x" in ctx and _conv.direct_conv_supported(self._geom)

    def factor_context(self, ctx, n_threads=1):
        """Return what the stored-Jacobian path keeps: the input for the direct kernels
        (C*H*W numbers per sample), else the unfolded input (C*kh*kw*P).
        """  # noqa: D205
        if self._reads_input(ctx):
            return {"x": ctx["x"]}
        return {"cols": self._cols(ctx, n_threads)}

    def split_tangent(self, V):
        """Cut this layer's slice ``V`` (k, n_params_layer) into GEMM-ready pieces."""
        k, size = V.shape[0], self.out_channels * self.patch_size
        tangent = {"weight": np.ascontiguousarray(V[:, :size]).reshape(
            k, self.out_channels, self.patch_size)}
        if self.bias:
            tangent["bias"] = np.ascontiguousarray(V[:, size:])
        return tangent

    def jvp(self, params, tangent, ctx, rx, n_threads):
        """R{s} = V phi(x) + W phi(R{x}) + v_b for k directions."""
        Vw = tangent["weight"]
        k, P = Vw.shape[0], self._geom[11] * self._geom[12]
        if self._reads_input(ctx):
            # the k directions' weights are k*M output channels of one direct convolution
            x = ctx["x"]
            n = x.shape[0]
            ry = np.empty((n, k, self.out_channels * P), dtype=x.dtype)
            _conv.conv_forward_direct(Vw.reshape(k * self.out_channels, -1),
                                      np.empty(0, dtype=x.dtype), x, ry.reshape(n, -1),
                                      self._geom, n_threads)
        else:
            cols = self._cols(ctx, n_threads)
            n = cols.shape[0]
            ry = np.empty((n, k, self.out_channels * P), dtype=cols.dtype)
            _conv.conv_gemm(Vw, cols[:, None], ry, False, n_threads)
        if rx is not None and self._reads_input(ctx):
            # W phi(R{x}): the n*k tangent inputs are the samples of one direct convolution
            _conv.conv_forward_direct(params["weight"].reshape(self.out_channels, -1),
                                      np.empty(0, dtype=rx.dtype), rx.reshape(n * k, -1),
                                      ry.reshape(n * k, -1), self._geom, n_threads, True)
        elif rx is not None:
            rcols = self._unfold(rx.reshape(n * k, -1), n_threads)
            _conv.conv_gemm(self._weight(params), rcols.reshape(n, k, self.patch_size, P),
                            ry, True, n_threads)
            # a Hessian product's R-backward needs phi(R{x}) again (rvjp): keep it with
            # the direction, tagged by the R{x} it came from, instead of unfolding twice
            tangent["_unfolded_rx"] = (rx, rcols)
        if self.bias:
            _conv.channel_bias_add(ry, tangent["bias"], n_threads)
        return ry

    def new_accumulator(self, k, dtype, into=None):
        """Zeroed parameter-gradient accumulators for k directions.

        ``into``: for k = 1, this layer's zeroed slice of a flat vector, which the
        accumulators are then views of.
        """
        size = self.out_channels * self.patch_size
        if into is not None:
            acc = {"weight": into[:size].reshape(1, self.out_channels, self.patch_size)}
            if self.bias:
                acc["bias"] = into[size:].reshape(1, self.out_channels)
            return acc
        acc = {"weight": np.zeros((k, self.out_channels, self.patch_size), dtype=dtype)}
        if self.bias:
            acc["bias"] = np.zeros((k, self.out_channels), dtype=dtype)
        return acc

    def accumulator_to_flat(self, acc, out):
        """Add the accumulators to ``out`` (k, n_params_layer)."""
        k, size = out.shape[0], self.out_channels * self.patch_size
        out[:, :size] += acc["weight"].reshape(k, size)
        if self.bias:
            out[:, size:] += acc["bias"]

    def param_vjp(self, ctx, gy, acc, n_threads):
        """dL/dW += sum_n g_n phi(x_n)^T, dL/db += sums of g over positions."""
        if self._reads_input(ctx):
            # straight from x, as the forward pass: no unfolded input to write and read
            _conv.conv_weight_grad_direct(gy, ctx["x"], acc["weight"], self._geom, n_threads)
        else:
            self._weight_grad(gy, self._cols(ctx, n_threads)[:, None], acc, n_threads)
        if self.bias:
            _conv.channel_bias_grad(gy, acc["bias"], n_threads)

    def _weight_grad(self, g, cols, acc, n_threads):
        k = acc["weight"].shape[0]
        work = self._work(g.dtype, n_threads, k, self.out_channels, self.patch_size)
        _conv.conv_weight_grad(g, cols, acc["weight"], work, n_threads)

    def _input_grad(self, weights, g, out, accumulate, n_threads, weights2=None, g2=None):
        """Set out (+)= col2im(weights^T g [+ weights2^T g2]), per sample and direction."""
        P = self._geom[11] * self._geom[12]
        work = self._work(g.dtype, n_threads, self.patch_size, P)
        if weights2 is None:
            weights2 = np.empty((0,) + weights.shape[1:], dtype=g.dtype)
            g2 = g
        _conv.conv_input_grad(weights, g, weights2, g2, out, work, self._geom, accumulate,
                              n_threads)

    def vjp(self, params, ctx, gy, acc, need_input_grad, n_threads):
        """Accumulate parameter gradients; return dL/dx = col2im(W^T g) (or None)."""
        if acc is not None:
            self.param_vjp(ctx, gy, acc, n_threads)
        if not need_input_grad:
            return None
        n, k = gy.shape[0], gy.shape[1]
        gx = np.empty((n, k, int(np.prod(self._input_shape))), dtype=gy.dtype)
        transposed = self._transposed_geometry()
        if _conv.direct_conv_supported(transposed):
            # W^T g then col2im is the convolution of g with the flipped, transposed W
            _conv.conv_forward_direct(self._flipped_weight(params), np.empty(0, gy.dtype),
                                      gy.reshape(n * k, -1), gx.reshape(n * k, -1),
                                      transposed, n_threads)
        else:
            self._input_grad(self._weight(params), gy, gx, False, n_threads)
        return gx

    def _transposed_geometry(self):
        """Geometry of dL/dx as a convolution of dL/ds, or None where that needs
        fractional strides (stride > 1) or cropping (padding beyond the kernel's span).
        """  # noqa: D205
        C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w = self._geom
        pad_h, pad_w = dh * (kh - 1) - ph, dw * (kw - 1) - pw
        if sh != 1 or sw != 1 or pad_h < 0 or pad_w < 0:
            return None
        return (self.out_channels, out_h, out_w, kh, kw, 1, 1, pad_h, pad_w, dh, dw, H, W)

    def _flipped(self, weights):
        """Return W'[j*C + c, (m, a, b)] = W_j[m, c, kh-1-a, kw-1-b] for k weights W_j
        (k, M, C*kh*kw): the weights of the convolutions of dL/ds that give dL/dx,
        the k directions' stacked as k*C output channels.
        """  # noqa: D205
        k = weights.shape[0]
        w = weights.reshape((k, self.out_channels, self.in_channels) + self.kernel_size)
        w = w[:, :, :, ::-1, ::-1].transpose(0, 2, 1, 3, 4)
        return np.ascontiguousarray(w).reshape(k * self.in_channels, -1)

    def _flipped_weight(self, params):
        """Return ``_flipped`` of the layer's weight (C, M*kh*kw)."""
        return self._flipped(params["weight"].reshape(1, self.out_channels, -1))

    def _flipped_tangent(self, tangent):
        """Return ``_flipped`` of the k directions' weights (k*C, M*kh*kw), kept with them."""
        flipped = tangent.get("weight_flipped")
        if flipped is None:
            flipped = tangent["weight_flipped"] = self._flipped(tangent["weight"])
        return flipped

    def rvjp(self, params, tangent, ctx, g, rx, rgy, acc, need_input_grad, n_threads):
        """R-operator of ``vjp``: R{dW} = R{g} phi(x)^T + g phi(R{x})^T, R{db} = sum R{g},
        R{dL/dx} = col2im(W^T R{g} + V^T g).
        """  # noqa: D205
        n, k, P = rgy.shape[0], rgy.shape[1], self._geom[11] * self._geom[12]
        self.param_vjp(ctx, rgy, acc, n_threads)
        if rx is not None and self._reads_input(ctx):
            # g phi(R{x}_j)^T: the direct weight gradient, direction by direction (the
            # directions share g here, not the input)
            g1 = np.ascontiguousarray(g)[:, None]
            for j in range(k):
                _conv.conv_weight_grad_direct(g1, np.ascontiguousarray(rx[:, j]),
                                              acc["weight"][j:j + 1], self._geom, n_threads)
        elif rx is not None:
            cached = tangent.pop("_unfolded_rx", None)
            if cached is not None and cached[0] is rx:
                rcols = cached[1]
            else:
                rcols = self._unfold(rx.reshape(n * k, -1), n_threads)
            self._weight_grad(g[:, None], rcols.reshape(n, k, self.patch_size, P), acc,
                              n_threads)
        if not need_input_grad:
            return None
        rgx = np.empty((n, k, int(np.prod(self._input_shape))), dtype=rgy.dtype)
        transposed = self._transposed_geometry()
        if _conv.direct_conv_supported(transposed):
            # V^T g then col2im: g convolved with the k directions' flipped weights, k*C
            # output channels of one direct convolution; then W^T R{g} as in vjp, added
            none = np.empty(0, dtype=rgy.dtype)
            _conv.conv_forward_direct(self._flipped_tangent(tangent), none,
                                      np.ascontiguousarray(g), rgx.reshape(n, -1), transposed,
                                      n_threads)
            _conv.conv_forward_direct(self._flipped_weight(params), none,
                                      rgy.reshape(n * k, -1), rgx.reshape(n * k, -1),
                                      transposed, n_threads, True)
        else:
            self._input_grad(self._weight(params), rgy, rgx, False, n_threads,
                             tangent["weight"], g[:, None])
        return rgx

    def input_grad(self, params, gy, ctx, n_threads):
        """dL/dx for direction-free gy (n, out_width)."""
        return self.vjp(params, ctx, gy[:, None], None, True, n_threads)[:, 0]

    def sample_jacobian(self, ctx, D, offset, J_out, n_threads):
        """Write this layer's columns of the per-sample Jacobians ``J_out``."""
        _conv.conv_sample_jacobian(D, self._cols(ctx, n_threads), self.bias, offset, J_out,
                                   n_threads)

    def kept_bytes(self, input_shape, itemsize, input_is_data):
        """Bytes per sample its forward context keeps: the input where the direct kernels
        read it (nothing of its own if it is the data), else the unfolded input.
        """  # noqa: D205
        if _conv.direct_conv_supported(self._geom):
            return 0 if input_is_data else int(np.prod(input_shape)) * itemsize
        return self.patch_size * self._geom[11] * self._geom[12] * itemsize

    factor_bytes = kept_bytes

    def work_elements(self, input_shape):
        """Scalars per sample of its temporaries (the unfolded input)."""
        return self.patch_size * self._geom[11] * self._geom[12]

class _Pool2d(_Windowed):
    """Shared spec of the pooling layers (no parameters)."""

    dilation = (1, 1)
    uses_output_grad = False  # linear given the argmax: rvjp is the vjp of R{dL/dy}

    def __init__(self, kernel_size, stride=None, padding=0):
        owner = type(self).__name__
        self.kernel_size = _pair(kernel_size, "kernel_size", owner, 1)
        self.stride = (self.kernel_size if stride is None
                       else _pair(stride, "stride", owner, 1))
        self.padding = _pair(padding, "padding", owner, 0)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"{owner}: padding must be at most half the kernel size "
                             f"(as in PyTorch), got padding={self.padding} for "
                             f"kernel_size={self.kernel_size}")
        self._geom = None

    def __repr__(self):
        return (f"{type(self).__name__}(kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding})")

    def output_shape(self, input_shape):  # noqa: D102
        C, _, _ = _spatial_input(self, input_shape)
        self._geom = self._geometry(input_shape)
        self._input_shape = tuple(input_shape)
        return (C, self._geom[11], self._geom[12])

    @property
    def _in_width(self):
        return int(np.prod(self._input_shape))

    @property
    def _out_width(self):
        return self._geom[0] * self._geom[11] * self._geom[12]

    def rvjp(self, params, tangent, ctx, g, rx, rgy, acc, need_input_grad, n_threads):
        """Linear (given the argmax): R{dL/dx} is the VJP of R{dL/dy}."""
        return self.vjp(params, ctx, rgy, acc, need_input_grad, n_threads)

    def input_grad(self, params, gy, ctx, n_threads):
        """dL/dx for direction-free gy (n, out_width)."""
        return self.vjp(params, ctx, gy[:, None], None, True, n_threads)[:, 0]


class MaxPool2d(_Pool2d):
    """Max-pooling, as ``torch.nn.MaxPool2d`` (padding counts as -inf).

    Derivatives go to the FIRST maximum of each window in row-major order, as
    in PyTorch; that matters after ReLU, where windows of zeros are common.
    """

    def forward(self, params, x, ctx, need, n_threads):
        """Window maxima; keeps the index of each maximum."""
        n = x.shape[0]
        y = np.empty((n, self._out_width), dtype=x.dtype)
        argmax = np.empty((n, self._out_width), dtype=np.intp)
        _conv.maxpool_forward(x, y, argmax, self._geom, n_threads)
        ctx["argmax"] = argmax
        return y

    def jvp(self, params, tangent, ctx, rx, n_threads):
        """R{y} = R{x} at each window's argmax."""
        if rx is None:
            return None
        ry = np.empty((rx.shape[0], rx.shape[1], self._out_width), dtype=rx.dtype)
        _conv.gather(rx, ctx["argmax"], _NO_GAIN[rx.dtype.char], ry, n_threads)
        return ry

    def vjp(self, params, ctx, gy, acc, need_input_grad, n_threads):
        """dL/dx: each output's gradient goes to its window's argmax."""
        if not need_input_grad:
            return None
        gx = np.empty((gy.shape[0], gy.shape[1], self._in_width), dtype=gy.dtype)
        _conv.scatter_add(gy, ctx["argmax"], _NO_GAIN[gy.dtype.char], gx, n_threads)
        return gx

    def kept_bytes(self, input_shape, itemsize, input_is_data):
        """Bytes per sample its forward context keeps: the argmax indices."""
        return self._out_width * np.dtype(np.intp).itemsize

    factor_bytes = kept_bytes


#: the ``gain`` argument of _conv.gather/scatter_add that stands for all ones
_NO_GAIN = {np.dtype(t).char: np.empty((0, 0), dtype=t) for t in (np.float32, np.float64)}


class ActivationMaxPool:
    """An activation and the max-pooling after it, as one step.

    Through ``f`` then max-pooling, tangents and cotangents both go "take the
    window's argmax, times f' there". This step keeps f' at the argmax (one
    number per pooled output) instead of f' on the whole pooling input, and
    makes one pass instead of two: after a convolution, ReLU and 2x2
    max-pooling, a quarter of the f' memory and half the traffic. It serves
    the factor paths of stored Jacobians (``_engine.factor_plan``), which only
    push tangents and cotangents, and the Hessian product when ``f'' = 0``
    (``_engine.hessian_steps``): then the pair's R-backward is linear too.
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
        return (isinstance(first, Activation) and not first.is_identity
                and isinstance(second, MaxPool2d)
                and not (second_order and first.has_curvature))

    def factor_bytes(self, input_shape, itemsize, input_is_data):
        """Bytes per sample of the step's context: the argmax and f' there."""
        return self.pool._out_width * (np.dtype(np.intp).itemsize + itemsize)

    kept_bytes = factor_bytes

    def context(self, activation_ctx, pool_ctx, n_threads):
        """Return {"argmax", "gain"}: the pool's argmax and f' gathered at it."""
        argmax, d1 = pool_ctx["argmax"], activation_ctx["d1"]
        gain = np.empty(argmax.shape, dtype=d1.dtype)
        _conv.gather(d1[:, None], argmax, _NO_GAIN[d1.dtype.char], gain[:, None], n_threads)
        return {"argmax": argmax, "gain": gain}

    def jvp(self, params, tangent, ctx, rx, n_threads):
        """R{y} = f'(x) R{x} at each window's argmax."""
        if rx is None:
            return None
        ry = np.empty((rx.shape[0], rx.shape[1], self.pool._out_width), dtype=rx.dtype)
        _conv.gather(rx, ctx["argmax"], ctx["gain"], ry, n_threads)
        return ry

    def vjp(self, params, ctx, gy, acc, need_input_grad, n_threads):
        """dL/dx: each output's gradient, times f', goes to its window's argmax."""
        if not need_input_grad:
            return None
        gx = np.empty((gy.shape[0], gy.shape[1], self.pool._in_width), dtype=gy.dtype)
        _conv.scatter_add(gy, ctx["argmax"], ctx["gain"], gx, n_threads)
        return gx

    def rvjp(self, params, tangent, ctx, g, rx, rgy, acc, need_input_grad, n_threads):
        """With f'' = 0 the pair is linear given f' and the argmax: the VJP of R{dL/dy}."""
        return self.vjp(params, ctx, rgy, acc, need_input_grad, n_threads)


class AvgPool2d(_Pool2d):
    """Average pooling, as ``torch.nn.AvgPool2d`` (padded zeros count in the mean)."""

    def forward(self, params, x, ctx, need, n_threads):
        """Window means (a linear map: nothing to keep)."""
        y = np.empty((x.shape[0], self._out_width), dtype=x.dtype)
        _conv.avgpool_forward(x, y, self._geom, n_threads)
        return y

    def jvp(self, params, tangent, ctx, rx, n_threads):
        """R{y} = avgpool(R{x})."""
        if rx is None:
            return None
        n, k = rx.shape[0], rx.shape[1]
        ry = np.empty((n, k, self._out_width), dtype=rx.dtype)
        _conv.avgpool_forward(rx.reshape(n * k, -1), ry.reshape(n * k, -1), self._geom,
                              n_threads)
        return ry

    def vjp(self, params, ctx, gy, acc, need_input_grad, n_threads):
        """dL/dx: each output's gradient spread evenly over its window."""
        if not need_input_grad:
            return None
        n, k = gy.shape[0], gy.shape[1]
        gx = np.empty((n, k, self._in_width), dtype=gy.dtype)
        _conv.avgpool_backward(gy.reshape(n * k, -1), gx.reshape(n * k, -1), self._geom,
                               n_threads)
        return gx


class Flatten(Layer):
    """Flatten (C, H, W) to C * H * W features in C order, as ``torch.nn.Flatten``.

    ghess keeps activations flattened per sample already, so this costs nothing.
    """

    is_identity = True
    uses_output_grad = False

    def forward(self, params, x, ctx, need, n_threads):  # noqa: D102
        return x

    def jvp(self, params, tangent, ctx, rx, n_threads):  # noqa: D102
        return rx

    def vjp(self, params, ctx, gy, acc, need_input_grad, n_threads):  # noqa: D102
        return gy

    def rvjp(self, params, tangent, ctx, g, rx, rgy, acc, need_input_grad, n_threads):
        """Pass R{dL/dy} through."""
        return rgy

    def input_grad(self, params, gy, ctx, n_threads):  # noqa: D102
        return gy

    def output_shape(self, input_shape):  # noqa: D102
        return (int(np.prod(input_shape)),)
