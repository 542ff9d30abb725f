#!/usr/bin/env python
"""A/B comparison of two builds of ghess: the same operations, timed interleaved.

Usage::

    python bench/ab.py --a /path/to/venv-a/bin/python --b /path/to/venv-b/bin/python
    python bench/ab.py --a ... --b ... --threads 1 2 --problems MLP-M CNN-C --rounds 40
    python bench/ab.py --a ... --b ... --quick     # tiny problems, to prove it works
    python bench/ab.py --a $PY --b $PY --a-env GHESS_ISA=avx2 --b-env GHESS_ISA=avx512
                                                   # one build, two ISA levels

For each thread count, one long-lived worker process per build (this script with
``--worker``, run by that build's interpreter) is pinned to the same ``threads``
cores, with the OpenMP/BLAS thread counts set in its environment before numpy is
imported (as ``bench/run.py`` does). Each worker builds the same problem: the
networks, batch, weights, data and direction of ``bench/problems.py`` (seed 0);
B takes A's arrays, and the report says whether B's own draw was identical. The
operators are built once, outside the timings; the operations are

- ``loss+grad``: ``ghess.loss_and_grad``;
- ``GGN product``: ``GGNLinearOperator(...) @ v`` (the default mode, auto);
- ``Hessian product``: ``HessianLinearOperator(...) @ v``;
- ``per-sample Jacobians`` (with ``--operations`` only): ``per_sample_jacobians`` on
  the benchmark's Jacobian samples, into one ``out=`` buffer reused across calls;

each with ``n_threads=threads``. They are timed in rounds: round r runs one sample
on A, then one on B (B first in every other round); a sample is the median of
``--calls`` calls after one untimed call, and with 2 or more threads each turn
starts after the other build's thread pools have stopped spinning
(``bench.timing.SETTLE``). Reported per operation: the median sample of A and of
B, B/A with a 95% bootstrap interval (rounds resampled in pairs), and the largest
difference between A's and B's results relative to A's largest entry (0 when the
numbers are unchanged).

The worker uses ghess's public API only, so that it runs unchanged on both builds.
"""

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
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

# neither imports numpy (the worker pins its cores first) nor a private ghess module
from bench.problems import QUICK_PROBLEMS  # noqa: E402
from bench.timing import SETTLE, pin_to_cores, thread_env  # noqa: E402

OPS = ("loss+grad", "GGN product", "Hessian product", "per-sample Jacobians")
#: what a run times unless ``--operations`` says otherwise
DEFAULT_OPS = OPS[:3]


# -- worker ---------------------------------------------------------------------------------
def worker(threads, outdir):
    """Serve the driver's commands, one JSON line each, on stdin; answer on stdout."""
    cores = pin_to_cores(threads)  # before numpy starts its threads
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to stderr, not into the answers

    import numpy as np

    import ghess

    def answer(message):
        answers.write(json.dumps(message) + "\n")

    info = {"python": sys.executable, "python_version": platform.python_version(),
            "ghess": ghess.__version__, "ghess_path": os.path.dirname(ghess.__file__),
            "numpy": np.__version__, "cores": cores,
            "GHESS_ISA": os.environ.get("GHESS_ISA", "(unset)")}
    try:
        from threadpoolctl import threadpool_info

        # whose BLAS: numpy's and SciPy's (which ghess calls) each ship one
        info["blas"] = sorted({
            f"{os.path.basename(os.path.dirname(i['filepath'])).removesuffix('.libs')}: "
            f"{i.get('internal_api')} {i.get('version')}"
            for i in threadpool_info() if i.get("user_api") == "blas"})
    except ImportError:
        pass
    answer(info)
    fns = {}
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "setup":
            fns, message = _setup(command, threads, outdir)
            answer(message)
        elif command["cmd"] == "time":
            fn = fns[command["op"]]
            fn()  # untimed: wakes this build's threads after the other build's turn
            times = []
            for _ in range(command["calls"]):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            answer({"median": float(np.median(times))})
        elif command["cmd"] == "quit":
            break
    answers.close()


