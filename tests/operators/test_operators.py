"""GGN, Hessian and Jacobian operators against the pure-NumPy reference."""

import threading

import numpy as np
import pytest
from conftest import RTOL, Case, held_bytes
from numpy.testing import assert_allclose, assert_array_equal

import ghess
from ghess.testing import (
    assert_allclose_rel,
    finite_difference_hvp,
    reference_ggn,
    reference_hessian,
    reference_per_sample_jacobians,
)


@pytest.mark.parametrize("chunk_size", [2, 64], ids=lambda c: f"chunk={c}")
def test_ggn_matches_reference(case, mode, chunk_size):
    G = ghess.GGNLinearOperator(case.model, case.loss, case.theta, case.data, mode=mode,
                                chunk_size=chunk_size, damping=0.25)
    expected = reference_ggn(case.model, case.loss, case.theta, case.data, damping=0.25)
    assert_allclose_rel(G.todense(), expected, RTOL[np.float64])
    assert G.mode == mode


@pytest.mark.parametrize("chunk_size", [2, 64], ids=lambda c: f"chunk={c}")
def test_hessian_matches_reference(case, mode, chunk_size):
    H = ghess.HessianLinearOperator(case.model, case.loss, case.theta, case.data, mode=mode,
                                    chunk_size=chunk_size, damping=0.5)
    expected = reference_hessian(case.model, case.loss, case.theta, case.data, damping=0.5)
    assert_allclose_rel(H.todense(), expected, RTOL[np.float64])


def test_jacobian_operator_matches_reference(case, mode):
    J = ghess.JacobianLinearOperator(case.model, case.theta, case.X, mode=mode, chunk_size=4)
    expected = reference_per_sample_jacobians(case.model, case.theta, case.X)
    expected = expected.reshape(-1, case.model.n_params)
    n = case.model.n_params
    assert J.shape == expected.shape
    assert_allclose_rel(J @ np.eye(n), expected, RTOL[np.float64])
    assert_allclose_rel(J.T @ np.eye(J.shape[0]), expected.T, RTOL[np.float64])
    assert_allclose_rel(J.H.matmat(np.eye(J.shape[0])), expected.T, RTOL[np.float64])


def test_per_sample_jacobians_match_reference(case):
    J = ghess.per_sample_jacobians(case.model, case.theta, case.X, chunk_size=4)
    expected = reference_per_sample_jacobians(case.model, case.theta, case.X)
    assert J.shape == (case.X.shape[0], case.model.n_outputs, case.model.n_params)
    assert_allclose_rel(J, expected, RTOL[np.float64])


def test_jacobian_dot_product_test(case):
    """<w, J v> = <J^T w, v> for random v, w."""
    J = ghess.JacobianLinearOperator(case.model, case.theta, case.X)
    rng = np.random.default_rng(3)
    v = rng.normal(size=J.shape[1])
    w = rng.normal(size=J.shape[0])
    assert_allclose(w @ (J @ v), (J.rmatvec(w)) @ v, rtol=1e-12)


def test_hessian_vector_product_matches_finite_differences(case):
    H = ghess.HessianLinearOperator(case.model, case.loss, case.theta, case.data)
    v = np.random.default_rng(5).normal(size=H.shape[1])

    def grad(theta):
        return ghess.loss_and_grad(case.model, case.loss, theta, case.data)[1]

    # fourth order: the truncation error of the second-order rule (eps^2 times the third
    # derivative) reached 1.5e-7 on the batch-norm case
    assert_allclose_rel(H @ v, finite_difference_hvp(grad, case.theta, v, eps=1e-4, order=4),
                        1e-7)


