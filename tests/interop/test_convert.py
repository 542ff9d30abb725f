"""ghess.from_torch / ghess.to_torch, and torch tensors wherever arrays are taken."""

import numpy as np
import pytest

import ghess
from ghess.testing import assert_allclose_rel

torch = pytest.importorskip("torch")
nn = torch.nn


def nested_dense():
    return nn.Sequential(nn.Sequential(nn.Linear(5, 8), nn.Tanh()),
                         nn.Sequential(nn.Linear(8, 6), nn.Dropout(0.3), nn.Softplus(2.0),
                                       nn.Identity()),
                         nn.Linear(6, 3))


def nested_conv():
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(4, 3, (3, 2), stride=(1, 2), padding="valid"),
                      nn.LeakyReLU(0.2), nn.AvgPool2d(1)),
        nn.Flatten(), nn.Linear(3 * 2 * 2, 4, bias=False), nn.Sigmoid())


CASES = {"dense": (nested_dense, (5,)), "conv": (nested_conv, (2, 8, 8))}


def torch_functional(module, loss_fn, X, y):
    """torch.func's GGN and Hessian products of ``loss_fn(module(X), y)`` at its parameters."""
    names = [n for n, _ in module.named_parameters()]
    shapes = [p.shape for p in module.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in module.parameters()])

    def unflatten(flat):
        out, start = {}, 0
        for name, shape in zip(names, shapes):
            size = int(np.prod(shape))
            out[name] = flat[start:start + size].reshape(shape)
            start += size
        return out

    def outputs(flat):
        return torch.func.functional_call(module, unflatten(flat), (X,))

    def objective(flat):
        return loss_fn(outputs(flat), y)

    def hvp(v):
        return torch.func.jvp(torch.func.grad(objective), (theta,), (v,))[1]

    def ggn(v):
        z, Jv = torch.func.jvp(outputs, (theta,), (v,))
        BJv = torch.func.jvp(torch.func.grad(lambda zz: loss_fn(zz, y)), (z,), (Jv,))[1]
        return torch.func.vjp(outputs, theta)[1](BJv)[0]

    return theta, ggn, hvp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_and_products_match_torch_func(name, dtype):
    make, input_shape = CASES[name]
    torch.manual_seed(0)
    module = make().to(dtype).eval()
    model, params = ghess.from_torch(module, input_shape)
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    assert params.dtype == np_dtype
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()]).numpy()
    np.testing.assert_array_equal(params, flat)
    back = ghess.to_torch(model, params)
    assert not back.training
    assert next(back.parameters()).dtype == dtype
    X = np.random.default_rng(1).normal(size=(6,) + input_shape).astype(np_dtype)
    with torch.no_grad():
        expected = module(torch.from_numpy(X)).numpy()
        assert_allclose_rel(back(torch.from_numpy(X)).numpy(), expected, 1e-6)
    assert_allclose_rel(model.forward(params, X), expected,
                        1e-5 if dtype == torch.float32 else 1e-13)
    if dtype == torch.float64:
        y = np.random.default_rng(2).integers(0, model.n_outputs, 6)
        loss = ghess.CrossEntropyLoss()
        theta, ggn, hvp = torch_functional(module, nn.CrossEntropyLoss(),
                                           torch.from_numpy(X), torch.from_numpy(y))
        v = np.random.default_rng(3).normal(size=model.n_params)
        G = ghess.GGNLinearOperator(model, loss, params, (X, y))
        H = ghess.HessianLinearOperator(model, loss, params, (X, y))
        assert_allclose_rel(G @ v, ggn(torch.from_numpy(v)).numpy(), 1e-10)
        assert_allclose_rel(H @ v, hvp(torch.from_numpy(v)).numpy(), 1e-10)


def test_a_newton_step_goes_back_into_the_module():
    torch.manual_seed(0)
    module = nested_dense().double().eval()
    model, params = ghess.from_torch(module, (5,))
    step = np.full(model.n_params, 0.01)
    torch.nn.utils.vector_to_parameters(torch.from_numpy(params + step), module.parameters())
    _, after = ghess.from_torch(module, (5,))
    np.testing.assert_allclose(after, params + step, rtol=0, atol=1e-15)