def _setup(command, threads, outdir):
    """Build one problem and its operations; save the inputs (A) and every first result."""
    import numpy as np

    import ghess
    from bench.problems import make_setup

    s = make_setup(command["problem"], command["dtype"], threads)
    arrays = {"theta": s.theta, "X": s.X, "y": s.y, "v": s.v}
    message = {"n_params": int(s.model.n_params), "batch": int(s.X.shape[0])}
    inputs = os.path.join(outdir, f"inputs-{command['tag']}.npz")
    if command["side"] == "A":
        np.savez(inputs, **arrays)
    # both builds run on the arrays A drew, read back from the file (alike in memory);
    # B says whether its own draw was the same
    with np.load(inputs) as given:
        message["own_inputs_equal"] = all(
            given[k].dtype == a.dtype and np.array_equal(given[k], a) for k, a in arrays.items())
        arrays = {k: given[k] for k in arrays}
    model, loss, theta, v = s.model, s.loss, arrays["theta"], arrays["v"]
    data = (arrays["X"], arrays["y"])
    makers = {  # each operation's function, built (its operator too) only when asked for
        "loss+grad": lambda: functools.partial(ghess.loss_and_grad, model, loss, theta, data,
                                               n_threads=threads),
        "GGN product": lambda: functools.partial(ghess.GGNLinearOperator(
            model, loss, theta, data, n_threads=threads).__matmul__, v),
        "Hessian product": lambda: functools.partial(ghess.HessianLinearOperator(
            model, loss, theta, data, n_threads=threads).__matmul__, v),
        "per-sample Jacobians": lambda: _jacobians(ghess, model, theta, data[0][:len(s.Xj)],
                                                   threads),
    }
    fns = {op: makers[op]() for op in command.get("ops", DEFAULT_OPS)}
    message["first"] = {}
    for op, fn in fns.items():
        t0 = time.perf_counter()
        result = fn()
        message["first"][op] = time.perf_counter() - t0
        if op == "loss+grad":
            value, grad = result
            results = {"loss": np.asarray(value), "grad": np.asarray(grad)}
        else:
            results = {"product": np.asarray(result)}
        np.savez(os.path.join(outdir, f"result-{command['tag']}-{command['side']}-{op}.npz"),
                 **results)
    return fns, message


def _jacobians(ghess, model, theta, X, threads):
    """``per_sample_jacobians`` of X into one buffer, allocated once: the rows time ghess's
    work, not the first-touch page faults of a fresh output (``bench/run.py``'s ``out=`` row)."""  # noqa: D205, D209, E501
    import numpy as np

    out = np.empty((X.shape[0], model.n_outputs, model.n_params), dtype=theta.dtype)
    return lambda: ghess.per_sample_jacobians(model, theta, X, n_threads=threads, out=out)


# -- driver ---------------------------------------------------------------------------------
class Worker:
    """One build's worker process, and the commands the driver sends it."""

    def __init__(self, python, threads, outdir, env=None):
        self.proc = subprocess.Popen(
            [python, os.path.abspath(__file__), "--worker", str(threads), outdir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={**thread_env(threads), **(env or {})}, text=True, bufsize=1)
        self.info = self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args[0]} exited with status "
                               f"{self.proc.wait()} (its error above)")
        return json.loads(line)

    def ask(self, **command):
        """Send ``command``; return the answer."""
        self.proc.stdin.write(json.dumps(command) + "\n")
        return self._read()

    def close(self):
        """Let the worker exit; kill it if it does not."""
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def max_rel_diff(path_a, path_b):
    """Largest |A - B| over the largest |A|, over every array of two results."""
    import numpy as np

    worst = 0.0
    with np.load(path_a) as a, np.load(path_b) as b:
        for key in a.files:
            x, y = a[key].astype(np.float64), b[key].astype(np.float64)
            if x.shape != y.shape:
                return float("inf")
            scale = np.max(np.abs(x)) if x.size else 0.0
            diff = np.max(np.abs(x - y)) if x.size else 0.0
            worst = max(worst, diff / scale if scale > 0 else diff)
    return float(worst)


