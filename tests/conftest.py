"""Shared test cases: small networks, losses and data with readable ids."""

import numpy as np
import pytest

import ghess
from ghess import testing

# Relative tolerances per dtype (float64: "exact to rounding").
RTOL = {np.float64: 1e-12, np.float32: 2e-4}


def make_targets(loss, n_samples, n_outputs, rng, dtype=np.float64):
    """Draw targets for ``loss``: labels, probabilities in [0, 1], or real values."""
    if isinstance(loss, ghess.CrossEntropyLoss):
        return rng.integers(0, n_outputs, size=n_samples)
    if isinstance(loss, ghess.BCEWithLogitsLoss):
        return rng.uniform(size=(n_samples, n_outputs)).astype(dtype)
    return rng.normal(size=(n_samples, n_outputs)).astype(dtype)


def make_data(loss, n_samples, model, rng, dtype=np.float64):
    """Draw inputs and targets fitting ``model`` and ``loss``."""
    X = rng.normal(size=(n_samples,) + model.input_shape).astype(dtype)
    return X, make_targets(loss, n_samples, model.n_outputs, rng, dtype)


class Hardtanh(ghess.nn.Activation):
    """``min_val`` below, ``max_val`` above, x between, as ``torch.nn.Hardtanh``.

    A layer defined outside the package by following docs/design.md's checklist
    for an elementwise activation: it runs in every operator through the same
    engine as the built-in layers, and the cases below hold it to the same
    exactness tests.
    """

    has_curvature = False  # f'' = 0 (away from the kinks)

    def __init__(self, min_val=-1.0, max_val=1.0):
        self.min_val, self.max_val = float(min_val), float(max_val)

    def __repr__(self):
        return f"Hardtanh(min_val={self.min_val}, max_val={self.max_val})"

    def evaluate(self, x, y_out, d1_out, d2_out, n_threads):
        """Write clip(x), and f' = 1 strictly inside the bounds (0 at them, as PyTorch)."""
        np.clip(x, self.min_val, self.max_val, out=y_out)
        if d1_out is not None:
            np.logical_and(x > self.min_val, x < self.max_val, out=d1_out, casting="unsafe")


def _reference_hardtanh(layer, s):
    """Return f, f', f'' of Hardtanh from the definition, not from the layer's code."""
    below, above = s <= layer.min_val, s >= layer.max_val
    value = np.where(below, layer.min_val, np.where(above, layer.max_val, s))
    return value, np.where(below | above, 0.0, 1.0), np.zeros_like(s)


testing.register_reference_activation(Hardtanh, _reference_hardtanh)


def _mlp(act, hidden=(6, 5), d=4, K=3, bias=True):
    layers = []
    width = d
    for h in hidden:
        layers += [ghess.Linear(width, h, bias=bias), act()]
        width = h
    layers.append(ghess.Linear(width, K))
    return ghess.Sequential(*layers, input_shape=(d,))


