"""from_torch on residual networks written the usual way, traced with torch.fx."""

import numpy as np
import pytest

import ghess
from ghess.testing import assert_allclose_rel

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional


class BasicBlock(nn.Module):
    """The CIFAR ResNet block: conv-bn-relu-conv-bn, plus the shortcut, then ReLU."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    """Three stages of basic blocks, global average pooling, a linear classifier."""

    def __init__(self, widths=(4, 6, 8), blocks=(2, 1, 1), num_classes=5, pool="adaptive"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, planes = [], widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks)):
            layers = []
            for j in range(count):
                layers.append(BasicBlock(planes, width, 2 if i > 0 and j == 0 else 1))
                planes = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(widths[-1], num_classes)
        self.pool = pool

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        if self.pool == "adaptive":
            out = F.adaptive_avg_pool2d(out, 1)
            out = torch.flatten(out, 1)
        else:  # the other common spelling
            out = F.avg_pool2d(out, 2)
            out = out.view(out.size(0), -1)
        return self.linear(out)


def trained_looking(module, seed=0):
    """Non-trivial batch-norm statistics and affine parameters, evaluation mode."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.3 * torch.randn(c, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
            with torch.no_grad():
                m.weight.copy_(1 + 0.2 * torch.randn(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
    return module.eval()


def resnet(dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    return trained_looking(ResNet(**kwargs)).to(dtype)


@pytest.mark.parametrize("pool", ["adaptive", "avg_pool2d-view"])
def test_resnet_converts_with_pytorch_layout(pool):
    net = resnet(pool=pool)
    model, theta = ghess.from_torch(net, (3, 8, 8))
    expected = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy()
    np.testing.assert_array_equal(theta, expected)
    assert sum(isinstance(layer, ghess.Residual) for layer in model.layers) == 4
    blocks = [layer for layer in model.layers if isinstance(layer, ghess.Residual)]
    assert [len(b.shortcut) for b in blocks] == [0, 0, 2, 2]  # identity, then conv + bn
    X = np.random.default_rng(1).normal(size=(4, 3, 8, 8))
    with torch.no_grad():
        z = net(torch.from_numpy(X)).numpy()
    assert_allclose_rel(model.forward(theta, X), z, 1e-13)
    # and back: the twin module computes the same
    twin = ghess.to_torch(model, theta)
    with torch.no_grad():
        assert_allclose_rel(twin(torch.from_numpy(X)).numpy(), z, 1e-13)


def torch_products(net, X, y, v):
    """Loss, gradient, GGN and Hessian products of torch.func on the flat parameters."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    sizes = [int(np.prod(s)) for s in shapes]
    tX, ty = torch.from_numpy(X), torch.from_numpy(y)

    def f(flat):
        params = {n: p.reshape(s) for n, p, s in zip(names, flat.split(sizes), shapes)}
        return torch.func.functional_call(net, params, (tX,))

    def objective(flat):
        return F.cross_entropy(f(flat), ty)

    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    tv = torch.from_numpy(v)
    z, Jv = torch.func.jvp(f, (theta,), (tv,))
    p = torch.softmax(z, dim=1)
    u = (p * Jv - p * (p * Jv).sum(dim=1, keepdim=True)) / X.shape[0]
    ggn = torch.func.vjp(f, theta)[1](u)[0]
    hvp = torch.func.jvp(torch.func.grad(objective), (theta,), (tv,))[1]
    value, grad = objective(theta), torch.func.grad(objective)(theta)
    return [t.detach().numpy() for t in (value, grad, ggn, hvp)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_resnet_curvature_matches_torch_func(dtype):
    net = resnet(torch.float64 if dtype == np.float64 else torch.float32)
    model, theta = ghess.from_torch(net, (3, 8, 8))
    rng = np.random.default_rng(2)
    X = rng.normal(size=(6, 3, 8, 8)).astype(dtype)
    y = rng.integers(0, 5, size=6)
    v = rng.normal(size=model.n_params).astype(dtype)
    value, grad, ggn, hvp = torch_products(net, X, y, v)
    loss, data = ghess.CrossEntropyLoss(), (X, y)
    tol = 1e-10 if dtype == np.float64 else 2e-4
    got_value, got_grad = ghess.loss_and_grad(model, loss, theta, data)
    assert abs(got_value - value) <= tol * abs(value)
    assert_allclose_rel(got_grad, grad, tol)
    for mode in ("stored", "recompute"):
        G = ghess.GGNLinearOperator(model, loss, theta, data, mode=mode)
        H = ghess.HessianLinearOperator(model, loss, theta, data, mode=mode)
        assert_allclose_rel(G @ v, ggn, tol)
        assert_allclose_rel(H @ v, hvp, tol)


def test_unsupported_graph_nodes_are_named():
    class Concat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], dim=1)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, x):
            return 2 * self.a(x)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(torch.tanh(self.a(x)))

    with pytest.raises(TypeError, match="graph node 'cat'.*reads 2 tensors"):
        ghess.from_torch(Concat().double(), (4,))
    with pytest.raises(TypeError, match="graph node 'mul'.*has no ghess layer"):
        ghess.from_torch(Scaled().double(), (4,))
    with pytest.raises(TypeError, match="module 'a' is called twice"):
        ghess.from_torch(Shared().double(), (4,))


def test_residual_shapes_that_differ_and_train_mode_are_refused():
    class Mismatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, stride=2, padding=1)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(torch.flatten(F.relu(self.conv(x)) + x, 1))

    with pytest.raises(ValueError, match=r"Residual: the body's output shape \(2, 2, 2\) "
                                         r"differs from the shortcut's \(2, 4, 4\)"):
        ghess.from_torch(Mismatched().double(), (2, 4, 4))
    net = resnet()
    net.layer2[0].bn2.train()
    with pytest.raises(TypeError, match=r"layer2\.0\.bn2: BatchNorm2d is in training mode"):
        ghess.from_torch(net, (3, 8, 8))


def test_parameters_registered_out_of_forward_order_are_refused():
    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.second = nn.Linear(4, 3)
            self.first = nn.Linear(4, 4)

        def forward(self, x):
            return self.second(F.relu(self.first(x)) + x)

    with pytest.raises(ValueError, match="registers its parameters in another order"):
        ghess.from_torch(Reordered().double(), (4,))
