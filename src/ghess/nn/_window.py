"""Window geometry shared by convolutions and poolings.

Each such layer carries its geometry as a tuple of 13 ints for the kernels of
``ghess._kernels.conv``: ``(in_channels, height, width, kernel_h, kernel_w,
stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, out_h, out_w)``.
"""

import numbers

import numpy as np

from .base import INT_MAX


def pair(value, name, owner, minimum):
    """Check an int or a pair of ints >= ``minimum``; return the pair."""
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
        if v > INT_MAX:
            raise ValueError(f"{owner}: {name} must be at most {INT_MAX}, got {value!r}")
        out.append(int(v))
    return tuple(out)


def spatial_input(layer, input_shape):
    """Check a per-sample input shape (channels, height, width)."""
    if len(input_shape) != 3:
        raise ValueError(f"{layer!r} expects inputs of shape (channels, height, width), "
                         f"got per-sample shape {tuple(input_shape)}")
    return input_shape


class Windowed:
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
        # the kernels index a sample's padded input (and so a pooling's outputs, never more)
        # with 32-bit ints
        padded = C * (H + 2 * ph) * (W + 2 * pw)
        if padded >= 2 ** 31:
            raise ValueError(
                f"{self!r}: the padded input ({C}x{H + 2 * ph}x{W + 2 * pw}) must have fewer "
                f"than 2**31 elements per sample (input {H}x{W}, padding {ph}x{pw})")
        return (C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w)