CASES = {
    "tanh-ce": (lambda: _mlp(ghess.Tanh), lambda: ghess.CrossEntropyLoss()),
    # factor: scikit-learn's half squared error, and a scaled sum
    "sigmoid-mse": (lambda: _mlp(ghess.Sigmoid), lambda: ghess.MSELoss(factor=0.5)),
    "softplus-bce": (lambda: _mlp(ghess.Softplus), lambda: ghess.BCEWithLogitsLoss()),
    "relu-ce-sum": (lambda: _mlp(ghess.ReLU),
                    lambda: ghess.CrossEntropyLoss(reduction="sum", factor=2.0)),
    "leakyrelu-mse-sum": (lambda: _mlp(lambda: ghess.LeakyReLU(0.2), bias=False),
                          lambda: ghess.MSELoss(reduction="sum")),
    "linear-linear-bce": (
        lambda: ghess.Sequential(ghess.Linear(4, 5), ghess.Linear(5, 3, bias=False),
                                 ghess.Identity(), input_shape=(4,)),
        lambda: ghess.BCEWithLogitsLoss(reduction="sum")),
    "tanh-tail-ce": (
        lambda: ghess.Sequential(ghess.Linear(4, 6), ghess.Tanh(), ghess.Linear(6, 3),
                                 ghess.Sigmoid(), input_shape=(4,)),
        lambda: ghess.CrossEntropyLoss()),
    "one-layer-mse": (lambda: ghess.Sequential(ghess.Linear(4, 2), input_shape=(4,)),
                      lambda: ghess.MSELoss()),
    "gelu-ce": (lambda: _mlp(ghess.GELU), lambda: ghess.CrossEntropyLoss()),
    # batch norm with non-trivial running statistics (gamma, beta: the parameters)
    "batchnorm-tanh-mse": (
        lambda: ghess.Sequential(
            ghess.Linear(4, 6), ghess.BatchNorm1d(6, eps=1e-3,
                                                  running_mean=np.linspace(-0.5, 0.7, 6),
                                                  running_var=np.linspace(0.8, 2.0, 6)),
            ghess.Tanh(), ghess.Linear(6, 3), input_shape=(4,)),
        lambda: ghess.MSELoss()),
    # batch norm without affine parameters: a fixed map, a layer without parameters
    "batchnorm-noaffine-silu-ce": (
        lambda: ghess.Sequential(
            ghess.Linear(4, 6), ghess.BatchNorm1d(6, affine=False,
                                                  running_mean=np.linspace(0.3, -0.6, 6),
                                                  running_var=np.linspace(0.5, 1.7, 6)),
            ghess.SiLU(), ghess.Linear(6, 3), input_shape=(4,)),
        lambda: ghess.CrossEntropyLoss()),
    "gelu-tanh-dropout-mse": (
        lambda: ghess.Sequential(ghess.Linear(4, 6), ghess.GELU(approximate="tanh"),
                                 ghess.Dropout(0.2), ghess.Linear(6, 3), input_shape=(4,)),
        lambda: ghess.MSELoss()),
    "silu-bce": (lambda: _mlp(ghess.SiLU), lambda: ghess.BCEWithLogitsLoss()),
    "elu-ce": (lambda: _mlp(lambda: ghess.ELU(0.7)), lambda: ghess.CrossEntropyLoss()),
    # a layer defined outside the package (above), held to every test of the built-in ones
    "hardtanh-ce": (lambda: _mlp(Hardtanh), lambda: ghess.CrossEntropyLoss()),
    # residual blocks: an identity shortcut, then a dense shortcut, with curvature inside
    "residual-tanh-mse": (
        lambda: ghess.Sequential(
            ghess.Linear(4, 6), ghess.Residual(ghess.Linear(6, 6), ghess.Tanh(),
                                               ghess.Linear(6, 6)),
            ghess.Softplus(),
            ghess.Residual(ghess.Linear(6, 5), ghess.GELU(),
                           shortcut=[ghess.Linear(6, 5, bias=False)]),
            ghess.Linear(5, 3), input_shape=(4,)),
        lambda: ghess.MSELoss()),
    # a residual as the first layer (its input is the data), with a residual nested inside
    "residual-first-nested-ce": (
        lambda: ghess.Sequential(
            ghess.Residual(ghess.Linear(4, 4), ghess.Residual(ghess.SiLU(), ghess.Linear(4, 4)),
                           ghess.Sigmoid(), shortcut=ghess.Linear(4, 4)),
            ghess.Linear(4, 3), input_shape=(4,)),
        lambda: ghess.CrossEntropyLoss()),
}


G = ghess

