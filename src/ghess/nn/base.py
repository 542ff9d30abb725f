"""The layer contract: what every layer of a :class:`ghess.Sequential` provides.

A layer maps an input ``x`` to an output ``y``. It declares its spec (parameter
names and shapes, output shape, initial values), a few properties that tell the
engine's planner what the layer needs, and propagation rules that the engine
(``ghess._engine``) calls on one chunk of ``n`` samples at a time:

- ``forward``: ``y = f(x)``, keeping in ``ctx`` what the other rules need;
- ``jvp``: ``R{y} = (df/dx) R{x} + (df/dw) v`` for ``k`` directions at once;
- ``vjp``: ``dL/dx = (df/dx)^T dL/dy`` and ``dL/dw += (df/dw)^T dL/dy``;
- ``rvjp``: the R-operator of ``vjp`` (Pearlmutter), for Hessian products.

Layouts: activations are kept flat per sample (C order), ``(n, width)``; a
quantity that depends on the directions has shape ``(n, k, width)``. ``None``
stands for an exactly zero direction-dependent array (``R{x}`` of the network
input), so that no work is spent on it. ``params`` is the layer's dict
``{name: view of theta}`` and ``tangent`` what ``split_tangent`` made of the
directions (empty for layers without parameters).

``docs/design.md`` ("Adding a layer") walks through writing a new one.
"""

import abc
import math
import numbers

import numpy as np

__all__ = ["Layer", "ParametricLayer", "WeightBiasLayer"]

Shape = tuple[int, ...]


#: the largest size or geometry value: the kernels index with C ints
INT_MAX = 2**31 - 1


def positive_int(value, name: str, owner: str) -> int:
    """Check a constructor argument that must be a positive int (at most ``INT_MAX``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{owner}: {name} must be positive, got {value}")
    if value > INT_MAX:
        raise ValueError(f"{owner}: {name} must be at most {INT_MAX}, got {value}")
    return int(value)


def finite_real(value, name: str, owner: str) -> float:
    """Check a constructor argument that must be a finite real number."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value}")
    return float(value)


def check_bias(bias, owner: str) -> bool:
    """Check a ``bias=`` flag."""
    if not isinstance(bias, (bool, np.bool_)):
        raise TypeError(f"{owner}: bias must be a bool, got {bias!r}")
    return bool(bias)


