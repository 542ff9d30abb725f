"""Curvature inside a PyTorch training loop, then Newton-CG steps written back to the model.

A small CNN on scikit-learn's 8x8 digits (a synthetic stand-in without
scikit-learn) is trained with Adam for a few epochs. After every epoch, ghess
converts the model (``ghess.from_torch``) and reports the top-3 Hessian
eigenvalues and the exact GGN trace of the training loss. Then a few
subsampled Newton-CG steps (``ghess.NewtonCG.step``) continue the training and
are written back into the torch model with ``vector_to_parameters``.

Run: ``python examples/torch_training_loop.py`` (about half a minute on 2 cores).
"""

import numpy as np
import torch

import ghess


def load_data():
    """Digits as (N, 1, 8, 8) float32 images and int64 labels; synthetic without sklearn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        rng = np.random.default_rng(0)
        y = rng.integers(0, 10, 1000)
        X = rng.normal(size=(1000, 1, 8, 8)) * 0.3
        X[np.arange(1000), 0, y % 8, y // 2] += 2.0  # a learnable pattern per class
        return X.astype(np.float32), y
    digits = load_digits()
    return (digits.images / 16.0)[:, None].astype(np.float32), digits.target


def main(epochs=3, newton_steps=3):
    """Train, measure the curvature each epoch, then take Newton-CG steps; return accuracy."""
    torch.manual_seed(0)
    X, y = load_data()
    X_t, y_t = torch.from_numpy(X), torch.from_numpy(y).long()
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss_fn = torch.nn.CrossEntropyLoss()
    loss = ghess.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X_t, y_t),
                                         batch_size=64, shuffle=True)
    for epoch in range(epochs):
        net.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            loss_fn(net(xb), yb).backward()
            optimizer.step()
        net.eval()
        model, theta = ghess.from_torch(net, input_shape=(1, 8, 8))
        H = ghess.HessianLinearOperator(model, loss, theta, (X, y))
        top = ghess.top_eigenvalues(H, k=3, tol=1e-4)
        trace = float(ghess.ggn_diagonal(model, loss, theta, (X, y)).sum())
        value = ghess.loss_and_grad(model, loss, theta, (X, y))[0]
        print(f"epoch {epoch}: loss {value:.4f}, top Hessian eigenvalues "
              f"{np.array2string(top, precision=4)}, GGN trace {trace:.4f}")

    # continue with Newton-CG on the same objective (plus a small L2 term)
    newton = ghess.NewtonCG(model, loss, C=1e4, subsample=0.25, seed=0)
    for step in range(newton_steps):
        theta, record = newton.step(theta, (X, y))
        torch.nn.utils.vector_to_parameters(torch.from_numpy(theta), net.parameters())
        with torch.no_grad():
            accuracy = float((net(X_t).argmax(1) == y_t).float().mean())
        print(f"Newton-CG step {step}: objective {record.objective:.4f}, "
              f"{record.cg_iterations} CG iterations, train accuracy {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
