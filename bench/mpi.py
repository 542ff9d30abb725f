#!/usr/bin/env python
"""Data-parallel scaling over MPI: ranks against threads, bytes per product, and a model.

Usage::

    python bench/mpi.py                                  # CNN-C (256) and MLP-M (1024), float32
    python bench/mpi.py --problems CNN-C --dtypes float64 --output /tmp/mpi

Needs mpi4py and an ``mpiexec`` (``pip install ".[mpi]"``). Four configurations run
the same operations on the same data (``bench/problems.py``, seed 0):

- ``1 rank`` and ``2 ranks``: ``mpiexec -n P python -m mpi4py``, one thread and one
  core per rank, each rank holding a contiguous shard and passing ``comm=``;
- ``1 proc, 1 thr`` and ``1 proc, 2 thr``: one process without MPI.

Operations: GGN and Hessian products (stored mode, one vector), loss+gradient, and a
Newton-CG iteration (``NewtonCG.step``: the objective, the GGN on a 20% subsample,
exactly ``CG_PRODUCTS`` CG products, the line search). A sample is the slowest rank's
time of one call, all ranks starting together after a barrier; the report gives
medians. A counting wrapper around the communicator records every collective of one
call and the bytes each rank sends in it.

The model: on P ranks one call costs ``T_c(N / P)``, the one-process one-thread time on
a shard of that size (measured here at every shard size down to one sample), plus the
collectives the counting wrapper recorded, each at ``alpha`` per message and ``beta``
per byte (ghess's reduction is a reduce-scatter and an allgather by hand: ``2 (P - 1)``
messages and ``2 (P - 1) / P`` of the vector's bytes per rank; a small one, one
allgather). ``alpha`` and ``beta``
are fitted to the reduction's measured times on 2 ranks here (shared memory), and the
model is also given for a cluster network with the ``NETWORK`` figures (an assumption,
stated in the report). It is checked against the 2-rank measurement. Results:
``MPI.md`` and ``mpi.json`` in ``--output`` (default ``bench/``).
"""

import argparse
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == HERE:
    sys.path[0] = ROOT
elif ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# none of these imports numpy: the worker pins itself to its core first
from bench import _internals, timing  # noqa: E402
from bench.report import cpu_info  # noqa: E402

OPERATIONS = ("GGN product", "Hessian product", "loss+grad", "Newton-CG iteration")
#: samples per problem: CNN-C at 256, MLP-M at its bench/run.py batch (tiny-cnn: tests)
BATCHES = {"CNN-C": 256, "MLP-M": 1024, "tiny-cnn": 16}
#: CG products in the timed Newton-CG iteration (cg_maxiter; the tolerance is never met)
CG_PRODUCTS = 10
#: rank counts of the model, and the data-set scales (1x and 10x the batch)
MODEL_RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DATA_SCALES = (1, 10)
#: the assumed cluster network: latency per message (s) and bytes per second per rank
NETWORK = {"alpha": 2e-6, "bandwidth": 12e9}
#: vector lengths (float64 items) at which the reduction itself is timed
REDUCTION_SIZES = (1, 64, 1024, 16384, 131072, 1048576)


# -- the worker: one configuration ---------------------------------------------------

class CountingComm:
    """An mpi4py communicator that records every collective and the bytes this rank sends.

    ``log`` holds ``(kind, payload bytes)``: the vector's bytes for ``Alltoallv`` and
    ``Allgatherv`` (a reduction's two halves), a rank's bytes for ``Allgather`` (a small
    array's reduction), a pickled object's for the lower-case collectives; ``sent`` the
    bytes this rank hands to the others.
    """

    def __init__(self, comm):
        self._comm, self.log, self.sent = comm, [], 0
        self._size, self._rank = comm.Get_size(), comm.Get_rank()

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def Alltoallv(self, send, recv):  # noqa: N802 (mpi4py's name)
        """Record the reduce-scatter half of a reduction."""
        array, (counts, _) = send
        self.log.append(("Alltoallv", array.nbytes))
        self.sent += (sum(counts) - counts[self._rank]) * array.itemsize
        return self._comm.Alltoallv(send, recv)

    def Allgather(self, send, recv):  # noqa: N802
        """Record a small array's reduction (gathered whole)."""
        self.log.append(("Allgather", send.nbytes))
        self.sent += send.nbytes * (self._size - 1)
        return self._comm.Allgather(send, recv)

    def Allgatherv(self, send, recv):  # noqa: N802
        """Record the allgather half of a reduction."""
        self.log.append(("Allgatherv", recv[0].nbytes))
        self.sent += send.nbytes * (self._size - 1)
        return self._comm.Allgatherv(send, recv)

    def Bcast(self, buf, root=0):  # noqa: N802
        """Record a broadcast of an array."""
        self.log.append(("Bcast", buf.nbytes))
        self.sent += buf.nbytes * (self._size - 1) if self._rank == root else 0
        return self._comm.Bcast(buf, root=root)

    def _object(self, kind, obj, copies):
        size = len(pickle.dumps(obj))
        self.log.append((kind, size))
        self.sent += size * copies

    def allgather(self, obj):
        """Record an allgather of a Python object."""
        self._object("allgather", obj, self._size - 1)
        return self._comm.allgather(obj)

    def allreduce(self, obj, op=None):
        """Record an allreduce of a Python object."""
        self._object("allreduce", obj, 1)
        return self._comm.allreduce(obj) if op is None else self._comm.allreduce(obj, op=op)

    def bcast(self, obj, root=0):
        """Record a broadcast of a Python object."""
        self._object("bcast", obj, (self._size - 1) if self._rank == root else 0)
        return self._comm.bcast(obj, root=root)


