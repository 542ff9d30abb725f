#!/usr/bin/env python
"""Thread scaling of ghess and its rivals, with ghess's per-stage times.

Usage::

    python bench/scaling.py                                  # 1 and 2 threads, float32
    python bench/scaling.py --threads 1 2 4 8 16 --stages    # a server, with stage times
    python bench/scaling.py --problems MLP-M --batch 2048 --dtypes float64
    python bench/scaling.py --report --output DIR              # SCALING.md from DIR's JSON
    python bench/scaling.py --problems CNN-C MLP-M --batch 256 --threads 1 \
        --operations "KFAC build" "KFAC product" "KFAC inverse product" "GGN product" \
        --output bench/kfac                                 # KFAC beside curvlinops'

For every (problem, dtype, thread count) one worker process, restricted to that many
cores before numpy, torch or JAX start their thread pools (``bench/timing.py``), sets
up loss+gradient, the GGN, Hessian and empirical Fisher products of ghess (stored mode) and
of PyTorch (``loss.backward()``, torch.func), JAX and curvlinops where they import
(each optional: the script runs where only numpy, scipy and ghess are installed),
checks that they agree with ghess, and times them in interleaved rounds (medians).
The default problems are the large-batch ones that a server runs
(``SCALING_BATCHES``: CNN-C with 1024 samples, MLP-M with 8192, ...). Beside them
every worker times one GEMM three ways on its threads (``bench.gemm.machine_gemms``):
what the machine itself gains from more cores.

``--stages`` also times each ghess operation stage by stage (``bench/stages.py``:
every kernel, every layer method's own Python and NumPy work, the checks, and the
rest), after the timed rounds. The report (``SCALING.md``, ``scaling.json`` in
``--output``) gives, per operation, each library's time and speed-up over its own
1-thread time, ghess's ratio against the fastest rival, the Karp-Flatt serial
fraction of ghess, and the stages that lose the most time at the largest thread
count (their time there minus their 1-thread time divided by the thread count).
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == HERE:
    sys.path[0] = ROOT
elif ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# none of these imports numpy: the worker pins itself to its cores first
from bench import _internals, timing  # noqa: E402
from bench.competitors import COMPETITORS, competitor_versions  # noqa: E402
from bench.competitors.common import Op, Unavailable, to_numpy  # noqa: E402
from bench.gemm import MACHINE_GEMM, MACHINE_GEMM_REPEATS, machine_gemms  # noqa: E402
from bench.problems import all_problems  # noqa: E402
from bench.report import cpu_info  # noqa: E402

#: the operations compared by default, ghess's names first
OPERATIONS = ("loss+grad", "GGN product", "Hessian product", "EF product")
#: KFAC's, on request (``--operations``): its build, product and inverse product
KFAC_OPERATIONS = ("KFAC build", "KFAC product", "KFAC inverse product")
#: the batch of each problem in this mode: large enough for 16 threads
SCALING_BATCHES = {"CNN-C": 1024, "MLP-M": 8192, "CNN-S": 2048, "MLP-S": 8192, "ResNet-C": 512}
#: ghess entries of ``bench/run.py`` left out here: stored mode is the one compared
LEFT_OUT = ("(recompute)", ", 1 thread)")
#: the operation of the machine's reference GEMMs (``bench.gemm.machine_gemms``)
MACHINE_OP = f"{MACHINE_GEMM_REPEATS} GEMMs " + "x".join(map(str, MACHINE_GEMM))
#: the libraries that may run (the NumPy reference is too slow at these batches)
LIBRARIES = ("ghess", "torch", "JAX", "curvlinops")


def run_config(problem, dtype_name, threads, batch, repeats, libraries, stages,
               operations=OPERATIONS):
    """Time one configuration in THIS process; return a dict of results."""
    import numpy as np

    from bench.problems import make_setup

    started = time.perf_counter()
    s = make_setup(problem, dtype_name, threads, batch=batch, ops=operations)
    result = {"problem": problem, "dtype": dtype_name, "threads": threads, "batch": batch,
              "cores": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
              else None, "timings": {}, "operations": {}, "agreement": {}, "skipped": {},
              "stages": {}, "operation_order": list(operations)}
    tol = 1e-10 if s.theta.dtype == np.float64 else 1e-3
    ops, refs = {}, {}
    for label, competitor in COMPETITORS:
        if label not in libraries:
            continue
        try:
            entries = competitor(s)
        except Unavailable as exc:
            result["skipped"][label] = str(exc)
            continue
        except Exception as exc:  # a rival that fails here must not end a server's run
            if label == "ghess":
                raise
            result["skipped"][label] = f"failed: {type(exc).__name__}: {exc}"
            continue
        entries = {name: entry for name, entry in entries.items()
                   if not any(part in name for part in LEFT_OUT)}
        for name, entry in list(entries.items()):
            value = (entry.to_numpy or to_numpy)(entry.fn())
            if entry.op not in refs:
                refs[entry.op] = value  # ghess's, which comes first
                continue
            ref = refs[entry.op]
            if isinstance(ref, tuple):  # (loss, gradient): the worse of the two
                rel = max(float(np.linalg.norm(np.subtract(a, b)) / np.linalg.norm(b))
                          for a, b in zip(value, ref))
            else:
                rel = float(np.linalg.norm(value - ref) / np.linalg.norm(ref))
            result["agreement"][name] = rel
            # an inverse product multiplies float32 rounding by (KFAC + damping I)'s condition
            # number (largest factor eigenvalues over KFAC_DAMPING): 1.2e-3 on CNN-C
            limit = 1e-2 if "inverse" in entry.op and s.theta.dtype == np.float32 else tol
            if not rel <= limit:  # a wrong result is not timed against ghess
                result["skipped"][name] = f"disagrees with ghess: relative error {rel:.2e}"
                del entries[name]
        ops.update(entries)
    result["versions"] = competitor_versions()
    # the machine's own gain from more threads, on one GEMM, timed in the same rounds
    for name, fn in machine_gemms(np.dtype(dtype_name), threads).items():
        ops[name] = Op(MACHINE_OP, fn)
    result["operation_order"].append(MACHINE_OP)
    settle = timing.SETTLE if threads > 1 else 0.0
    timed = timing.interleaved_times({name: e.fn for name, e in ops.items()}, repeats,
                                     settle=settle)
    for name, entry in ops.items():
        result["timings"][name] = timed[name][0]
        result["operations"][name] = entry.op
    if stages:
        from bench import stages as stage_timers

        stage_timers.instrument()
        for name, entry in ops.items():
            if timing.library(name) == "ghess":
                median, per_stage, calls = stage_timers.profile(entry.fn, repeats)
                result["stages"][name] = {"median": median, "stages": per_stage,
                                          "calls": calls}
    # which build each convolution took where ghess times them (they may differ by process)
    result["isa_choices"] = _internals.measured_isa_choices()
    result["elapsed"] = time.perf_counter() - started
    return result


def run_worker(problem, dtype, threads, batch, args, stages=True):
    """Spawn one configuration's worker (with ``--stages``, stage times unless ``stages``
    is false); return its result dict."""  # noqa: D205, D209
    command = [sys.executable, __file__, "--repeats", str(args.repeats), "--budget",
               str(args.budget), "--libraries", *args.libraries,
               "--operations", *args.operations,
               "--worker", problem, dtype, str(threads), str(batch)]
    if args.stages and stages:
        command.append("--stages")
    proc = subprocess.run(command, env=timing.thread_env(threads), capture_output=True,
                          text=True)
    if proc.returncode != 0:  # reported, and the run goes on with the next configuration
        sys.stderr.write(proc.stdout + proc.stderr)
        return None
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def karp_flatt(speed_up, threads):
    """Return the serial fraction that a speed-up on ``threads`` threads implies."""
    return (1 / speed_up - 1 / threads) / (1 - 1 / threads)


def merge_rounds(rounds):
    """One configuration's results from several workers (``--rounds``): each timing the
    median of the workers' medians; the rest (stages, agreement) from the last worker."""  # noqa: D205, D209
    import statistics

    merged = dict(rounds[-1], rounds=len(rounds))
    merged["timings"] = {name: statistics.median(r["timings"][name] for r in rounds
                                                 if name in r["timings"])
                         for name in rounds[-1]["timings"]}
    return merged


