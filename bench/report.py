"""The report: the targets, ``RESULTS.md`` and ``results.json``.

The report opens with a summary of the targets (:data:`TARGETS`): ghess's stored
GGN product 2x faster than the fastest of torch.func/JAX/curvlinops, its Hessian
product 1.5x, loss+grad no slower than PyTorch, per-sample Jacobians 1.5x faster
than torch.func, 5x faster products than the NumPy reference on conv nets, and a
1.7x speed-up from 1 to 2 threads on CNN-C. Then the machine, the method, and one
section per configuration.
"""

import json
import os
import time
from typing import NamedTuple

#: ghess's entry for each operation the competitors are compared with
GHESS_MAIN = {"forward": "ghess forward", "loss+grad": "ghess loss+grad",
              "GGN product": "ghess GGN product (stored)",
              "Hessian product": "ghess Hessian product (stored)",
              "Jacobian product": "ghess Jacobian product (stored)",
              "per-sample Jacobians": "ghess per-sample Jacobians (out=)"}


class Target(NamedTuple):
    """ghess's ``op`` must be ``ratio`` times faster than the fastest of ``rivals``."""

    column: str
    op: str
    rivals: tuple
    ratio: float
    conv_only: bool = False


TARGETS = (
    Target("GGN vs best (>=2x)", "GGN product", ("torch.func", "JAX", "curvlinops"), 2.0),
    Target("Hessian vs best (>=1.5x)", "Hessian product", ("torch.func", "JAX", "curvlinops"),
           1.5),
    Target("loss+grad vs torch (>=1x)", "loss+grad", ("torch",), 1.0),
    Target("Jacobians vs torch.func (>=1.5x)", "per-sample Jacobians", ("torch.func",), 1.5),
    Target("GGN vs NumPy (>=5x, CNN)", "GGN product", ("numpy",), 5.0, conv_only=True),
    Target("Hessian vs NumPy (>=5x, CNN)", "Hessian product", ("numpy",), 5.0, conv_only=True),
)
#: ghess's 1 -> 2 thread speed-up of these products must reach SCALING_TARGET ...
SCALING_OPS = ("GGN product", "Hessian product")
SCALING_TARGET = 1.7
#: ... on these problems
SCALING_PROBLEMS = ("CNN-C",)


def judge(res, target):
    """Judge ``target`` in one result: None when not measured, else a dict.

    ``ratio`` is the fastest rival's time over ghess's, ``rival`` that rival's entry,
    and ``pass`` None where the target does not apply (NumPy targets on dense nets).
    """
    t = res["timings"]
    mine = GHESS_MAIN[target.op]
    rivals = [f"{rival} {target.op}" for rival in target.rivals]
    rivals = [name for name in rivals if name in t]
    if mine not in t or not rivals:
        return None
    fastest = min(rivals, key=t.get)
    ratio = t[fastest] / t[mine]
    applies = res["conv"] or not target.conv_only
    return {"ratio": ratio, "rival": fastest, "required": target.ratio,
            "pass": ratio >= target.ratio if applies else None}


def target_cell(verdict):
    """``'2.31x PASS'``; no mark where the target does not apply, ``n/a`` if not measured."""
    if verdict is None:
        return "n/a"
    mark = {True: " PASS", False: " FAIL", None: ""}[verdict["pass"]]
    return f"{verdict['ratio']:.2f}x{mark}"


def thread_scaling(all_results):
    """Rows (problem, dtype, op, speed-up, machine's GEMM speed-up) from 1 to 2 threads.

    Both of ghess's timings come from the 2-thread worker, where the 1-thread
    products are timed in the same rounds as the 2-thread ones; the last column
    is the 1024 x 784 x 512 GEMM's 2-thread rate over its 1-thread rate in that
    worker (None if not measured).
    """
    rows = []
    for res in all_results:
        if res["threads"] != 2:
            continue
        t = res["timings"]
        one_thread_gemm = res.get("gemm_gflops_1thread")
        machine = res["gemm_gflops"] / one_thread_gemm if one_thread_gemm else None
        for op in SCALING_OPS:
            two, one = GHESS_MAIN[op], f"ghess {op} (stored, 1 thread)"
            if one in t and two in t:
                rows.append((res["problem"], res["dtype"], op, t[one] / t[two], machine))
    return rows