class Layer(abc.ABC):
    """A layer without parameters; the base of every layer.

    Subclasses implement ``output_shape``, ``forward``, ``jvp``, ``vjp`` and
    ``rvjp``, set the planner properties that differ from the defaults below,
    and report their memory (``kept_bytes``, ``factor_bytes``,
    ``work_elements``) when they keep or allocate more than their output.
    Layers with parameters derive from :class:`ParametricLayer`.
    """

    # -- what the planner reads ------------------------------------------
    #: whether ``rvjp`` has a second-order term of its own (f'' != 0)
    has_curvature: bool = False
    #: whether ``rvjp`` reads g = dL/dy: a Hessian product's stored trace keeps g
    #: at the output of exactly these layers
    uses_output_grad: bool = True
    #: whether the layer passes its input through unchanged (no arrays of its own)
    is_identity: bool = False
    #: whether dy/dx is the same (out_width, in_width) matrix for every sample and
    #: ``input_jacobian`` returns it (a dense layer: its weight)
    has_shared_input_jacobian: bool = False
    #: whether y = f(x) elementwise and ``forward`` keeps f'(x) as ``ctx["d1"]``
    #: (with ``need >= 1``): the planner may fuse it with a max-pooling after it
    is_elementwise: bool = False
    #: whether y gathers one input per output and ``forward`` keeps their indices
    #: as ``ctx["argmax"]`` (n, out_width) (max-pooling)
    selects_argmax: bool = False
    #: whether the layer runs per-sample GEMMs of its own and so wants chunks whose
    #: temporaries stay in cache, rather than many samples per chunk (convolutions)
    wants_cache_sized_chunks: bool = False
    #: whether ``input_grad`` also keeps in ``ctx`` gradients that ``rvjp`` reads (a
    #: residual block's inner layers'): a Hessian trace then calls it even for the
    #: first parametrised layer, whose input gradient is otherwise not needed
    keeps_inner_grads: bool = False

    # -- spec -------------------------------------------------------------
    def param_shapes(self, input_shape: Shape) -> list[tuple[str, Shape]]:
        """Return ``[(name, shape), ...]`` of the parameters, in PyTorch's order."""
        return []

    @abc.abstractmethod
    def output_shape(self, input_shape: Shape) -> Shape:
        """Return the output shape for one sample, or raise ``ValueError``.

        Called once per model, with the per-sample input shape: a layer may
        record its input geometry here (the model owns a copy of each layer).
        """

    def init_params(self, input_shape: Shape, rng: np.random.Generator,
                    dtype: np.dtype) -> dict[str, np.ndarray]:
        """Return PyTorch-style initial values, as ``{name: array}``."""
        return {}

    # -- propagation --------------------------------------------------------
    @abc.abstractmethod
    def forward(self, params: dict, x: np.ndarray, ctx: dict, need: int,
                n_threads: int) -> np.ndarray:
        """Return y (n, out_width) for x (n, in_width); keep in ``ctx`` what later passes need.

        ``need``: 0 for outputs only, 1 to keep what first-order passes read
        (f'), 2 to keep also what ``rvjp`` reads (f'').
        """

    @abc.abstractmethod
    def jvp(self, params: dict, tangent: dict | None, ctx: dict, rx: np.ndarray | None,
            n_threads: int, rctx: dict | None = None) -> np.ndarray | None:
        """Return R{y} (n, k, out_width) from R{x} (n, k, in_width) or None.

        ``rctx``: a scratch dict of one Hessian product and chunk that the same
        step's ``rvjp`` receives (to reuse work of the R-forward), or None.
        """

    @abc.abstractmethod
    def vjp(self, params: dict, ctx: dict, gy: np.ndarray, acc: dict | None,
            need_input_grad: bool, n_threads: int) -> np.ndarray | None:
        """Accumulate dL/dw into ``acc``; return dL/dx (n, k, in_width), or None if not needed."""

    @abc.abstractmethod
    def rvjp(self, params: dict, tangent: dict | None, ctx: dict, g: np.ndarray | None,
             rx: np.ndarray | None, rgy: np.ndarray, acc: dict | None,
             need_input_grad: bool, n_threads: int,
             rctx: dict | None = None) -> np.ndarray | None:
        """R-operator of ``vjp``: accumulate R{dL/dw}; return R{dL/dx}.

        ``g`` = dL/dy (n, out_width), passed only when ``uses_output_grad``;
        ``rx`` = R{x}; ``rgy`` = R{dL/dy} (n, k, out_width).
        """

    def input_grad(self, params: dict, gy: np.ndarray, ctx: dict,
                   n_threads: int) -> np.ndarray:
        """dL/dx (n, in_width) for a direction-free gy (n, out_width)."""
        return self.vjp(params, ctx, gy[:, None], None, True, n_threads)[:, 0]

    # -- memory (bytes per sample, for planning before anything is allocated) --
    def kept_bytes(self, input_shape: Shape, itemsize: int, input_is_data: bool) -> int:
        """Bytes per sample that ``forward(need=2)`` keeps in ``ctx`` (Hessian traces)."""
        return 0

    def factor_bytes(self, input_shape: Shape, itemsize: int, input_is_data: bool) -> int:
        """Bytes per sample that the stored-Jacobian path keeps for this layer.

        A parametrised layer's ``factor_context``; for a parameter-free layer,
        its first-order context when a factor path runs through it.
        """
        return 0

    def work_elements(self, input_shape: Shape) -> int:
        """Scalars per sample of temporaries beyond the activations (for chunk sizing)."""
        return 0

    def __repr__(self):
        return f"{type(self).__name__}()"


