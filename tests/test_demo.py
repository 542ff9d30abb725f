"""The demo's parts: the two-layer Hessian blocks, and Newton-CG on the digits."""

import pytest

from ghess import demo


def test_hessian_blocks_example_is_exact():
    lines = []
    assert demo.hessian_blocks_example(out=lines.append) < 1e-8
    assert any("d2J/dW1 dW2" in line for line in lines)


def test_newton_cg_example_trains():
    assert demo.newton_cg_example(n_iterations=4, out=lambda *_: None) < 0.2


def test_digits_training_reaches_97_percent():
    pytest.importorskip("sklearn")
    *_, accuracy = demo.train_digits(out=lambda *_: None)
    assert accuracy >= 0.97
