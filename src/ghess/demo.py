"""The worked example run by ``python -m ghess demo``.

1. The classic question: the exact second derivatives d2J/dW1^2, d2J/dW1 dW2 and
   d2J/dW2^2 of a two-layer sigmoid network with cost 1/2 sum (y - yhat)^2,
   checked against finite differences of the gradient.
2. Newton-CG training of a small CNN on scikit-learn's 8x8 digits (installed
   with ``pip install ".[demo]"``; no download), then the curvature at the
   solution: top GGN and Hessian eigenvalues, traces, and the Hessian's
   spectral density (a PNG when matplotlib is installed). Without
   scikit-learn, a synthetic classification problem stands in.
"""

import argparse
import time

import numpy as np
from scipy.sparse.linalg import cg, eigsh

from . import analysis
from ._config import show_config
from .functional import loss_and_grad
from .nn import (
    Conv2d,
    CrossEntropyLoss,
    Flatten,
    Linear,
    MaxPool2d,
    MSELoss,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
)
from .operators import GGNLinearOperator, HessianLinearOperator
from .optim import NewtonCG


def hessian_blocks_example(out=print):
    """Print the three Hessian blocks of a 2-layer sigmoid network; return the FD error."""
    rng = np.random.default_rng(0)
    d, m, K, N = 3, 4, 2, 16
    X, Y = rng.normal(size=(N, d)), rng.uniform(size=(N, K))
    model = Sequential(Linear(d, m, bias=False), Sigmoid(), Linear(m, K, bias=False), Sigmoid(),
                       input_shape=(d,))
    theta = model.init_params(seed=0) * 3
    # J = 1/2 sum (y - yhat)^2 = MSELoss(reduction="sum") / 2
    H = HessianLinearOperator(model, MSELoss(reduction="sum"), theta, (X, Y))
    a = 0.5 * H.block("0.weight", "0.weight")
    b = 0.5 * H.block("0.weight", "2.weight")
    c = 0.5 * H.block("2.weight", "2.weight")
    out("1. Two-layer sigmoid network, J = 1/2 sum (y - yhat)^2, "
        f"W1: {m}x{d}, W2: {K}x{m}, {N} samples")
    np.set_printoptions(precision=4, suppress=True, linewidth=100)
    out(f"   d2J/dW1^2     shape {a.shape}, eigenvalues in [{np.linalg.eigvalsh(a).min():.4f}, "
        f"{np.linalg.eigvalsh(a).max():.4f}]")
    out(f"   d2J/dW1 dW2   shape {b.shape}, first row {b[0]}")
    out(f"   d2J/dW2^2     shape {c.shape}, diagonal {np.diag(c)}")

    def grad(t):
        return 0.5 * loss_and_grad(model, MSELoss(reduction="sum"), t, (X, Y))[1]

    eps = 1e-5
    fd = np.empty((model.n_params, model.n_params))
    for j in range(model.n_params):
        e = np.zeros(model.n_params)
        e[j] = eps
        fd[:, j] = (grad(theta + e) - grad(theta - e)) / (2 * eps)
    full = np.block([[a, b], [b.T, c]])
    err = np.abs(full - fd).max() / np.abs(fd).max()
    out(f"   max relative difference to central finite differences: {err:.1e}")
    return err