def summary_table(by_config):
    """Markdown lines: per problem and operation, ghess's speed-up from 1 thread to the
    most, its serial fraction, and the same for the machine's GEMMs and the rivals."""  # noqa: D205, D209
    rows = []
    for (problem, dtype, batch), runs in by_config.items():
        counts = sorted(runs)
        if counts[0] != 1 or len(counts) < 2:
            continue
        one, top, p = runs[1], runs[counts[-1]], counts[-1]
        for op in one.get("operation_order", OPERATIONS):
            names = [n for n, o in one["operations"].items() if o == op
                     and n in top["timings"]]
            ups = {n: one["timings"][n] / top["timings"][n] for n in names}
            ghess = [n for n in names if timing.library(n) == "ghess"]
            others = ", ".join(f"{timing.library(n)} x{ups[n]:.2f}" for n in names
                               if n not in ghess)
            if ghess:
                up = ups[ghess[0]]
                cells = [f"x{up:.2f}", f"{100 * karp_flatt(up, p):.1f}%"]
            else:  # the machine's GEMMs
                cells = ["", ""]
            rows.append(f"| {problem} | {batch} | {dtype} | {op} | " + " | ".join(cells)
                        + f" | {others} |")
        p_label = p
    if not rows:
        return []
    return ["## Summary", "",
            f"From 1 to {p_label} threads: ghess's speed-up and its Karp-Flatt serial "
            "fraction; beside them the rivals' speed-ups, and for the GEMM rows the "
            "machine's (`bench/gemm.py`, `machine_gemms`: split = one GEMM's rows over "
            "OpenMP threads as ghess's kernels run it, workers = one single-threaded GEMM "
            "per Python thread as ghess's workers run, NumPy = its BLAS's own threads).",
            "", "| problem | N | dtype | operation | ghess | serial | others |",
            "|---|---:|---|---|---:|---:|---|", *rows, ""]