#: small convolutional networks, each with a loss
CONV_CASES = {
    "conv-bn-relu-bn1d-ce": (
        lambda: G.Sequential(G.Conv2d(2, 3, 3, padding=1),
                             G.BatchNorm2d(3, running_mean=np.array([0.2, -0.4, 0.1]),
                                           running_var=np.array([0.8, 1.5, 1.1])),
                             G.ReLU(), G.MaxPool2d(2), G.Conv2d(3, 4, 2), G.Flatten(),
                             G.BatchNorm1d(16, running_mean=np.linspace(-1, 1, 16),
                                           running_var=np.linspace(0.8, 3, 16)),
                             G.Softplus(), G.Linear(16, 4), input_shape=(2, 6, 6)),
        lambda: G.CrossEntropyLoss()),
    "conv-global-avgpool-ce": (
        lambda: G.Sequential(G.Conv2d(2, 3, 3, padding=1), G.ReLU(),
                             G.AdaptiveAvgPool2d((3, None)), G.Conv2d(3, 4, 1), G.SiLU(),
                             G.AdaptiveAvgPool2d(1), G.Flatten(), G.Linear(4, 5),
                             input_shape=(2, 6, 6)),
        lambda: G.CrossEntropyLoss()),
    "conv-gelu-maxpool-silu-elu-ce": (
        lambda: G.Sequential(G.Conv2d(2, 3, 3, padding=1), G.GELU(), G.MaxPool2d(2),
                             G.Conv2d(3, 4, 2), G.SiLU(), G.Dropout(0.1), G.Flatten(),
                             G.ELU(0.5), G.Linear(16, 4), input_shape=(2, 6, 6)),
        lambda: G.CrossEntropyLoss()),
    "conv-relu-maxpool-ce": (
        lambda: G.Sequential(G.Conv2d(2, 3, 3, padding=1), G.ReLU(), G.MaxPool2d(2), G.Flatten(),
                             G.Linear(27, 4), input_shape=(2, 6, 6)),
        lambda: G.CrossEntropyLoss()),
    "conv-odd-shapes-mse": (
        lambda: G.Sequential(G.Conv2d(1, 2, (3, 2), stride=2, padding=2, dilation=(1, 2)),
                             G.Tanh(), G.AvgPool2d(2, padding=1), G.Conv2d(2, 3, 1, bias=False),
                             G.Sigmoid(), G.Flatten(), G.Linear(27, 3), input_shape=(1, 7, 8)),
        lambda: G.MSELoss()),
    "conv-stride-avgpool-bce": (
        lambda: G.Sequential(G.Conv2d(3, 4, 3, stride=2), G.Softplus(), G.AvgPool2d((2, 1)),
                             G.Flatten(), G.Linear(4 * 1 * 3, 2), input_shape=(3, 7, 7)),
        lambda: G.BCEWithLogitsLoss()),
    "conv-single-channel-pad2-sum": (
        lambda: G.Sequential(G.Conv2d(1, 1, 2), G.LeakyReLU(0.1),
                             G.MaxPool2d(3, stride=1, padding=1),
                             G.Conv2d(1, 2, 2, padding=2), G.Tanh(), G.Flatten(),
                             G.Linear(2 * 6 * 6, 3), input_shape=(1, 4, 4)),
        lambda: G.CrossEntropyLoss(reduction="sum")),
    # tanh then max-pooling: fused for first-order paths, not in the Hessian (f'' != 0);
    # ReLU then max-pooling before a convolution: fused in the Hessian too
    "conv-tanh-maxpool-relu-maxpool-ce": (
        lambda: G.Sequential(G.Conv2d(1, 3, 3, padding=1), G.Tanh(), G.MaxPool2d(2),
                             G.Conv2d(3, 2, 3, padding=1), G.ReLU(), G.MaxPool2d(2, stride=1),
                             G.Flatten(), G.Linear(2 * 3 * 3, 3), input_shape=(1, 8, 8)),
        lambda: G.CrossEntropyLoss()),
    # a layer defined outside the package (Hardtanh, above), fused with the max-pooling
    # after it like the built-in activations
    "conv-hardtanh-maxpool-mse": (
        lambda: G.Sequential(G.Conv2d(2, 3, 3, padding=1), Hardtanh(), G.MaxPool2d(2),
                             G.Flatten(), G.Linear(27, 3), input_shape=(2, 6, 6)),
        lambda: G.MSELoss()),
    "conv-linear-in-theta-mse": (
        lambda: G.Sequential(G.Conv2d(2, 2, 3, padding=1), G.Flatten(), input_shape=(2, 3, 3)),
        lambda: G.MSELoss(reduction="sum")),
    # a small ResNet: basic blocks (conv-bn-relu-conv-bn), an identity and a strided
    # 1x1 conv + batch norm shortcut, ReLU after each sum, global average pooling
    "resnet-ce": (
        lambda: G.Sequential(
            G.Conv2d(2, 3, 3, padding=1, bias=False), _bn2d(3, 0), G.ReLU(),
            G.Residual(G.Conv2d(3, 3, 3, padding=1, bias=False), _bn2d(3, 1), G.ReLU(),
                       G.Conv2d(3, 3, 3, padding=1, bias=False), _bn2d(3, 2)),
            G.ReLU(),
            G.Residual(G.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), _bn2d(4, 3),
                       G.ReLU(), G.Conv2d(4, 4, 3, padding=1, bias=False), _bn2d(4, 4),
                       shortcut=[G.Conv2d(3, 4, 1, stride=2, bias=False), _bn2d(4, 5)]),
            G.ReLU(), G.AdaptiveAvgPool2d(1), G.Flatten(), G.Linear(4, 3),
            input_shape=(2, 6, 6)),
        lambda: G.CrossEntropyLoss()),
    # inside a residual, ReLU and max-pooling are not fused; tanh gives curvature
    "residual-maxpool-tanh-mse": (
        lambda: G.Sequential(
            G.Conv2d(1, 2, 3, padding=1), G.Tanh(),
            G.Residual(G.Conv2d(2, 2, 3, padding=1), G.ReLU(),
                       G.MaxPool2d(3, stride=1, padding=1), G.Tanh()),
            G.Flatten(), G.Linear(2 * 5 * 5, 3), input_shape=(1, 5, 5)),
        lambda: G.MSELoss()),
}