def newton_cg_example(n_iterations=8, out=print):
    """Train a small tanh classifier with damped Gauss-Newton CG steps; return the final loss."""
    rng = np.random.default_rng(1)
    N, d, K = 600, 10, 3
    centers = rng.normal(scale=2.0, size=(K, d))
    y = rng.integers(0, K, size=N)
    X = centers[y] + rng.normal(size=(N, d))
    model = Sequential(Linear(d, 32), Tanh(), Linear(32, K), input_shape=(d,))
    loss = CrossEntropyLoss()
    theta = model.init_params(seed=1)
    damping = 1.0
    out(f"\n2. Newton-CG on a {d}-32-{K} tanh classifier, {N} samples, "
        f"{model.n_params} parameters")
    out("   iter      loss    |grad|   CG its   damping   step")
    start = time.perf_counter()
    value, grad = loss_and_grad(model, loss, theta, (X, y))
    for it in range(n_iterations):
        G = GGNLinearOperator(model, loss, theta, (X, y), damping=damping)
        n_cg = [0]
        direction, _ = cg(G, -grad, rtol=0.1, maxiter=50,
                          callback=lambda _: n_cg.__setitem__(0, n_cg[0] + 1))
        predicted = grad @ direction + 0.5 * direction @ (G @ direction)
        step = 1.0
        while True:  # Armijo backtracking
            new_value, new_grad = loss_and_grad(model, loss, theta + step * direction, (X, y))
            if new_value <= value + 1e-4 * step * (grad @ direction) or step < 1e-4:
                break
            step /= 2
        ratio = (new_value - value) / predicted if predicted < 0 else 0.0
        damping *= 2 / 3 if ratio > 0.75 else (1.5 if ratio < 0.25 else 1.0)
        theta, value, grad = theta + step * direction, new_value, new_grad
        out(f"   {it:4d}  {value:8.5f}  {np.linalg.norm(grad):8.2e}  {n_cg[0]:6d}  "
            f"{damping:8.3g}  {step:5.3f}")
    accuracy = (model.forward(theta, X).argmax(axis=1) == y).mean()
    out(f"   training accuracy {accuracy:.3f}, {time.perf_counter() - start:.2f} s")
    G = GGNLinearOperator(model, loss, theta, (X, y))
    H = HessianLinearOperator(model, loss, theta, (X, y))
    top_g = np.sort(eigsh(G, k=3, which="LA", return_eigenvectors=False))[::-1]
    top_h = np.sort(eigsh(H, k=3, which="LA", return_eigenvectors=False))[::-1]
    out(f"   top GGN eigenvalues     {np.array2string(top_g, precision=4)}")
    out(f"   top Hessian eigenvalues {np.array2string(top_h, precision=4)}")
    return value


def train_digits(n_iterations=30, out=print):
    """Train a small CNN on scikit-learn's digits with Newton-CG.

    Returns ``(model, loss, theta, (X_train, y_train), test_accuracy, history)``.
    """
    (X_train, y_train), (X_test, y_test) = _digits_data()
    model = Sequential(Conv2d(1, 16, 3, padding=1), ReLU(), MaxPool2d(2),
                       Conv2d(16, 32, 3, padding=1), ReLU(), MaxPool2d(2),
                       Flatten(), Linear(32 * 2 * 2, 10), input_shape=(1, 8, 8))
    loss = CrossEntropyLoss()
    out(f"\n2. Newton-CG on scikit-learn's digits: {len(X_train)} training and {len(X_test)} "
        f"test images, a CNN with {model.n_params} parameters")
    out("   f = |theta|^2 / (2 C) + mean cross-entropy, C = 1000; Gauss-Newton on a fresh 20% "
        "subsample each iteration")
    start = time.perf_counter()
    optimizer = NewtonCG(model, loss, C=1000.0, subsample=0.2, cg_maxiter=50, seed=0)
    theta, history = optimizer.fit(model.init_params(seed=0), (X_train, y_train),
                                   n_iterations=n_iterations, validation=(X_test, y_test),
                                   verbose=out is print)
    accuracy = optimizer.evaluate(theta, (X_test, y_test))
    out(f"   test accuracy {accuracy:.4f} after {len(history)} iterations, "
        f"{time.perf_counter() - start:.1f} s")
    return model, loss, theta, (X_train, y_train), accuracy, history


