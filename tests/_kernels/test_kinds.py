"""The kind enums of ghess._kernels.dense: names, values, and use as the kernels' int kind."""

import enum

import numpy as np
import pytest
from ghess._kernels.dense import ActivationKind, OutputHessianKind

from ghess._kernels import dense


def test_members_and_values():
    assert {m.name: m.value for m in ActivationKind} == {
        "IDENTITY": 0, "RELU": 1, "LEAKY_RELU": 2, "TANH": 3, "SIGMOID": 4, "SOFTPLUS": 5,
        "GELU": 6, "GELU_TANH": 7, "SILU": 8, "ELU": 9}
    assert {m.name: m.value for m in OutputHessianKind} == {
        "IDENTITY": 0, "SOFTMAX": 1, "DIAGONAL": 2}
    for kinds in (ActivationKind, OutputHessianKind):
        assert issubclass(kinds, enum.IntEnum) and kinds.__module__ == "ghess._kernels.dense"
        assert all(int(m) == m.value and m == m.value for m in kinds)


@pytest.mark.parametrize("kind", list(ActivationKind))
def test_activation_kernel_takes_a_member_as_its_int(kind):
    x = np.linspace(-3, 3, 13)
    results = []
    for k in (kind, int(kind)):
        y, d1, d2 = np.empty_like(x), np.empty_like(x), np.empty_like(x)
        dense.activation_forward(k, 0.1, 20.0, x, y, d1, d2, 1)
        results.append((y, d1, d2))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", list(OutputHessianKind))
def test_output_hessian_kernel_takes_a_member_as_its_int(kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4))
    state = (np.empty((0, 0)) if kind == OutputHessianKind.IDENTITY
             else rng.uniform(size=(2, 4)))
    out_member, out_int = np.empty_like(x), np.empty_like(x)
    dense.output_hessian_apply(kind, state, 0.5, x, out_member, 1)
    dense.output_hessian_apply(int(kind), state, 0.5, x, out_int, 1)
    np.testing.assert_array_equal(out_member, out_int)