def counted_flops(res, name):
    """Return the flops counted for operation ``name``, None if only nominal (or none)."""
    if res.get("flops_source", {}).get(name, "nominal") == "nominal":
        return None
    return res["flops"][name]


def flop_ratio(res, mine, rival):
    """Return the rival's counted flops over ghess's: the speed-up at equal GEMM efficiency."""
    mine_flops, rival_flops = counted_flops(res, mine), counted_flops(res, rival)
    if mine_flops is None or rival_flops is None:
        return None
    return rival_flops / mine_flops


def peak_lines(all_results):
    """Return a table of every missed GGN/Hessian/loss+grad target against the GEMM peak.

    ``needed`` is the rate ghess would have to sustain over its own counted flops
    to meet the target against that run's fastest rival; ``peak`` is the GEMM rate
    measured in the same worker (1024x784 @ 784x512). A need above 100% of the peak
    cannot be met with ghess's flop count on this machine.
    """
    rows = []
    for res in all_results:
        peak = res.get("gemm_gflops")
        for target in TARGETS[:3]:
            verdict = judge(res, target)
            if not peak or verdict is None or verdict["pass"] is not False:
                continue
            mine, rival, t = GHESS_MAIN[target.op], verdict["rival"], res["timings"]
            mine_flops, rival_flops = counted_flops(res, mine), counted_flops(res, rival)
            if mine_flops is None:
                continue
            have = mine_flops / t[mine] / 1e9
            need = target.ratio * mine_flops / t[rival] / 1e9
            rival_rate = None if rival_flops is None else rival_flops / t[rival] / 1e9
            cells = [f"{rate:.1f} ({rate / peak:.0%})" if rate is not None else "n/a"
                     for rate in (have, need, rival_rate)]
            rows.append(f"| {res['problem']} | {res['dtype']} | {res['threads']} | {target.op} "
                        f"| {rival} | " + " | ".join(cells) + f" | {peak:.1f} |")
    if not rows:
        return []
    return ["", "Missed targets against the machine's GEMM peak (GFLOP/s over each "
            "implementation's counted flops; % of the GEMM rate measured in the same worker). "
            "\"needed\" is what ghess would have to sustain to meet the target; above 100% "
            "it cannot be met with ghess's flop count on this machine.", "",
            "| problem | dtype | threads | operation | fastest rival | ghess | needed "
            "| rival | GEMM peak |", "|---|---|---:|---|---|---:|---:|---:|---:|"] + rows