def preconditioned_digits(model, loss, data, plain_history, out=print):
    """Rerun the digits training with KFAC-preconditioned CG; compare the GGN products.

    Returns ``(products, plain_products)`` to reach the plain run's final objective
    (CG iterations plus one curvature product per iteration); ``products`` is None
    if the preconditioned run does not reach it.
    """
    target = plain_history[-1].objective
    plain_products = sum(r.cg_iterations + 1 for r in plain_history)
    start = time.perf_counter()
    optimizer = NewtonCG(model, loss, C=1000.0, subsample=0.2, cg_maxiter=50, seed=0,
                         preconditioner="kfac", preconditioner_every=5)
    _, history = optimizer.fit(model.init_params(seed=0), data,
                               n_iterations=len(plain_history), verbose=False,
                               callback=lambda theta, record: record.objective <= target)
    reached = next((it + 1 for it, r in enumerate(history) if r.objective <= target), None)
    products = sum(r.cg_iterations + 1 for r in history[:reached])
    out("   the same with CG preconditioned by KFAC (NewtonCG(preconditioner=\"kfac\"), "
        "factors rebuilt every 5 iterations):")
    if reached is None:
        out(f"   did not reach the objective {target:.5f} in {len(plain_history)} iterations")
        return None, plain_products
    out(f"   objective {target:.5f} after {reached} iterations and {products} GGN products "
        f"(CG + 1 per iteration), against {len(plain_history)} and {plain_products} "
        f"without: {1 - products / plain_products:.0%} fewer, "
        f"{time.perf_counter() - start:.1f} s")
    return products, plain_products


def digits_example(output="ghess_spectrum.png", n_iterations=30, out=print):
    """Train on the digits, then analyse the curvature at the solution; return accuracy."""
    model, loss, theta, (X_train, y_train), accuracy, history = train_digits(n_iterations, out)
    preconditioned_digits(model, loss, (X_train, y_train), history, out)
    start = time.perf_counter()
    G = GGNLinearOperator(model, loss, theta, (X_train, y_train))
    H = HessianLinearOperator(model, loss, theta, (X_train, y_train))
    top_g = analysis.top_eigenvalues(G, k=3)
    top_h = analysis.top_eigenvalues(H, k=3)
    trace_g = float(analysis.ggn_diagonal(model, loss, theta, (X_train, y_train)).sum())
    trace_h = analysis.hutchpp_trace(H, n_matvecs=90)
    out("   curvature of the loss at the solution (without the regulariser):")
    out(f"   top GGN eigenvalues      {np.array2string(top_g, precision=5)}")
    out(f"   top Hessian eigenvalues  {np.array2string(top_h, precision=5)}")
    out(f"   GGN trace (exact)        {trace_g:.5f}")
    out(f"   Hessian trace (Hutch++)  {trace_h:.5f}")
    grid, density, nodes, _ = analysis.spectral_density(H, n_vectors=4, n_lanczos=40)
    # extremal Ritz values converge first: the smallest is a cheap estimate of the most
    # negative curvature (eigsh converges slowly on that cluster near 0)
    out(f"   smallest Hessian eig.    {np.nanmin(nodes):.3e} (Lanczos estimate)")
    try:
        analysis.plot_spectral_density(grid, density, output,
                                       title="Hessian spectral density (digits CNN)")
        out(f"   spectral density (stochastic Lanczos quadrature) written to {output}")
    except ImportError:
        out("   (install matplotlib to plot the spectral density)")
    out(f"   analysis took {time.perf_counter() - start:.1f} s")
    return accuracy