def test_unsupported_modules_are_named_with_their_path():
    module = nn.Sequential(nn.Linear(3, 4),
                           nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Hardswish())))
    with pytest.raises(TypeError, match=r"^1\.1\.0: Hardswish is not supported"):
        ghess.from_torch(module, (3,))
    with pytest.raises(TypeError, match="groups=2 is not supported"):
        ghess.from_torch(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), (2, 5, 5))
    train = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5))
    with pytest.raises(TypeError, match=r"1: Dropout is in training mode: call module.eval"):
        ghess.from_torch(train, (3,))
    with pytest.raises(TypeError, match="must all be float32 or all float64"):
        ghess.from_torch(nn.Sequential(nn.Linear(3, 2).half()), (3,))
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        ghess.from_torch([nn.Linear(3, 2)], (3,))


def test_a_module_with_its_own_forward_fails_the_check():
    class Residual(nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)

    module = nn.Sequential(Residual(nn.Linear(3, 3), nn.Tanh()), nn.Linear(3, 2)).double()
    with pytest.raises(ValueError, match="forward pass differs"):
        ghess.from_torch(module, (3,))


def test_torch_tensors_are_taken_wherever_arrays_are():
    torch.manual_seed(0)
    module = nested_dense().double().eval()
    model, params = ghess.from_torch(module, (5,))
    X = torch.randn(7, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    theta = torch.from_numpy(params).requires_grad_()
    loss = ghess.CrossEntropyLoss()
    value, grad = ghess.loss_and_grad(model, loss, theta, (X, y))
    ref_value, ref_grad = ghess.loss_and_grad(model, loss, params, (X.numpy(), y.numpy()))
    assert value == ref_value and isinstance(grad, np.ndarray)
    np.testing.assert_array_equal(grad, ref_grad)
    G = ghess.GGNLinearOperator(model, loss, theta, (X, y))
    v = torch.ones(model.n_params, dtype=torch.float64)
    np.testing.assert_array_equal(G.matvec(v), G.matvec(v.numpy()))
    J = ghess.JacobianLinearOperator(model, theta, X)
    assert isinstance(J.matmat(torch.eye(model.n_params, dtype=torch.float64)), np.ndarray)
    np.testing.assert_array_equal(model.forward(theta, X), model.forward(params, X.numpy()))


def test_dataloaders_and_lists_of_lists_are_batches():
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    module = nested_dense().double().eval()
    model, params = ghess.from_torch(module, (5,))
    X, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    loss = ghess.CrossEntropyLoss()
    whole = ghess.loss_and_grad(model, loss, params, (X, y))
    loader = DataLoader(TensorDataset(X, y), batch_size=6)
    batched = ghess.loss_and_grad(model, loss, params, loader)
    assert batched[0] == pytest.approx(whole[0], rel=1e-14)
    assert_allclose_rel(batched[1], whole[1], 1e-14)
    as_lists = ([X[:9].numpy(), y[:9].numpy()], [X[9:].numpy(), y[9:].numpy()])
    assert_allclose_rel(ghess.loss_and_grad(model, loss, params, as_lists)[1], whole[1], 1e-14)
    G = ghess.GGNLinearOperator(model, loss, params, loader)
    assert_allclose_rel(G @ np.ones(model.n_params),
                        ghess.GGNLinearOperator(model, loss, params, (X, y)) @ np.ones(
                            model.n_params), 1e-13)
    shuffled = DataLoader(TensorDataset(X, y), batch_size=6, shuffle=True)
    with pytest.raises(ValueError, match="different batches on two passes"):
        ghess.GGNLinearOperator(model, loss, params, shuffled)
    ghess.GGNLinearOperator(model, loss, params, shuffled, check_deterministic=False)


def test_adaptive_average_pooling_converts_and_refuses_uneven_windows():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d((3, None)),
                        nn.Flatten(), nn.Linear(2 * 3 * 6, 3)).double().eval()
    model, theta = ghess.from_torch(net, (1, 8, 8))  # checks one forward pass of both
    pool = model.layers[2]
    assert isinstance(pool, ghess.AdaptiveAvgPool2d) and pool.kernel_size == (2, 1)
    X = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert_allclose_rel(model.forward(theta, X), net(X).numpy(), 1e-14)
    back = ghess.to_torch(model, theta)
    assert isinstance(back[2], nn.AdaptiveAvgPool2d) and back[2].output_size == (3, None)
    with pytest.raises(ValueError, match=r"input of 6x6 does not divide into 4x4 windows"):
        ghess.Sequential(ghess.Conv2d(1, 2, 3), ghess.AdaptiveAvgPool2d(4), ghess.Flatten(),
                         ghess.Linear(32, 3), input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="AdaptiveAvgPool2d: output_size must be >= 1"):
        ghess.AdaptiveAvgPool2d(0)