def summary_lines(all_results):
    """Return the SUMMARY section: every target, one row per configuration."""
    lines = ["## SUMMARY", "",
             "Ratios are competitor time / ghess time (>1: ghess is faster); \"best\" is the "
             "fastest of torch.func, JAX and curvlinops in that run. A NumPy target applies "
             "to conv nets only; n/a: the competitor did not run.", "",
             "| problem | dtype | threads | " + " | ".join(t.column for t in TARGETS) + " |",
             "|---|---|---:|" + "---:|" * len(TARGETS)]
    met = total = 0
    for res in all_results:
        verdicts = [judge(res, target) for target in TARGETS]
        met += sum(v is not None and v["pass"] is True for v in verdicts)
        total += sum(v is not None and v["pass"] is not None for v in verdicts)
        lines.append(f"| {res['problem']} | {res['dtype']} | {res['threads']} | "
                     + " | ".join(map(target_cell, verdicts)) + " |")
    lines += ["", "Counted flops of the fastest rival over ghess's (PyTorch's FlopCounterMode, "
              "XLA's cost analysis, ghess's layer count): the speed-up each product would "
              "show at equal GEMM efficiency.", "",
              "| problem | dtype | threads | GGN: rival, flop ratio "
              "| Hessian: rival, flop ratio |",
              "|---|---|---:|---|---|"]
    for res in all_results:
        cells = []
        for target in TARGETS[:2]:
            verdict = judge(res, target)
            ratio = None if verdict is None else flop_ratio(res, GHESS_MAIN[target.op],
                                                            verdict["rival"])
            cells.append("n/a" if ratio is None else f"{verdict['rival']}, {ratio:.2f}")
        lines.append(f"| {res['problem']} | {res['dtype']} | {res['threads']} | "
                     + " | ".join(cells) + " |")
    lines += peak_lines(all_results)
    scaling = thread_scaling(all_results)
    lines += ["", "ghess 1 -> 2 thread speed-up, both timed in the 2-thread worker "
              f"(target >= {SCALING_TARGET}x on "
              f"{', '.join(SCALING_PROBLEMS)}):", ""]
    if scaling:
        lines += ["| problem | dtype | product | speed-up | machine's GEMM 1 -> 2 | status |",
                  "|---|---|---|---:|---:|---|"]
        for problem, dtype, op, speedup, machine in scaling:
            status = "—"
            if problem in SCALING_PROBLEMS:
                status = "PASS" if speedup >= SCALING_TARGET else "FAIL"
                met += status == "PASS"
                total += 1
            gemm = "n/a" if machine is None else f"{machine:.2f}x"
            lines.append(f"| {problem} | {dtype} | {op} | {speedup:.2f}x | {gemm} | {status} |")
    else:
        lines.append("(not measured: no problem ran with 2 threads)")
    lines += ["", f"**Targets met: {met} of {total}.**", ""]
    return lines