def _digits_data():
    """Return the digits as the demo splits them: (X_train, y_train), (X_test, y_test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = (digits.images / 16.0)[:, None].astype(np.float64)  # (N, 1, 8, 8)
    X_train, X_test, y_train, y_test = train_test_split(
        X, digits.target, test_size=0.2, random_state=0, stratify=digits.target)
    return (X_train, y_train), (X_test, y_test)


def distributed_digits(comm, n_iterations=30, out=print):
    """Run the demo's Newton-CG on the digits, data-parallel over the ranks of ``comm``.

    Each rank keeps every size-th training image (its shard); Newton-CG runs with
    ``comm`` (every rank subsamples its own shard). Returns ``(test accuracy,
    whether every rank ended with the same parameters)``.
    """
    import hashlib

    rank, size = comm.Get_rank(), comm.Get_size()
    (X_train, y_train), (X_test, y_test) = _digits_data()
    mine = (X_train[rank::size], y_train[rank::size])
    model = Sequential(Conv2d(1, 16, 3, padding=1), ReLU(), MaxPool2d(2),
                       Conv2d(16, 32, 3, padding=1), ReLU(), MaxPool2d(2),
                       Flatten(), Linear(32 * 2 * 2, 10), input_shape=(1, 8, 8))
    out(f"Newton-CG on the digits over {size} MPI ranks: rank shards of "
        f"{comm.allgather(len(mine[0]))} training images, a fresh 20% subsample of each "
        "shard per iteration")
    start = time.perf_counter()
    optimizer = NewtonCG(model, CrossEntropyLoss(), C=1000.0, subsample=0.2, cg_maxiter=50,
                         seed=0, comm=comm)
    theta, history = optimizer.fit(model.init_params(seed=0), mine, n_iterations=n_iterations,
                                   verbose=out is print and rank == 0)
    digest = hashlib.sha256(theta.tobytes()).hexdigest()
    same = len(set(comm.allgather(digest))) == 1
    accuracy = NewtonCG(model, CrossEntropyLoss()).evaluate(theta, (X_test, y_test))
    out(f"test accuracy {accuracy:.4f} after {len(history)} iterations, "
        f"{time.perf_counter() - start:.1f} s; every rank ended with the same parameters: "
        f"{same}")
    return accuracy, same


def _run_distributed(ranks):
    """Run the distributed demo: under mpiexec already, or launch ``ranks`` processes."""
    try:
        from mpi4py import MPI
    except ImportError:
        print("the distributed demo needs mpi4py and an MPI library: pip install '.[mpi]'")
        return 1
    comm = MPI.COMM_WORLD
    if comm.Get_size() > 1:  # a rank of an mpiexec job
        out = print if comm.Get_rank() == 0 else (lambda *_: None)
        accuracy, same = distributed_digits(comm, out=out)
        return 0 if accuracy >= 0.97 and same else 1
    import os
    import shutil
    import subprocess
    import sys

    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep
                           + os.environ.get("PATH", ""))
    if mpiexec is None:
        print("no mpiexec found: pip install mpich (or run under your MPI's mpiexec)")
        return 1
    # python -m mpi4py: an exception on one rank aborts them all instead of a hang
    command = [mpiexec, "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m", "ghess",
               "demo", "--distributed"]
    print("+ " + " ".join(command), flush=True)
    return subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1")).returncode


def main(argv=()):
    """Entry point of ``python -m ghess [demo|config]``."""
    parser = argparse.ArgumentParser(prog="python -m ghess",
                                     description="ghess worked example")
    parser.add_argument("command", nargs="?", default="demo", choices=["demo", "config"])
    parser.add_argument("--output", default="ghess_spectrum.png",
                        help="where to write the spectral density plot")
    parser.add_argument("--distributed", action="store_true",
                        help="the digits Newton-CG over MPI ranks (needs '.[mpi]')")
    parser.add_argument("--ranks", type=int, default=2,
                        help="MPI ranks to launch for --distributed (default 2)")
    args = parser.parse_args(list(argv))
    if args.command == "config":
        show_config()
        return 0
    if args.distributed:
        return _run_distributed(args.ranks)
    start = time.perf_counter()
    err = hessian_blocks_example()
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("\n(scikit-learn is not installed: pip install '.[demo]' for the digits demo; "
              "a synthetic problem stands in)")
        newton_cg_example()
        accuracy = 1.0
    else:
        accuracy = digits_example(args.output)
    print(f"\ndemo finished in {time.perf_counter() - start:.1f} s")
    return 0 if err < 1e-6 and accuracy >= 0.97 else 1