class ParametricLayer(Layer):
    """A layer with parameters: the contract adds their layout and derivatives.

    The layer's parameters are one contiguous slice of the flat theta, in the
    order of ``param_shapes``, each in C order.
    """

    @abc.abstractmethod
    def param_shapes(self, input_shape: Shape) -> list[tuple[str, Shape]]:
        """Return ``[(name, shape), ...]`` of the parameters, in PyTorch's order."""

    @abc.abstractmethod
    def init_params(self, input_shape: Shape, rng: np.random.Generator,
                    dtype: np.dtype) -> dict[str, np.ndarray]:
        """Return PyTorch-style initial values, as ``{name: array}``."""

    @abc.abstractmethod
    def split_tangent(self, V: np.ndarray) -> dict:
        """Cut this layer's slice ``V`` (k, n_layer_params) of the directions into pieces."""

    @abc.abstractmethod
    def new_accumulator(self, k: int, dtype: np.dtype, into: np.ndarray | None = None) -> dict:
        """Zeroed parameter-gradient accumulators for k directions.

        ``into``: for k = 1, this layer's zeroed slice of a flat vector, which the
        accumulators are then views of (no copy back needed).
        """

    @abc.abstractmethod
    def accumulator_to_flat(self, acc: dict, out: np.ndarray) -> None:
        """Add the accumulators to ``out`` (k, n_layer_params)."""

    @abc.abstractmethod
    def param_vjp(self, ctx: dict, gy: np.ndarray, acc: dict, n_threads: int) -> None:
        """dL/dw += (dy/dw)^T gy for gy (n, k, out_width), from a forward or factor context."""

    @abc.abstractmethod
    def factor_context(self, ctx: dict, n_threads: int = 1) -> dict:
        """Return what the stored-Jacobian path keeps of a forward context for ``param_vjp``
        and ``jvp`` with ``rx=None``.
        """  # noqa: D205

    @abc.abstractmethod
    def sample_jacobian(self, ctx: dict, D: np.ndarray, offset: int, J_out: np.ndarray,
                        n_threads: int) -> None:
        """Write this layer's columns of the per-sample Jacobians ``J_out`` (n, K, n_params).

        ``D`` (n, K, out_width) = dz/dy per sample; the columns start at ``offset``.
        """

    def input_jacobian(self, params: dict) -> np.ndarray:
        """dy/dx: one (out_width, in_width) matrix for every sample.

        Layers that set ``has_shared_input_jacobian`` implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} has no shared input Jacobian")


class WeightBiasLayer(ParametricLayer):
    """A layer whose parameters are a weight and, if ``self.bias``, a bias of ``n_out``.

    Provides the parameter layout's share of the contract: the directions'
    pieces and the accumulators, in the shapes ``accumulator_shapes`` gives
    (the weight's shape is the GEMM-ready one of each layer; the bias's
    tangent is (k, n_out)).
    """

    bias: bool

    @abc.abstractmethod
    def accumulator_shapes(self, k: int) -> tuple[Shape, Shape]:
        """Shapes of the weight and bias accumulators (and tangents) for k directions."""

    @abc.abstractmethod
    def input_vjp(self, params: dict, gy: np.ndarray, n_threads: int) -> np.ndarray:
        """dL/dx (n, k, in_width) for gy = dL/dy (n, k, out_width)."""

    def vjp(self, params, ctx, gy, acc, need_input_grad, n_threads):
        """Accumulate parameter gradients (``param_vjp``); return dL/dx (or None)."""
        if acc is not None:
            self.param_vjp(ctx, gy, acc, n_threads)
        return self.input_vjp(params, gy, n_threads) if need_input_grad else None

    #: whether the layer has KFAC's Kronecker factors (``kfac_inputs`` and
    #: ``kfac_output_grads``: Linear and Conv2d)
    has_kronecker_factors = False

    def kfac_inputs(self, ctx: dict, approx: str, n_threads: int) -> tuple[np.ndarray, bool]:
        """Return the inputs whose second moment is KFAC's input factor, as a Gram operand.

        Returns ``(X, transpose)``, X of shape (batch, rows, cols): the factor's
        sum is ``sum_b X[b] X[b]^T``, or ``sum_b X[b]^T X[b]`` with ``transpose``
        (``dense.gram_sum``). ``approx`` is ``"expand"`` (a vector per sample and
        weight-sharing position) or ``"reduce"`` (per sample, averaged over the
        positions).
        """
        raise NotImplementedError

    def kfac_output_grads(self, gy: np.ndarray, approx: str) -> tuple[np.ndarray, bool]:
        """Return the output gradients gy (n, m, out_width) as KFAC's other Gram operand.

        As ``kfac_inputs``; ``"reduce"`` sums over the positions.
        """
        raise NotImplementedError

    def kfac_sample_operands(self, ctx: dict, gy: np.ndarray,
                             n_threads: int) -> tuple[np.ndarray, np.ndarray]:
        """Return each sample's inputs (n, d_in, T) and output gradients (n, m, n_out, T).

        T weight-sharing positions (1 for a dense layer): the weight gradient of
        sample n and column c is ``g[n, c] @ a[n].T`` (EKFAC's eigenvalue correction).
        """
        raise NotImplementedError

    def kfac_weight_shape(self) -> tuple[int, int]:
        """Return the shape of the weight as KFAC's matrix (n_out, d_in)."""
        raise NotImplementedError

    def kfac_positions(self) -> int:
        """Weight-sharing positions of one sample (the output pixels of a convolution)."""
        return 1

    @property
    def weight_size(self) -> int:
        """Scalars in the weight."""
        return math.prod(self.accumulator_shapes(1)[0])

    def split_tangent(self, V):
        """Cut this layer's slice ``V`` (k, n_layer_params) into the weight's and bias's."""
        k, n_w = V.shape[0], self.weight_size
        tangent = {"weight": np.ascontiguousarray(V[:, :n_w]).reshape(
            self.accumulator_shapes(k)[0])}
        if self.bias:
            tangent["bias"] = np.ascontiguousarray(V[:, n_w:])
        return tangent

    def new_accumulator(self, k, dtype, into=None):
        """Zeroed parameter-gradient accumulators for k directions (views of ``into``)."""
        weight_shape, bias_shape = self.accumulator_shapes(k)
        if into is not None:
            n_w = self.weight_size
            acc = {"weight": into[:n_w].reshape(weight_shape)}
            if self.bias:
                acc["bias"] = into[n_w:].reshape(bias_shape)
            return acc
        acc = {"weight": np.zeros(weight_shape, dtype=dtype)}
        if self.bias:
            acc["bias"] = np.zeros(bias_shape, dtype=dtype)
        return acc

    def accumulator_to_flat(self, acc, out):
        """Add the accumulators to ``out`` (k, n_layer_params)."""
        k, n_w = out.shape[0], self.weight_size
        out[:, :n_w] += acc["weight"].reshape(k, n_w)
        if self.bias:
            out[:, n_w:] += acc["bias"].reshape(k, -1)
