"""Max- and average pooling over NCHW activations (no parameters)."""

import numpy as np

from .._kernels import conv as kernels
from ._window import Windowed, pair, spatial_input
from .base import Layer

__all__ = ["MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d"]

#: the ``gain`` argument of the gather/scatter kernels that stands for all ones
NO_GAIN = {np.dtype(t).char: np.empty((0, 0), dtype=t) for t in (np.float32, np.float64)}
#: max pooling's argmax: an index into one sample's input (int32 halves the bytes the
#: JVP and VJP read; ``_window`` refuses inputs of 2**31 elements per sample)
ARGMAX_DTYPE = np.dtype(np.int32)


class _Pool2d(Windowed, Layer):
    """Shared spec of the pooling layers (no parameters)."""

    dilation = (1, 1)
    uses_output_grad = False  # linear given the argmax: rvjp is the vjp of R{dL/dy}

    def __init__(self, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] | None = None,
                 padding: int | tuple[int, int] = 0) -> None:
        owner = type(self).__name__
        self.kernel_size = pair(kernel_size, "kernel_size", owner, 1)
        self.stride = (self.kernel_size if stride is None
                       else pair(stride, "stride", owner, 1))
        self.padding = pair(padding, "padding", owner, 0)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"{owner}: padding must be at most half the kernel size "
                             f"(as in PyTorch), got padding={self.padding} for "
                             f"kernel_size={self.kernel_size}")
        self._geom = None

    def __repr__(self):
        return (f"{type(self).__name__}(kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding})")

    def output_shape(self, input_shape):
        """(channels, out_h, out_w); records the geometry."""
        C, _, _ = spatial_input(self, input_shape)
        self._geom = self._geometry(input_shape)
        self._input_shape = tuple(input_shape)
        return (C, self._geom[11], self._geom[12])

    @property
    def in_width(self):
        """Scalars per sample of the input."""
        return int(np.prod(self._input_shape))

    @property
    def out_width(self):
        """Scalars per sample of the output."""
        return self._geom[0] * self._geom[11] * self._geom[12]

    def rvjp(self, params, tangent, ctx, g, rx, rgy, acc, need_input_grad, n_threads,
             rctx=None):
        """Linear (given the argmax): R{dL/dx} is the VJP of R{dL/dy}."""
        return self.vjp(params, ctx, rgy, acc, need_input_grad, n_threads)


class MaxPool2d(_Pool2d):
    """Max-pooling, as ``torch.nn.MaxPool2d`` (padding counts as -inf).

    Derivatives go to the FIRST maximum of each window in row-major order, as
    in PyTorch; that matters after ReLU, where windows of zeros are common.
    """

    selects_argmax = True

    def forward(self, params, x, ctx, need, n_threads):
        """Window maxima; keeps the index of each maximum."""
        n = x.shape[0]
        y = np.empty((n, self.out_width), dtype=x.dtype)
        argmax = np.empty((n, self.out_width), dtype=ARGMAX_DTYPE)
        kernels.maxpool_forward(x, y, argmax, self._geom, n_threads)
        ctx["argmax"] = argmax
        return y

    def jvp(self, params, tangent, ctx, rx, n_threads, rctx=None):
        """R{y} = R{x} at each window's argmax."""
        if rx is None:
            return None
        ry = np.empty((rx.shape[0], rx.shape[1], self.out_width), dtype=rx.dtype)
        kernels.gather(rx, ctx["argmax"], NO_GAIN[rx.dtype.char], ry, n_threads)
        return ry

    def vjp(self, params, ctx, gy, acc, need_input_grad, n_threads):
        """dL/dx: each output's gradient goes to its window's argmax."""
        if not need_input_grad:
            return None
        gx = np.empty((gy.shape[0], gy.shape[1], self.in_width), dtype=gy.dtype)
        kernels.scatter_add(gy, ctx["argmax"], NO_GAIN[gy.dtype.char], gx,
                            self.windows_disjoint, n_threads)
        return gx

    @property
    def windows_disjoint(self):
        """Whether no input element lies in two windows (stride >= kernel size)."""
        return all(s >= k for s, k in zip(self.stride, self.kernel_size))

    def kept_bytes(self, input_shape, itemsize, input_is_data):
        """Bytes per sample its forward context keeps: the argmax indices."""
        return self.out_width * ARGMAX_DTYPE.itemsize

    factor_bytes = kept_bytes


class AvgPool2d(_Pool2d):
    """Average pooling, as ``torch.nn.AvgPool2d`` (padded zeros count in the mean)."""

    def forward(self, params, x, ctx, need, n_threads):
        """Window means (a linear map: nothing to keep)."""
        y = np.empty((x.shape[0], self.out_width), dtype=x.dtype)
        kernels.avgpool_forward(x, y, self._geom, n_threads)
        return y

    def jvp(self, params, tangent, ctx, rx, n_threads, rctx=None):
        """R{y} = avgpool(R{x})."""
        if rx is None:
            return None
        n, k = rx.shape[0], rx.shape[1]
        ry = np.empty((n, k, self.out_width), dtype=rx.dtype)
        kernels.avgpool_forward(rx.reshape(n * k, -1), ry.reshape(n * k, -1), self._geom,
                                n_threads)
        return ry

    def vjp(self, params, ctx, gy, acc, need_input_grad, n_threads):
        """dL/dx: each output's gradient spread evenly over its window."""
        if not need_input_grad:
            return None
        n, k = gy.shape[0], gy.shape[1]
        gx = np.empty((n, k, self.in_width), dtype=gy.dtype)
        kernels.avgpool_backward(gy.reshape(n * k, -1), gx.reshape(n * k, -1), self._geom,
                                 n_threads)
        return gx


class AdaptiveAvgPool2d(AvgPool2d):
    """Average pooling to a given output size, as ``torch.nn.AdaptiveAvgPool2d``.

    ``output_size`` is an int or a pair (an entry None keeps that input size);
    ``AdaptiveAvgPool2d(1)`` is global average pooling. The output size must
    divide the input size: PyTorch's windows are then the equal, non-overlapping
    ones of an ``AvgPool2d`` whose kernel and stride are the input size over the
    output size, which is how it runs. Other sizes (PyTorch's overlapping windows
    of unequal length) raise ``ValueError`` when the model is built.
    """

    def __init__(self, output_size: int | tuple[int | None, int | None]) -> None:
        sizes = tuple(output_size) if isinstance(output_size, (tuple, list)) else (
            output_size, output_size)
        if len(sizes) != 2:
            raise ValueError(f"AdaptiveAvgPool2d: output_size must be an int or a pair, got "
                             f"{output_size!r}")
        self.output_size = tuple(None if s is None else pair(s, "output_size",
                                                             "AdaptiveAvgPool2d", 1)[0]
                                 for s in sizes)
        self.kernel_size = self.stride = None  # from the input, in output_shape
        self.padding = (0, 0)
        self._geom = None

    def __repr__(self):
        return f"AdaptiveAvgPool2d(output_size={self.output_size})"

    def output_shape(self, input_shape):
        """(channels, out_h, out_w): the kernel and stride are the input over the output."""
        C, H, W = spatial_input(self, input_shape)
        out = tuple(size if want is None else want
                    for size, want in zip((H, W), self.output_size))
        if H % out[0] or W % out[1]:
            raise ValueError(
                f"{self!r}: an input of {H}x{W} does not divide into {out[0]}x{out[1]} "
                "windows; ghess supports output sizes that divide the input size (global "
                "average pooling: output_size=1)")
        self.kernel_size = self.stride = (H // out[0], W // out[1])
        return super().output_shape(input_shape)