def test_ggn_equals_jt_b_j_built_from_jacobians(case):
    """G = sum_n J_n^T B_n J_n with J_n from per_sample_jacobians and B_n from the loss."""
    J = ghess.per_sample_jacobians(case.model, case.theta, case.X)
    z = case.model.forward(case.theta, case.X)
    N, K = z.shape
    scale = case.loss.scale(N, K)
    G = np.zeros((case.model.n_params,) * 2)
    for n in range(N):
        if isinstance(case.loss, ghess.MSELoss):
            B = 2 * np.eye(K)
        elif isinstance(case.loss, ghess.CrossEntropyLoss):
            p = np.exp(z[n] - z[n].max())
            p /= p.sum()
            B = np.diag(p) - np.outer(p, p)
        else:
            s = 1 / (1 + np.exp(-z[n]))
            B = np.diag(s * (1 - s))
        G += scale * J[n].T @ B @ J[n]
    op = ghess.GGNLinearOperator(case.model, case.loss, case.theta, case.data)
    assert_allclose_rel(op.todense(), G, 1e-12)


@pytest.mark.parametrize("operator", ["ggn", "hessian"])
def test_float32_close_to_float64(operator, mode):
    cls = ghess.GGNLinearOperator if operator == "ggn" else ghess.HessianLinearOperator
    c64 = Case("tanh-ce", np.float64)
    c32 = Case("tanh-ce", np.float32)
    op64 = cls(c64.model, c64.loss, c64.theta, c64.data, mode=mode)
    op32 = cls(c32.model, c32.loss, c32.theta, c32.data, mode=mode)
    assert op32.dtype == np.float32 and op64.dtype == np.float64
    v = np.random.default_rng(0).normal(size=op64.shape[1])
    out32 = op32 @ v.astype(np.float32)
    assert out32.dtype == np.float32
    assert_allclose_rel(out32, op64 @ v, RTOL[np.float32])


