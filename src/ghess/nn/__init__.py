"""Networks: the layer contract, the layers, the losses and ``Sequential``.

- ``base``: :class:`Layer` and :class:`ParametricLayer`, the contract every layer
  fulfils (spec, planner properties, forward/JVP/VJP/R-operator rules, memory);
- ``linear``, ``activation``, ``conv``, ``pooling``, ``reshape``, ``normalization``: the
  layers; ``residual``: residual blocks of them;
- ``losses``: losses with PyTorch's semantics and their output-space Hessians;
- ``sequential``: the container and the flat parameter layout.
"""

from .activation import (
    ELU,
    GELU,
    Activation,
    Dropout,
    Identity,
    LeakyReLU,
    ReLU,
    Sigmoid,
    SiLU,
    Softplus,
    Tanh,
)
from .base import Layer, ParametricLayer
from .conv import Conv2d
from .linear import Linear
from .losses import BCEWithLogitsLoss, CrossEntropyLoss, Loss, MSELoss
from .normalization import BatchNorm1d, BatchNorm2d
from .pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from .reshape import Flatten
from .residual import Residual
from .sequential import ParamSlot, Sequential

__all__ = [
    "Layer",
    "ParametricLayer",
    "Activation",
    "Identity",
    "LeakyReLU",
    "ReLU",
    "Sigmoid",
    "Softplus",
    "Tanh",
    "GELU",
    "SiLU",
    "ELU",
    "Dropout",
    "Linear",
    "Conv2d",
    "MaxPool2d",
    "AvgPool2d",
    "AdaptiveAvgPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "Flatten",
    "Residual",
    "Loss",
    "MSELoss",
    "CrossEntropyLoss",
    "BCEWithLogitsLoss",
    "Sequential",
    "ParamSlot",
]
