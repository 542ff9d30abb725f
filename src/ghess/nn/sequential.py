"""Sequential: the network container and the flat parameter layout.

The parameters are ONE flat 1-D array ``theta``, laid out exactly as
``torch.cat([p.reshape(-1) for p in seq.parameters()])`` for the equivalent
``torch.nn.Sequential``: layer by layer, weight then bias, C order.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from .._config import computing, resolve_n_threads
from .._validation import as_float_array, check_n_threads, check_params, compute_dtype
from .base import Layer

__all__ = ["Sequential", "ParamSlot"]

#: samples per chunk of ``Sequential.forward`` (outputs only: no per-layer contexts kept)
FORWARD_CHUNK = 4096


class ParamSlot:
    """Where one named parameter lives in theta."""

    __slots__ = ("name", "layer_index", "attr", "shape", "start", "stop")

    def __init__(self, name: str, layer_index: int, attr: str, shape: Sequence[int],
                 start: int) -> None:
        self.name = name
        self.layer_index = layer_index
        self.attr = attr
        self.shape = tuple(shape)
        self.start = start
        self.stop = start + int(np.prod(shape))

    @property
    def size(self) -> int:
        """Number of scalars."""
        return self.stop - self.start

    def __repr__(self):
        return f"ParamSlot({self.name!r}, shape={self.shape}, theta[{self.start}:{self.stop}])"


def _kind(slot):
    """Return the kind of a parameter: "weight" for "0.weight" and "2.body.0.weight"."""
    return slot.attr.rsplit(".", 1)[-1]


class Sequential:
    """A chain of layers applied in order, as ``torch.nn.Sequential``.

    Parameters
    ----------
    *layers : Layer
        The layers, e.g. ``Linear(4, 8), Tanh(), Linear(8, 3)``.
    input_shape : tuple of int
        Shape of ONE input sample, e.g. ``(d,)`` for dense networks.

    Attributes
    ----------
    n_params : int
        Length of the flat parameter vector.
    n_outputs : int
        Number of network outputs K per sample.
    param_slots : dict
        ``{"0.weight": ParamSlot, ...}``, keyed like ``nn.Sequential.state_dict()``.

    Examples
    --------
    >>> import ghess
    >>> model = ghess.Sequential(ghess.Linear(3, 4), ghess.Tanh(), ghess.Linear(4, 2),
    ...                          input_shape=(3,))
    >>> model.n_params
    26
    >>> list(model.param_slots)
    ['0.weight', '0.bias', '2.weight', '2.bias']
    """

    def __init__(self, *layers: Layer, input_shape: int | tuple[int, ...] | list[int]) -> None:
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        if not layers:
            raise ValueError("Sequential needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: layer {i} must be a ghess layer, "
                                f"got {type(layer).__name__}")
        if isinstance(input_shape, numbers.Integral) and not isinstance(input_shape, bool):
            input_shape = (input_shape,)
        if not isinstance(input_shape, (tuple, list)) or not all(
                isinstance(s, numbers.Integral) and not isinstance(s, (bool, np.bool_))
                for s in input_shape):
            raise TypeError(f"Sequential: input_shape must be a tuple of ints, "
                            f"got {input_shape!r}")
        input_shape = tuple(int(s) for s in input_shape)
        if not input_shape or any(s <= 0 for s in input_shape):
            raise ValueError(f"Sequential: input_shape must be non-empty with positive sizes, "
                             f"got {input_shape}")
        # The model owns copies: layers record their input geometry below, so one
        # layer object may serve in several models without interference.
        self.layers = tuple(copy.copy(layer) for layer in layers)
        self.input_shape = input_shape

        shapes = [input_shape]
        slots = {}
        offset = 0
        #: per layer, the ParamSlots of its parameters (empty for parameter-free layers)
        self.layer_slots = []
        for i, layer in enumerate(self.layers):
            try:
                out_shape = layer.output_shape(shapes[-1])
            except ValueError as exc:
                raise ValueError(f"Sequential layer {i}: {exc}") from None
            layer_slots = []
            for attr, shape in layer.param_shapes(shapes[-1]):
                slot = ParamSlot(f"{i}.{attr}", i, attr, shape, offset)
                offset = slot.stop
                slots[slot.name] = slot
                layer_slots.append(slot)
            self.layer_slots.append(layer_slots)
            shapes.append(tuple(out_shape))
        self.shapes = tuple(shapes)
        if len(shapes[-1]) != 1:
            raise ValueError(f"Sequential: the network must end with a flat output (N, K), "
                             f"but its output per sample has shape {shapes[-1]}")
        self.output_shape = shapes[-1]
        self.n_outputs = shapes[-1][0]
        self.param_slots = slots
        self.n_params = offset

    def __repr__(self):
        inner = ",\n    ".join(repr(layer) for layer in self.layers)
        return f"Sequential(\n    {inner},\n    input_shape={self.input_shape})"

    # -- parameters -------------------------------------------------------
    def layer_range(self, index: int) -> tuple[int, int]:
        """(start, stop) of layer ``index``'s parameters in theta."""
        slots = self.layer_slots[index]
        if not slots:
            return (0, 0)
        return (slots[0].start, slots[-1].stop)

    def init_params(self, seed: int | np.random.Generator = 0,
                    dtype: npt.DTypeLike = np.float64) -> np.ndarray:
        """PyTorch's default initialisation, drawn from ``numpy.random.default_rng(seed)``.

        Returns
        -------
        theta : ndarray of shape (n_params,)
        """
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"init_params: dtype must be float32 or float64, got {dtype}")
        rng = np.random.default_rng(seed)
        theta = np.empty(self.n_params, dtype=dtype)
        for i, layer in enumerate(self.layers):
            values = layer.init_params(self.shapes[i], rng, dtype)
            for slot in self.layer_slots[i]:
                theta[slot.start:slot.stop] = values[slot.attr].reshape(-1)
        return theta

    def unflatten(self, theta: npt.ArrayLike) -> dict[str, np.ndarray]:
        """Return views of ``theta`` keyed like ``nn.Sequential.state_dict()``.

        Writing into a view writes into ``theta``.
        """
        theta = np.asarray(theta)
        if theta.ndim != 1 or theta.shape[0] != self.n_params:
            raise ValueError(f"unflatten: theta must have shape ({self.n_params},), "
                             f"got {theta.shape}")
        return {name: theta[s.start:s.stop].reshape(s.shape) for name, s in
                self.param_slots.items()}

    def flatten(self, params: Mapping[str, npt.ArrayLike]) -> np.ndarray:
        """Inverse of :meth:`unflatten`: a dict of arrays to one flat theta."""
        missing = set(self.param_slots) - set(params)
        extra = set(params) - set(self.param_slots)
        if missing or extra:
            raise ValueError(f"flatten: expected keys {list(self.param_slots)}, "
                             f"missing {sorted(missing)}, unexpected {sorted(extra)}")
        arrays = {name: np.asarray(value) for name, value in params.items()}
        for name, value in arrays.items():
            if value.dtype.kind not in "iuf":
                raise TypeError(f"flatten: {name} must be real, got dtype {value.dtype}")
        dtype = np.result_type(*[compute_dtype(a.dtype) for a in arrays.values()])
        theta = np.empty(self.n_params, dtype=dtype)
        for name, slot in self.param_slots.items():
            value = arrays[name]
            if value.shape != slot.shape:
                raise ValueError(f"flatten: {name} must have shape {slot.shape}, "
                                 f"got {value.shape}")
            theta[slot.start:slot.stop] = value.reshape(-1)
        return theta

    def parameter_mask(self, select: str | int) -> np.ndarray:
        """Return a 0/1 vector over the flat parameters: 1 where ``select`` picks them.

        ``select`` is a kind of parameter (``"weight"`` or ``"bias"``, in every
        layer), a layer index, or a parameter name such as ``"2.weight"``. For a
        diagonal damping on part of the parameters:
        ``alpha * model.parameter_mask("weight")``.
        """
        mask = np.zeros(self.n_params)
        if isinstance(select, numbers.Integral) and not isinstance(select, bool):
            if not 0 <= select < len(self.layers):
                raise ValueError(f"parameter_mask: layer index must lie in [0, "
                                 f"{len(self.layers)}), got {select}")
            slots = self.layer_slots[select]
        elif isinstance(select, str) and select in self.param_slots:
            slots = [self.param_slots[select]]
        elif isinstance(select, str) and any(_kind(s) == select
                                             for s in self.param_slots.values()):
            slots = [s for s in self.param_slots.values() if _kind(s) == select]
        else:
            kinds = sorted({_kind(s) for s in self.param_slots.values()})
            raise ValueError(f"parameter_mask: select a kind {kinds}, a layer index or a "
                             f"parameter name {list(self.param_slots)}, got {select!r}")
        for slot in slots:
            mask[slot.start:slot.stop] = 1.0
        return mask

    def layer_params(self, theta: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Per layer, a dict ``{attr: view}`` of theta (the engine's form)."""
        return [{s.attr: theta[s.start:s.stop].reshape(s.shape) for s in slots}
                for slots in self.layer_slots]

    # -- inputs -----------------------------------------------------------
    def check_inputs(self, X: npt.ArrayLike, dtype: npt.DTypeLike,
                     name: str = "X") -> np.ndarray:
        """Validate inputs (N, *input_shape); return them contiguous in ``dtype``."""
        X = as_float_array(X, name, dtype=dtype)
        expected = (X.shape[0] if X.ndim else 0,) + self.input_shape
        if X.ndim != len(expected) or X.shape[1:] != self.input_shape:
            raise ValueError(f"{name} must have shape (n_samples, "
                             f"{', '.join(map(str, self.input_shape))}), got {X.shape}")
        if X.shape[0] == 0:
            raise ValueError(f"{name} is empty: got 0 samples")
        return X

    def forward(self, theta: npt.ArrayLike, X: npt.ArrayLike, *,
                n_threads: int | None = None) -> np.ndarray:
        """Network outputs z of shape (N, K), computed in theta's dtype.

        Outputs that overflow (from finite inputs and parameters) raise
        ``FloatingPointError`` naming the first layer whose outputs are not finite.
        """
        from .._engine.passes import checked_forward  # the engine builds on nn: not at import

        theta = check_params(theta, self.n_params)
        X = self.check_inputs(X, theta.dtype)
        lparams = self.layer_params(theta)
        out = np.empty((X.shape[0], self.n_outputs), dtype=theta.dtype)
        omp = resolve_n_threads(check_n_threads(n_threads))
        with computing():
            for start in range(0, X.shape[0], FORWARD_CHUNK):
                _, z = checked_forward(self, lparams, X[start:start + FORWARD_CHUNK], 0, omp)
                out[start:start + z.shape[0]] = z
        return out

    def forward_chunk(self, lparams: Sequence[dict[str, np.ndarray]], X: np.ndarray, need: int,
                      n_threads: int) -> tuple[list[dict], np.ndarray]:
        """Forward pass of one chunk: outputs (n, K) and each layer's context.

        ``need`` = 0 (outputs), 1 (+ what first-order passes read), 2 (+ f'').
        Activations are kept flat per sample (C order).
        """
        ctxs = []
        x = X.reshape(X.shape[0], -1)
        for layer, params in zip(self.layers, lparams):
            ctx = {}
            x = layer.forward(params, x, ctx, need, n_threads)
            ctxs.append(ctx)
        return ctxs, x