def operations(setup, data, comm, threads, ops):
    """Return ``{op: callable}`` on ``data`` (this rank's shard), each with ``comm``."""
    import ghess

    model, loss, theta, v = setup.model, setup.loss, setup.theta, setup.v
    fns = {}
    if "GGN product" in ops:
        G = ghess.GGNLinearOperator(model, loss, theta, data, mode="stored", comm=comm,
                                    n_threads=threads)
        fns["GGN product"] = lambda: G.matvec(v)
    if "Hessian product" in ops:
        H = ghess.HessianLinearOperator(model, loss, theta, data, mode="stored", comm=comm,
                                        n_threads=threads)
        fns["Hessian product"] = lambda: H.matvec(v)
    if "loss+grad" in ops:
        fns["loss+grad"] = lambda: ghess.loss_and_grad(model, loss, theta, data, comm=comm,
                                                       n_threads=threads)
    if "Newton-CG iteration" in ops:
        def iteration():
            opt = ghess.NewtonCG(model, loss, C=1.0, subsample=0.2, cg_rtol=1e-30,
                                 cg_maxiter=CG_PRODUCTS, mode="stored", seed=0, comm=comm,
                                 n_threads=threads)
            opt.step(theta, data)
        fns["Newton-CG iteration"] = iteration
    return fns


def timed(fn, comm, budget):
    """Median over repeats of the slowest rank's time of ``fn()`` (ranks start together)."""
    import numpy as np

    def once():
        if comm is not None:
            comm.Barrier()
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        return t if comm is None else comm.allreduce(t, op=_max())

    first = once()  # warm-up, and the repeat count (the same on every rank: a max)
    repeats = max(5, min(40, int(budget / max(first, 1e-6))))
    return float(np.median([once() for _ in range(repeats)]))


def _max():
    from mpi4py import MPI

    return MPI.MAX


def shard_of(n, rank, size):
    """Return a rank's contiguous slice of ``n`` samples (the first ranks get one more)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def run_worker(args):
    """Time every operation in this process (a rank, or a lone process); print RESULT."""
    comm = None
    if args.mpi:
        from mpi4py import MPI
        comm = CountingComm(MPI.COMM_WORLD)
    rank, size = (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())
    timing.pin_to_cores(args.threads, skip=rank * args.threads)  # rank r on its own core(s)
    from bench.problems import make_setup

    result = {"problem": args.problem, "dtype": args.dtype, "threads": args.threads,
              "ranks": size, "mpi": bool(args.mpi), "times": {}, "collectives": {},
              "sent": {}, "shards": {}}
    for n in args.sizes:
        setup = make_setup(args.problem, args.dtype, args.threads, batch=n)
        s = shard_of(n, rank, size)
        data = (setup.X[s], setup.y[s])
        fns = operations(setup, data, comm, args.threads, args.operations)
        for op, fn in fns.items():
            key = f"{op} @{n}"
            result["times"][key] = timed(fn, comm, args.budget)
            if comm is not None:  # one more call, its collectives recorded
                comm.log, comm.sent = [], 0
                fn()
                result["collectives"][key], result["sent"][key] = list(comm.log), comm.sent
                comm.log = []  # the next timings are not this call's
        if comm is not None:
            result["shards"][n] = comm.allgather(data[0].shape[0])
    if comm is not None and args.reduction:
        result["reduction"] = reduction_times(comm, args.budget)
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


def reduction_times(comm, budget):
    """Median time of ghess's reduction of a float64 vector, per length in bytes."""
    import numpy as np

    times = {}
    for n in REDUCTION_SIZES:
        x = np.ones(n)
        times[8 * n] = timed(lambda x=x: _internals.rank_order_sum(comm._comm, x), comm,
                             budget / 4)
    return times


# -- the driver ----------------------------------------------------------------------