def config_lines(res):
    """One configuration's timings, rates, memory, comparisons and agreement."""
    t, gemm = res["timings"], res["gemm_gflops"]
    n_jac = res["jacobian_samples"]
    jac_note = ("the whole batch" if n_jac == res["batch"]
                else f"the first {n_jac} samples (a sub-batch: the whole batch's "
                     "Jacobians exceed 2 GiB)")
    lines = [f"## {res['problem']}, {res['dtype']}, {res['threads']} thread(s)", "",
             f"Batch {res['batch']}, {res['n_params']} parameters, forward GEMM work "
             f"F = {res['forward_flops'] / 1e6:.4g} MFLOP; GEMM {gemm:.1f} GFLOP/s on "
             f"core(s) {res['cores']}. Per-sample Jacobians on {jac_note}, "
             f"{res['jacobian_bytes'] / 2**20:.3g} MiB of output."]
    rates = res.get("blas_rates")
    if rates:
        libraries = list(next(iter(rates.values())))
        lines += ["", "GEMM rates (GFLOP/s) of each library on the same operands, one core:",
                  "",
                  "| GEMM | " + " | ".join(libraries) + " |",
                  "|---|" + "---:|" * len(libraries)]
        for shape, by_library in rates.items():
            lines.append(f"| {shape} | "
                         + " | ".join(f"{by_library[name]:.1f}" for name in libraries) + " |")
        lines.append("")
    for label, reason in res["skipped"].items():
        lines.append(f"Skipped {label}: {reason}.")
    for name, note in res.get("notes", {}).items():
        lines.append(f"{name}: {note}.")
    lines += ["", "| operation | median (ms) | runs | MFLOP (* nominal) | % of GEMM peak "
              "(Jacobians: output GB/s) | peak extra RSS (MiB) | % in OS kernel |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    kernel_share = res.get("kernel_share", {})
    sources = res.get("flops_source", {})
    for name, seconds in t.items():
        flops = res["flops"].get(name)
        if flops is not None:
            mark = "*" if sources.get(name, "nominal") == "nominal" else ""
            nominal = f"{flops / 1e6:.4g}{mark}"
            rate = f"{100 * flops / (seconds * gemm * 1e9):.1f}%"
        elif res["operations"][name] == "per-sample Jacobians":
            nominal, rate = "—", f"{res['jacobian_bytes'] / seconds / 1e9:.2f} GB/s"
        else:
            nominal, rate = "—", "—"
        share = kernel_share.get(name)
        lines.append(f"| {name} | {1e3 * seconds:.3f} | {res['repeats'][name]} | {nominal} | "
                     f"{rate} | {res['peak_memory_mib'][name]:.2f} | "
                     f"{'—' if share is None else f'{100 * share:.0f}%'} |")
    lines += ["", "| ghess operation | competitor | ghess (ms) | competitor (ms) | "
              "ratio (competitor / ghess) | flop ratio | target |",
              "|---|---|---:|---:|---:|---:|---|"]

    def flops_cell(mine, name):
        ratio = flop_ratio(res, mine, name)
        return "—" if ratio is None else f"{ratio:.2f}"

    for op, mine in GHESS_MAIN.items():
        if mine not in t:
            continue
        for name, other_op in res["operations"].items():
            if other_op == op and name != mine:
                lines.append(f"| {mine} | {name} | {1e3 * t[mine]:.3f} | {1e3 * t[name]:.3f} "
                             f"| {t[name] / t[mine]:.2f}x | {flops_cell(mine, name)} | |")
    for target in TARGETS:
        verdict = judge(res, target)
        if verdict is None or verdict["pass"] is None:
            continue
        mine, fastest = GHESS_MAIN[target.op], verdict["rival"]
        rival = (fastest if len(target.rivals) == 1
                 else f"fastest of {' / '.join(target.rivals)}: {fastest}")
        lines.append(f"| {mine} | {rival} | {1e3 * t[mine]:.3f} | {1e3 * t[fastest]:.3f} | "
                     f"{verdict['ratio']:.2f}x | {flops_cell(mine, fastest)} | "
                     f">= {target.ratio}x: "
                     f"{'PASS' if verdict['pass'] else 'FAIL'} |")
    lines += ["", "Agreement with ghess (relative 2-norm): " + ", ".join(
        f"{k} {v:.1e}" for k, v in res["agreement"].items()), ""]
    return lines


def cpu_info():
    """Model name, family and model numbers (a VM's model name is often generic),
    logical CPUs and the vector ISA flags of this machine."""  # noqa: D205, D209
    model, flags, numbers = "unknown", set(), {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "model name" and model == "unknown":
                    model = value
                elif key in ("cpu family", "model") and key not in numbers:
                    numbers[key] = value
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl",
                       "avx512_bf16", "amx_tile") if f in flags]
    return {"cpu": model, "family": numbers.get("cpu family"), "model": numbers.get("model"),
            "logical_cpus": os.cpu_count(), "isa": isa}


def machine_info(all_results):
    """CPU, cores, versions and BLAS of this machine (competitor versions from the runs)."""
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
    from . import _internals

    info = {"cpu": cpu, "cores": os.cpu_count(), "isa_flags": " ".join(cpu_info()["isa"]),
            "ghess_isa": _internals.ghess_isa(), "python": platform.python_version(),
            "platform": platform.platform(), "numpy": np.__version__,
            "scipy": scipy.__version__, "ghess": ghess.__version__,
            "blas": sorted({f"{i.get('internal_api')} {i.get('version')}"
                            for i in threadpool_info() if i.get("user_api") == "blas"})}
    for package in ("torch", "jax", "jaxlib", "curvlinops"):
        info[package] = next((r["versions"][package] for r in all_results
                              if package in r["versions"]), "not available")
    return info


