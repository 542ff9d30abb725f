"""Conversion of ghess models to PyTorch (needs PyTorch, an optional extra)."""

import numpy as np

from ..nn import (
    Activation,
    AvgPool2d,
    Conv2d,
    Flatten,
    LeakyReLU,
    Linear,
    MaxPool2d,
    Softplus,
)

__all__ = ["torch_sequential"]


def torch_sequential(model, dtype=None, *, params=None):
    """Build the ``torch.nn.Sequential`` equivalent to a ghess model (needs PyTorch).

    Same layers, same semantics, same parameter order: ``torch.cat([p.reshape(-1)
    for p in seq.parameters()])`` is ghess's flat theta. With ``params`` (a flat
    theta) the torch parameters are set to it. ``dtype`` defaults to float64.
    """
    import torch

    modules = []
    for layer in model.layers:
        if isinstance(layer, Linear):
            modules.append(torch.nn.Linear(layer.in_features, layer.out_features,
                                           bias=layer.bias))
        elif isinstance(layer, Conv2d):
            modules.append(torch.nn.Conv2d(layer.in_channels, layer.out_channels,
                                           layer.kernel_size, stride=layer.stride,
                                           padding=layer.padding, dilation=layer.dilation,
                                           bias=layer.bias))
        elif isinstance(layer, (MaxPool2d, AvgPool2d)):
            # AvgPool2d: PyTorch's default count_include_pad=True, as ghess
            modules.append(getattr(torch.nn, type(layer).__name__)(
                layer.kernel_size, stride=layer.stride, padding=layer.padding))
        elif isinstance(layer, LeakyReLU):
            modules.append(torch.nn.LeakyReLU(layer.negative_slope))
        elif isinstance(layer, Softplus):
            modules.append(torch.nn.Softplus(layer.beta, layer.threshold))
        elif isinstance(layer, (Activation, Flatten)):
            modules.append(getattr(torch.nn, type(layer).__name__)())
        else:
            raise TypeError(f"torch_sequential: no PyTorch equivalent for {layer!r}")
    seq = torch.nn.Sequential(*modules).to(torch.float64 if dtype is None else dtype)
    if params is not None:
        flat = torch.as_tensor(np.asarray(params), dtype=next(seq.parameters()).dtype)
        torch.nn.utils.vector_to_parameters(flat, seq.parameters())
    return seq