@pytest.mark.parametrize("operator", ["ggn", "hessian"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_batches_equal_concatenation(operator, reduction, mode):
    cls = ghess.GGNLinearOperator if operator == "ggn" else ghess.HessianLinearOperator
    c = Case("tanh-ce", n_samples=11)
    loss = ghess.CrossEntropyLoss(reduction=reduction)
    batches = [(c.X[:4], c.y[:4]), (c.X[4:5], c.y[4:5]), (c.X[5:], c.y[5:])]
    whole = cls(c.model, loss, c.theta, (c.X, c.y), mode=mode).todense()
    split = cls(c.model, loss, c.theta, batches, mode=mode).todense()
    from_generator = cls(c.model, loss, c.theta, iter(batches), mode=mode).todense()
    assert_allclose_rel(split, whole, 1e-13)
    assert_allclose_rel(from_generator, whole, 1e-13)


def test_stored_and_recompute_agree():
    c = Case("softplus-bce", n_samples=20)
    for cls in (ghess.GGNLinearOperator, ghess.HessianLinearOperator):
        a = cls(c.model, c.loss, c.theta, c.data, mode="stored", chunk_size=3)
        b = cls(c.model, c.loss, c.theta, c.data, mode="recompute", chunk_size=7)
        V = np.random.default_rng(1).normal(size=(a.shape[1], 5))
        assert_allclose_rel(a @ V, b @ V, 1e-13)


# -- operator properties ----------------------------------------------------

@pytest.mark.parametrize("operator", ["ggn", "hessian"])
def test_symmetric(case, operator):
    cls = ghess.GGNLinearOperator if operator == "ggn" else ghess.HessianLinearOperator
    op = cls(case.model, case.loss, case.theta, case.data)
    rng = np.random.default_rng(2)
    u, v = rng.normal(size=(2, op.shape[0]))
    assert_allclose(u @ (op @ v), (op @ u) @ v, rtol=1e-11)
    assert op.H is op and op.T is op


def test_ggn_positive_semidefinite(case):
    G = ghess.GGNLinearOperator(case.model, case.loss, case.theta, case.data).todense()
    eigenvalues = np.linalg.eigvalsh(G)
    assert eigenvalues.min() >= -1e-12 * max(1.0, eigenvalues.max())
    v = np.random.default_rng(4).normal(size=G.shape[0])
    assert v @ (G @ v) >= 0


def test_relu_hessian_differs_from_ggn():
    """Piecewise-linear activations still give cross-layer second-order terms."""
    c = Case("relu-ce-sum")
    H = ghess.HessianLinearOperator(c.model, c.loss, c.theta, c.data).todense()
    G = ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data).todense()
    assert np.abs(H - G).max() > 1e-3 * np.abs(G).max()


@pytest.mark.parametrize("operator", ["ggn", "hessian", "jacobian"])
def test_linear_and_deterministic(operator, mode):
    c = Case("sigmoid-mse", n_samples=30)
    if operator == "jacobian":
        op = ghess.JacobianLinearOperator(c.model, c.theta, c.X, mode=mode)
    else:
        cls = ghess.GGNLinearOperator if operator == "ggn" else ghess.HessianLinearOperator
        op = cls(c.model, c.loss, c.theta, c.data, mode=mode)
    rng = np.random.default_rng(6)
    u, v = rng.normal(size=(2, op.shape[1]))
    assert_allclose(op @ (2.0 * u - 3.0 * v), 2.0 * (op @ u) - 3.0 * (op @ v),
                    rtol=1e-12, atol=1e-14 * np.abs(op @ u).max())
    assert_array_equal(op @ u, op @ u)  # bit for bit


@pytest.mark.parametrize("operator", ["ggn", "hessian"])
def test_one_and_two_threads_agree(operator, mode):
    cls = ghess.GGNLinearOperator if operator == "ggn" else ghess.HessianLinearOperator
    c = Case("tanh-ce", n_samples=300)
    one = cls(c.model, c.loss, c.theta, c.data, mode=mode, n_threads=1)
    two = cls(c.model, c.loss, c.theta, c.data, mode=mode, n_threads=2)
    V = np.random.default_rng(7).normal(size=(one.shape[1], 3))
    assert_allclose_rel(one @ V, two @ V, 1e-13)
    assert_array_equal(two @ V, two @ V)


def test_matvec_input_shapes(mode):
    c = Case("tanh-ce")
    G = ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data, mode=mode, damping=0.1)
    n = G.shape[0]
    V = np.random.default_rng(8).normal(size=(3, n))
    expected = np.stack([G.matvec(v) for v in V])
    assert G.matvec(V[0]).shape == (n,)
    assert G.matvec(V[0][:, None]).shape == (n, 1)
    assert_array_equal(G.matvec(V[0][:, None])[:, 0], expected[0])
    batched = G.matvec(V)
    assert batched.shape == (3, n)
    assert_allclose(batched, expected, rtol=1e-13)
    assert_allclose(G.matmat(V.T), expected.T, rtol=1e-13)
    assert_allclose(G @ np.asfortranarray(V.T), expected.T, rtol=1e-13)
    assert G.matvec(V[None]).shape == (1, 3, n)
    # list input and integer dtype are converted, not refused
    assert_allclose(G.matvec(list(V[0])), expected[0], rtol=1e-13)
    assert G.matvec(np.ones(n, dtype=np.int64)).dtype == np.float64


def test_jacobian_matvec_shapes():
    c = Case("tanh-ce", n_samples=5)
    J = ghess.JacobianLinearOperator(c.model, c.theta, c.X)
    m, n = J.shape
    V = np.random.default_rng(9).normal(size=(4, n))
    W = np.random.default_rng(9).normal(size=(4, m))
    assert J.matvec(V).shape == (4, m)
    assert J.rmatvec(W).shape == (4, n)
    assert_allclose(J.matvec(V)[1], J @ V[1], rtol=1e-13)
    assert_allclose(J.rmatvec(W)[2], J.T @ W[2], rtol=1e-13)


