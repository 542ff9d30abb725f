"""The curvature of a CIFAR-style ResNet, converted from PyTorch with ``ghess.from_torch``.

A ResNet written the usual way (basic blocks ``conv-bn-relu-conv-bn`` with
``out += self.shortcut(x)`` and ``F.relu``, global average pooling,
``torch.flatten``) is put in evaluation mode and converted: ``torch.fx`` traces its
forward, and every residual addition becomes a ``ghess.Residual``. On a batch of
3x32x32 inputs the script then reports the loss, the top Hessian eigenvalues,
the GGN's trace, and a Newton direction from CG on the damped GGN, and checks one
Hessian-vector product against ``torch.func``.

Run: ``python examples/resnet_curvature.py`` (about half a minute on 2 cores).
"""

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import identity
from scipy.sparse.linalg import aslinearoperator, cg

import ghess


class BasicBlock(torch.nn.Module):
    """conv3x3-bn-relu-conv3x3-bn, plus the shortcut (a strided 1x1 conv + bn where needed)."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(planes)
        self.conv2 = torch.nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(planes)
        self.shortcut = torch.nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = torch.nn.Sequential(
                torch.nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                torch.nn.BatchNorm2d(planes))

    def forward(self, x):
        """Return relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class ResNet(torch.nn.Module):
    """Three stages (widths 8, 16, 32), one block each, global average pooling."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.layer3 = BasicBlock(16, 32, stride=2)
        self.linear = torch.nn.Linear(32, num_classes)

    def forward(self, x):
        """Return the class scores."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def main(n_samples=128):
    """Convert, then measure the curvature; return the top Hessian eigenvalue."""
    torch.manual_seed(0)
    net = ResNet().double()
    with torch.no_grad():  # a few training-mode passes: running statistics of a real net
        for _ in range(5):
            net(torch.randn(64, 3, 32, 32, dtype=torch.float64))
    net.eval()
    model, theta = ghess.from_torch(net, input_shape=(3, 32, 32))
    blocks = sum(isinstance(layer, ghess.Residual) for layer in model.layers)
    print(f"converted: {len(model.layers)} layers, {blocks} residual blocks, "
          f"{model.n_params} parameters")

    rng = np.random.default_rng(0)
    X = rng.normal(size=(n_samples, 3, 32, 32))
    y = rng.integers(0, 10, size=n_samples)
    loss = ghess.CrossEntropyLoss()
    value, grad = ghess.loss_and_grad(model, loss, theta, (X, y))
    H = ghess.HessianLinearOperator(model, loss, theta, (X, y))
    G = ghess.GGNLinearOperator(model, loss, theta, (X, y))
    top = ghess.top_eigenvalues(H, k=3, seed=0)
    trace, stderr = ghess.hutchinson_trace(G, n_samples=32, seed=0)
    damped = G + 1e-3 * aslinearoperator(identity(model.n_params))
    direction, info = cg(damped, -grad, rtol=1e-3, maxiter=100)
    print(f"loss {value:.4f}, |grad| {np.linalg.norm(grad):.3e}")
    print(f"top Hessian eigenvalues: {np.array2string(top, precision=4)}")
    print(f"GGN trace (Hutchinson, 32 probes): {trace:.4f} +- {stderr:.4f}")
    print(f"Newton direction from CG (info {info}): decrease "
          f"{-grad @ direction:.3e} along it")

    # one Hessian-vector product against torch.func, on the flat parameters
    v = rng.normal(size=model.n_params)
    names = [name for name, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    sizes = [int(np.prod(s)) for s in shapes]

    def objective(flat):
        params = {n: p.reshape(s) for n, p, s in zip(names, flat.split(sizes), shapes)}
        out = torch.func.functional_call(net, params, (torch.from_numpy(X),))
        return F.cross_entropy(out, torch.from_numpy(y))

    hvp = torch.func.jvp(torch.func.grad(objective), (torch.from_numpy(theta),),
                         (torch.from_numpy(v),))[1].numpy()
    error = np.linalg.norm(H @ v - hvp) / np.linalg.norm(hvp)
    print(f"H v against torch.func: relative difference {error:.1e}")
    assert error < 1e-10
    return float(top[0])


if __name__ == "__main__":
    main()
