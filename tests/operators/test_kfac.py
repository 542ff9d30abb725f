"""KFAC and the Monte-Carlo Fisher against the NumPy reference, and their contracts."""

import numpy as np
import pytest
from conftest import CASES, CONV_CASES, make_data

import ghess
from ghess import testing
from ghess.testing import assert_allclose_rel

# conv-tanh-maxpool-...: the backward pass fuses each activation with the max-pooling after
# it (a curved one, and overlapping windows), as the stored factors do
NETWORKS = ["tanh-ce", "softplus-bce", "sigmoid-mse", "conv-relu-maxpool-ce",
            "conv-tanh-maxpool-relu-maxpool-ce", "conv-odd-shapes-mse", "conv-stride-avgpool-bce"]


def _setup(name, n_samples=11, dtype=np.float64):
    make_model, make_loss = CASES.get(name) or CONV_CASES[name]
    model, loss = make_model(), make_loss()
    X, y = make_data(loss, n_samples, model, np.random.default_rng(0), dtype)
    return model, loss, model.init_params(seed=1, dtype=dtype) * dtype(2), (X, y)


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical", "mc"])
def test_kfac_equals_the_reference(name, fisher_type):
    model, loss, theta, data = _setup(name)
    M = 3 if fisher_type == "mc" else 1
    for approx, separate in (("expand", True), ("reduce", False)):
        K = ghess.KFACLinearOperator(model, loss, theta, data, fisher_type=fisher_type,
                                     kfac_approx=approx, separate_weight_and_bias=separate,
                                     mc_samples=M, seed=2, chunk_size=4)
        expected = testing.reference_kfac(model, loss, theta, data, fisher_type, approx, M, 2,
                                          separate)
        assert_allclose_rel(K.todense(), expected, 1e-12)


def test_kfac_float32_threads_chunks_and_batches():
    model, loss, theta, (X, y) = _setup("conv-relu-maxpool-ce", 20)
    ref = ghess.KFACLinearOperator(model, loss, theta, (X, y)).todense()
    other = ghess.KFACLinearOperator(model, loss, theta, [(X[:7], y[:7]), (X[7:], y[7:])],
                                     chunk_size=3, n_threads=2).todense()
    assert_allclose_rel(other, ref, 1e-13)
    f32 = ghess.KFACLinearOperator(model, loss, theta.astype(np.float32),
                                   (X.astype(np.float32), y))
    assert f32.dtype == np.float32
    assert_allclose_rel(f32.todense(), ref, 1e-4)


@pytest.mark.parametrize("name", ["tanh-ce", "conv-relu-maxpool-ce"])
@pytest.mark.parametrize("strategy", ["exact", "heuristic"])
def test_kfac_inverse(name, strategy):
    model, loss, theta, data = _setup(name)
    K = ghess.KFACLinearOperator(model, loss, theta, data)
    v = np.random.default_rng(3).normal(size=(model.n_params, 2))
    damping = 1e-3
    inverse = K.inverse(damping, strategy=strategy)
    if strategy == "exact":  # (KFAC + damping I)^-1 (KFAC + damping I) v = v
        assert_allclose_rel(inverse @ (K @ v + damping * v), v, 1e-8)
        damped = ghess.KFACLinearOperator(model, loss, theta, data, damping=damping)
        assert_allclose_rel(damped.inverse() @ (damped @ v), v, 1e-8)
    else:  # the factors damped separately: symmetric positive definite
        M = inverse @ np.eye(model.n_params)
        assert_allclose_rel(M, M.T, 1e-12)
        assert np.linalg.eigvalsh(M).min() > 0
    # cross-entropy's B is singular (its rows sum to zero): no inverse without damping
    with pytest.raises(ValueError, match="singular"):
        K.inverse(0.0)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-11), (np.float32, 1e-4)])