METHOD = """\
Times are medians after a warm-up (ms). Every implementation runs in the same process on the
same weights, data and vectors, after a check that it agrees with ghess. The operations are
timed in interleaved rounds (each round runs every operation once, slow ones for fewer
rounds), so that a drift in the machine's speed, large on this shared VM, hits ghess and its
rivals alike; the operator builds are timed separately. With 2 threads, each library's
operations run together in a round, after 0.2 s of idling and one untimed call of its quickest
operation: a thread pool still spinning after one library's last call would otherwise take a
core from the next library (torch.func's products, right after the NumPy reference's OpenBLAS
calls, timed up to 2x slower). The 1 -> 2 thread
speed-up compares ghess's 2-thread products with 1-thread twins timed in the same rounds of
the 2-thread worker; next to it, the machine's own: the 1024 x 784 x 512 GEMM's rate with 2
threads over its rate with 1, both in that worker (a core taken by another tenant of the VM
shows there).
Each worker process is restricted to `threads` CPU cores with `sched_setaffinity`, which
binds every library's thread pool alike, including XLA's (JAX 0.10 has no flag for the size of
its CPU thread pool; `intra_op_parallelism_threads` is not an XLA flag). With 1 thread, JAX
also runs with `XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`; OpenMP and BLAS get the thread
count through their environment variables and PyTorch through `torch.set_num_threads`.

Flops are counted per implementation: ghess's from its layers (`ghess_gemm_flops`: GEMMs
and the contractions with the stored factors), PyTorch's, torch.func's and curvlinops' by
`torch.utils.flop_counter.FlopCounterMode`, JAX's by XLA's cost analysis of the compiled
function (after XLA's own simplifications). The NumPy reference has no counter: its figures
(marked *) are nominal multiples of F, the GEMM flops of one forward pass (forward F,
loss+grad 3F, GGN product 2F, Hessian product 6F). The percentage of the GEMM peak (a
1024 x 784 x 512 GEMM timed in the same worker before and after the rounds, the faster
kept) is then each implementation's own efficiency,
and the flop ratio (rival's flops / ghess's) is the speed-up ghess would show if both ran at
the same efficiency. Per-sample Jacobians report their output rate in GB/s. torch.func
and JAX produce them as one block per parameter tensor; the concatenation into one array is
not timed. "torch loss+grad" is PyTorch's ordinary `loss.backward()` on the module.

Peak extra RSS: after all timings each operation runs once more while a thread samples the
resident set size every 0.5 ms (and the kernel's high-water mark, reset before the call where
Linux allows it); reported is the peak minus the resident size just before the call, after
freed heap memory was returned to the OS.

% in OS kernel: the process's system CPU time over the wall time of an operation's timed
runs (all threads). It is the cost of page faults on fresh allocations: on this VM a freshly
touched page may also have to be supplied by the hypervisor, so an operation that writes a new
multi-hundred-MiB array (per-sample Jacobians) can spend most of its time there. "ghess
per-sample Jacobians (out=)" writes into one buffer reused across calls, which the API offers;
the rivals' APIs allocate a new output on every call.
"""


def write_report(infos, all_results, path_md, path_json, title):
    """SUMMARY, machine info, then one section per configuration; and the JSON."""
    summary = {"targets": [dict({"problem": r["problem"], "dtype": r["dtype"],
                                 "threads": r["threads"]},
                                **{t.column: judge(r, t) for t in TARGETS})
                           for r in all_results],
               "thread_scaling": [
                   {"problem": problem, "dtype": dtype, "op": op, "speedup": speedup,
                    "machine_gemm_speedup": machine,
                    "pass": speedup >= SCALING_TARGET if problem in SCALING_PROBLEMS else None}
                   for problem, dtype, op, speedup, machine in thread_scaling(all_results)]}
    with open(path_json, "w") as fh:
        json.dump({"machine": infos, "summary": summary, "results": all_results}, fh, indent=1)
    lines = [f"# {title}", "",
             f"Generated by `python bench/run.py` on {time.strftime('%Y-%m-%d')}.", ""]
    lines += summary_lines(all_results)
    lines += ["## Machine", ""] + [f"- {key}: {value}" for key, value in infos.items()]
    lines += ["", "## Method", "", METHOD]
    for res in all_results:
        lines += config_lines(res)
    with open(path_md, "w") as fh:
        fh.write("\n".join(lines) + "\n")