def ratio_interval(a, b, resamples=2000, seed=0):
    """95% bootstrap interval of median(b) / median(a), resampling the rounds in pairs."""
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    ratios = np.median(b[idx], axis=1) / np.median(a[idx], axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def auto_rounds(seconds_per_call, calls, budget, low=5, high=100):
    """Return the rounds that give each build about ``budget`` s of an operation's calls."""
    per_sample = (calls + 1) * max(seconds_per_call, 1e-6)
    return max(low, min(high, int(budget / per_sample)))


def compare(workers, problem, dtype, threads, args, outdir):
    """Set up ``problem`` in both workers and time its operations; return the rows."""
    tag = f"{problem}-{dtype}-{threads}"
    ops = list(args.operations)
    first = workers["A"].ask(cmd="setup", problem=problem, dtype=dtype, tag=tag, side="A",
                             ops=ops)
    second = workers["B"].ask(cmd="setup", problem=problem, dtype=dtype, tag=tag, side="B",
                              ops=ops)
    if not second["own_inputs_equal"]:
        print(f"note: {tag}: B's own weights/data/vector differ from A's; B used A's",
              file=sys.stderr)
    rows = []
    for op in ops:
        rounds = args.rounds or auto_rounds(max(first["first"][op], second["first"][op]),
                                            args.calls, args.budget)
        samples = {"A": [], "B": []}
        for r in range(rounds):
            for side in ("A", "B") if r % 2 == 0 else ("B", "A"):
                if threads > 1:
                    time.sleep(SETTLE)  # the other build's thread pools stop spinning
                samples[side].append(workers[side].ask(cmd="time", op=op,
                                                       calls=args.calls)["median"])
        a, b = statistics.median(samples["A"]), statistics.median(samples["B"])
        low, high = ratio_interval(samples["A"], samples["B"])
        diff = max_rel_diff(os.path.join(outdir, f"result-{tag}-A-{op}.npz"),
                            os.path.join(outdir, f"result-{tag}-B-{op}.npz"))
        row = {"problem": problem, "dtype": dtype, "threads": threads, "op": op,
               "a": a, "b": b, "ratio": b / a, "low": low, "high": high, "diff": diff,
               "rounds": rounds, "own_inputs_equal": second["own_inputs_equal"],
               "n_params": first["n_params"], "batch": first["batch"]}
        print(table_row(row), file=sys.stderr, flush=True)  # progress
        rows.append(row)
    return rows


def machine_info():
    """CPU model, AVX2/AVX-512 flags and core count (lscpu, else /proc/cpuinfo)."""
    fields = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    model, flags = fields.get("Model name"), fields.get("Flags")
    if model is None or flags is None:
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    key, _, value = line.partition(":")
                    if key.strip() == "model name" and model is None:
                        model = value.strip()
                    elif key.strip() == "flags" and flags is None:
                        flags = value.strip()
        except OSError:
            pass
    flags = set((flags or "").split())
    avx512 = sorted(f for f in flags if f.startswith("avx512"))
    allowed = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count())
    return {"cpu": model or "unknown", "avx2": "avx2" in flags, "load": _load(),
            "avx512": " ".join(avx512) if avx512 else "no",
            "cores": fields.get("CPU(s)", str(os.cpu_count())), "cores_allowed": allowed,
            "platform": platform.platform()}