@pytest.mark.parametrize("separate", [True, False])
def test_kfac_inverse_over_the_input_factors_range_equals_the_dense_inverse(dtype, rtol,
                                                                            separate):
    # 6 samples into a layer of 20 inputs (and 16 hidden units): A has rank <= 6 (7 with
    # a joint bias), so the inverse product runs its GEMMs over A's range and multiplies
    # its null space by 1/damping; the result must be the dense inverse's
    model = ghess.Sequential(ghess.Linear(20, 16), ghess.Tanh(), ghess.Linear(16, 4),
                             input_shape=(20,))
    loss = ghess.CrossEntropyLoss()
    rng = np.random.default_rng(4)
    X, y = rng.normal(size=(6, 20)).astype(dtype), rng.integers(0, 4, size=6)
    theta = model.init_params(seed=0, dtype=dtype)
    K = ghess.KFACLinearOperator(model, loss, theta, (X, y), separate_weight_and_bias=separate)
    damping = 1e-2
    inverse = K.inverse(damping)
    assert all(entry[4] for entry in inverse._eigen.values())  # the range path, every layer
    dense = np.linalg.inv(K.todense().astype(np.float64) + damping * np.eye(model.n_params))
    V = rng.normal(size=(model.n_params, 3))
    assert_allclose_rel(inverse @ V.astype(dtype), dense @ V, rtol)
    assert_allclose_rel(inverse @ (K @ V + damping * V), V, 1e-8 if dtype == np.float64 else 1e-3)


def test_kfac_errors():
    model, loss, theta, data = _setup("tanh-ce")
    with pytest.raises(ValueError, match="fisher_type"):
        ghess.KFACLinearOperator(model, loss, theta, data, fisher_type="type-1")
    with pytest.raises(ValueError, match="kfac_approx"):
        ghess.KFACLinearOperator(model, loss, theta, data, kfac_approx="blocked")
    with pytest.raises(ValueError, match="mc_samples must be 1"):
        ghess.KFACLinearOperator(model, loss, theta, data, mc_samples=4)
    with pytest.raises(ValueError, match="seed"):
        ghess.KFACLinearOperator(model, loss, theta, data, fisher_type="mc", seed=-1)
    with pytest.raises(ValueError, match="strategy"):
        ghess.KFACLinearOperator(model, loss, theta, data).inverse(1.0, strategy="newton")
    bn_model, bn_loss, bn_theta, bn_data = _setup("batchnorm-tanh-mse")
    with pytest.raises(ValueError, match="Linear and Conv2d layers only; layer"):
        ghess.KFACLinearOperator(bn_model, bn_loss, bn_theta, bn_data)
    with pytest.raises(ValueError, match="params"):
        ghess.KFACLinearOperator(model, loss, theta[:-1], data)


# -- the Monte-Carlo Fisher ---------------------------------------------------------

@pytest.mark.parametrize("name", ["tanh-ce", "softplus-bce", "sigmoid-mse", "resnet-ce"])
def test_fisher_mc_equals_the_reference_and_is_reproducible(name):
    model, loss, theta, data = _setup(name, 9)
    F = ghess.FisherMCLinearOperator(model, loss, theta, data, mc_samples=5, seed=4,
                                     chunk_size=4)
    assert_allclose_rel(F.todense(),
                        testing.reference_fisher_mc(model, loss, theta, data, 5, 4), 1e-12)
    v = np.random.default_rng(0).normal(size=model.n_params)
    # the same draws in recompute mode, with another chunking
    again = ghess.FisherMCLinearOperator(model, loss, theta, data, mc_samples=5, seed=4,
                                         mode="recompute", chunk_size=2)
    assert_allclose_rel(again @ v, F @ v, 1e-13)
    assert_allclose_rel(again @ v, again @ v, 0.0)
    other = ghess.FisherMCLinearOperator(model, loss, theta, data, mc_samples=5, seed=5)
    assert np.linalg.norm(other @ v - F @ v) > 1e-6 * np.linalg.norm(F @ v)


@pytest.mark.parametrize("name", ["tanh-ce", "softplus-bce", "sigmoid-mse",
                                  "conv-relu-maxpool-ce"])