def _bn2d(channels, seed):
    """BatchNorm2d with drawn, non-trivial running statistics."""
    rng = np.random.default_rng(100 + seed)
    return G.BatchNorm2d(channels, running_mean=rng.normal(scale=0.3, size=channels),
                         running_var=rng.uniform(0.5, 2.0, size=channels))


def held_bytes(op):
    """Bytes of the distinct buffers that a stored operator's chunk states hold.

    A view counts its base's buffer, once; the data and the parameters, which the
    states view, are not counted.
    """
    from ghess._engine.factors import ChunkFactors, buffer_bytes, held_arrays

    exclude = [X for X, _ in op.data.batches] + [op.params]
    total = 0
    for state in op._stored:
        if isinstance(state, ChunkFactors):
            total += state.nbytes(exclude)
        else:  # a Hessian product's gradient trace
            total += buffer_bytes(held_arrays([state.ctxs, state.grads, state.loss_state]),
                                  exclude)
    return total


class ConvCase:
    """A convolutional network, a loss, parameters and data."""

    def __init__(self, name, dtype=np.float64, n_samples=5, seed=0):
        make_model, make_loss = CONV_CASES[name]
        self.name = name
        self.model, self.loss = make_model(), make_loss()
        rng = np.random.default_rng(seed)
        self.theta = self.model.init_params(seed=seed, dtype=dtype) * dtype(2.0)
        self.X, self.y = make_data(self.loss, n_samples, self.model, rng, dtype)
        self.data = (self.X, self.y)


class Case:
    """A model, a loss, parameters and data."""

    def __init__(self, name, dtype=np.float64, n_samples=9, seed=0):
        make_model, make_loss = CASES[name]
        self.name = name
        self.model = make_model()
        self.loss = make_loss()
        rng = np.random.default_rng(seed)
        self.theta = self.model.init_params(seed=seed, dtype=dtype)
        # move the weights off PyTorch's small init so curvature terms are not tiny
        self.theta *= dtype(2.0)
        self.X, self.y = make_data(self.loss, n_samples, self.model, rng, dtype)
        self.data = (self.X, self.y)
        self.dtype = dtype


@pytest.fixture(params=sorted(CASES), ids=lambda n: f"case={n}")
def case(request):
    """Every small case in float64."""
    return Case(request.param)


@pytest.fixture(params=[np.float32, np.float64], ids=lambda d: f"dtype={np.dtype(d).name}")
def dtype(request):
    """Both supported dtypes."""
    return request.param


@pytest.fixture(params=["stored", "recompute"], ids=lambda m: f"mode={m}")
def mode(request):
    """Both product modes."""
    return request.param


def measured_peak(build, apply):
    """Bytes ghess allocates at once while ``build()`` makes an operator and ``apply(op)`` runs.

    Every array made inside counts (the operator's private copies of data and
    parameters included, as ``memory_required`` counts them), each at the size of the
    block the pool gives it, from an empty pool: what the process really holds.
    """
    from ghess._config import computing
    from ghess._kernels import alloc

    alloc.release()
    with computing():
        base, _ = alloc.usage()
        op = build()
        apply(op)
        _, peak = alloc.usage()
        del op
    return peak - base
