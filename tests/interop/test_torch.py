"""Cross-checks against PyTorch (skipped when it is not installed)."""

import numpy as np
import pytest
from conftest import Case

import ghess
from ghess.testing import assert_allclose_rel, torch_sequential

torch = pytest.importorskip("torch")
torch.set_default_dtype(torch.float64)


def to_torch(model):
    return torch_sequential(model)


def torch_loss(loss):
    plain = getattr(torch.nn, type(loss).__name__)(reduction=loss.reduction)
    return lambda z, y: loss.factor * plain(z, y)


def functional(case):
    net = to_torch(case.model)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    assert names == list(case.model.param_slots)

    def unflatten(flat):
        out, start = {}, 0
        for name, shape in zip(names, shapes):
            size = int(np.prod(shape))
            out[name] = flat[start:start + size].reshape(shape)
            start += size
        return out

    def outputs(flat, X):
        return torch.func.functional_call(net, unflatten(flat), (X,))

    X = torch.from_numpy(case.X)
    y = torch.from_numpy(case.y)
    lossfn = torch_loss(case.loss)

    def objective(flat):
        return lossfn(outputs(flat, X), y)

    return net, outputs, objective, X


DENSE = ["tanh-ce", "sigmoid-mse", "softplus-bce", "relu-ce-sum", "leakyrelu-mse-sum",
         "linear-linear-bce", "gelu-ce", "gelu-tanh-dropout-mse", "silu-bce", "elu-ce",
         "batchnorm-tanh-mse", "batchnorm-noaffine-silu-ce", "residual-tanh-mse",
         "residual-first-nested-ce"]
CONV = ["conv-bn-relu-bn1d-ce", "conv-gelu-maxpool-silu-elu-ce", "conv-global-avgpool-ce",
        "conv-relu-maxpool-ce",
        "conv-odd-shapes-mse",
        "conv-stride-avgpool-bce",
        "conv-single-channel-pad2-sum", "conv-linear-in-theta-mse", "resnet-ce",
        "residual-maxpool-tanh-mse"]


@pytest.fixture(params=DENSE + CONV, ids=lambda n: f"case={n}")
def tcase(request):
    if request.param in CONV:
        from conftest import ConvCase

        return ConvCase(request.param)
    return Case(request.param)


def test_parameter_layout_matches_torch(tcase):
    net = to_torch(tcase.model)
    torch.nn.utils.vector_to_parameters(torch.from_numpy(tcase.theta), net.parameters())
    flat = torch.cat([p.reshape(-1) for p in net.parameters()]).detach().numpy()
    np.testing.assert_array_equal(flat, tcase.theta)
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    for name, view in tcase.model.unflatten(tcase.theta).items():
        np.testing.assert_array_equal(view, state[name])


def test_loss_grad_hessian_match_torch(tcase):
    _, outputs, objective, X = functional(tcase)
    theta = torch.from_numpy(tcase.theta)
    value, grad = ghess.loss_and_grad(tcase.model, tcase.loss, tcase.theta, tcase.data)
    np.testing.assert_allclose(value, objective(theta).item(), rtol=1e-13)
    assert_allclose_rel(grad, torch.func.grad(objective)(theta).numpy(), 1e-12)
    H = ghess.HessianLinearOperator(tcase.model, tcase.loss, tcase.theta, tcase.data)
    assert_allclose_rel(H.todense(), torch.func.hessian(objective)(theta).numpy(), 1e-12)
    z = tcase.model.forward(tcase.theta, tcase.X)
    assert_allclose_rel(z, outputs(theta, X).detach().numpy(), 1e-14)


def test_jacobians_and_ggn_match_torch(tcase):
    _, outputs, _, X = functional(tcase)
    theta = torch.from_numpy(tcase.theta)

    def one(flat, x):
        return outputs(flat, x[None])[0]

    J = torch.func.vmap(torch.func.jacrev(one), in_dims=(None, 0))(theta, X).numpy()
    assert_allclose_rel(ghess.per_sample_jacobians(tcase.model, tcase.theta, tcase.X), J, 1e-12)
    # GGN from torch.func's Jacobians and the loss Hessian in output space
    z = outputs(theta, X).detach()
    y = torch.from_numpy(tcase.y)
    lossfn = torch_loss(tcase.loss)
    N, K = z.shape
    if isinstance(tcase.loss, ghess.CrossEntropyLoss):
        # B = diag(p) - p p^T as sum_{j<k} p_j p_k (e_j - e_k)(e_j - e_k)^T: torch's
        # Hessian of the loss cancels where the softmax saturates (the ResNet case)
        p = torch.softmax(z, dim=1).numpy()
        scale = tcase.loss.factor / (N if tcase.loss.reduction == "mean" else 1)
        G = np.zeros((J.shape[2],) * 2)
        for j in range(K):
            for k in range(j + 1, K):
                d = J[:, j] - J[:, k]
                G += scale * np.einsum("n,ni,nj->ij", p[:, j] * p[:, k], d, d)
    else:
        B = torch.func.hessian(lambda zz: lossfn(zz, y))(z).numpy()  # (N, K, N, K)
        G = np.einsum("nki,nkml,mlj->ij", J, B, J, optimize=True)
    op = ghess.GGNLinearOperator(tcase.model, tcase.loss, tcase.theta, tcase.data)
    assert_allclose_rel(op.todense(), G, 1e-12)


def test_empirical_fisher_matches_torch_per_sample_gradients(tcase):
    """The EF as curvlinops defines it, c sum_n grad l_n grad l_n^T, from torch.func."""
    net, outputs, _, X = functional(tcase)
    theta = torch.from_numpy(tcase.theta)
    y = torch.from_numpy(tcase.y)
    plain = getattr(torch.nn, type(tcase.loss).__name__)(reduction="sum")

    def sample_loss(flat, x, t):
        return tcase.loss.factor * plain(outputs(flat, x[None]), t[None])

    grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(
        theta, X, y).numpy()
    N, K = tcase.X.shape[0], tcase.model.n_outputs
    c = (1.0 if tcase.loss.reduction == "sum" else
         1.0 / N if isinstance(tcase.loss, ghess.CrossEntropyLoss) else 1.0 / (N * K))
    F = ghess.EmpiricalFisherLinearOperator(tcase.model, tcase.loss, tcase.theta, tcase.data)
    assert_allclose_rel(F.todense(), c * grads.T @ grads, 1e-12)
