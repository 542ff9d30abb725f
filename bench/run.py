#!/usr/bin/env python
"""Side-by-side benchmark of ghess against NumPy, PyTorch, JAX and curvlinops.

Usage::

    python bench/run.py                      # every problem, float32/64, 1 and 2 threads
    python bench/run.py --quick              # tiny problems, to prove the script works
    python bench/run.py --problems MLP-S --dtypes float64 --threads 1 --output /tmp/b

The suite
---------
Each configuration (problem, dtype, threads) runs in its own worker process. The
worker restricts itself to ``threads`` CPU cores (``os.sched_setaffinity``) and the
driver sets the OpenMP/BLAS thread counts in its environment, all before numpy is
imported. The core restriction applies to every implementation alike; it is what
bounds XLA, whose CPU thread pool has no size flag (with one thread the worker also
gets ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``).

Implementations, all on the same weights, data and vectors (the cross-entropy
loss with ``reduction="sum"``):

- ghess: forward, loss+grad, GGN and Hessian products in stored and recompute
  mode, GGN matmat with 16 columns, the empirical Fisher product (stored), Jacobian
  products, per-sample Jacobians, and the operator builds;
- numpy: the pure-NumPy reference products of ``ghess.testing``;
- torch.func: GGN product (jvp, closed-form softmax B, vjp), Hessian product
  (jvp of grad), empirical Fisher product (jvp, B_n = g_n g_n^T, vjp: curvlinops'
  pseudo-loss), Jacobian product, per-sample Jacobians ``vmap(jacrev)``; and
  PyTorch's ordinary forward and ``loss.backward()`` (named "torch");
- JAX: the same operations, each under ``jax.jit``, in float64 with x64 enabled;
- curvlinops: ``GGNLinearOperator`` and ``HessianLinearOperator`` multiplied by a
  torch tensor.

PyTorch, JAX and curvlinops are optional: a competitor that cannot be imported is
skipped and named in the report. Every result is checked against ghess (relative
2-norm error at most 1e-10 in float64, 1e-3 in float32) before anything is timed.

Per-sample Jacobians are dense (N, K, n_params) arrays. When that exceeds 2 GiB in
float64 (the MLPs), every implementation computes them for the same first
``n`` samples, the most whose float64 output fits in 256 MiB; the report names
``n``. torch.func and JAX return one block per parameter tensor; their timings
exclude the concatenation into one array (done only for the agreement check).

Measurements
------------
- time: median over repeats after a warm-up;
- interleaved: every operation of a worker is timed in rounds, one run of each per
  round, so that ratios compare timings taken under the same machine conditions; with
  2 threads a library's operations run together in each round, after the previous
  library's thread pool has stopped spinning (``interleaved_times``, ``SETTLE``);
- flops counted per implementation (ghess from its layers, PyTorch by
  FlopCounterMode, JAX by XLA's cost analysis; nominal multiples of the forward
  GEMM work for the NumPy reference), as a fraction of a 1024 x 784 x 512 GEMM
  timed in the same worker; per-sample Jacobians report their output rate in GB/s;
- peak extra resident memory: after all timings, each operation runs once more
  while a thread samples the resident set size every 0.5 ms (and, where Linux
  lets a process reset it, the kernel's high-water mark is read too); reported is
  the peak minus the resident size just before the call.

The report (``RESULTS.md``, ``results.json``; ``--quick`` writes ``RESULTS_quick.md``)
opens with a summary of the targets (``bench/report.py``).

The code: ``bench/problems.py`` (the problems), ``bench/competitors/`` (one module per
implementation), ``bench/flops.py``, ``bench/gemm.py`` (GEMM rates), ``bench/timing.py``
(worker set-up, interleaved rounds, memory) and ``bench/report.py`` (the targets and the
report); this script is the entry point and the worker.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# ``bench`` is a package of the repository root: run as a script, this file's directory
# would otherwise stand first on the path, its modules shadowing top-level ones
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == HERE:
    sys.path[0] = ROOT
elif ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# none of these imports numpy: the worker pins itself to its cores first
from bench import timing  # noqa: E402
from bench.competitors import COMPETITORS, competitor_versions  # noqa: E402
from bench.competitors.common import UNCHECKED_OPS, Unavailable, to_numpy  # noqa: E402
from bench.flops import FLOPS_PER_FORWARD, forward_flops  # noqa: E402
from bench.gemm import blas_rates, gemm_one_thread  # noqa: E402
from bench.problems import DEFAULT_PROBLEMS, QUICK_PROBLEMS, make_setup  # noqa: E402
from bench.report import TARGETS, judge, machine_info, write_report  # noqa: E402
from bench.timing import (  # noqa: E402
    SETTLE,
    PeakMemory,
    interleaved_times,
    median_time,
    pin_to_cores,
    thread_env,
)

#: seconds of timed repeats per operation with ``--quick``: it proves the script runs,
#: and its figures are not read
QUICK_BUDGET = 0.05


def run_config(problem, dtype_name, threads, repeats, cores=None):
    """Benchmark one configuration in THIS process; return a dict of results."""
    import numpy as np
    from scipy.sparse.linalg import LinearOperator  # noqa: F401  (import cost outside timings)

    import ghess

    started = time.perf_counter()
    s = make_setup(problem, dtype_name, threads)
    model, dtype = s.model, s.theta.dtype
    F = forward_flops(model, s.X.shape[0])
    n_jac = s.Xj.shape[0]
    results = {"problem": problem, "dtype": dtype_name, "threads": threads, "cores": cores,
               "n_params": model.n_params, "batch": s.X.shape[0],
               "conv": any(isinstance(layer, ghess.Conv2d) for layer in model.layers),
               "forward_flops": F, "jacobian_samples": n_jac,
               "jacobian_bytes": n_jac * model.n_outputs * model.n_params * dtype.itemsize,
               "timings": {}, "repeats": {}, "kernel_share": {}, "operations": {}, "flops": {},
               "flops_source": {}, "peak_memory_mib": {}, "agreement": {}, "skipped": {}}

    tol = 1e-10 if dtype == np.float64 else 1e-3

    def relative_error(value, ref):
        if isinstance(ref, tuple):  # (loss, gradient): the worse of the two
            return max(relative_error(a, b) for a, b in zip(value, ref))
        return float(np.linalg.norm(np.subtract(value, ref)) / np.linalg.norm(ref))

    def agree(name, value, ref):
        rel = relative_error(value, ref)
        results["agreement"][name] = rel
        if not rel <= tol:
            raise AssertionError(f"{name} disagrees with ghess: relative error {rel:.2e}")

    # every competitor is set up and checked against ghess before anything is timed
    ops, refs = {}, {}
    for label, competitor in COMPETITORS:
        try:
            entries = competitor(s)
        except Unavailable as exc:
            results["skipped"][label] = str(exc)
            continue
        for name, entry in entries.items():
            if entry.op in UNCHECKED_OPS:
                continue
            value = (entry.to_numpy or to_numpy)(entry.fn())
            if entry.op in refs:
                agree(name, value, refs[entry.op])
            else:
                refs[entry.op] = value
        ops.update(entries)
    results["notes"] = {name: entry.note for name, entry in ops.items() if entry.note}
    results["versions"] = competitor_versions()

    # the machine's GEMM throughput on a 1024 x 784 x 512 product, measured before and
    # after the timed rounds; the faster of the two is the peak (this VM's speed drifts,
    # and a low reading would flatter every "fraction of peak")
    rng = np.random.default_rng(1)
    a = rng.normal(size=(1024, 784)).astype(dtype)
    b = rng.normal(size=(784, 512)).astype(dtype)
    # (with 2 threads each measurement below starts once the last library's pool idles)
    settle = SETTLE if threads > 1 else 0.0
    time.sleep(settle)
    t_gemm, _ = median_time(lambda: a @ b, repeats)
    # with 2 threads, the same GEMM on 1: what the machine itself gains from the second
    # core in this worker (a core taken by another tenant shows here, not only in ghess)
    t_gemm_1 = gemm_one_thread(a, b, repeats) if threads > 1 else None
    # per core only: with 2 threads each library's pool would compete with the others'
    # still-spinning OpenMP pools, and the figures would measure that contention
    results["blas_rates"] = blas_rates(dtype) if threads == 1 else {}

    # builds (seconds each on big problems) are timed on their own; the rest interleaved
    builds = {name: entry.fn for name, entry in ops.items() if entry.op in UNCHECKED_OPS}
    time.sleep(settle)
    timed = {name: median_time(fn, 3) + (None,) for name, fn in builds.items()}
    timed.update(interleaved_times({name: entry.fn for name, entry in ops.items()
                                    if name not in builds}, repeats, settle=settle))
    time.sleep(settle)
    t_gemm = min(t_gemm, median_time(lambda: a @ b, repeats)[0])
    results["gemm_gflops"] = 2 * 1024 * 784 * 512 / t_gemm / 1e9
    if t_gemm_1 is not None:
        t_gemm_1 = min(t_gemm_1, gemm_one_thread(a, b, repeats))
        results["gemm_gflops_1thread"] = 2 * 1024 * 784 * 512 / t_gemm_1 / 1e9
    for name, entry in ops.items():
        (results["timings"][name], results["repeats"][name],
         results["kernel_share"][name]) = timed[name]
        results["operations"][name] = entry.op
        if entry.flops is not None:
            results["flops"][name] = entry.flops
            results["flops_source"][name] = entry.flops_source
        elif entry.op in FLOPS_PER_FORWARD:
            results["flops"][name] = FLOPS_PER_FORWARD[entry.op] * F
            results["flops_source"][name] = "nominal"

    gc.collect()  # once: 0.2 s a call with torch and JAX loaded; refcounts free the rest
    memory = PeakMemory()
    for name, entry in ops.items():
        results["peak_memory_mib"][name] = memory.measure(entry.fn) / 2**20
    results["elapsed"] = time.perf_counter() - started
    return results


def run_worker(problem, dtype, threads, repeats, budget):
    """Spawn one configuration's worker; return its result dict."""
    proc = subprocess.run(
        [sys.executable, __file__, "--repeats", str(repeats), "--budget", str(budget),
         "--worker", problem, dtype, str(threads)],
        env=thread_env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(proc.returncode)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", nargs="+", default=list(DEFAULT_PROBLEMS))
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed repeats per operation (at least --repeats runs; "
                             f"default {timing.BUDGET}, or {QUICK_BUDGET} with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny problems only, float64, 1 thread, a short budget")
    parser.add_argument("--output", default=None,
                        help="directory for the report (default: bench/, or with --quick "
                             "a new temporary directory, so a trial run never overwrites "
                             "committed results)")
    parser.add_argument("--worker", nargs=3, metavar=("PROBLEM", "DTYPE", "THREADS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.budget is None:
        args.budget = QUICK_BUDGET if args.quick else timing.BUDGET
    timing.BUDGET = args.budget
    if args.worker:
        threads = int(args.worker[2])
        cores = pin_to_cores(threads)  # before numpy, torch or JAX start their threads
        result = run_config(args.worker[0], args.worker[1], threads, args.repeats, cores)
        print("RESULT " + json.dumps(result))
        return 0

    if args.quick:
        args.problems, args.dtypes, args.threads, args.repeats = (list(QUICK_PROBLEMS),
                                                                  ["float64"], [1], 3)
    if args.output is None:
        args.output = tempfile.mkdtemp(prefix="ghess-bench-") if args.quick else HERE
        print(f"report directory: {args.output}", flush=True)
    os.makedirs(args.output, exist_ok=True)
    all_results = []
    for problem in args.problems:
        for dtype in args.dtypes:
            for threads in args.threads:
                result = run_worker(problem, dtype, threads, args.repeats, args.budget)
                all_results.append(result)
                verdicts = [judge(result, target) for target in TARGETS]
                passes = [v["pass"] for v in verdicts if v is not None and v["pass"] is not None]
                met, judged = sum(passes), len(passes)
                ggn = result["timings"]["ghess GGN product (stored)"]
                print(f"{problem:11s} {dtype:8s} {threads} thr: GGN {1e3 * ggn:8.3f} ms, "
                      f"targets met {met}/{judged}, {result['elapsed']:.0f} s", flush=True)
                # after every configuration: an interrupted run keeps what it measured
                name = "RESULTS_quick" if args.quick else "RESULTS"
                title = "ghess benchmark results" + (" (--quick)" if args.quick else "")
                write_report(machine_info(all_results), all_results,
                             os.path.join(args.output, name + ".md"),
                             os.path.join(args.output, name.lower() + ".json"), title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