def test_todense_equals_identity_product():
    c = Case("softplus-bce")
    H = ghess.HessianLinearOperator(c.model, c.loss, c.theta, c.data, damping=0.3)
    assert_allclose_rel(H.todense(), H @ np.eye(H.shape[0]), 1e-14)


@pytest.mark.parametrize("operator", ["ggn", "hessian"])
def test_block_matches_dense(operator):
    cls = ghess.GGNLinearOperator if operator == "ggn" else ghess.HessianLinearOperator
    c = Case("tanh-ce")
    op = cls(c.model, c.loss, c.theta, c.data, damping=0.2)
    dense = op.todense()
    for a in c.model.param_slots.values():
        for b in c.model.param_slots.values():
            block = op.block(a.name, b.name)
            assert block.shape == (a.size, b.size)
            assert_allclose_rel(block, dense[a.start:a.stop, b.start:b.stop], 1e-14)
    assert_allclose_rel(op.block("2.weight"), op.block("2.weight", "2.weight"), 0)


def test_inputs_not_modified_and_params_copied():
    c = Case("tanh-ce")
    theta, X, y = c.theta.copy(), c.X.copy(), c.y.copy()
    for cls in (ghess.GGNLinearOperator, ghess.HessianLinearOperator):
        op = cls(c.model, c.loss, c.theta, c.data)
        v = np.ones(op.shape[0])
        before = op @ v
        op @ v
        c.theta[0] += 1.0  # the operator keeps its own copy of theta
        assert_array_equal(op @ v, before)
        c.theta[0] -= 1.0
        assert_array_equal(v, np.ones(op.shape[0]))
    assert_array_equal(c.theta, theta)
    assert_array_equal(c.X, X)
    assert_array_equal(c.y, y)


def test_memory_required_and_auto_mode():
    c = Case("tanh-ce", n_samples=50)
    # per sample: inputs of the 2nd and 3rd Linear (6 + 5), D of layer 0 (K * 6), the
    # Tanh f' after layer 2 (5: its D, at the last Linear's input, is that Linear's
    # weight, shared by all samples), softmax (K); the final Linear's D is the identity
    K = 3
    stored = 50 * 8 * (6 + 5 + K * 6 + 5 + K)
    op = ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data)
    assert op.mode == "stored" and op.memory_bytes == stored
    assert held_bytes(op) == stored
    # the peak: what is held, and the build's or a product's temporaries
    assert stored < ghess.GGNLinearOperator.memory_required(c.model, c.data, "stored")
    f32 = ghess.GGNLinearOperator(c.model, c.loss, c.theta.astype(np.float32), c.data)
    assert f32.memory_bytes == stored // 2
    small = ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data, memory_budget=stored - 1)
    assert small.mode == "recompute" and small.memory_bytes == 0
    with pytest.raises(ValueError, match="memory_budget"):
        ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data, mode="stored",
                                memory_budget=stored - 1)
    # the same product in both modes, to rounding (the sums run in another order)
    assert_allclose_rel(op @ np.ones(op.shape[0]), small @ np.ones(op.shape[0]), 1e-13)
    recompute = ghess.HessianLinearOperator.memory_required(c.model, c.data, "recompute",
                                                            chunk_size=10)
    assert 0 < recompute < ghess.HessianLinearOperator.memory_required(c.model, 500,
                                                                       "recompute",
                                                                       chunk_size=100)


@pytest.mark.parametrize("case_name", ["tanh-ce", "softplus-bce", "linear-linear-bce",
                                       "tanh-tail-ce", "relu-ce-sum",
                                       "residual-first-nested-ce"], ids=lambda n: f"case={n}")
def test_memory_bytes_is_what_is_held(case_name):
    """The planned stored bytes equal the bytes of the buffers the stored states keep."""
    c = Case(case_name, n_samples=40)
    for cls in (ghess.GGNLinearOperator, ghess.HessianLinearOperator):
        op = cls(c.model, c.loss, c.theta, c.data, mode="stored", chunk_size=8)
        assert held_bytes(op) == op.memory_bytes