def _load():
    """Return the 1-minute load average (None where unknown)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


HEADER = ("| problem | dtype | threads | op | A median (ms) | B median (ms) | B/A "
          "| B/A 95% CI | max rel diff |")


def table_row(row):
    """One Markdown row of the table."""
    return (f"| {row['problem']} | {row['dtype']} | {row['threads']} | {row['op']} "
            f"| {1e3 * row['a']:.3f} | {1e3 * row['b']:.3f} | {row['ratio']:.3f} "
            f"| {row['low']:.3f} - {row['high']:.3f} | {row['diff']:.3g} |")


def report(machine, builds, rows, args):
    """Return the Markdown report: machine, builds, method, the table and the verdicts."""
    lines = ["# A/B: two builds of ghess", "",
             f"Generated by `python bench/ab.py` on {time.strftime('%Y-%m-%d %H:%M')}.", "",
             "## Machine", "",
             f"- CPU: {machine['cpu']}",
             f"- AVX2: {'yes' if machine['avx2'] else 'no'}; AVX-512: {machine['avx512']}",
             f"- cores: {machine['cores']} ({machine['cores_allowed']} allowed to this run)",
             f"- platform: {machine['platform']}",
             "- load average (1 min) before and after the run: "
             + " and ".join("unknown" if x is None else f"{x:.2f}"
                            for x in (machine["load"], machine["load_after"]))
             + " (other work on these cores slows the multi-threaded runs most: a thread "
             "preempted mid-product stalls the others)",
             "", "## Builds", ""]
    for side in ("A", "B"):
        info = builds[side]
        blas = ", ".join(info.get("blas", [])) or "unknown"
        lines.append(f"- {side}: `{info['python']}` (Python {info['python_version']}), "
                     f"ghess {info['ghess']} from `{info['ghess_path']}`, "
                     f"numpy {info['numpy']}, BLAS {blas}, GHESS_ISA "
                     f"{info.get('GHESS_ISA', 'unknown')}"
                     + "".join(f", {k}={v}" for k, v in info.get("env", {}).items()
                               if k != "GHESS_ISA"))
    rounds = (f"{args.rounds} rounds" if args.rounds else
              f"rounds sized for about {args.budget:g} s of calls per operation and build "
              "(5 to 100)")
    lines += ["", "## Method", "",
              f"Interleaved rounds ({rounds}); a round times one sample on A and one on B, "
              "B first in every other round; a sample is the median of "
              f"{args.calls} calls after one untimed call. With 2 or more threads each turn "
              f"starts after {SETTLE} s of idling. Medians of the samples (ms); B/A with a "
              "95% bootstrap interval over the rounds; max rel diff: the largest |A - B| of "
              "the results (loss and gradient, G v, H v) over the largest |A|, on the same "
              "weights, data and vector.", "", "## Results", "",
              HEADER, "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    lines += [table_row(row) for row in rows]
    worst = max(rows, key=lambda row: abs(row["ratio"] - 1))
    within = all(abs(row["ratio"] - 1) <= args.tolerance for row in rows)
    max_diff = max(row["diff"] for row in rows)
    lines += ["",
              f"B/A within 1 ± {args.tolerance:g} on every row: {'yes' if within else 'no'} "
              f"(farthest: {worst['problem']} {worst['dtype']} {worst['threads']} thread(s) "
              f"{worst['op']}, {worst['ratio']:.3f}, 95% CI {worst['low']:.3f} - "
              f"{worst['high']:.3f}).",
              "Numbers unchanged: " + ("yes, every result identical"
                                       if max_diff == 0 else f"largest rel diff {max_diff:.3g}")
              + "."]
    if not all(row["own_inputs_equal"] for row in rows):
        lines.append("Note: B's own draw of the weights, data or vector differed from A's "
                     "in some problem; B ran on A's.")
    return lines


def parse_env(values, option):
    """``["VAR=VALUE", ...]`` as a dict; a clear error for anything else."""
    env = {}
    for value in values:
        name, sep, setting = value.partition("=")
        if not sep or not name:
            raise SystemExit(f"{option} takes VAR=VALUE pairs, got {value!r}")
        env[name] = setting
    return env


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", help="Python interpreter of build A (the reference)")
    parser.add_argument("--b", help="Python interpreter of build B")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--problems", nargs="+", default=["MLP-M", "CNN-C"])
    parser.add_argument("--dtype", nargs="+", default=["float32"])
    parser.add_argument("--operations", nargs="+", default=list(DEFAULT_OPS), choices=OPS,
                        help="what to time (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds per operation (default: sized by --budget, 5 to 100)")
    parser.add_argument("--calls", type=int, default=5, help="calls per sample (their median)")
    parser.add_argument("--budget", type=float, default=10.0,
                        help="seconds of calls per operation and build, when --rounds is unset")
    parser.add_argument("--tolerance", type=float, default=0.03,
                        help="the B/A band the verdict line checks")
    parser.add_argument("--output", default=os.path.join(HERE, "AB.md"),
                        help="Markdown file to write")
    parser.add_argument("--quick", action="store_true",
                        help="tiny problems, 1 thread, 3 rounds of 3 calls")
    parser.add_argument("--a-env", nargs="+", default=[], metavar="VAR=VALUE",
                        help="environment of A's workers (e.g. GHESS_ISA=avx2)")
    parser.add_argument("--b-env", nargs="+", default=[], metavar="VAR=VALUE",
                        help="environment of B's workers (e.g. GHESS_ISA=avx512)")
    parser.add_argument("--worker", nargs=2, metavar=("THREADS", "DIR"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(int(args.worker[0]), args.worker[1])
        return 0
    if not (args.a and args.b):
        parser.error("--a and --b are required")
    if args.quick:
        args.problems, args.threads, args.rounds, args.calls = list(QUICK_PROBLEMS), [1], 3, 3

    envs = {side: parse_env(values, f"--{side.lower()}-env")
            for side, values in (("A", args.a_env), ("B", args.b_env))}
    machine = machine_info()
    outdir = tempfile.mkdtemp(prefix="ghess-ab-")
    rows, builds = [], {}
    print(HEADER, file=sys.stderr, flush=True)
    try:
        for threads in args.threads:
            workers = {}
            try:
                for side, python in (("A", args.a), ("B", args.b)):
                    workers[side] = Worker(python, threads, outdir, envs[side])
                    builds[side] = {**workers[side].info, "env": envs[side]}
                for problem in args.problems:
                    for dtype in args.dtype:
                        rows += compare(workers, problem, dtype, threads, args, outdir)
            finally:
                for w in workers.values():
                    w.close()
    finally:
        shutil.rmtree(outdir, ignore_errors=True)
    machine["load_after"] = _load()
    lines = report(machine, builds, rows, args)
    text = "\n".join(lines) + "\n"
    print(text)
    if os.path.dirname(args.output):
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as fh:
        fh.write(text)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
