#!/usr/bin/env python
"""Each convolution of the benchmark CNNs on its own: ghess's direct kernels beside oneDNN's.

Usage::

    python bench/conv_layers.py                       # CNN-S and CNN-C, float32 and float64,
                                                      # 1 and 2 threads -> bench/CONV_LAYERS.md
    python bench/conv_layers.py --threads 1 --dtypes float32 --samples 32 --output /tmp/x

Where ghess's loss+gradient trails PyTorch's on a CPU, this says which layer and which
of its three products is behind, and whether the layout oneDNN prefers is why. For
every thread count one worker process, pinned to that many cores with the OpenMP/BLAS
thread counts set before numpy or torch start (``bench/timing.py``), takes each Conv2d
layer of CNN-S and CNN-C (``bench/problems.py``) with its real input: the activations
of a forward pass of the network, seed 0, on ``--samples`` samples. It times in
interleaved rounds (medians):

- *forward*: ghess ``Conv2d.forward`` (the direct kernel, bias included) against
  ``torch.nn.functional.conv2d``;
- *weight gradient*: ghess ``Conv2d.param_vjp`` (weight and bias) against
  ``aten.convolution_backward`` with output mask (input no, weight yes, bias yes);
- *input gradient*: ghess ``Conv2d.input_vjp`` against ``convolution_backward`` with
  mask (yes, no, no);

PyTorch in its default NCHW layout (oneDNN converts to its blocked layout inside each
call) and in ``channels_last`` (NHWC, the layout oneDNN runs without converting).
PyTorch has no oneDNN convolution in float64; it runs its own im2col + GEMM there.
Every result is checked against PyTorch's (relative error) before it is timed.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# ``bench`` is a package of the repository root: run as a script, this file's directory
# would otherwise stand first on the path, its modules shadowing top-level ones
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == HERE:
    sys.path[0] = ROOT
elif ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# neither imports numpy: the worker pins its cores first
from bench.timing import pin_to_cores, thread_env  # noqa: E402

PROBLEMS = ("CNN-S", "CNN-C")
OPERATIONS = ("forward", "weight gradient", "input gradient")
LAYOUTS = ("NCHW", "channels_last")


def _conv_layers(model):
    """Return the indices of the model's Conv2d layers."""
    from ghess.nn.conv import Conv2d

    return [i for i, layer in enumerate(model.layers) if isinstance(layer, Conv2d)]


def _layer_cases(problem, dtype, samples, threads, torch):
    """Yield (label, macs, {name: fn}, {name: relative error}) for each conv layer."""
    import numpy as np

    from bench.problems import all_problems

    factory, _ = all_problems()[problem]
    model = factory()
    rng = np.random.default_rng(0)
    X = rng.standard_normal((samples,) + tuple(model.input_shape)).astype(dtype)
    theta = model.init_params(seed=0).astype(dtype)
    lparams = model.layer_params(theta)
    inputs, x = [], X.reshape(samples, -1)
    for i, layer in enumerate(model.layers):  # each layer's input, flat per sample
        inputs.append(x)
        x = layer.forward(lparams[i], x, {}, 1, threads)
    shape = tuple(model.input_shape)
    shapes = []
    for layer in model.layers:
        shapes.append(shape)
        shape = tuple(layer.output_shape(shape))
    F = torch.nn.functional
    backward = torch.ops.aten.convolution_backward
    for i in _conv_layers(model):
        layer, params = model.layers[i], lparams[i]
        (C, H, W), (Co, Ho, Wo) = shapes[i], tuple(layer.output_shape(shapes[i]))
        kh, kw = params["weight"].shape[2:]
        stride, padding = tuple(layer.stride), tuple(layer.padding)
        macs = samples * Co * Ho * Wo * C * kh * kw
        xi = np.ascontiguousarray(inputs[i])
        gy = rng.standard_normal((samples, Co * Ho * Wo)).astype(dtype)
        ctx = {}
        layer.forward(params, xi, ctx, 1, threads)
        acc = layer.new_accumulator(1, np.dtype(dtype))

        def weight_grad(layer=layer, ctx=ctx, gy=gy, acc=acc):
            for value in acc.values():
                value.fill(0)
            layer.param_vjp(ctx, gy[:, None, :], acc, threads)
            return acc["weight"]

        fns = {
            "ghess forward": lambda layer=layer, params=params, xi=xi: layer.forward(
                params, xi, {}, 1, threads),
            "ghess weight gradient": weight_grad,
            "ghess input gradient": lambda layer=layer, params=params, gy=gy: layer.input_vjp(
                params, gy[:, None, :], threads),
        }
        ours = {"forward": fns["ghess forward"](),
                "weight gradient": weight_grad().reshape(params["weight"].shape).copy(),
                "input gradient": fns["ghess input gradient"]()}
        errors = {}
        for layout in LAYOUTS:
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            tx = torch.from_numpy(xi).reshape(samples, C, H, W).contiguous(memory_format=fmt)
            tw = torch.from_numpy(params["weight"]).contiguous(memory_format=fmt)
            tb = torch.from_numpy(params["bias"])
            tg = torch.from_numpy(gy).reshape(samples, Co, Ho, Wo).contiguous(memory_format=fmt)
            common = (tuple(tb.shape), list(stride), list(padding), [1, 1], False, [0, 0], 1)
            tfns = {
                "forward": lambda tx=tx, tw=tw, tb=tb: F.conv2d(tx, tw, tb, stride, padding),
                "weight gradient": lambda tg=tg, tx=tx, tw=tw: backward(
                    tg, tx, tw, *common, [False, True, True])[1],
                "input gradient": lambda tg=tg, tx=tx, tw=tw: backward(
                    tg, tx, tw, *common, [True, False, False])[0],
            }
            for op, fn in tfns.items():
                fns[f"torch {layout} {op}"] = fn
                with torch.no_grad():
                    theirs = fn().contiguous().numpy().reshape(ours[op].shape)
                scale = max(float(np.abs(theirs).max()), 1e-30)
                errors[f"{layout} {op}"] = float(np.abs(ours[op] - theirs).max()) / scale
        number = _conv_layers(model).index(i) + 1
        label = f"{problem} conv{number}: {C}x{H}x{W} -> {Co}x{Ho}x{Wo}, {kh}x{kw}"
        yield label, macs, fns, errors


