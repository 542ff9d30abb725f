"""Conversion between ghess models and PyTorch modules (needs PyTorch, an optional extra).

- :func:`from_torch`: an ``nn.Sequential`` (nested ones too) of supported modules, or a
  residual network traced with ``torch.fx`` (``torch_graph``), to a ghess ``Sequential``
  and its flat parameters, checked by one forward pass of both;
- :func:`to_torch`: a ghess model and parameters to the equivalent ``nn.Sequential``.

The flat parameters are ``torch.cat([p.detach().reshape(-1) for p in
module.parameters()])`` in both directions, so a Newton step computed by ghess is
written back with ``torch.nn.utils.vector_to_parameters``.
"""

import numpy as np

from .._problem import check_model
from .._validation import check_params
from ..nn import (
    ELU,
    GELU,
    Activation,
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    Identity,
    LeakyReLU,
    Linear,
    MaxPool2d,
    ReLU,
    Residual,
    Sequential,
    Sigmoid,
    SiLU,
    Softplus,
    Tanh,
)
from .torch_graph import traced_layers

__all__ = ["from_torch", "to_torch", "torch_sequential"]


def to_torch(model: Sequential, params) -> "torch.nn.Module":  # noqa: F821
    """Return the ``torch.nn.Sequential`` equivalent to ``model``, holding ``params``.

    In evaluation mode and in the parameters' dtype: its forward equals
    ``model.forward(params, X)`` and ``torch.cat([p.reshape(-1) for p in
    module.parameters()])`` equals ``params``.
    """
    import torch

    check_model(model)
    theta = check_params(params, model.n_params)
    dtype = torch.float32 if theta.dtype == np.float32 else torch.float64
    return torch_sequential(model, dtype, params=theta).eval()


