"""ghess's Fisher and KFAC operators against curvlinops' on the same model and data.

curvlinops (``curvlinops-for-pytorch``) is the reference library of curvature
operators; its conventions are the ones ghess follows. The README's test command
installs it (without its CUDA-pulling dependencies); the test skips without it.
"""

import numpy as np
import pytest
from conftest import CASES, CONV_CASES, make_data

import ghess

torch = pytest.importorskip("torch")
curvlinops = pytest.importorskip("curvlinops")

NETWORKS = ["tanh-ce", "softplus-bce", "sigmoid-mse", "relu-ce-sum", "conv-relu-maxpool-ce",
            "conv-odd-shapes-mse", "conv-stride-avgpool-bce"]


def _setup(name):
    make_model, make_loss = CASES.get(name) or CONV_CASES[name]
    model, loss = make_model(), make_loss()
    loss = type(loss)(reduction=loss.reduction)  # PyTorch's losses have no factor
    X, y = make_data(loss, 13, model, np.random.default_rng(0))
    if isinstance(loss, ghess.BCEWithLogitsLoss):
        y = (y > 0.5).astype(np.float64)  # curvlinops' type-2 KFAC takes binary targets
    theta = model.init_params(seed=1) * 2.0
    module = ghess.to_torch(model, theta).double()
    torch_loss = {ghess.MSELoss: torch.nn.MSELoss,
                  ghess.CrossEntropyLoss: torch.nn.CrossEntropyLoss,
                  ghess.BCEWithLogitsLoss: torch.nn.BCEWithLogitsLoss}[type(loss)](
                      reduction=loss.reduction)
    # two batches of unequal size: the reductions must count samples globally
    yt = torch.as_tensor(y)
    data = [(torch.as_tensor(X[:8]), yt[:8]), (torch.as_tensor(X[8:]), yt[8:])]
    return model, loss, theta, (X, y), module, torch_loss, data


def _dense(op, n):
    return op.to_scipy() @ np.eye(n) if hasattr(op, "to_scipy") else op @ np.eye(n)


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("name", NETWORKS)
def test_empirical_fisher_equals_curvlinops(name):
    model, loss, theta, data, module, torch_loss, tdata = _setup(name)
    ours = ghess.EmpiricalFisherLinearOperator(model, loss, theta, data).todense()
    theirs = _dense(curvlinops.EFLinearOperator(module, torch_loss, list(module.parameters()),
                                                tdata, check_deterministic=False),
                    model.n_params)
    assert _rel(ours, theirs) < 1e-10


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("separate", [True, False])
def test_kfac_equals_curvlinops(name, fisher_type, kfac_approx, separate):
    model, loss, theta, data, module, torch_loss, tdata = _setup(name)
    ours = ghess.KFACLinearOperator(model, loss, theta, data, fisher_type=fisher_type,
                                    kfac_approx=kfac_approx,
                                    separate_weight_and_bias=separate).todense()
    theirs = _dense(curvlinops.KFACLinearOperator(
        module, torch_loss, list(module.parameters()), tdata, fisher_type=fisher_type,
        kfac_approx=kfac_approx, separate_weight_and_bias=separate,
        check_deterministic=False), model.n_params)
    assert _rel(ours, theirs) < 1e-10


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_ekfac_equals_curvlinops(name, fisher_type):
    model, loss, theta, data, module, torch_loss, tdata = _setup(name)
    ours = ghess.EKFACLinearOperator(model, loss, theta, data,
                                     fisher_type=fisher_type).todense()
    theirs = _dense(curvlinops.EKFACLinearOperator(
        module, torch_loss, list(module.parameters()), tdata, fisher_type=fisher_type,
        check_deterministic=False), model.n_params)
    assert _rel(ours, theirs) < 1e-10


@pytest.mark.parametrize("name", ["tanh-ce", "conv-relu-maxpool-ce"])
def test_kfac_inverse_equals_curvlinops(name):
    model, loss, theta, data, module, torch_loss, tdata = _setup(name)
    theirs_kfac = curvlinops.KFACLinearOperator(module, torch_loss, list(module.parameters()),
                                                tdata, fisher_type="type-2",
                                                check_deterministic=False)
    theirs = _dense(curvlinops.KFACInverseLinearOperator(theirs_kfac, damping=1e-3,
                                                         use_exact_damping=True),
                    model.n_params)
    ours = ghess.KFACLinearOperator(model, loss, theta, data).inverse(1e-3) @ np.eye(
        model.n_params)
    assert _rel(ours, theirs) < 1e-8
