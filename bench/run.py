#!/usr/bin/env python
"""Side-by-side benchmark of ghess against the pure-NumPy reference and PyTorch.

Usage::

    python bench/run.py                      # every problem, float32/64, 1 and 2 threads
    python bench/run.py --quick              # a tiny problem, to prove the script works
    python bench/run.py --problems MLP-S --dtypes float64 --threads 1

Each configuration (problem, dtype, threads) runs in its own process, which pins
its thread count BEFORE numpy is imported. Within that process every
implementation runs on the same weights, data and vectors, after a check that
they agree. Timings are medians over repeats after a warm-up; figures are
reported as ratios to ghess's stored-mode GGN product of the same run, and a
GEMM of the machine is timed in the same run to read them as fractions of peak.
Results go to bench/RESULTS.md and bench/results.json.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

def _problems():
    """Name -> (model factory, batch); PyTorch layouts, NCHW."""
    import ghess as G

    return {
        "MLP-S": (lambda: G.Sequential(G.Linear(784, 256), G.Tanh(), G.Linear(256, 10),
                                       input_shape=(784,)), 256),
        "MLP-M": (lambda: G.Sequential(G.Linear(784, 512), G.ReLU(), G.Linear(512, 512),
                                       G.ReLU(), G.Linear(512, 10), input_shape=(784,)), 1024),
        "MLP-M-tanh": (lambda: G.Sequential(G.Linear(784, 512), G.Tanh(), G.Linear(512, 512),
                                            G.Tanh(), G.Linear(512, 10), input_shape=(784,)),
                       1024),
        "CNN-S": (lambda: G.Sequential(
            G.Conv2d(1, 16, 3, padding=1), G.ReLU(), G.MaxPool2d(2),
            G.Conv2d(16, 32, 3, padding=1), G.ReLU(), G.MaxPool2d(2),
            G.Flatten(), G.Linear(32 * 7 * 7, 10), input_shape=(1, 28, 28)), 128),
        "CNN-C": (lambda: G.Sequential(
            G.Conv2d(3, 32, 5, padding=2), G.ReLU(), G.MaxPool2d(2),
            G.Conv2d(32, 64, 3, padding=1), G.ReLU(), G.MaxPool2d(2),
            G.Conv2d(64, 64, 3, padding=1), G.ReLU(), G.MaxPool2d(2),
            G.Flatten(), G.Linear(64 * 4 * 4, 10), input_shape=(3, 32, 32)), 64),
        "tiny": (lambda: G.Sequential(G.Linear(20, 16), G.Tanh(), G.Linear(16, 4),
                                      input_shape=(20,)), 32),
        "tiny-cnn": (lambda: G.Sequential(G.Conv2d(1, 4, 3, padding=1), G.ReLU(),
                                          G.MaxPool2d(2), G.Flatten(), G.Linear(64, 3),
                                          input_shape=(1, 8, 8)), 16),
    }


def run_config(problem, dtype_name, threads, repeats):
    """Benchmark one configuration in THIS process; return a dict of results."""
    import numpy as np
    from scipy.sparse.linalg import LinearOperator  # noqa: F401  (import cost outside timings)

    import ghess
    from ghess import testing

    make_model, batch = _problems()[problem]
    model = make_model()
    input_shape = model.input_shape
    dtype = np.dtype(dtype_name)
    rng = np.random.default_rng(0)
    theta = model.init_params(seed=0, dtype=dtype)
    X = rng.normal(size=(batch,) + input_shape).astype(dtype)
    y = rng.integers(0, model.n_outputs, size=batch)
    loss = ghess.CrossEntropyLoss(reduction="sum")
    V = rng.normal(size=(16, model.n_params)).astype(dtype)
    v = V[0]

    def median_time(fn, min_repeats=repeats, budget=2.0):
        t0 = time.perf_counter()
        fn()  # warm-up
        first = time.perf_counter() - t0
        # slow operations (the NumPy reference on CNNs) get fewer repeats, never below 3
        min_repeats = max(3, min(min_repeats, int(4 * budget / max(first, 1e-9))))
        times = []
        start = time.perf_counter()
        while len(times) < min_repeats or (time.perf_counter() - start < budget
                                           and len(times) < 50):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times)), len(times)

    results = {"problem": problem, "dtype": dtype_name, "threads": threads,
               "n_params": model.n_params, "batch": batch, "timings": {}, "agreement": {}}
    timings = results["timings"]

    # the machine's GEMM throughput, measured here on a 1024 x 784 x 512 product
    a = rng.normal(size=(1024, 784)).astype(dtype)
    b = rng.normal(size=(784, 512)).astype(dtype)
    t_gemm, _ = median_time(lambda: a @ b)
    results["gemm_gflops"] = 2 * a.shape[0] * 784 * 512 / t_gemm / 1e9

    # ghess
    t_build_g, _ = median_time(lambda: ghess.GGNLinearOperator(
        model, loss, theta, (X, y), mode="stored", n_threads=threads), min_repeats=3)
    G = ghess.GGNLinearOperator(model, loss, theta, (X, y), mode="stored", n_threads=threads)
    Gr = ghess.GGNLinearOperator(model, loss, theta, (X, y), mode="recompute",
                                 n_threads=threads)
    t_build_h, _ = median_time(lambda: ghess.HessianLinearOperator(
        model, loss, theta, (X, y), mode="stored", n_threads=threads), min_repeats=3)
    H = ghess.HessianLinearOperator(model, loss, theta, (X, y), mode="stored",
                                    n_threads=threads)
    timings["ghess GGN build (stored)"] = t_build_g
    timings["ghess GGN product (stored)"] = median_time(lambda: G @ v)[0]
    timings["ghess GGN product (recompute)"] = median_time(lambda: Gr @ v)[0]
    timings["ghess GGN matmat x16 (stored)"] = median_time(lambda: G.matmat(V.T))[0]
    timings["ghess Hessian build (stored)"] = t_build_h
    timings["ghess Hessian product (stored)"] = median_time(lambda: H @ v)[0]
    timings["ghess loss+grad"] = median_time(
        lambda: ghess.loss_and_grad(model, loss, theta, (X, y), n_threads=threads))[0]
    Gv, Hv = G @ v, H @ v

    def agree(name, value, ref):
        rel = float(np.linalg.norm(value - ref) / np.linalg.norm(ref))
        results["agreement"][name] = rel
        tol = 1e-10 if dtype == np.float64 else 1e-3
        if not rel <= tol:
            raise AssertionError(f"{name} disagrees with ghess: relative error {rel:.2e}")

    # pure-NumPy reference (batched jvp/vjp, recomputed for every product)
    agree("numpy GGN product", testing.reference_ggn_matvec(model, loss, theta, (X, y), v), Gv)
    agree("numpy Hessian product",
          testing.reference_hessian_matvec(model, loss, theta, (X, y), v), Hv)
    timings["numpy GGN product"] = median_time(
        lambda: testing.reference_ggn_matvec(model, loss, theta, (X, y), v))[0]
    timings["numpy Hessian product"] = median_time(
        lambda: testing.reference_hessian_matvec(model, loss, theta, (X, y), v))[0]

    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(threads)
        tdtype = torch.float64 if dtype == np.float64 else torch.float32
        net = testing.torch_sequential(model, tdtype)
        names = [n for n, _ in net.named_parameters()]
        shapes = [p.shape for p in net.parameters()]
        sizes = [int(np.prod(s)) for s in shapes]
        tX, ty = torch.from_numpy(X), torch.from_numpy(y)
        ttheta = torch.from_numpy(theta.copy())
        tv = torch.from_numpy(v.copy())

        def f(flat):
            params = {n: p.reshape(s) for n, p, s in zip(names, flat.split(sizes), shapes)}
            return torch.func.functional_call(net, params, (tX,))

        def objective(flat):
            return torch.nn.functional.cross_entropy(f(flat), ty, reduction="sum")

        def torch_ggn(vec):
            z, Jv = torch.func.jvp(f, (ttheta,), (vec,))
            p = torch.softmax(z, dim=1)
            u = p * Jv - p * (p * Jv).sum(dim=1, keepdim=True)
            _, vjp_fn = torch.func.vjp(f, ttheta)
            return vjp_fn(u)[0]

        grad_fn = torch.func.grad(objective)

        def torch_hvp(vec):
            return torch.func.jvp(grad_fn, (ttheta,), (vec,))[1]

        def torch_loss_grad():
            flat = ttheta.clone().requires_grad_(True)
            value = objective(flat)
            value.backward()
            return value.item(), flat.grad

        with torch.no_grad():
            agree("torch.func GGN product", torch_ggn(tv).numpy(), Gv)
        agree("torch.func Hessian product", torch_hvp(tv).detach().numpy(), Hv)
        timings["torch.func GGN product"] = median_time(lambda: torch_ggn(tv))[0]
        timings["torch.func Hessian product"] = median_time(lambda: torch_hvp(tv))[0]
        timings["torch loss+grad"] = median_time(torch_loss_grad)[0]
        results["torch"] = torch.__version__
    return results


def machine_info():
    """CPU, cores, versions and BLAS of this machine."""
    import platform

    import numpy as np
    import scipy
    from threadpoolctl import threadpool_info

    import ghess

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "numpy": np.__version__,
            "scipy": scipy.__version__, "ghess": ghess.__version__,
            "blas": sorted({f"{i.get('internal_api')} {i.get('version')}"
                            for i in threadpool_info() if i.get("user_api") == "blas"})}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    return info


def write_report(infos, all_results, path_md, path_json):
    """Tables of medians and ratios, with machine info."""
    with open(path_json, "w") as fh:
        json.dump({"machine": infos, "results": all_results}, fh, indent=1)
    lines = ["# ghess benchmark results", "",
             f"Generated by `python bench/run.py` on {time.strftime('%Y-%m-%d')}.", "",
             "## Machine", ""]
    for key, value in infos.items():
        lines.append(f"- {key}: {value}")
    lines += ["", "Times are medians after a warm-up (ms). Ratios compare each competitor with "
              "the corresponding ghess operation of the same run (>1: ghess is faster).", ""]
    pairs = [
        ("GGN product", "ghess GGN product (stored)",
         ["numpy GGN product", "torch.func GGN product", "ghess GGN product (recompute)"]),
        ("Hessian product", "ghess Hessian product (stored)",
         ["numpy Hessian product", "torch.func Hessian product"]),
        ("loss+grad", "ghess loss+grad", ["torch loss+grad"]),
    ]
    for res in all_results:
        t = res["timings"]
        lines.append(f"## {res['problem']}, {res['dtype']}, {res['threads']} thread(s) "
                     f"(batch {res['batch']}, {res['n_params']} parameters, "
                     f"GEMM {res['gemm_gflops']:.1f} GFLOP/s)")
        lines += ["", "| operation | median (ms) |", "|---|---:|"]
        for name, value in t.items():
            lines.append(f"| {name} | {1e3 * value:.3f} |")
        lines += ["", "| ghess operation | competitor | ratio (competitor / ghess) |",
                  "|---|---|---:|"]
        for label, mine, others in pairs:
            for other in others:
                if mine in t and other in t:
                    lines.append(f"| {label} | {other} | {t[other] / t[mine]:.2f}x |")
        lines += ["", "Agreement with ghess (relative 2-norm): " + ", ".join(
            f"{k} {v:.1e}" for k, v in res["agreement"].items()), ""]
    with open(path_md, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", nargs="+",
                        default=["MLP-S", "MLP-M", "MLP-M-tanh", "CNN-S", "CNN-C"])
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="one tiny configuration")
    parser.add_argument("--output", default=HERE)
    parser.add_argument("--worker", nargs=3, metavar=("PROBLEM", "DTYPE", "THREADS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = run_config(args.worker[0], args.worker[1], int(args.worker[2]), args.repeats)
        print("RESULT " + json.dumps(result))
        return 0

    if args.quick:
        args.problems, args.dtypes, args.threads, args.repeats = (["tiny", "tiny-cnn"],
                                                                  ["float64"], [1], 3)
    all_results = []
    for problem in args.problems:
        for dtype in args.dtypes:
            for threads in args.threads:
                env = dict(os.environ)
                for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                    env[var] = str(threads)
                proc = subprocess.run(
                    [sys.executable, __file__, "--repeats", str(args.repeats),
                     "--worker", problem, dtype, str(threads)],
                    env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stdout + proc.stderr)
                    return proc.returncode
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
                result = json.loads(line[len("RESULT "):])
                all_results.append(result)
                t = result["timings"]
                print(f"{problem:11s} {dtype:8s} {threads} thr: GGN stored "
                      f"{1e3 * t['ghess GGN product (stored)']:8.3f} ms, numpy "
                      f"{t['numpy GGN product'] / t['ghess GGN product (stored)']:6.2f}x slower"
                      + (f", torch.func {t['torch.func GGN product'] / t['ghess GGN product (stored)']:5.2f}x slower"  # noqa: E501
                         if "torch.func GGN product" in t else ""), flush=True)
    name = "RESULTS_quick" if args.quick else "RESULTS"
    write_report(machine_info(), all_results, os.path.join(args.output, name + ".md"),
                 os.path.join(args.output, name.lower() + ".json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
