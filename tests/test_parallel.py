"""Chunks shared out over workers (``ghess._parallel``): the same numbers, in a fixed order."""

import numpy as np
import pytest
from conftest import Case
from numpy.testing import assert_array_equal

import ghess
from ghess._config import effective_threads
from ghess._parallel import contiguous_runs, run_workers, worker_count
from ghess.testing import assert_allclose_rel


def test_workers_need_two_chunks_per_thread():
    assert worker_count(3, 2) == 1
    assert worker_count(4, 2) == 2
    assert worker_count(100, 1) == 1
    assert [list(r) for r in contiguous_runs(5, 2)] == [[0, 1], [2, 3, 4]]


def test_a_worker_runs_its_kernels_on_one_thread():
    assert run_workers(3, lambda w: effective_threads(8)) == [1, 1, 1]
    assert run_workers(1, lambda w: effective_threads(1)) == [1]


def test_the_lowest_failing_task_raises_after_all_finish():
    finished = []

    def task(w):
        finished.append(w)
        if w >= 1:
            raise ValueError(f"task {w}")
        return w

    with pytest.raises(ValueError, match="task 1"):
        run_workers(3, task)
    assert sorted(finished) == [0, 1, 2]


@pytest.mark.parametrize("mode", ["stored", "recompute"])
def test_workers_agree_with_one_thread_and_repeat_bit_for_bit(mode):
    c = Case("tanh-ce", n_samples=120)
    V = np.random.default_rng(3).normal(size=(c.model.n_params, 2))
    W = np.random.default_rng(4).normal(size=(120 * c.model.n_outputs, 2))
    for cls in (ghess.GGNLinearOperator, ghess.HessianLinearOperator,
                ghess.EmpiricalFisherLinearOperator):
        one = cls(c.model, c.loss, c.theta, c.data, mode=mode, chunk_size=10, n_threads=1)
        two = cls(c.model, c.loss, c.theta, c.data, mode=mode, chunk_size=10, n_threads=2)
        assert_allclose_rel(two @ V, one @ V, 1e-13)
        assert_array_equal(two @ V, two @ V)
    J1 = ghess.JacobianLinearOperator(c.model, c.theta, c.X, mode=mode, chunk_size=10,
                                      n_threads=1)
    J2 = ghess.JacobianLinearOperator(c.model, c.theta, c.X, mode=mode, chunk_size=10,
                                      n_threads=2)
    assert_allclose_rel(J2.T @ W, J1.T @ W, 1e-13)  # each chunk pulls back its own rows
    assert_array_equal(J2 @ V, J1 @ V)


def test_loss_gradient_jacobians_and_kfac_on_workers():
    c = Case("tanh-ce", n_samples=120)
    value1, grad1 = ghess.loss_and_grad(c.model, c.loss, c.theta, c.data, chunk_size=10,
                                        n_threads=1)
    value2, grad2 = ghess.loss_and_grad(c.model, c.loss, c.theta, c.data, chunk_size=10,
                                        n_threads=2)
    assert value2 == pytest.approx(value1, rel=1e-14)
    assert_allclose_rel(grad2, grad1, 1e-13)
    assert_array_equal(ghess.loss_and_grad(c.model, c.loss, c.theta, c.data, chunk_size=10,
                                           n_threads=2)[1], grad2)
    # every chunk on one thread either way: the same bits, row by row
    assert_array_equal(
        ghess.per_sample_jacobians(c.model, c.theta, c.X, chunk_size=10, n_threads=2),
        ghess.per_sample_jacobians(c.model, c.theta, c.X, chunk_size=10, n_threads=1))
    for fisher_type in ("type-2", "empirical", "mc"):
        K1, K2 = (ghess.KFACLinearOperator(c.model, c.loss, c.theta, c.data, chunk_size=10,
                                           n_threads=t, fisher_type=fisher_type)
                  for t in (1, 2))
        for i in K1.layers:
            assert_allclose_rel(K2.input_factors[i], K1.input_factors[i], 1e-13)
            assert_allclose_rel(K2.gradient_factors[i], K1.gradient_factors[i], 1e-13)