def test_chunks_are_as_few_and_as_even_as_fit():
    from ghess._data import as_batches

    c = Case("tanh-ce", n_samples=50)
    X, y = c.data
    batches = as_batches(c.model, c.loss, [(X[:7], y[:7]), (X[7:], y[7:])], np.float64)
    for chunk_size, sizes in ((3, [2, 2, 3] + [2, 3, 3, 3, 3, 3, 3, 2, 3, 3, 3, 3, 3, 3, 3]),
                              (43, [7, 43]), (42, [7, 21, 22]), (100, [7, 43])):
        chunks = list(batches.chunks(chunk_size))
        assert [len(Xc) for Xc, _ in chunks] == sizes
        assert_array_equal(np.concatenate([Xc for Xc, _ in chunks]), X)
        assert_array_equal(np.concatenate([yc for _, yc in chunks]), y)


def test_single_direction_accumulates_in_place():
    """For one direction the per-layer accumulators are views of the flat output.

    A gradient or a matvec then needs no zeroing and no copy of its own; for
    several directions they are arrays of their own, added at the end.
    """
    from ghess import _engine

    c = Case("tanh-ce", n_samples=6)
    one = np.zeros((1, c.model.n_params))
    accs = _engine.new_accumulators(c.model, 1, np.float64, one)
    views = [a for acc in accs if acc is not None for a in acc.values()]
    assert views and all(np.shares_memory(a, one) for a in views)
    for a in views:
        a += 1.0
    _engine.accumulators_to_flat(c.model, accs, one)  # nothing more to add
    assert_array_equal(one, np.ones_like(one))

    two = np.zeros((2, c.model.n_params))
    accs = _engine.new_accumulators(c.model, 2, np.float64, two)
    arrays = [a for acc in accs if acc is not None for a in acc.values()]
    assert not any(np.shares_memory(a, two) for a in arrays)
    for a in arrays:
        a += 1.0
    _engine.accumulators_to_flat(c.model, accs, two)
    assert_array_equal(two, np.ones_like(two))
    # one direction at a time (in place) gives the columns of the two-direction product
    for cls in (ghess.GGNLinearOperator, ghess.HessianLinearOperator):
        op = cls(c.model, c.loss, c.theta, c.data)
        v = np.random.default_rng(0).normal(size=(c.model.n_params, 2))
        assert_allclose_rel(np.column_stack([op @ v[:, 0], op @ v[:, 1]]), op @ v, 1e-13)


def test_default_chunk_is_larger_without_convolutions():
    """Dense-only networks get 128 MiB of temporaries per chunk, conv nets 64 MiB.

    The chunk is a GEMM dimension of dense layers; convolutions' per-sample GEMMs
    want small chunks.
    """
    from ghess import _engine
    from ghess._engine.plan import CHUNK_BYTES

    dense = ghess.Sequential(ghess.Linear(784, 512), ghess.ReLU(), ghess.Linear(512, 10),
                             input_shape=(784,))
    per_sample = _engine.plan_for(dense, 8).working_bytes(1)
    assert _engine.plan_for(dense, 8).chunk_size() == 2 * CHUNK_BYTES // per_sample
    conv = ghess.Sequential(ghess.Conv2d(3, 8, 3), ghess.ReLU(), ghess.Flatten(),
                            ghess.Linear(8 * 30 * 30, 10), input_shape=(3, 32, 32))
    per_sample = _engine.plan_for(conv, 8).working_bytes(1)
    assert _engine.plan_for(conv, 8).chunk_size() == CHUNK_BYTES // per_sample


