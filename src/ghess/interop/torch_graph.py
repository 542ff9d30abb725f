"""Residual PyTorch models to ghess layers, through a ``torch.fx`` trace of their forward.

``from_torch`` sends here every module that is not a plain ``nn.Sequential`` of
supported modules, such as a CIFAR ResNet written the usual way (a ``BasicBlock``
whose forward is ``F.relu(self.bn1(self.conv1(x)))``, ..., ``out += self.shortcut(x)``,
``F.relu(out)``; then ``F.avg_pool2d`` or ``AdaptiveAvgPool2d``, ``torch.flatten`` or
``out.view(out.size(0), -1)``, a ``Linear``).

The traced graph must be a chain of supported operations with residual additions:
every node has one tensor input, except an addition, whose two inputs are two chains
from one earlier value (its *split point*). An addition becomes a
:class:`~ghess.Residual` of the two chains, the one whose parameters the module
registers first being the body, so that ghess's flat parameters are the module's
``parameters()`` in order. Anything else (a product of two tensors, a
concatenation, a module called twice, an operation ghess has no layer for) raises
``TypeError`` naming the graph node, before any work.
"""

import operator

from ..nn import (
    ELU,
    GELU,
    AdaptiveAvgPool2d,
    AvgPool2d,
    Dropout,
    Flatten,
    LeakyReLU,
    MaxPool2d,
    ReLU,
    Residual,
    Sigmoid,
    SiLU,
    Softplus,
    Tanh,
)

__all__ = ["traced_layers"]


def traced_layers(module, convert_module):
    """Return ``(layers, parameter names)``: ``module``'s forward as ghess layers.

    ``convert_module(path, submodule)`` converts one leaf module (``from_torch``'s
    rule). The names are those of the module's parameters in the order of the
    ghess layers' flat parameters.
    """
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception as exc:  # data-dependent control flow and the like
        raise TypeError(f"from_torch: {type(module).__name__} cannot be traced by torch.fx "
                        f"({type(exc).__name__}: {exc}); only forwards that are chains of "
                        "modules and functions with residual additions convert") from None
    return _Converter(module, graph, convert_module).convert()