def test_fisher_mc_converges_to_the_ggn(name):
    """4000 draws: within 5% of the GGN (Frobenius), as the issue asks; 1.1% measured."""
    model, loss, theta, data = _setup(name, 20)
    G = ghess.GGNLinearOperator(model, loss, theta, data).todense()
    F = ghess.FisherMCLinearOperator(model, loss, theta, data, mc_samples=4000, seed=0)
    assert F.memory_bytes < 2 * ghess.GGNLinearOperator(model, loss, theta, data).memory_bytes
    assert np.linalg.norm(F.todense() - G) / np.linalg.norm(G) < 0.05


def test_sampled_targets_follow_the_predictive_distribution():
    rng = np.random.default_rng(0)
    z = np.array([[0.3, -1.0, 2.0], [5.0, 0.0, -5.0]])
    labels = ghess.CrossEntropyLoss().sample_targets(z, rng, 200000)  # (draws, n)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    for n in range(2):
        freq = np.bincount(labels[:, n], minlength=3) / labels.shape[0]
        assert np.abs(freq - p[n]).max() < 5e-3
    y = ghess.MSELoss().sample_targets(z, rng, 200000)
    assert np.abs(y.mean(axis=0) - z).max() < 1e-2 and abs(y.var(axis=0).mean() - 0.5) < 1e-2
    b = ghess.BCEWithLogitsLoss().sample_targets(z, rng, 200000)
    assert np.abs(b.mean(axis=0) - 1 / (1 + np.exp(-z))).max() < 5e-3


# -- EKFAC ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tanh-ce", "softplus-bce", "sigmoid-mse",
                                  "conv-relu-maxpool-ce", "conv-odd-shapes-mse"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical", "mc"])
def test_ekfac_equals_the_reference(name, fisher_type):
    model, loss, theta, data = _setup(name, 9)
    M = 2 if fisher_type == "mc" else 1
    for separate in (True, False):
        E = ghess.EKFACLinearOperator(model, loss, theta, data, fisher_type=fisher_type,
                                      mc_samples=M, seed=1, chunk_size=4,
                                      separate_weight_and_bias=separate)
        expected = testing.reference_ekfac(model, loss, theta, data, fisher_type, "expand", M,
                                           1, separate)
        assert_allclose_rel(E.todense(), expected, 1e-10)


def test_ekfac_inverse_and_its_diagonal_in_the_eigenbasis():
    """EKFAC's eigenvalues are the exact GGN's diagonal in KFAC's eigenbasis."""
    model, loss, theta, data = _setup("tanh-ce", 40)
    E = ghess.EKFACLinearOperator(model, loss, theta, data)
    G = ghess.GGNLinearOperator(model, loss, theta, data).todense()
    eig = E.eigendecompositions()
    for i in E.layers:
        (_, Qa), (_, Qb) = eig[i]
        start = model.layer_range(i)[0]
        n_out, d_in = model.layers[i].kfac_weight_shape()
        block = G[start:start + n_out * d_in, start:start + n_out * d_in]
        Q = np.kron(Qb, Qa)
        assert_allclose_rel(np.diag(Q.T @ block @ Q),
                            E.corrected_eigenvalues[i]["weight"].ravel(), 1e-10)
    v = np.random.default_rng(0).normal(size=model.n_params)
    assert_allclose_rel(E.inverse(1e-3) @ (E @ v + 1e-3 * v), v, 1e-8)
    with pytest.raises(ValueError, match="strategy='exact' only"):
        E.inverse(1e-3, strategy="heuristic")



@pytest.mark.parametrize("cls", [ghess.KFACLinearOperator, ghess.EKFACLinearOperator])
@pytest.mark.parametrize("separate", [True, False])
def test_trace_logdet_and_norm_from_the_eigenvalues(cls, separate):
    model, loss, theta, data = _setup("conv-relu-maxpool-ce", 30)
    op = cls(model, loss, theta, data, damping=1e-2, separate_weight_and_bias=separate)
    dense = op.todense()
    assert op.trace == pytest.approx(np.trace(dense), rel=1e-12)
    assert op.frobenius_norm == pytest.approx(np.linalg.norm(dense), rel=1e-12)
    sign, logdet = np.linalg.slogdet(dense)
    assert sign == 1 and op.logdet == pytest.approx(logdet, rel=1e-10)
    assert op.det == pytest.approx(np.exp(logdet), rel=1e-8)
