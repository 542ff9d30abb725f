"""Shared test cases: small networks, losses and data with readable ids."""

import numpy as np
import pytest

import ghess

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
    "sigmoid-mse": (lambda: _mlp(ghess.Sigmoid), lambda: ghess.MSELoss()),
    "softplus-bce": (lambda: _mlp(ghess.Softplus), lambda: ghess.BCEWithLogitsLoss()),
    "relu-ce-sum": (lambda: _mlp(ghess.ReLU), lambda: ghess.CrossEntropyLoss(reduction="sum")),
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
}


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
