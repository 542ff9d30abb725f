"""Run under ``mpiexec -n P python -m mpi4py``: distributed results against one process.

Every rank builds the same data (seeded), keeps its shard (unequal sizes, and with
P = 3 one rank's shard is empty), and compares each distributed quantity with the
single-process one on the whole data (1e-12, float64), and across ranks bit for
bit (a hash of the bytes, gathered). Rank 0 prints "OK ranks [0, 1, ...]" when
every rank has passed; any failure
raises, which ``python -m mpi4py`` turns into an abort of every rank.
Usage: distributed_checks.py <case>; cases: "agree", and the fault cases below.
"""

import hashlib
import sys

import numpy as np
from mpi4py import MPI
from scipy.sparse.linalg import aslinearoperator, cg

import ghess

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def problem():
    model = ghess.Sequential(ghess.Conv2d(1, 3, 3, padding=1), ghess.Tanh(), ghess.Flatten(),
                             ghess.Linear(3 * 5 * 5, 4), input_shape=(1, 5, 5))
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(29, 1, 5, 5)), rng.integers(0, 4, size=29)
    return model, model.init_params(seed=1) * 2.0, X, y


def shard(n):
    """Unequal shards; the last rank's is empty when there are 3 ranks."""
    bounds = {1: [0, n], 2: [0, 11, n], 3: [0, 17, n, n]}[size]
    return slice(bounds[rank], bounds[rank + 1])


def same_on_every_rank(a):
    digest = hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
    digests = comm.allgather(digest)
    assert len(set(digests)) == 1, f"results differ across ranks: {digests}"


def close(a, b, what, rtol=1e-12):
    err = np.linalg.norm(np.asarray(a) - b) / max(np.linalg.norm(b), 1e-300)
    assert err <= rtol, f"{what}: relative error {err:.2e}"


def reduction():
    """Check the reduction is the rank-order sum, for any length (below the rank count too)."""
    from ghess._distributed import sum_in_rank_order

    for shape in ((1,), (2,), (7, 3), (1000,), (20011,), (3, 4001)):  # small, then sliced
        mine = np.random.default_rng(rank).normal(size=shape) * 10.0 ** rank
        total = sum_in_rank_order(comm, mine)
        expected = comm.allgather(mine)[0].copy()
        for part in comm.allgather(mine)[1:]:
            expected += part
        assert total.shape == shape and np.array_equal(total, expected), shape
        same_on_every_rank(total)
    # several arrays in one reduction: each as if reduced alone
    from ghess._distributed import sum_all_in_rank_order

    arrays = [np.random.default_rng(rank + 10).normal(size=shape) for shape in
              ((3, 3), (1,), (5,), (9000,))]
    for packed, array in zip(sum_all_in_rank_order(comm, arrays), arrays):
        assert np.array_equal(packed, sum_in_rank_order(comm, array))