def test_batch_norm_converts_with_its_running_statistics_and_refuses_training_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3, eps=1e-3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(3 * 5 * 5, 4), nn.BatchNorm1d(4)).double()
    net.train()
    with torch.no_grad():  # running statistics and affine parameters away from their init
        for _ in range(3):
            net(torch.randn(16, 2, 5, 5, dtype=torch.float64) * 2 + 0.5)
        for m in net:
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    with pytest.raises(TypeError, match=r"1: BatchNorm2d is in training mode: call "
                                        r"module.eval\(\) first"):
        ghess.from_torch(net, (2, 5, 5))
    net.eval()
    model, theta = ghess.from_torch(net, (2, 5, 5))  # checks one forward pass of both
    bn = model.layers[1]
    assert isinstance(bn, ghess.BatchNorm2d) and bn.eps == 1e-3
    np.testing.assert_array_equal(bn.running_var, net[1].running_var.numpy())
    assert not np.allclose(bn.running_mean, 0)
    X = torch.randn(7, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert_allclose_rel(model.forward(theta, X), net(X).numpy(), 1e-13)
    back = ghess.to_torch(model, theta)
    assert not back.training
    torch.testing.assert_close(back[5].running_mean, net[5].running_mean)
    with torch.no_grad():
        assert_allclose_rel(back(X).numpy(), net(X).numpy(), 1e-13)
    with pytest.raises(TypeError, match="without running statistics"):
        ghess.from_torch(nn.Sequential(nn.Linear(3, 4),
                                       nn.BatchNorm1d(4, track_running_stats=False).eval()),
                         (3,))
    # affine=False: the fixed map (x - mean) / sigma, a layer without parameters
    fixed = nn.BatchNorm1d(4, affine=False)
    fixed.running_mean.copy_(torch.linspace(-1, 1, 4, dtype=fixed.running_mean.dtype))
    net = nn.Sequential(nn.Linear(3, 4), fixed, nn.Tanh(), nn.Linear(4, 2)).double().eval()
    model, theta = ghess.from_torch(net, (3,))
    assert model.layers[1].affine is False and model.layer_slots[1] == []
    X = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        assert_allclose_rel(model.forward(theta, X), net(X).numpy(), 1e-13)


def test_batch_norm_arguments_checked():
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3, eps=1e-05\) expects 3 channels, "
                                         r"but the previous layer produces 2"):
        ghess.Sequential(ghess.BatchNorm2d(3), ghess.Flatten(), ghess.Linear(50, 2),
                         input_shape=(2, 5, 5))
    with pytest.raises(ValueError, match=r"expects per-sample inputs of rank \(3,\)"):
        ghess.Sequential(ghess.BatchNorm2d(4), input_shape=(4,))
    with pytest.raises(ValueError, match=r"running_var must be a real array of shape \(3,\)"):
        ghess.BatchNorm1d(3, running_var=np.ones(4))
    with pytest.raises(ValueError, match="running_var must be >= 0"):
        ghess.BatchNorm1d(3, running_var=-np.ones(3))
    with pytest.raises(TypeError, match="affine must be a bool"):
        ghess.BatchNorm1d(3, affine="no")