def launch(problem, dtype, threads, ranks, sizes, args, reduction=False):
    """Run one worker configuration (``ranks`` None: a lone process); return its RESULT."""
    worker = [__file__, "--worker", "--problem", problem, "--dtype", dtype, "--threads",
              str(threads), "--budget", str(args.budget), "--sizes", *map(str, sizes),
              "--operations", *args.operations]
    if ranks is None:
        command = [sys.executable, *worker]
    else:
        command = [args.mpiexec, "-n", str(ranks), sys.executable, "-m", "mpi4py", *worker,
                   "--mpi"] + (["--reduction"] if reduction else [])
    proc = subprocess.run(command, env=timing.thread_env(threads), capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"the worker failed: {' '.join(command)}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def fit_network(reduction):
    """Fit ``t = 2 alpha + bytes beta`` (the reduction on 2 ranks) by least squares."""
    import numpy as np

    b = np.array([float(k) for k in reduction])
    t = np.array(list(reduction.values()))
    A = np.stack([2 * np.ones_like(b), b], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(A / t[:, None], np.ones_like(t), rcond=None)
    return {"alpha": max(float(alpha), 0.0), "bandwidth": 1.0 / max(float(beta), 1e-15)}


def collective_time(kind, payload, ranks, net):
    """Modelled seconds of one collective on ``ranks`` ranks (``net``: alpha, bandwidth)."""
    if ranks == 1:
        return 0.0
    alpha, beta = net["alpha"], 1.0 / net["bandwidth"]
    steps = math.ceil(math.log2(ranks))
    if kind in ("Alltoallv", "Allgatherv"):  # pairwise: P - 1 messages of 1/P each
        return (ranks - 1) * (alpha + payload / ranks * beta)
    if kind in ("allgather", "Allgather"):  # ring: P - 1 messages of the object
        return (ranks - 1) * (alpha + payload * beta)
    if kind == "allreduce":  # recursive doubling of a scalar
        return steps * (alpha + payload * beta)
    return steps * (alpha + payload * beta)  # bcast / Bcast: a binomial tree


def model_time(compute, log, ranks, net):
    """Modelled seconds of one call: its compute on the shard plus its collectives."""
    return compute + sum(collective_time(kind, payload, ranks, net) for kind, payload in log)


def shard_sizes(batch):
    """Shard sizes the model needs: batch * scale / P for every scale and rank count."""
    return sorted({max(1, math.ceil(batch * scale / p))
                   for scale in DATA_SCALES for p in MODEL_RANKS}, reverse=True)


def write_report(machine, runs, path_md, path_json):
    """Write ``MPI.md`` (the tables) and ``mpi.json`` (every measurement)."""
    with open(path_json, "w") as fh:
        json.dump({"machine": machine, "runs": runs}, fh, indent=1)
    lines = ["# Data-parallel scaling over MPI", "",
             f"CPU: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, vector ISA: "
             f"{' '.join(machine['isa'])}; ghess's ISA levels: {machine['ghess_isa']}; "
             f"{machine['mpi']}. Generated by `python bench/mpi.py`: medians of the "
             "slowest rank's time per call; one thread and one core per rank. `1 rank` "
             "is `mpiexec -n 1` with `comm=`, `1 proc` a plain process without MPI. "
             f"A Newton-CG iteration runs exactly {CG_PRODUCTS} CG products (the "
             "objective, the GGN on a 20% subsample, CG, the line search).", ""]
    for key, run in runs.items():
        problem, dtype = key.split(" ")
        batch = BATCHES[problem]
        lines += measured_table(problem, dtype, batch, run)
        lines += model_table(problem, dtype, batch, run)
    with open(path_md, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def measured_table(problem, dtype, batch, run):
    """Return the side-by-side table of a problem: four configurations, bytes per call."""
    cols = ("1 rank", "2 ranks", "1 proc, 1 thr", "1 proc, 2 thr")
    lines = [f"## {problem}, N = {batch}, {dtype}", "",
             f"Shards on 2 ranks: {run['2 ranks']['shards'][str(batch)]}.", "",
             "| operation | " + " | ".join(f"{c} (ms)" for c in cols)
             + " | 2 ranks / 1 rank | 2 thr / 1 thr | bytes sent per rank (2 ranks) "
             "| collectives |", "|---" * 9 + "|"]
    for op in OPERATIONS:
        key = f"{op} @{batch}"
        if key not in run["1 rank"]["times"]:
            continue
        t = {c: run[c]["times"][key] for c in cols}
        log = run["2 ranks"]["collectives"][key]
        kinds = {}
        for kind, _ in log:
            kinds[kind] = kinds.get(kind, 0) + 1
        lines.append(f"| {op} | " + " | ".join(f"{1e3 * t[c]:.2f}" for c in cols)
                     + f" | {t['1 rank'] / t['2 ranks']:.2f}x"
                     f" | {t['1 proc, 1 thr'] / t['1 proc, 2 thr']:.2f}x"
                     f" | {run['2 ranks']['sent'][key]:,}"
                     f" | {', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))} |")
    return lines + [""]


def model_table(problem, dtype, batch, run):
    """Modelled speed-ups at 1 to 256 ranks, for the batch and 10x it, two networks."""
    fitted = run["network"]
    lines = [f"### {problem}, {dtype}: modelled speed-up over 1 rank", "",
             f"Compute: the 1-thread time on a shard of N / P samples, measured. "
             f"Collectives: those of the 2-rank run, each at alpha per message and 1/bandwidth "
             f"per byte; fitted to the reduction on 2 ranks here (shared memory: alpha "
             f"{1e6 * fitted['alpha']:.1f} us, {fitted['bandwidth'] / 1e9:.1f} GB/s), and "
             f"assumed for a cluster network (alpha {1e6 * NETWORK['alpha']:.0f} us, "
             f"{NETWORK['bandwidth'] / 1e9:.0f} GB/s per rank). Each rank as fast as one "
             "core here.", ""]
    check = []
    for op in OPERATIONS:
        key = f"{op} @{batch}"
        if key not in run["1 rank"]["times"]:
            continue
        log = run["2 ranks"]["collectives"][key]
        compute = run["1 proc, 1 thr"]["times"]
        half = compute[f"{op} @{math.ceil(batch / 2)}"]
        predicted = model_time(half, log, 2, fitted)
        check.append(f"{op} {1e3 * predicted:.2f} ms modelled vs "
                     f"{1e3 * run['2 ranks']['times'][key]:.2f} ms measured")
    lines += ["Check on 2 ranks: " + "; ".join(check) + ".", "",
              "| operation | N | network | " + " | ".join(f"P={p}" for p in MODEL_RANKS)
              + " |", "|---" * (3 + len(MODEL_RANKS)) + "|"]
    for op in OPERATIONS:
        if f"{op} @{batch}" not in run["1 rank"]["times"]:
            continue
        log = run["2 ranks"]["collectives"][f"{op} @{batch}"]
        compute = run["1 proc, 1 thr"]["times"]
        for scale in DATA_SCALES:
            n = batch * scale
            base = compute[f"{op} @{n}"]
            for name, net in (("here", fitted), ("cluster", NETWORK)):
                cells = []
                for p in MODEL_RANKS:
                    t = model_time(compute[f"{op} @{math.ceil(n / p)}"], log, p, net)
                    cells.append(f"{base / t:.1f}")
                lines.append(f"| {op} | {n} | {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def mpi_version(mpiexec):
    """Return the MPI library's name and version, from ``mpiexec --version``."""
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "MPI unknown"
    for line in out.splitlines():
        if "Version:" in line:
            return "MPICH " + line.split(":", 1)[1].strip()
    return out.splitlines()[0] if out else "MPI unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", nargs="+", default=["CNN-C", "MLP-M"],
                        choices=list(BATCHES))
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--operations", nargs="+", default=list(OPERATIONS),
                        choices=OPERATIONS)
    parser.add_argument("--budget", type=float, default=1.0,
                        help="seconds of timed repeats per operation and size")
    parser.add_argument("--output", default=HERE, help="directory for MPI.md and mpi.json")
    parser.add_argument("--mpiexec", default=shutil.which(
        "mpiexec", path=os.path.dirname(sys.executable) + os.pathsep
        + os.environ.get("PATH", "")))
    # the worker's
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mpi", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reduction", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--problem", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", nargs="+", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return 0
    if args.mpiexec is None:
        raise SystemExit("no mpiexec: pip install mpich mpi4py (the 'mpi' extra)")
    os.makedirs(args.output, exist_ok=True)
    machine = dict(cpu_info(), ghess_isa=_internals.ghess_isa(), mpi=mpi_version(args.mpiexec))
    runs = {}
    for problem in args.problems:
        batch = BATCHES[problem]
        for dtype in args.dtypes:
            run = {
                "1 rank": launch(problem, dtype, 1, 1, [batch], args),
                "2 ranks": launch(problem, dtype, 1, 2, [batch], args, reduction=True),
                "1 proc, 2 thr": launch(problem, dtype, 2, None, [batch], args),
                # the model's compute: every shard size, one thread
                "1 proc, 1 thr": launch(problem, dtype, 1, None, shard_sizes(batch), args),
            }
            run["network"] = fit_network(run["2 ranks"]["reduction"])
            runs[f"{problem} {dtype}"] = run
            t = run["2 ranks"]["times"]
            print(f"{problem} {dtype}: 2 ranks " + ", ".join(
                f"{k.split(' @')[0]} {1e3 * v:.2f} ms" for k, v in t.items()), flush=True)
            write_report(machine, runs, os.path.join(args.output, "MPI.md"),
                         os.path.join(args.output, "mpi.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
