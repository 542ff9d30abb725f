"""Faults found by an audit of the public API: each test failed before its fix (issue 21)."""

import copy
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from conftest import Case
from numpy.testing import assert_allclose, assert_array_equal

import ghess
from ghess._validation import max_threads

# -- thread counts ---------------------------------------------------------------


@pytest.mark.parametrize("n_threads", [max_threads() + 1, 40000, 2**31, 2**40])
def test_n_threads_above_the_ceiling_is_refused_by_name(n_threads):
    c = Case("tanh-ce")
    with pytest.raises(ValueError, match=r"n_threads must be at most \d+"):
        ghess.loss_and_grad(c.model, c.loss, c.theta, c.data, n_threads=n_threads)
    with pytest.raises(ValueError, match="n_threads must be at most"):
        ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data, n_threads=n_threads)
    with pytest.raises(ValueError, match="n_threads must be at most"):
        c.model.forward(c.theta, c.X, n_threads=n_threads)


FORK_SCRIPT = textwrap.dedent("""
    import os, sys, warnings
    import numpy as np
    import ghess
    rng = np.random.default_rng(0)
    model = ghess.Sequential(ghess.Linear(64, 256), ghess.Tanh(), ghess.Linear(256, 10),
                             input_shape=(64,))
    theta = model.init_params(seed=0)
    X, y = rng.normal(size=(2048, 64)), rng.integers(0, 10, 2048)
    loss = ghess.CrossEntropyLoss()
    parent = ghess.loss_and_grad(model, loss, theta, (X, y), n_threads=2)[1]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            child = ghess.loss_and_grad(model, loss, theta, (X, y), n_threads=2)[1]
            G = ghess.GGNLinearOperator(model, loss, theta, (X, y))
            child_ggn = G @ np.ones(model.n_params)
        warned = sum("forked" in str(w.message) for w in caught)
        expected = 1 if ghess._kernels.dense.openmp_enabled() else 0
        # the parent's 2 threads share the samples out as 2 chunks: the same numbers to
        # rounding, relative to the gradient's scale
        close = np.abs(child - parent).max() <= 1e-12 * np.abs(parent).max()
        ok = (close and np.all(np.isfinite(child_ggn))
              and warned == expected)
        os.write(write, b"ok" if ok else b"bad")
        os._exit(0)
    os.waitpid(pid, 0)
    print(os.read(read, 2).decode())
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_after_threaded_use_finishes_with_the_same_numbers():
    done = subprocess.run([sys.executable, "-c", FORK_SCRIPT], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok", done.stdout + done.stderr


# -- non-finite results from finite inputs ---------------------------------------


def test_overflow_in_the_loss_is_reported_not_returned():
    c = Case("sigmoid-mse")
    model = ghess.Sequential(ghess.Linear(4, 3), input_shape=(4,))
    theta = model.init_params() * 1e200
    with pytest.raises(FloatingPointError, match="overflowed"):
        ghess.loss_and_grad(model, ghess.MSELoss(), theta, (c.X, c.y))


def test_float32_forward_overflow_names_the_layer():
    c = Case("tanh-ce", dtype=np.float32)
    theta = c.theta.copy()
    params = c.model.unflatten(theta)  # views
    params["2.bias"][:] = 100.0  # every tanh of layer 3 at 1
    params["4.weight"][:] = 3e38  # the output layer sums five of 3e38: above float32's range
    with pytest.raises(FloatingPointError, match=r"forward pass overflowed at layer 4 \(Linear"):
        ghess.loss_and_grad(c.model, c.loss, theta, c.data)
    with pytest.raises(FloatingPointError, match="forward pass overflowed at layer 4"):
        ghess.HessianLinearOperator(c.model, c.loss, theta, c.data, mode="stored")
    with pytest.raises(FloatingPointError, match="forward pass overflowed at layer 4"):
        c.model.forward(theta, c.X)  # it returned the infinities


def test_product_overflow_is_reported():
    c = Case("sigmoid-mse", dtype=np.float32)
    G = ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data)
    with pytest.raises(FloatingPointError, match="GGNLinearOperator product is not finite"):
        G @ np.full(G.shape[0], 3e38, dtype=np.float32)


def test_input_that_overflows_the_cast_says_so():
    c = Case("tanh-ce", dtype=np.float32)
    X = c.X.astype(np.float64)
    X[1, 2] = 1e39
    with pytest.raises(ValueError, match=r"X overflows float32: 1e\+39 at index \(1, 2\)"):
        ghess.loss_and_grad(c.model, c.loss, c.theta, (X, c.y))
    # a vector for a float32 operator likewise (it said "contains NaN or Inf", with
    # NumPy's raw cast warning beside it)
    G = ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data)
    v = np.zeros(c.model.n_params)
    v[3] = 1e39
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"vector overflows float32: 1e\+39 at index \(3,"):
            G @ v


# -- Newton-CG keeps its progress ------------------------------------------------


def _newton(**kwargs):
    c = Case("tanh-ce", n_samples=60)
    opt = ghess.NewtonCG(c.model, c.loss, C=10.0, subsample=0.5, seed=3, **kwargs)
    return c, opt


def test_newton_cg_exception_in_callback_keeps_progress_and_resumes_the_same_trajectory():
    c, straight = _newton()
    theta_straight, history = straight.fit(c.theta, c.data, n_iterations=5, verbose=False)

    c, opt = _newton()

    def fail_at_third(theta, record):
        if len(opt.history_) == 3:
            raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed") as info:
        opt.fit(c.theta, c.data, n_iterations=5, verbose=False, callback=fail_at_third)
    if sys.version_info >= (3, 11):
        assert any("Newton-CG iteration 3" in note for note in info.value.__notes__)
    assert len(opt.history_) == 3
    assert_array_equal(opt.theta_, _newton()[1].fit(c.theta, c.data, n_iterations=3,
                                                    verbose=False)[0])
    resumed, more = opt.fit(opt.theta_, c.data, n_iterations=2, verbose=False)
    assert_allclose(resumed, theta_straight, rtol=1e-13, atol=1e-15)
    assert [r.objective for r in more] == pytest.approx([r.objective for r in history[3:]],
                                                        rel=1e-12)


def test_newton_cg_rejects_an_overflowing_step_instead_of_failing():
    c, opt = _newton()
    objective, calls = opt.objective, []

    def overflowing_first_candidate(theta, data):
        calls.append(theta)
        if len(calls) == 2:  # call 1 is the start, call 2 the line search's first candidate
            raise FloatingPointError("the loss overflowed")
        return objective(theta, data)

    opt.objective = overflowing_first_candidate
    theta, history = opt.fit(c.theta, c.data, n_iterations=1, verbose=False)
    assert history[0].accepted and history[0].backtracks >= 1 and history[0].step_size < 1


def test_newton_cg_stops_with_a_warning_when_every_step_is_rejected():
    c, opt = _newton(max_backtracks=1, armijo=0.999999, max_rejections=3)
    with pytest.warns(RuntimeWarning, match="3 iterations in a row found no step"):
        theta, history = opt.fit(c.theta, c.data, n_iterations=20, verbose=False)
    assert len(history) == 3 and not any(r.accepted for r in history)
    assert_array_equal(theta, opt.theta_)


def test_newton_cg_with_overflowing_targets_stops_with_a_clear_error():
    # float64 targets of 1e152 with a summed squared error: the objective (1e306) is
    # finite, but CG's products overflow. Before, every step was rejected in silence
    # (a NaN direction has no descent slope) and the rejection stop never fired.
    model = ghess.Sequential(ghess.Linear(4, 3), input_shape=(4,))
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(50, 4)), rng.normal(size=(50, 3)) * 1e152
    opt = ghess.NewtonCG(model, ghess.MSELoss(reduction="sum"), subsample=0.5, seed=0)
    with pytest.raises(FloatingPointError, match="CG solve overflowed in float64") as info:
        opt.fit(model.init_params(seed=0), (X, Y), n_iterations=30, verbose=False)
    if sys.version_info >= (3, 11):
        assert any("iteration 0" in note for note in info.value.__notes__)
    assert opt.history_ == []


def test_newton_cg_float32_overflow_in_cg_says_overflow_not_bad_input():
    # the objective fits float32 (1.7e36) but CG's iterates do not: a FloatingPointError
    # naming the CG solve, where the operator used to say the vector had NaN or Inf
    model = ghess.Sequential(ghess.Linear(4, 3), input_shape=(4,))
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 4)).astype(np.float32)
    Y = (rng.normal(size=(50, 3)) * 1e17).astype(np.float32)
    opt = ghess.NewtonCG(model, ghess.MSELoss(reduction="sum"), subsample=0.5, seed=0)
    with pytest.raises(FloatingPointError, match="CG solve overflowed in float32") as info:
        opt.fit(model.init_params(seed=0, dtype=np.float32), (X, Y), verbose=False)
    if sys.version_info >= (3, 11):
        assert any("stage: the CG solve" in note for note in info.value.__notes__)


def test_newton_cg_initial_objective_overflow_says_so():
    model = ghess.Sequential(ghess.Linear(4, 3), input_shape=(4,))
    c = Case("sigmoid-mse")
    opt = ghess.NewtonCG(model, ghess.MSELoss())
    with pytest.raises(FloatingPointError) as info:
        opt.fit(model.init_params() * 1e200, (c.X, c.y), verbose=False)
    if sys.version_info >= (3, 11):
        assert any("initial parameters" in note for note in info.value.__notes__)


def test_step_records_copy_and_answer_hasattr():
    c, opt = _newton()
    _, history = opt.fit(c.theta, c.data, n_iterations=1, verbose=False)
    record = copy.deepcopy(history)[0]
    assert record.objective == history[0].objective
    assert not hasattr(record, "no_such_key") and hasattr(record, "accepted")


# -- clear messages --------------------------------------------------------------


def test_unclear_inputs_get_clear_messages():
    c = Case("tanh-ce")
    with pytest.raises(TypeError, match=r"list of 2 items .* as a tuple \(X, y\)"):
        ghess.loss_and_grad(c.model, c.loss, c.theta, [c.X, c.y])
    with pytest.raises(TypeError, match="y is None: CrossEntropyLoss needs targets"):
        ghess.loss_and_grad(c.model, c.loss, c.theta, (c.X, None))
    G = ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data)
    with pytest.raises(TypeError, match="vector must be real numbers"):
        G.matvec("abc")


# -- small contract breaks -------------------------------------------------------


def test_zero_columns_give_empty_results():
    c = Case("tanh-ce")
    n = c.model.n_params
    for op in (ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data),
               ghess.HessianLinearOperator(c.model, c.loss, c.theta, c.data)):
        assert op.matmat(np.zeros((n, 0))).shape == (n, 0)
    J = ghess.JacobianLinearOperator(c.model, c.theta, c.X)
    assert J.matmat(np.zeros((n, 0))).shape == (J.shape[0], 0)
    assert J.rmatmat(np.zeros((J.shape[0], 0))).shape == (n, 0)
    G = ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data)
    assert G.matvec(np.zeros((0, n))).shape == (0, n)
    # the curvature family and the inverses too (KFAC's reshaped the empty block)
    kfac = ghess.KFACLinearOperator(c.model, c.loss, c.theta, c.data)
    for op in (ghess.EmpiricalFisherLinearOperator(c.model, c.loss, c.theta, c.data),
               ghess.FisherMCLinearOperator(c.model, c.loss, c.theta, c.data),
               kfac, kfac.inverse(damping=1e-3),
               ghess.EKFACLinearOperator(c.model, c.loss, c.theta, c.data),
               ghess.InverseLinearOperator(G)):
        name = type(op).__name__
        assert op.matmat(np.zeros((n, 0))).shape == (n, 0), name
        assert op.matvec(np.zeros((0, n))).shape == (0, n), name
        assert op.rmatmat(np.zeros((n, 0))).shape == (n, 0), name


@pytest.mark.parametrize("argument", ["stride", "padding", "kernel_size"])
def test_huge_geometry_is_refused_by_name(argument):
    kwargs = {"stride": 1, "padding": 0, "kernel_size": 3, argument: 2**40}
    with pytest.raises(ValueError, match=f"Conv2d: {argument} must be at most 2147483647"):
        ghess.Conv2d(1, 2, **kwargs)
    with pytest.raises(ValueError, match="Linear: out_features must be at most"):
        ghess.Linear(3, 2**40)


def test_geometry_past_32_bit_indices_is_refused_when_the_model_is_built():
    # a padding that fits an int but makes a padded map of 2**62 elements: refused by the
    # model, where it used to pass and fail in forward with NumPy's dimension error
    for layer in (ghess.Conv2d(1, 2, 3, padding=2**30), ghess.MaxPool2d(3, padding=1)):
        shape = (1, 8, 8) if isinstance(layer, ghess.Conv2d) else (2**14, 2**9, 2**9)
        with pytest.raises(ValueError, match="fewer than 2\\*\\*31 elements per sample"):
            ghess.Sequential(layer, input_shape=shape)


def test_negative_tolerance_and_memory_budget_are_refused():
    c = Case("tanh-ce")
    G = ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data)
    with pytest.raises(ValueError, match="tol must be finite and >= 0"):
        ghess.top_eigenvalues(G, 2, tol=-1)
    with pytest.raises(ValueError, match="memory_budget must be"):
        ghess.ggn_diagonal(c.model, c.loss, c.theta, c.data, memory_budget=-1)
    with pytest.raises(ValueError, match="memory_budget must be"):
        ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data, memory_budget=float("nan"))


def test_memory_budget_as_a_real_number_of_bytes_is_taken_and_checked():
    # 1e13 as the issue wrote it: taken as bytes (it was a TypeError), and above what the
    # process may use it warns, in ggn_diagonal as in the operators
    c = Case("tanh-ce")
    G = ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data, memory_budget=2e8)
    assert G.memory_budget == 200_000_000
    with pytest.warns(RuntimeWarning, match="exceeds the"):
        ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data, memory_budget=1e15)
    with pytest.warns(RuntimeWarning, match="exceeds the"):
        ghess.ggn_diagonal(c.model, c.loss, c.theta, c.data, memory_budget=1e15)


def test_jacobian_todense_works_in_column_blocks():
    c = Case("tanh-ce")
    J = ghess.JacobianLinearOperator(c.model, c.theta, c.X)
    dense = J.todense()
    assert_allclose(dense, J @ np.eye(J.shape[1]), rtol=1e-14, atol=1e-15)


# -- memory budget ---------------------------------------------------------------


def test_default_memory_budget_honours_rlimit_as():
    resource = pytest.importorskip("resource")
    script = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)); "
              "from ghess._problem import default_memory_budget, memory_limit; "
              "print(memory_limit(), default_memory_budget())")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and hard < 6 << 30:
        pytest.skip("the hard RLIMIT_AS is below the test's limit")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    limit, budget = map(int, done.stdout.split())
    assert limit <= 6 << 30 and budget == min(4 << 30, limit // 4)


def test_cgroup_limits_of_the_process_own_cgroup_and_its_ancestors_count(tmp_path):
    # a fake hierarchy: the v1 memory controller's limit on this process's nested cgroup
    # (the audit found only the mount root read) and a v2 limit on an ancestor, "max"
    # (no limit) on the v2 cgroup itself and none at either root
    from ghess._problem import _cgroup_memory_limits

    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    (v1 / "jobs" / "job7").mkdir(parents=True)
    (v1 / "jobs" / "job7" / "memory.limit_in_bytes").write_text("2147483648\n")
    (v1 / "memory.limit_in_bytes").write_text(str(2 ** 63 - 4096))  # v1's "none"
    (v2 / "user.slice" / "session-3.scope").mkdir(parents=True)
    (v2 / "user.slice" / "memory.max").write_text("3221225472\n")
    (v2 / "user.slice" / "session-3.scope" / "memory.max").write_text("max\n")
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/jobs/job7\n3:cpu,cpuacct:/elsewhere\n"
                    "0::/user.slice/session-3.scope\n")
    mounts = ((str(v2), "memory.max"), (str(v1), "memory.limit_in_bytes"))
    assert sorted(_cgroup_memory_limits(str(proc), mounts)) == [2 << 30, 3 << 30]
    # in a container (the path is "/"), the mount's root is the container's cgroup
    proc.write_text("0::/\n")
    (v2 / "memory.max").write_text("1073741824\n")
    assert _cgroup_memory_limits(str(proc), mounts) == [1 << 30]
    assert _cgroup_memory_limits(str(tmp_path / "absent"), ()) == []


def test_memory_budget_above_the_machine_warns():
    from ghess._problem import memory_limit

    c = Case("tanh-ce")
    with pytest.warns(RuntimeWarning, match="exceeds the .* this process may use"):
        G = ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data,
                                    memory_budget=2 * memory_limit())
    assert G.mode == "stored"


SIGINT_SCRIPT = textwrap.dedent("""
    import signal, sys, time
    # a shell's background job (`pytest &`) starts with SIGINT ignored, and a child
    # inherits that: give the child Python's own handler, as an interactive session has
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import numpy as np
    import ghess
    rng = np.random.default_rng(0)
    model = ghess.Sequential(ghess.Conv2d(3, 16, 3, padding=1), ghess.ReLU(), ghess.Flatten(),
                             ghess.Linear(16 * 16 * 16, 10), input_shape=(3, 16, 16))
    X, y = rng.normal(size=(512, 3, 16, 16)), rng.integers(0, 10, 512)
    H = ghess.HessianLinearOperator(model, ghess.CrossEntropyLoss(), model.init_params(),
                                    (X, y), mode="recompute")
    v = np.ones(model.n_params)
    print("ready", flush=True)
    try:
        while True:
            H @ v
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(3)
""")


def test_sigint_during_products_ends_them_promptly():
    import signal
    import time

    child = subprocess.Popen([sys.executable, "-c", SIGINT_SCRIPT], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == 3 and "interrupted" in out, err