def worker(threads, dtypes, samples, budget):
    """Time every case at ``threads`` threads; return the JSON-able rows."""
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    from bench._internals import ghess_isa
    from bench.timing import interleaved_times

    torch.set_num_threads(threads)
    threadpool_limits(1)  # ghess's kernels run their own threads; none of BLAS's
    rows = []
    with torch.no_grad():
        for dtype in dtypes:
            for problem in PROBLEMS:
                for label, macs, fns, errors in _layer_cases(problem, np.dtype(dtype),
                                                             samples, threads, torch):
                    times = interleaved_times(fns, 9, budget)
                    rows.append({"dtype": dtype, "layer": label, "macs": macs,
                                 "times": {name: t[0] for name, t in times.items()},
                                 "errors": errors})
    return {"threads": threads, "rows": rows, "ghess_isa": ghess_isa(),
            "torch": torch.__version__, "mkldnn": bool(torch.backends.mkldnn.is_available())}


def _cpu_line():
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == (platform.processor() or
                                                               "unknown CPU"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl")
                   if f in flags)
    return f"{model}, {os.cpu_count()} logical CPUs, vector ISA: {isa or 'none listed'}"


def report(results, args):
    """Markdown: per dtype and thread count, each layer's three products."""
    lines = ["# Convolutions one by one: ghess's direct kernels beside PyTorch's (oneDNN)", "",
             f"`{' '.join(['python bench/conv_layers.py', *sys.argv[1:]])}`",
             f"on {time.strftime('%Y-%m-%d')}: each Conv2d layer of CNN-S and CNN-C with "
             f"its real input ({args.samples} samples, seed 0), timed alone in interleaved "
             "rounds (medians, ms). *ratio*: PyTorch's faster layout's time over ghess's "
             "(>1: ghess is faster). GFLOP/s count 2 flops per multiply-add.", "",
             f"CPU: {_cpu_line()}."]
    first = results[0]
    lines += [f"ghess ISA levels: {first['ghess_isa']}; torch {first['torch']} "
              f"(oneDNN available: {first['mkldnn']}; float64 convolutions run PyTorch's "
              "own im2col + GEMM).", ""]
    for result in results:
        t = result["threads"]
        for dtype in args.dtypes:
            rows = [r for r in result["rows"] if r["dtype"] == dtype]
            if not rows:
                continue
            lines += [f"## {dtype}, {t} thread(s)", "",
                      "| layer | product | ghess | GFLOP/s | torch NCHW | torch channels_last "
                      "| ratio | max rel. error |",
                      "|---|---|---:|---:|---:|---:|---:|---:|"]
            for r in rows:
                for op in OPERATIONS:
                    ours = r["times"][f"ghess {op}"]
                    theirs = {layout: r["times"][f"torch {layout} {op}"] for layout in LAYOUTS}
                    err = max(r["errors"][f"{layout} {op}"] for layout in LAYOUTS)
                    lines.append(
                        f"| {r['layer']} | {op} | {ours * 1e3:.3f} | "
                        f"{2 * r['macs'] / ours / 1e9:.1f} | {theirs['NCHW'] * 1e3:.3f} | "
                        f"{theirs['channels_last'] * 1e3:.3f} | "
                        f"{min(theirs.values()) / ours:.2f}x | {err:.1e} |")
            total = {name: sum(r["times"][name] for r in rows)
                     for name in rows[0]["times"]}
            for op in OPERATIONS:
                best = min(total[f"torch {layout} {op}"] for layout in LAYOUTS)
                lines.append(f"| all layers | {op} | {total[f'ghess {op}'] * 1e3:.3f} | | "
                             f"{total[f'torch NCHW {op}'] * 1e3:.3f} | "
                             f"{total[f'torch channels_last {op}'] * 1e3:.3f} | "
                             f"{best / total[f'ghess {op}']:.2f}x | |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--samples", type=int, default=32,
                        help="samples per call (default 32: ghess's chunk on 2 threads)")
    parser.add_argument("--budget", type=float, default=0.5,
                        help="seconds of repeats per timed function")
    parser.add_argument("--output", default=HERE, help="directory for CONV_LAYERS.md and .json")
    parser.add_argument("--worker", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        threads = int(args.worker[0])
        pin_to_cores(threads)
        print(json.dumps(worker(threads, args.dtypes, args.samples, args.budget)))
        return
    results = []
    for threads in args.threads:
        command = [sys.executable, os.path.abspath(__file__), "--worker", str(threads),
                   "--dtypes", *args.dtypes, "--samples", str(args.samples),
                   "--budget", str(args.budget)]
        out = subprocess.run(command, env=thread_env(threads), check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{threads} thread(s) done", file=sys.stderr)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "conv_layers.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.output, "CONV_LAYERS.md"), "w") as f:
        f.write(report(results, args))


if __name__ == "__main__":
    main()