def agree():
    reduction()
    model, theta, X, y = problem()
    s = shard(len(X))
    mine = (X[s], y[s])
    loss = ghess.CrossEntropyLoss()
    v = np.random.default_rng(2).normal(size=model.n_params)
    value, grad = ghess.loss_and_grad(model, loss, theta, mine, comm=comm)
    ref_value, ref_grad = ghess.loss_and_grad(model, loss, theta, (X, y))
    close(value, ref_value, "loss")
    close(grad, ref_grad, "gradient")
    same_on_every_rank(np.concatenate([[value], grad]))
    for cls in (ghess.GGNLinearOperator, ghess.HessianLinearOperator,
                ghess.EmpiricalFisherLinearOperator):
        for mode in ("stored", "recompute"):
            op = cls(model, loss, theta, mine, mode=mode, chunk_size=5, comm=comm,
                     damping=1e-3)
            ref = cls(model, loss, theta, (X, y), damping=1e-3)
            close(op @ v, ref @ v, f"{cls.__name__} {mode}")
            same_on_every_rank(op @ v)
    # SciPy's CG unchanged on every rank: the same iterates, the same solution
    G = ghess.GGNLinearOperator(model, loss, theta, mine, comm=comm, damping=1e-2)
    x, info = cg(G, -grad, rtol=1e-10)
    assert info == 0
    same_on_every_rank(x)
    close(x, cg(ghess.GGNLinearOperator(model, loss, theta, (X, y), damping=1e-2), -ref_grad,
                rtol=1e-10)[0], "CG solution", 1e-8)  # CG to 1e-10 amplifies rounding
    # the GGN diagonal, and an estimator run SPMD on a distributed operator
    close(ghess.analysis.ggn_diagonal(model, loss, theta, mine, comm=comm),
          ghess.analysis.ggn_diagonal(model, loss, theta, (X, y)), "GGN diagonal")
    top = ghess.analysis.top_eigenvalues(G, k=2)
    same_on_every_rank(top)
    close(top, ghess.analysis.top_eigenvalues(
        ghess.GGNLinearOperator(model, loss, theta, (X, y), damping=1e-2), k=2),
        "top eigenvalues", 1e-9)
    family(model, theta, X, y, s, v)
    estimators(model, theta, mine)
    sum_loss = ghess.MSELoss(reduction="sum")
    Y = np.random.default_rng(3).normal(size=(len(X), 4))
    close(ghess.loss_and_grad(model, sum_loss, theta, (X[s], Y[s]), comm=comm)[1],
          ghess.loss_and_grad(model, sum_loss, theta, (X, Y))[1], "sum reduction")


def family(model, theta, X, y, s, v):
    """Check the MC Fisher and KFAC/EKFAC: the ranks draw the targets of one process."""
    Y = np.random.default_rng(4).normal(size=(len(X), 4))
    B = (np.random.default_rng(5).random(size=(len(X), 4)) < 0.5).astype(float)
    for loss, targets in ((ghess.CrossEntropyLoss(), y), (ghess.MSELoss(), Y),
                          (ghess.BCEWithLogitsLoss(), B)):
        for mode in ("stored", "recompute"):
            op = ghess.FisherMCLinearOperator(model, loss, theta, (X[s], targets[s]),
                                              mc_samples=3, seed=7, mode=mode, chunk_size=4,
                                              comm=comm)
            ref = ghess.FisherMCLinearOperator(model, loss, theta, (X, targets),
                                               mc_samples=3, seed=7)
            close(op @ v, ref @ v, f"MC Fisher {loss!r} {mode}")
            same_on_every_rank(op @ v)
    loss = ghess.CrossEntropyLoss()
    for cls in (ghess.KFACLinearOperator, ghess.EKFACLinearOperator):
        for fisher_type in ("type-2", "mc", "empirical"):
            kw = dict(fisher_type=fisher_type, mc_samples=2 if fisher_type == "mc" else 1,
                      kfac_approx="reduce" if fisher_type == "mc" else "expand", seed=3)
            op = cls(model, loss, theta, (X[s], y[s]), chunk_size=4, comm=comm, **kw)
            ref = cls(model, loss, theta, (X, y), **kw)
            close(op @ v, ref @ v, f"{cls.__name__} {fisher_type}")
            inverse = op.inverse(1e-2) @ v
            close(inverse, ref.inverse(1e-2) @ v, f"{cls.__name__} {fisher_type} inverse",
                  1e-10)
            same_on_every_rank(np.concatenate([op @ v, inverse, [op.logdet]]))


def estimators(model, theta, mine):
    """Check that the analysis helpers agree on every rank whatever the seed."""
    G = ghess.GGNLinearOperator(model, ghess.CrossEntropyLoss(), theta, mine, comm=comm)
    shifted = G + aslinearoperator(0.5 * np.eye(G.shape[0]))  # a SciPy sum: no .comm
    an = ghess.analysis
    for seed in (None, np.random.default_rng(rank)):  # differ by rank unless shared
        same_on_every_rank(np.concatenate([
            an.top_eigenvalues(G, k=2, seed=seed),
            an.top_eigenvalues(shifted, k=2, seed=seed, comm=comm),
            [an.hutchinson_trace(G, 8, seed=seed)[0], an.hutchpp_trace(G, 9, seed=seed)],
            an.hutchinson_diagonal(G, 4, seed=seed),
            an.spectral_density(G, n_vectors=2, n_lanczos=5, seed=seed)[1]]))