def write_report(results, machine, path_md, path_json):
    """Write the scaling tables (Markdown) and the raw results (JSON)."""
    with open(path_json, "w") as fh:
        json.dump({"machine": machine, "results": results}, fh, indent=1)
    by_config = {}
    for r in results:
        by_config.setdefault((r["problem"], r["dtype"], r["batch"]), {}).setdefault(
            r["threads"], []).append(r)
    by_config = {key: {t: merge_rounds(rs) for t, rs in runs.items()}
                 for key, runs in by_config.items()}
    lines = ["# Thread scaling of ghess and its rivals", "",
             f"CPU: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, vector ISA: "
             f"{' '.join(machine['isa']) or 'none of AVX2/AVX-512'}; ghess's ISA levels: "
             f"{machine.get('ghess_isa', 'unknown')}. "
             + ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items()) + ".",
             "", "Medians (ms) of interleaved rounds, one worker process per thread count "
             "restricted to that many cores (with `--rounds R`, R workers per count in "
             "alternation, and the median of their medians); `(x S)` is the speed-up over "
             "the same library's 1-thread time; *ratio* is the fastest rival's time over "
             "ghess's; *serial* is ghess's Karp-Flatt serial fraction at that thread count.",
             ""]
    lines += summary_table(by_config)
    for (problem, dtype, batch), runs in by_config.items():
        counts = sorted(runs)
        base = runs[counts[0]]
        lines += [f"## {problem}, N={batch}, {dtype}", ""]
        if base["skipped"]:
            lines += [f"- not timed: {name}: {why}" for name, why in base["skipped"].items()]
            lines.append("")
        lines += ["| operation | library | " + " | ".join(f"{t} thr" for t in counts) + " |",
                  "|---|---|" + "---:|" * len(counts)]
        for op in base.get("operation_order", OPERATIONS):
            names = [n for n, o in base["operations"].items() if o == op]

            def seconds(t, name):
                return runs[t]["timings"].get(name, float("nan"))

            for name in names:
                cells = []
                for t in counts:
                    up = seconds(counts[0], name) / seconds(t, name) * counts[0]
                    cells.append(f"{1e3 * seconds(t, name):.1f}"
                                 + ("" if t == counts[0] else f" (x{up:.2f})"))
                lines.append(f"| {op} | {timing.library(name)} | " + " | ".join(cells) + " |")
            ghess = next((n for n in names if timing.library(n) == "ghess"), None)
            rivals = [n for n in names if timing.library(n) != "ghess"]
            if ghess and rivals:
                ratios = [min(seconds(t, n) for n in rivals) / seconds(t, ghess) for t in counts]
                lines.append(f"| {op} | ratio | " + " | ".join(f"{r:.2f}x" for r in ratios)
                             + " |")
            if ghess and counts[0] == 1:
                fractions = [karp_flatt(seconds(1, ghess) / seconds(t, ghess), t)
                             for t in counts[1:]]
                lines.append(f"| {op} | ghess serial | | "
                             + " | ".join(f"{100 * e:.1f}%" for e in fractions) + " |")
        lines.append("")
        top = runs[counts[-1]]
        if counts[0] == 1 and len(counts) > 1 and top["stages"]:
            p = counts[-1]
            lines += [f"### ghess stages, 1 vs {p} threads", "",
                      f"Per call (ms, exclusive). *lost* = time at {p} threads minus the "
                      f"1-thread time over {p}: what keeps the operation from a {p}x "
                      "speed-up. The 12 stages that lose the most, then the rest.", ""]
            for name, prof in top["stages"].items():
                one = base["stages"][name]["stages"]
                many = prof["stages"]
                rows = sorted(((1e3 * (many.get(k, 0.0) - one.get(k, 0.0) / p), k)
                               for k in set(one) | set(many)), reverse=True)
                total_1, total_p = 1e3 * sum(one.values()), 1e3 * sum(many.values())
                lines += [f"**{name}**: {total_1:.1f} ms -> {total_p:.1f} ms "
                          f"(x{total_1 / total_p:.2f})", "",
                          "| stage | calls | 1 thr | " + f"{p} thr | speed-up | lost |",
                          "|---|---:|---:|---:|---:|---:|"]
                for lost, k in rows[:12]:
                    a, b = 1e3 * one.get(k, 0.0), 1e3 * many.get(k, 0.0)
                    lines.append(f"| {k} | {prof['calls'].get(k, 0):g} | {a:.2f} | {b:.2f} | "
                                 f"{a / b if b else float('nan'):.2f} | {lost:.2f} |")
                rest_1 = sum(1e3 * one.get(k, 0.0) for _, k in rows[12:])
                rest_p = sum(1e3 * many.get(k, 0.0) for _, k in rows[12:])
                lines += [f"| (the other {max(0, len(rows) - 12)}) | | {rest_1:.2f} | "
                          f"{rest_p:.2f} | | {rest_p - rest_1 / p:.2f} |", ""]
    with open(path_md, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", nargs="+", default=list(SCALING_BATCHES))
    parser.add_argument("--batch", type=int, default=None,
                        help="samples per problem (default: SCALING_BATCHES's, "
                             "others their bench/run.py batch)")
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.5,
                        help="seconds of timed repeats per operation (at least --repeats runs)")
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    parser.add_argument("--operations", nargs="+", default=list(OPERATIONS),
                        choices=OPERATIONS + KFAC_OPERATIONS)
    parser.add_argument("--stages", action="store_true",
                        help="also time ghess's operations stage by stage")
    parser.add_argument("--output", default=HERE, help="directory for SCALING.md and "
                        "scaling.json (default: bench/)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="workers per thread count, run in alternation; each timing is "
                             "the median over them")
    parser.add_argument("--report", action="store_true",
                        help="only rewrite SCALING.md from --output's scaling.json")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    timing.BUDGET = args.budget
    if args.worker:
        problem, dtype, threads, batch = args.worker
        timing.pin_to_cores(int(threads))
        result = run_config(problem, dtype, int(threads), int(batch), args.repeats,
                            args.libraries, args.stages, tuple(args.operations))
        print("RESULT " + json.dumps(result))
        return 0
    os.makedirs(args.output, exist_ok=True)
    paths = os.path.join(args.output, "SCALING.md"), os.path.join(args.output, "scaling.json")
    if args.report:
        with open(paths[1]) as fh:
            saved = json.load(fh)
        write_report(saved["results"], saved["machine"], *paths)
        return 0
    machine = dict(cpu_info(), ghess_isa=_internals.ghess_isa())
    results = []
    for problem in args.problems:
        batch = args.batch or SCALING_BATCHES.get(problem) or all_problems()[problem][1]
        for dtype in args.dtypes:
            # with --rounds, the thread counts' workers alternate: a slow spell of a shared
            # machine then falls on every count alike, and the medians drop it
            for round_, threads in [(r, t) for r in range(args.rounds) for t in args.threads]:
                r = run_worker(problem, dtype, threads, batch, args,
                               stages=round_ == args.rounds - 1)
                if r is None:
                    print(f"{problem} N={batch} {dtype} {threads} thr: the worker failed",
                          flush=True)
                    continue
                results.append(r)
                machine["versions"] = r["versions"]
                times = ", ".join(f"{n} {1e3 * t:.1f} ms" for n, t in r["timings"].items()
                                  if timing.library(n) == "ghess")
                print(f"{problem} N={batch} {dtype} {threads} thr: {times} "
                      f"({r['elapsed']:.0f} s)", flush=True)
                # after every configuration: an interrupted run keeps what it measured
                write_report(results, machine, *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