def test_chunks_on_several_threads():
    """On T threads data of at least 2 T 1-thread chunks is cut into a multiple of T
    chunks of at most the 1-thread size, as many workers' equal shares
    (``ghess._parallel``); on less a conv net's one chunk holds the 1-thread chunk's
    samples per thread (its kernels split them over the threads), and a dense net
    keeps its chunk.
    ``memory_required`` sizes the chunk the same way, for the threads it is told.
    """  # noqa: D205
    from ghess import _engine
    from ghess._engine.plan import CHUNK_BYTES

    conv = ghess.Sequential(ghess.Conv2d(3, 8, 3), ghess.ReLU(), ghess.Flatten(),
                            ghess.Linear(8 * 30 * 30, 10), input_shape=(3, 32, 32))
    plan = _engine.plan_for(conv, 8)
    one = CHUNK_BYTES // plan.working_bytes(1)
    assert plan.chunk_size(batch_sizes=[2000]) == one
    for threads, sizes in ((3, [2000]), (2, [2000]), (4, [1000, 333]), (2, [4 * one])):
        chunk = plan.chunk_size(threads=threads, batch_sizes=sizes)
        count = sum(-(-n // chunk) for n in sizes)
        assert chunk <= one and count % threads == 0, (threads, sizes, chunk, count)
        assert chunk >= min(one // 2, -(-sum(sizes) // threads))
    # 40 < 3 * 16 samples: one chunk, three times the budget
    assert plan.chunk_size(threads=3, batch_sizes=[40]) == 3 * CHUNK_BYTES // plan.working_bytes(1)
    assert plan.chunk_size(minimum=400, threads=3, batch_sizes=[1000]) == 1200
    dense = ghess.Sequential(ghess.Linear(784, 512), ghess.ReLU(), ghess.Linear(512, 10),
                             input_shape=(784,))
    dense_plan = _engine.plan_for(dense, 8)
    assert dense_plan.chunk_size(threads=3, batch_sizes=[40]) == dense_plan.chunk_size()
    dense_one = dense_plan.chunk_size()
    assert dense_plan.chunk_size(threads=2, batch_sizes=[1000]) == dense_one  # too few
    dense_chunk = dense_plan.chunk_size(threads=2, batch_sizes=[5 * dense_one])
    assert dense_chunk < dense_one and -(-5 * dense_one // dense_chunk) == 6
    theta = conv.init_params(seed=0)
    X, y = np.zeros((2000, 3, 32, 32)), np.zeros(2000, dtype=int)
    for threads in (1, 2):
        op = ghess.GGNLinearOperator(conv, ghess.CrossEntropyLoss(), theta, (X, y),
                                     mode="recompute", n_threads=threads)
        assert op.chunk_size == plan.chunk_size(threads=threads, batch_sizes=[2000])
        # memory_required probes that chunk: the same as asking for it
        assert ghess.GGNLinearOperator.memory_required(conv, X, "recompute", n_threads=threads) \
            == ghess.GGNLinearOperator.memory_required(conv, X, "recompute",
                                                       chunk_size=op.chunk_size,
                                                       n_threads=threads)
    with pytest.raises(ValueError, match="n_threads"):
        ghess.GGNLinearOperator.memory_required(conv, X, "recompute", n_threads=0)


# -- regressions: defects found in review, each once a wrong or unclear result --


@pytest.mark.parametrize("mode", ["stored", "recompute"])
def test_operators_own_their_data(mode):
    """Writing the next minibatch into the caller's buffer must not change an operator."""
    c = Case("tanh-ce", n_samples=20)
    X, y = c.X.copy(), c.y.copy()
    v = np.random.default_rng(0).normal(size=c.model.n_params)
    ops = [cls(c.model, c.loss, c.theta, (X, y), mode=mode)
           for cls in (ghess.GGNLinearOperator, ghess.HessianLinearOperator)]
    J = ghess.JacobianLinearOperator(c.model, c.theta, X, mode=mode)
    before = [op @ v for op in ops] + [J @ v]
    X[:] = np.random.default_rng(1).normal(size=X.shape)
    y[:] = (y + 1) % 3
    after = [op @ v for op in ops] + [J @ v]
    for b, a in zip(before, after):
        assert_array_equal(a, b)


def test_concurrent_products_keep_blas_threads_and_bits():
    from threadpoolctl import threadpool_info

    def blas_threads():
        return sorted(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")

    c = Case("sigmoid-mse", n_samples=200)
    H = ghess.HessianLinearOperator(c.model, c.loss, c.theta, c.data, mode="recompute")
    v = np.ones(H.shape[0])
    reference = H @ v
    before = blas_threads()
    results = []

    def work():
        for _ in range(5):
            results.append(H @ v)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert blas_threads() == before
    for r in results:
        assert_array_equal(r, reference)


def test_jacobian_adjoint_batched_and_clear_errors():
    c = Case("tanh-ce", n_samples=5)
    J = ghess.JacobianLinearOperator(c.model, c.theta, c.X)
    W = np.random.default_rng(0).normal(size=(4, J.shape[0]))
    assert_allclose(J.T.matvec(W), J.rmatvec(W), rtol=1e-14)
    assert J.T.T is J and J.H.H is J
    with pytest.raises(ValueError, match=rf"vector must have shape \({J.shape[0]},\).*got"):
        J.T @ np.ones(J.shape[0] + 1)
    G = ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data)
    with pytest.raises(ValueError, match=rf"vector must have shape \({G.shape[0]},\)"):
        G @ np.ones(G.shape[0] + 1)
    assert J.todense().shape == J.shape
    assert held_bytes(J) == J.memory_bytes < \
        ghess.JacobianLinearOperator.memory_required(c.model, c.X)


def test_memory_required_recompute_uses_the_operators_chunk_and_directions():
    c = Case("tanh-ce", n_samples=50)
    one = ghess.HessianLinearOperator.memory_required(c.model, c.data, "recompute")
    sixteen = ghess.HessianLinearOperator.memory_required(c.model, c.data, "recompute",
                                                          n_directions=16)
    assert sixteen > 4 * one


# -- diagonal damping ----------------------------------------------------------------


@pytest.mark.parametrize("operator", [ghess.GGNLinearOperator, ghess.HessianLinearOperator])
def test_damping_array_is_a_diagonal_shift(operator):
    c = Case("tanh-ce")
    model = c.model
    weights = model.parameter_mask("weight")
    assert weights.sum() == sum(s.size for s in model.param_slots.values() if s.attr == "weight")
    assert_array_equal(model.parameter_mask("weight") + model.parameter_mask("bias"),
                       np.ones(model.n_params))
    one_layer = model.parameter_mask(2)
    assert one_layer.sum() == model.param_slots["2.weight"].size + model.param_slots["2.bias"].size
    assert_array_equal(model.parameter_mask("2.bias")[model.param_slots["2.bias"].start:
                                                      model.param_slots["2.bias"].stop], 1.0)
    diagonal = 0.3 * weights + 0.1 * one_layer
    plain = operator(c.model, c.loss, c.theta, c.data).todense()
    damped = operator(c.model, c.loss, c.theta, c.data, damping=diagonal)
    assert_allclose(damped.todense(), plain + np.diag(diagonal), rtol=1e-14, atol=1e-15)
    w = model.param_slots["2.weight"]
    assert_allclose(damped.block("2.weight"), damped.todense()[w.start:w.stop, w.start:w.stop],
                    rtol=1e-14)


def test_damping_array_is_checked():
    c = Case("tanh-ce")
    n = c.model.n_params
    with pytest.raises(ValueError, match=f"must have length {n}"):
        ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data, damping=np.ones(n - 1))
    with pytest.raises(ValueError, match="finite and >= 0 everywhere"):
        ghess.GGNLinearOperator(c.model, c.loss, c.theta, c.data, damping=-np.ones(n))
    with pytest.raises(ValueError, match="parameter_mask: select a kind"):
        c.model.parameter_mask("gamma")
    with pytest.raises(ValueError, match="layer index must lie in"):
        c.model.parameter_mask(99)