def newton():
    """Distributed subsampled Newton-CG: the same parameters on every rank, lower objective."""
    model, theta, X, y = problem()
    s = shard(len(X))
    loss = ghess.CrossEntropyLoss()
    for subsample, preconditioner in ((0.5, None), (12, None), (0.5, "kfac"), (12, "diag")):
        opt = ghess.NewtonCG(model, loss, C=10.0, subsample=subsample, seed=0, comm=comm,
                             preconditioner=preconditioner)
        new, history = opt.fit(theta, (X[s], y[s]), n_iterations=4, verbose=False,
                               validation=(X[s], y[s]))
        same_on_every_rank(new)
        same_on_every_rank(np.array([h.objective for h in history]))
        objective = [h.objective for h in history]
        assert objective[-1] < objective[0]
        # the objective it reports is the whole data's, as one process computes it
        value, _ = ghess.loss_and_grad(model, loss, new, (X, y))
        close(objective[-1], value + 0.5 * float(new @ new) / 10.0, "objective")
        accuracy = (model.forward(new, X).argmax(axis=1) == y).mean()
        close(history[-1]["validation"], accuracy, "validation accuracy")


def newton_reports():
    """Check that only rank 0 prints, and that one rank's callback stop stops every rank."""
    import io

    model, theta, X, y = problem()
    s = shard(len(X))
    out = io.StringIO()
    opt = ghess.NewtonCG(model, ghess.CrossEntropyLoss(), subsample=0.5, seed=0, comm=comm)
    _, history = opt.fit(theta, (X[s], y[s]), n_iterations=5, file=out,
                         callback=lambda theta, record: rank == size - 1 and record is not None
                         and len(opt.history_) == 2)
    assert len(history) == 2, len(history)
    assert (out.getvalue().count("\n") == 3) == (rank == 0), out.getvalue()


def params_differ():
    model, theta, X, y = problem()
    theta = theta + (rank == 1) * 1e-9
    ghess.GGNLinearOperator(model, ghess.CrossEntropyLoss(), theta, (X[shard(len(X))],
                                                                     y[shard(len(X))]),
                            comm=comm)


def params_wrong_length():
    model, theta, X, y = problem()
    if rank == 1:
        theta = theta[:-1]
    ghess.loss_and_grad(model, ghess.CrossEntropyLoss(), theta, (X[:3], y[:3]), comm=comm)


def model_differs():
    model, theta, X, y = problem()
    if rank == 1:
        model = ghess.Sequential(ghess.Conv2d(1, 3, 3, padding=1), ghess.ReLU(),
                                 ghess.Flatten(), ghess.Linear(3 * 5 * 5, 4),
                                 input_shape=(1, 5, 5))
    ghess.loss_and_grad(model, ghess.CrossEntropyLoss(), theta, (X[:3], y[:3]), comm=comm)


def bad_shard():
    model, theta, X, y = problem()
    if rank == 1:
        X = X[:, :, :4]  # the wrong feature shape on one rank
    ghess.loss_and_grad(model, ghess.CrossEntropyLoss(), theta, (X[:3], y[:3]), comm=comm)


def newton_bad_shard():
    model, theta, X, y = problem()
    if rank == 1:
        y = y + 10  # labels out of range on one rank
    ghess.NewtonCG(model, ghess.CrossEntropyLoss(), comm=comm).fit(
        theta, (X[:5], y[:5]), n_iterations=1, verbose=False)


def raises_mid_run():
    model, theta, X, y = problem()
    G = ghess.GGNLinearOperator(model, ghess.CrossEntropyLoss(), theta, (X[:3], y[:3]),
                                comm=comm)
    if rank == 1:
        raise RuntimeError("rank 1 fails between two products")
    G @ np.ones(model.n_params)  # rank 0 would wait here forever without python -m mpi4py


if __name__ == "__main__":
    globals()[sys.argv[1]]()
    done = comm.gather(rank, root=0)  # one line from rank 0: ranks' output interleaves
    if rank == 0:
        print(f"OK ranks {done}", flush=True)
