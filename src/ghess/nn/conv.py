"""The 2-D convolution.

Activations of a convolutional network are kept per sample in NCHW order,
flattened: ``(n, C * H * W)``, and ``(n, k, C * H * W)`` for k directions, so
the engine and the elementwise layers treat them like dense activations and
``Flatten`` costs nothing.

A convolution ``s = W * x + b`` is, per sample, the GEMM ``s_n = W phi(x_n) + b``
with ``phi(x_n)`` the unfolded input (im2col) of shape
``(in_channels * kh * kw, out_h * out_w)``; its transpose (col2im) scatters back.
With stride 1 along the width (and AVX2/FMA), the direct kernels of
``ghess._kernels.conv`` compute those GEMMs from ``x_n`` itself, for the forward
pass, ``V phi(x)``, the weight gradient and (stride 1 both ways) the input
gradient; such a layer then keeps ``x`` instead of ``phi(x)``.
"""

import numpy as np

from .._kernels import conv as kernels
from ._window import Windowed, pair, spatial_input
from .base import WeightBiasLayer, check_bias, positive_int

__all__ = ["Conv2d"]


class Conv2d(Windowed, WeightBiasLayer):
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

    wants_cache_sized_chunks = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, bias: bool = True) -> None:
        self.in_channels = positive_int(in_channels, "in_channels", "Conv2d")
        self.out_channels = positive_int(out_channels, "out_channels", "Conv2d")
        self.kernel_size = pair(kernel_size, "kernel_size", "Conv2d", 1)
        self.stride = pair(stride, "stride", "Conv2d", 1)
        self.padding = pair(padding, "padding", "Conv2d", 0)
        self.dilation = pair(dilation, "dilation", "Conv2d", 1)
        self.bias = check_bias(bias, "Conv2d")
        self._geom = None

    def __repr__(self):
        return (f"Conv2d({self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias})")

    @property
    def patch_size(self):
        """Rows of the unfolded input: in_channels * kh * kw."""
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def param_shapes(self, input_shape):
        """Return weight (out_channels, in_channels, kh, kw), then bias (out_channels,)."""
        shapes = [("weight", (self.out_channels, self.in_channels) + self.kernel_size)]
        if self.bias:
            shapes.append(("bias", (self.out_channels,)))
        return shapes

    def output_shape(self, input_shape):
        """(out_channels, out_h, out_w); records the geometry."""
        C, H, W = spatial_input(self, input_shape)
        if C != self.in_channels:
            raise ValueError(f"{self!r} expects {self.in_channels} input channels, "
                             f"but its input has {C}")
        self._geom = self._geometry(input_shape)
        self._input_shape = tuple(input_shape)
        return (self.out_channels, self._geom[11], self._geom[12])

    def init_params(self, input_shape, rng, dtype):
        """PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
        # PyTorch: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        # fan_in = in_channels * kh * kw; the same bound for the bias.
        bound = 1.0 / np.sqrt(self.patch_size)
        shape = (self.out_channels, self.in_channels) + self.kernel_size
        params = {"weight": rng.uniform(-bound, bound, shape)}
        if self.bias:
            params["bias"] = rng.uniform(-bound, bound, self.out_channels)
        return {name: value.astype(dtype) for name, value in params.items()}


    def accumulator_shapes(self, k):
        """Weights (k, out_channels, in_channels * kh * kw); biases (k, out_channels)."""
        return (k, self.out_channels, self.patch_size), (k, self.out_channels)

    # -- propagation ------------------------------------------------------
    def _weight(self, params):
        return params["weight"].reshape(1, self.out_channels, self.patch_size)

    def _unfold(self, x, n_threads):
        """Unfolded inputs (m, C*kh*kw, P) of the rows of x (m, C*H*W)."""
        P = self._geom[11] * self._geom[12]
        cols = np.empty((x.shape[0], self.patch_size, P), dtype=x.dtype)
        kernels.unfold(x, cols, self._geom, n_threads)
        return cols

    def _work(self, dtype, n_threads, *shape):
        return np.empty((n_threads,) + shape, dtype=dtype)

    def forward(self, params, x, ctx, need, n_threads):
        """s_n = W phi(x_n) + b per sample; keeps x, or the unfolded inputs phi(x)."""
        n = x.shape[0]
        if kernels.direct_conv_supported(self._geom):
            # direct convolution (faster than im2col + GEMM where it applies): phi(x)
            # is built later, by _cols, only for the passes that need it
            y = np.empty((n, self.out_channels * self._geom[11] * self._geom[12]),
                         dtype=x.dtype)
            bias = params["bias"] if self.bias else np.empty(0, dtype=x.dtype)
            kernels.conv_forward_direct(params["weight"].reshape(self.out_channels, -1), bias, x,
                                        y, self._geom, n_threads)
            ctx["x"] = x
            return y
        cols = self._unfold(x, n_threads)
        y = np.empty((n, 1, self.out_channels * cols.shape[2]), dtype=x.dtype)
        kernels.conv_gemm(self._weight(params), cols[:, None], y, False, n_threads)
        if self.bias:
            kernels.channel_bias_add(y, params["bias"][None, :], n_threads)
        ctx["cols"] = cols
        return y.reshape(n, -1)

    def _cols(self, ctx, n_threads):
        """Return the unfolded inputs phi(x): kept by the im2col path, else unfolded now.

        Only per-sample Jacobians need phi(x) where the direct kernels apply; it is
        not put back into ``ctx``, which may be an operator's stored context.
        """
        cols = ctx.get("cols")
        return self._unfold(ctx["x"], n_threads) if cols is None else cols

    has_kronecker_factors = True

    def kfac_weight_shape(self):
        """Return the shape of the weight as KFAC's matrix: (out_channels, C_in kh kw)."""
        return self.out_channels, self.patch_size

    def kfac_positions(self):
        """Output pixels: the positions that share the weight (KFC's T)."""
        return self._geom[11] * self._geom[12]

    def kfac_inputs(self, ctx, approx, n_threads):
        """The unfolded patches (n, C kh kw, P): ``sum_n cols_n cols_n^T`` sums every
        pixel's patch (``"expand"``, no transposed copy); ``"reduce"`` averages each
        sample's patches over the pixels, (1, n, C kh kw).
        """  # noqa: D205, D401
        cols = self._cols(ctx, n_threads)
        if approx == "reduce":
            return cols.mean(axis=2)[None], True
        return cols, False

    def kfac_sample_operands(self, ctx, gy, n_threads):
        """Return the unfolded patches (n, C kh kw, P) and gradients (n, m, C_out, P)."""
        return (self._cols(ctx, n_threads),
                gy.reshape(gy.shape[0], gy.shape[1], self.out_channels, -1))

    def kfac_output_grads(self, gy, approx):
        """The output gradients (n, m, C_out H W) as (n m, C_out, P): ``sum G G^T`` over
        samples, columns and pixels; ``"reduce"`` sums the pixels first, (1, n m, C_out).
        """  # noqa: D205, D401
        g = gy.reshape(gy.shape[0] * gy.shape[1], self.out_channels, -1)
        if approx == "reduce":
            return g.sum(axis=2)[None], True
        return g, False

    def _reads_input(self, ctx):
        """Whether the direct kernels serve this context (they read x, not phi(x))."""
        return "x" in ctx and kernels.direct_conv_supported(self._geom)

    def factor_context(self, ctx, n_threads=1):
        """Return what the stored-Jacobian path keeps: the input for the direct kernels
        (C*H*W numbers per sample), else the unfolded input (C*kh*kw*P).
        """  # noqa: D205
        if self._reads_input(ctx):
            return {"x": ctx["x"]}
        return {"cols": self._cols(ctx, n_threads)}

    def jvp(self, params, tangent, ctx, rx, n_threads, rctx=None):
        """R{s} = V phi(x) + W phi(R{x}) + v_b for k directions."""
        Vw = tangent["weight"]
        k, P = Vw.shape[0], self._geom[11] * self._geom[12]
        if self._reads_input(ctx):
            # the k directions' weights are k*M output channels of one direct convolution
            x = ctx["x"]
            n = x.shape[0]
            ry = np.empty((n, k, self.out_channels * P), dtype=x.dtype)
            kernels.conv_forward_direct(Vw.reshape(k * self.out_channels, -1),
                                        np.empty(0, dtype=x.dtype), x, ry.reshape(n, -1),
                                        self._geom, n_threads)
        else:
            cols = self._cols(ctx, n_threads)
            n = cols.shape[0]
            ry = np.empty((n, k, self.out_channels * P), dtype=cols.dtype)
            kernels.conv_gemm(Vw, cols[:, None], ry, False, n_threads)
        if rx is not None and self._reads_input(ctx):
            # W phi(R{x}): the n*k tangent inputs are the samples of one direct convolution
            kernels.conv_forward_direct(params["weight"].reshape(self.out_channels, -1),
                                        np.empty(0, dtype=rx.dtype), rx.reshape(n * k, -1),
                                        ry.reshape(n * k, -1), self._geom, n_threads, True)
        elif rx is not None:
            rcols = self._unfold(rx.reshape(n * k, -1), n_threads)
            kernels.conv_gemm(self._weight(params), rcols.reshape(n, k, self.patch_size, P),
                              ry, True, n_threads)
            if rctx is not None:  # the R-backward needs phi(R{x}) again (rvjp)
                rctx["unfolded_rx"] = rcols
        if self.bias:
            kernels.channel_bias_add(ry, tangent["bias"], n_threads)
        return ry

    def param_vjp(self, ctx, gy, acc, n_threads):
        """dL/dW += sum_n g_n phi(x_n)^T, dL/db += sums of g over positions."""
        if self._reads_input(ctx):
            # straight from x, as the forward pass: no unfolded input to write and read
            kernels.conv_weight_grad_direct(gy, ctx["x"], acc["weight"], self._geom, n_threads)
        else:
            self._weight_grad(gy, self._cols(ctx, n_threads)[:, None], acc, n_threads)
        if self.bias:
            kernels.channel_bias_grad(gy, acc["bias"], n_threads)

    def _weight_grad(self, g, cols, acc, n_threads):
        k = acc["weight"].shape[0]
        work = self._work(g.dtype, n_threads, k, self.out_channels, self.patch_size)
        kernels.conv_weight_grad(g, cols, acc["weight"], work, n_threads)

    def _input_grad(self, weights, g, out, accumulate, n_threads, weights2=None, g2=None):
        """Set out (+)= col2im(weights^T g [+ weights2^T g2]), per sample and direction."""
        P = self._geom[11] * self._geom[12]
        work = self._work(g.dtype, n_threads, self.patch_size, P)
        if weights2 is None:
            weights2 = np.empty((0,) + weights.shape[1:], dtype=g.dtype)
            g2 = g
        kernels.conv_input_grad(weights, g, weights2, g2, out, work, self._geom, accumulate,
                                n_threads)

    def input_vjp(self, params, gy, n_threads):
        """dL/dx = col2im(W^T g)."""
        n, k = gy.shape[0], gy.shape[1]
        gx = np.empty((n, k, int(np.prod(self._input_shape))), dtype=gy.dtype)
        transposed = self._transposed_geometry()
        if kernels.direct_conv_supported(transposed):
            # W^T g then col2im is the convolution of g with the flipped, transposed W
            kernels.conv_forward_direct(self._flipped_weight(params), np.empty(0, gy.dtype),
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

    def rvjp(self, params, tangent, ctx, g, rx, rgy, acc, need_input_grad, n_threads,
             rctx=None):
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
                kernels.conv_weight_grad_direct(g1, np.ascontiguousarray(rx[:, j]),
                                                acc["weight"][j:j + 1], self._geom, n_threads)
        elif rx is not None:
            rcols = None if rctx is None else rctx.pop("unfolded_rx", None)
            if rcols is None:
                rcols = self._unfold(rx.reshape(n * k, -1), n_threads)
            self._weight_grad(g[:, None], rcols.reshape(n, k, self.patch_size, P), acc,
                              n_threads)
        if not need_input_grad:
            return None
        rgx = np.empty((n, k, int(np.prod(self._input_shape))), dtype=rgy.dtype)
        transposed = self._transposed_geometry()
        if kernels.direct_conv_supported(transposed):
            # V^T g then col2im: g convolved with the k directions' flipped weights, k*C
            # output channels of one direct convolution; then W^T R{g} as in vjp, added
            none = np.empty(0, dtype=rgy.dtype)
            kernels.conv_forward_direct(self._flipped_tangent(tangent), none,
                                        np.ascontiguousarray(g), rgx.reshape(n, -1), transposed,
                                        n_threads)
            kernels.conv_forward_direct(self._flipped_weight(params), none,
                                        rgy.reshape(n * k, -1), rgx.reshape(n * k, -1),
                                        transposed, n_threads, True)
        else:
            self._input_grad(self._weight(params), rgy, rgx, False, n_threads,
                             tangent["weight"], g[:, None])
        return rgx

    def sample_jacobian(self, ctx, D, offset, J_out, n_threads):
        """Write this layer's columns of the per-sample Jacobians ``J_out``."""
        work = self._work(D.dtype, n_threads, D.shape[1] * self.out_channels * self.patch_size)
        kernels.conv_sample_jacobian(D, self._cols(ctx, n_threads), self.bias, offset, J_out,
                                     work, n_threads)

    def kept_bytes(self, input_shape, itemsize, input_is_data):
        """Bytes per sample its forward context keeps: the input where the direct kernels
        read it (nothing of its own if it is the data), else the unfolded input.
        """  # noqa: D205
        if kernels.direct_conv_supported(self._geom):
            return 0 if input_is_data else int(np.prod(input_shape)) * itemsize
        return self.patch_size * self._geom[11] * self._geom[12] * itemsize

    factor_bytes = kept_bytes

    def work_elements(self, input_shape):
        """Scalars per sample of its temporaries (the unfolded input)."""
        return self.patch_size * self._geom[11] * self._geom[12]
