"""The demo's parts: the two-layer Hessian blocks, and Newton-CG on the digits."""

import pytest

from ghess import demo


def test_hessian_blocks_example_is_exact():
    lines = []
    assert demo.hessian_blocks_example(out=lines.append) < 1e-8
    assert any("d2J/dW1 dW2" in line for line in lines)


def test_newton_cg_example_trains():
    assert demo.newton_cg_example(n_iterations=4, out=lambda *_: None) < 0.2


@pytest.mark.end_to_end
def test_digits_training_reaches_97_percent():
    pytest.importorskip("sklearn")
    model, loss, _, data, accuracy, history = demo.train_digits(out=lambda *_: None)
    assert accuracy >= 0.97
    # KFAC-preconditioned CG reaches the same objective in fewer GGN products (39-41%
    # fewer measured, bench/PRECONDITION.md)
    lines = []
    products, plain = demo.preconditioned_digits(model, loss, data, history, lines.append)
    assert products is not None and products < 0.8 * plain
    assert any("fewer" in line for line in lines)