class _Converter:
    def __init__(self, module, graph, convert_module):
        self.module = module
        self.convert_module = convert_module
        nodes = list(graph.nodes)
        inputs = [n for n in nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise TypeError(f"from_torch: the forward must take one tensor, it takes "
                            f"{[n.name for n in inputs]}")
        self.input = inputs[0]
        self.output = next(n for n in nodes if n.op == "output")
        self.registered = {name: i for i, (name, _) in enumerate(module.named_parameters())}
        self.used_modules = set()
        self.names = {}  # id(ghess layer) -> torch parameter names of its own parameters
        self._splits = {}

    def convert(self):
        out = self.output.args[0]
        if not hasattr(out, "op"):
            raise TypeError("from_torch: the forward must return one tensor")
        layers = self._chain(out, self.input)
        return layers, [name for layer in layers for name in self._param_names(layer)]

    # -- the graph's structure ----------------------------------------------------
    def _inputs(self, node):
        """Return the tensor nodes a node reads (not the sizes a view reads)."""
        if node.op == "call_method" and node.target in ("view", "reshape"):
            return [node.args[0]]
        return list(node.all_input_nodes)

    def _is_add(self, node):
        return ((node.op == "call_function" and node.target in _additions())
                or (node.op == "call_method" and node.target in ("add", "add_")))

    def _step(self, node):
        """Return the node before ``node`` on its chain: its input, or an addition's split."""
        if self._is_add(node):
            return self._split(node)
        inputs = self._inputs(node)
        if len(inputs) != 1:
            raise TypeError(f"from_torch: graph node {node.name!r} ({node.op} "
                            f"{_target_name(node)}) reads {len(inputs)} tensors; only "
                            "chains with residual additions convert")
        return inputs[0]

    def _spine(self, node):
        spine = [node]
        while node is not self.input:
            node = self._step(node)
            spine.append(node)
        return spine

    def _split(self, add):
        """Return the value both inputs of an addition come from (the nearest common one)."""
        if add not in self._splits:
            tensors = self._inputs(add)
            if len(tensors) != 2 or add.kwargs.get("alpha", 1) != 1:
                raise TypeError(f"from_torch: graph node {add.name!r} adds "
                                f"{len(tensors)} tensors; a residual adds two with alpha=1")
            on_left = set(self._spine(tensors[0]))
            self._splits[add] = next(n for n in self._spine(tensors[1]) if n in on_left)
        return self._splits[add]

    def _chain(self, node, start):
        """Return the ghess layers that map the value at ``start`` to the value at ``node``."""
        layers = []
        while node is not start:
            if node is self.input:
                raise TypeError(f"from_torch: graph node {start.name!r} is not on the path "
                                "to the output")
            if self._is_add(node):
                split = self._split(node)
                a, b = (self._chain(t, split) for t in self._inputs(node))
                if not a and not b:
                    raise TypeError(f"from_torch: graph node {node.name!r} adds a value to "
                                    "itself; a residual adds two different chains")
                # the chain whose parameters the module registers first is the body
                # (ghess's flat parameters are the body's, then the shortcut's)
                body, shortcut = sorted((a, b), key=self._first_registered)
                if not body:
                    body, shortcut = shortcut, body
                block = Residual(*body, shortcut=shortcut)  # holds copies of the layers
                self.names[id(block)] = [name for layer in body + shortcut
                                         for name in self._param_names(layer)]
                layers.append(block)
                node = split
            else:
                before = self._step(node)  # a node that reads two tensors is refused first
                layers.append(self._layer(node))
                node = before
        layers.reverse()
        return layers

    def _first_registered(self, chain):
        """Registration index of a chain's first parameter (no parameters: last)."""
        names = [name for layer in chain for name in self._param_names(layer)]
        return self.registered[names[0]] if names else len(self.registered)

    def _param_names(self, layer):
        """Return the torch names of a converted layer's parameters, in ghess's order."""
        return self.names.get(id(layer), [])

    # -- one node to one layer --------------------------------------------------------
    def _layer(self, node):
        if node.op == "call_module":
            if node.target in self.used_modules:
                raise TypeError(f"from_torch: module {node.target!r} is called twice (graph "
                                f"node {node.name!r}); shared weights do not convert")
            self.used_modules.add(node.target)
            sub = self.module.get_submodule(node.target)
            layer = self.convert_module(node.target, sub)
            self.names[id(layer)] = [f"{node.target}.{name}"
                                     for name, _ in sub.named_parameters()]
            return layer
        layer = _function_layer(node)
        if layer is None:
            raise TypeError(f"from_torch: graph node {node.name!r} ({node.op} "
                            f"{_target_name(node)}) has no ghess layer; supported are "
                            "modules from_torch converts, relu, leaky_relu, tanh, sigmoid, "
                            "gelu, silu, elu, softplus, dropout (evaluation mode), "
                            "max_pool2d, avg_pool2d, adaptive_avg_pool2d, flatten(x, 1), "
                            "x.view(x.size(0), -1) and residual additions")
        return layer


def _additions():
    import torch

    return (operator.add, operator.iadd, torch.add)


def _target_name(node):
    return getattr(node.target, "__name__", str(node.target))


def _arg(node, index, name, default):
    """Return a call's argument by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _function_layer(node):
    """Return the ghess layer of a ``call_function``/``call_method`` node, or None."""
    import torch
    import torch.nn.functional as F

    op, target = node.op, node.target
    if op == "call_method":
        name = target
    elif op == "call_function":
        name = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
                F.leaky_relu: "leaky_relu", torch.tanh: "tanh", F.tanh: "tanh",
                torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.gelu: "gelu",
                F.silu: "silu", F.elu: "elu", F.softplus: "softplus", F.dropout: "dropout",
                F.max_pool2d: "max_pool2d", F.avg_pool2d: "avg_pool2d",
                F.adaptive_avg_pool2d: "adaptive_avg_pool2d",
                torch.flatten: "flatten"}.get(target)
    else:
        return None
    if name in ("relu", "relu_"):
        return ReLU()
    if name == "leaky_relu":
        return LeakyReLU(_arg(node, 1, "negative_slope", 0.01))
    if name == "tanh":
        return Tanh()
    if name == "sigmoid":
        return Sigmoid()
    if name == "gelu":
        return GELU(node.kwargs.get("approximate", "none"))
    if name == "silu":
        return SiLU()
    if name == "elu":
        return ELU(_arg(node, 1, "alpha", 1.0))
    if name == "softplus":
        return Softplus(_arg(node, 1, "beta", 1.0), _arg(node, 2, "threshold", 20.0))
    if name == "dropout":
        if _arg(node, 2, "training", True):
            return None  # F.dropout in training mode is random: refused
        return Dropout(_arg(node, 1, "p", 0.5))
    if name == "max_pool2d" and op == "call_function":
        if (_arg(node, 4, "dilation", 1) not in (1, (1, 1)) or _arg(node, 5, "ceil_mode", False)
                or _arg(node, 6, "return_indices", False)):
            return None
        kernel = _arg(node, 1, "kernel_size", None)
        return MaxPool2d(kernel, stride=_arg(node, 2, "stride", None) or kernel,
                         padding=_arg(node, 3, "padding", 0))
    if name == "avg_pool2d" and op == "call_function":
        if (_arg(node, 4, "ceil_mode", False) or not _arg(node, 5, "count_include_pad", True)
                or _arg(node, 6, "divisor_override", None) is not None):
            return None
        kernel = _arg(node, 1, "kernel_size", None)
        return AvgPool2d(kernel, stride=_arg(node, 2, "stride", None) or kernel,
                         padding=_arg(node, 3, "padding", 0))
    if name == "adaptive_avg_pool2d" and op == "call_function":
        return AdaptiveAvgPool2d(_arg(node, 1, "output_size", None))
    if name == "flatten":
        start = _arg(node, 1, "start_dim", 0 if op == "call_function" else 0)
        end = _arg(node, 2, "end_dim", -1)
        return Flatten() if (start, end) == (1, -1) else None
    if name in ("view", "reshape") and len(node.args) == 3 and node.args[2] == -1:
        size = node.args[1]
        if (getattr(size, "op", None) == "call_method" and size.target == "size"
                and size.args[0] is node.args[0] and list(size.args[1:]) == [0]):
            return Flatten()  # x.view(x.size(0), -1): C-order flattening per sample
    return None