def from_torch(module, input_shape, *, check: bool = True):
    """Convert a PyTorch module to ``(model, params)``.

    Parameters
    ----------
    module : torch.nn.Module
        An ``nn.Sequential`` (nested ones are flattened in order) of ``Linear``,
        ``Conv2d`` (zero padding, no groups), ``ReLU``, ``LeakyReLU``, ``Tanh``,
        ``Sigmoid``, ``Softplus``, ``GELU``, ``SiLU``, ``ELU``, ``Identity``,
        ``BatchNorm1d``, ``BatchNorm2d`` (in evaluation mode, with running
        statistics), ``MaxPool2d``, ``AvgPool2d``, ``AdaptiveAvgPool2d`` (output sizes that
        divide the input), ``Flatten`` and ``Dropout`` (the identity,
        as in evaluation mode; a Dropout in training mode is refused), or one
        such module. A module with a forward of its own, such as a ResNet (blocks
        ``conv-bn-relu-conv-bn`` with ``out += self.shortcut(x)``, ``F.relu``,
        ``torch.flatten``), is traced with ``torch.fx``: a chain of those modules
        and of the matching functions (``F.relu``, ``F.avg_pool2d``, ...) with
        residual additions becomes a ``Sequential`` with :class:`~ghess.Residual`
        layers; any other graph raises ``TypeError`` naming the node.
    input_shape : tuple of int
        The shape of one input sample, e.g. ``(3, 32, 32)``.
    check : bool, default=True
        Run one forward pass of both on a random input and raise ``ValueError``
        if they disagree beyond rounding.

    Returns
    -------
    model : Sequential
    params : ndarray
        ``torch.cat([p.detach().reshape(-1) for p in module.parameters()])`` in
        the module's dtype (float32 stays float32).

    Raises
    ------
    TypeError
        Naming the module's path and class when ghess cannot express it, before
        any work; or when the parameters are not all float32 or all float64.
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"from_torch: module must be a torch.nn.Module, got "
                        f"{type(module).__name__}")
    leaves = list(_leaves(module, ""))
    if all(next(sub.children(), None) is None for _, sub in leaves):
        layers = [_layer(path, sub) for path, sub in leaves]
    else:  # modules with a forward of their own (residual blocks): traced with torch.fx
        layers, order = traced_layers(module, _layer)
        registered = [name for name, _ in module.named_parameters()]
        if sorted(order) == sorted(registered) and order != registered:
            raise ValueError(
                "from_torch: the module registers its parameters in another order than its "
                f"forward uses them ({registered[:4]}... against {order[:4]}...); ghess's "
                "flat parameters follow the forward, each residual's body before its "
                "shortcut: register the submodules in that order")
    if not layers:
        raise ValueError("from_torch: the module has no layers")
    dtypes = {p.dtype for p in module.parameters()}
    if not dtypes <= {torch.float32, torch.float64} or len(dtypes) > 1:
        raise TypeError(f"from_torch: parameters must all be float32 or all float64, "
                        f"got {sorted(str(d) for d in dtypes)}")
    try:
        model = Sequential(*layers, input_shape=input_shape)
    except ValueError as exc:  # shapes that do not chain, branches that do not match
        raise ValueError(f"from_torch: {exc}") from None
    dtype = np.float32 if dtypes == {torch.float32} else np.float64
    tensors = [p.detach().reshape(-1) for p in module.parameters()]
    params = (torch.cat(tensors).cpu().numpy().astype(dtype, copy=True) if tensors
              else np.zeros(0, dtype=dtype))
    if params.shape[0] != model.n_params:  # a module with parameters ghess does not see
        raise ValueError(f"from_torch: the module has {params.shape[0]} parameters, the "
                         f"converted model {model.n_params}")
    if check:
        _check_forward(module, model, params)
    return model, params


def _leaves(module, path):
    """Yield ``(path, module)`` of the leaf modules in order, through nested Sequentials."""
    import torch

    if isinstance(module, torch.nn.Sequential):
        for name, child in module.named_children():
            yield from _leaves(child, f"{path}.{name}" if path else name)
    else:
        yield path or type(module).__name__, module


def _layer(path, m):
    """Return the ghess layer equivalent to the torch module ``m`` at ``path``, or raise."""
    import torch.nn as tnn

    def refuse(why):
        raise TypeError(f"{path}: {type(m).__name__} {why}")

    kind = type(m)
    if kind is tnn.Linear:
        return Linear(m.in_features, m.out_features, bias=m.bias is not None)
    if kind is tnn.Conv2d:
        if m.groups != 1:
            refuse(f"with groups={m.groups} is not supported (only groups=1)")
        if m.padding_mode != "zeros":
            refuse(f"with padding_mode={m.padding_mode!r} is not supported (only 'zeros')")
        if isinstance(m.padding, str):
            if m.padding != "valid":
                refuse(f"with padding={m.padding!r} is not supported (use explicit padding)")
            padding = 0
        else:
            padding = m.padding
        return Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                      padding=padding, dilation=m.dilation, bias=m.bias is not None)
    if kind is tnn.MaxPool2d:
        if m.ceil_mode or m.return_indices or _pair(m.dilation) != (1, 1):
            refuse("with ceil_mode, return_indices or dilation is not supported")
        return MaxPool2d(m.kernel_size, stride=m.stride, padding=m.padding)
    if kind in (tnn.BatchNorm1d, tnn.BatchNorm2d):
        if m.training:
            refuse("is in training mode: call module.eval() first (in training mode batch "
                   "statistics couple the samples of a batch; ghess computes the curvature of "
                   "the network in evaluation mode, with the running statistics)")
        if m.running_mean is None or m.running_var is None:
            refuse("without running statistics (track_running_stats=False) uses batch "
                   "statistics even in evaluation mode: not supported")
        layer_type = BatchNorm1d if kind is tnn.BatchNorm1d else BatchNorm2d
        return layer_type(m.num_features, m.eps, affine=m.affine,
                          running_mean=m.running_mean.detach().cpu().double().numpy(),
                          running_var=m.running_var.detach().cpu().double().numpy())
    if kind is tnn.AdaptiveAvgPool2d:
        return AdaptiveAvgPool2d(m.output_size)
    if kind is tnn.AvgPool2d:
        if m.ceil_mode or not m.count_include_pad or m.divisor_override is not None:
            refuse("is supported only with ceil_mode=False, count_include_pad=True and no "
                   "divisor_override")
        return AvgPool2d(m.kernel_size, stride=m.stride, padding=m.padding)
    if kind is tnn.Flatten:
        if (m.start_dim, m.end_dim) != (1, -1):
            refuse("is supported only with start_dim=1, end_dim=-1")
        return Flatten()
    if kind is tnn.Dropout:
        if m.training and m.p > 0:
            refuse("is in training mode: call module.eval() first (ghess computes the "
                   "curvature of the network in evaluation mode, where Dropout is the identity)")
        return Dropout(m.p)
    if kind is tnn.GELU:
        return GELU(m.approximate)
    if kind is tnn.ELU:
        return ELU(m.alpha)
    simple = {tnn.ReLU: ReLU, tnn.Tanh: Tanh, tnn.Sigmoid: Sigmoid, tnn.Identity: Identity,
              tnn.SiLU: SiLU}
    if kind in simple:
        return simple[kind]()
    if kind is tnn.LeakyReLU:
        return LeakyReLU(m.negative_slope)
    if kind is tnn.Softplus:
        return Softplus(m.beta, m.threshold)
    refuse("is not supported")


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _check_forward(module, model, params):
    """Compare one forward pass of both on a random input; ValueError beyond rounding."""
    import torch

    X = np.random.default_rng(0).normal(size=(2,) + model.input_shape).astype(params.dtype)
    with torch.no_grad():
        expected = module(torch.from_numpy(X)).reshape(2, -1).cpu().numpy()
    got = model.forward(params, X)
    tolerance = 1e-4 if params.dtype == np.float32 else 1e-10
    scale = max(float(np.abs(expected).max()), 1e-30)
    if expected.shape != got.shape or not np.abs(got - expected).max() <= tolerance * scale:
        raise ValueError("from_torch: the converted model's forward pass differs from the "
                         "module's on a random input (a module whose forward is not the "
                         "sequence of its children?)")


def torch_sequential(model, dtype=None, *, params=None):
    """Build the ``torch.nn.Sequential`` equivalent to a ghess model (needs PyTorch).

    Same layers, same semantics, same parameter order: ``torch.cat([p.reshape(-1)
    for p in seq.parameters()])`` is ghess's flat theta. With ``params`` (a flat
    theta) the torch parameters are set to it. ``dtype`` defaults to float64.
    """
    import torch

    modules = [_torch_module(torch, layer) for layer in model.layers]
    # evaluation mode: the one where Dropout is the identity, as in ghess
    seq = torch.nn.Sequential(*modules).to(torch.float64 if dtype is None else dtype).eval()
    if params is not None:
        flat = torch.as_tensor(np.asarray(params), dtype=next(seq.parameters()).dtype)
        torch.nn.utils.vector_to_parameters(flat, seq.parameters())
    return seq


def _torch_module(torch, layer):
    """Return the PyTorch module equivalent to one ghess layer (float64 buffers)."""
    if isinstance(layer, Residual):
        body = torch.nn.Sequential(*[_torch_module(torch, inner) for inner in layer.body])
        shortcut = torch.nn.Sequential(*[_torch_module(torch, inner)
                                         for inner in layer.shortcut])
        return _residual_class(torch)(body, shortcut)
    if isinstance(layer, Linear):
        return torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
    if isinstance(layer, Conv2d):
        return torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                               stride=layer.stride, padding=layer.padding,
                               dilation=layer.dilation, bias=layer.bias)
    if isinstance(layer, (BatchNorm1d, BatchNorm2d)):
        module = getattr(torch.nn, type(layer).__name__)(layer.num_features, eps=layer.eps,
                                                         affine=layer.affine)
        # float64 buffers, converted with the module later (a copy into its float32
        # buffers would round the statistics before a float64 model sees them)
        module.running_mean = torch.from_numpy(np.array(layer.running_mean))
        module.running_var = torch.from_numpy(np.array(layer.running_var))
        return module
    if isinstance(layer, AdaptiveAvgPool2d):
        return torch.nn.AdaptiveAvgPool2d(layer.output_size)
    if isinstance(layer, (MaxPool2d, AvgPool2d)):
        # AvgPool2d: PyTorch's default count_include_pad=True, as ghess
        return getattr(torch.nn, type(layer).__name__)(layer.kernel_size, stride=layer.stride,
                                                       padding=layer.padding)
    if isinstance(layer, LeakyReLU):
        return torch.nn.LeakyReLU(layer.negative_slope)
    if isinstance(layer, Softplus):
        return torch.nn.Softplus(layer.beta, layer.threshold)
    if isinstance(layer, GELU):
        return torch.nn.GELU(approximate=layer.approximate)
    if isinstance(layer, ELU):
        return torch.nn.ELU(layer.alpha)
    if isinstance(layer, Dropout):
        return torch.nn.Dropout(layer.p)
    if isinstance(layer, (Activation, Flatten)):
        return getattr(torch.nn, type(layer).__name__)()
    raise TypeError(f"torch_sequential: no PyTorch equivalent for {layer!r}")


_RESIDUAL_CLASS = []


def _residual_class(torch):
    """Return the ``nn.Module`` class of a ghess ``Residual``: ``body(x) + shortcut(x)``.

    ``body`` and ``shortcut`` are ``nn.Sequential`` (an empty one is the identity),
    registered in that order: the parameters' order and names are ghess's.
    """
    if not _RESIDUAL_CLASS:
        class Residual(torch.nn.Module):
            def __init__(self, body, shortcut):
                super().__init__()
                self.body = body
                self.shortcut = shortcut

            def forward(self, x):
                return self.body(x) + self.shortcut(x)

        _RESIDUAL_CLASS.append(Residual)
    return _RESIDUAL_CLASS[0]
