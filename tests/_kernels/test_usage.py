"""ghess._kernels.alloc.usage, exact bytes of ghess's temporaries; the stored bytes by it."""

import gc

import numpy as np
import pytest
from conftest import CASES, CONV_CASES, make_data

import ghess
from ghess._kernels import alloc


def test_usage_counts_arrays_made_while_computing():
    alloc.usage()
    with ghess._config.computing():
        a = np.ones(3 << 20, dtype=np.uint8)  # a pooled size
        b = np.ones(100)
        live, peak = alloc.usage()
    assert live >= a.nbytes + b.nbytes and peak >= live
    c = np.ones(1 << 20)  # made outside: not ghess's
    del a, b
    live_after, peak_after = alloc.usage()
    assert live_after <= live - (3 << 20) - 800 and peak_after >= live
    assert alloc.usage() == (live_after, live_after)
    del c


@pytest.mark.parametrize("name", sorted(CASES)[:6] + sorted(CONV_CASES)[:3])
@pytest.mark.parametrize("kind", ["ggn", "hessian", "jacobian"])
def test_stored_bytes_are_what_the_operator_holds(name, kind):
    """memory_bytes (the plan's bytes per sample times N) is exactly what stays allocated."""
    make_model, make_loss = (CASES.get(name) or CONV_CASES[name])
    model, loss = make_model(), make_loss()
    X, y = make_data(loss, 37, model, np.random.default_rng(0))
    theta = model.init_params(seed=1)
    gc.collect()
    before, _ = alloc.usage()
    if kind == "jacobian":
        op = ghess.JacobianLinearOperator(model, theta, X, mode="stored", chunk_size=10)
    else:
        cls = ghess.GGNLinearOperator if kind == "ggn" else ghess.HessianLinearOperator
        op = cls(model, loss, theta, (X, y), mode="stored", chunk_size=10)
    live, _ = alloc.usage()
    held = live - before
    # exact, but for the loss state MSELoss does not keep (K numbers per sample, see
    # Plan._trace_bytes) and the private copy of the data (counted by neither)
    slack = 37 * model.n_outputs * theta.itemsize if isinstance(loss, ghess.MSELoss) else 0
    assert op.memory_bytes - slack <= held <= op.memory_bytes + X.nbytes + np.asarray(y).nbytes
    del op


def test_bypassed_pool_counts_exact_sizes():
    """A freed 3 MiB block serves a 2.9 MiB array from the pool (counted at 3 MiB), not
    while the pool is bypassed (memory_required's probes count exact sizes).
    """  # noqa: D205
    asked = int(2.9 * (1 << 20))
    for bypass, counted in ((False, 3 << 20), (True, asked)):
        alloc.release()
        previous = alloc.bypass_pool(bypass)
        try:
            with ghess._config.computing():
                a = np.empty(3 << 20, dtype=np.uint8)
                del a
                before, _ = alloc.usage()
                b = np.empty(asked, dtype=np.uint8)
                live, _ = alloc.usage()
                del b
        finally:
            assert alloc.bypass_pool(previous) is bypass
        assert live - before == counted
