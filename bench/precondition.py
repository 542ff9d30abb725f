"""Preconditioned Newton-CG: GGN products and wall time to reach the plain run's objective.

Usage::

    python bench/precondition.py                 # writes bench/PRECONDITION.md
    python bench/precondition.py --iterations 10 --output /tmp/p   # a quick run
    python bench/precondition.py --problems fashion --seed 1 --runs none kfac-5 --output /tmp/p

Four problems (``--problems``):
- ``digits``: the demo's CNN on scikit-learn's 8x8 digits (80/20 stratified split,
  C = 1000, a 20% subsample per iteration, ``cg_maxiter=50``: the demo's settings);
- ``mlp``: MLP-M (784-512-512-10, ReLU) on 4096 synthetic samples whose labels come
  from a random teacher network of the same shape (C = 1000, 10% subsample);
- ``mlp-digits``: MLP-M on the digits scaled up to 28x28 (the same split, C = 1000,
  20% subsample);
- ``fashion``: MLP-M on the first 4096 images of Fashion-MNIST's training set (C = 1000,
  10% subsample: the synthetic problem's settings). ``bench/fashion_mnist.py`` says
  where the files come from; without them this problem is skipped, and the report
  says so.

For each, Newton-CG runs ``--iterations`` iterations without a preconditioner, then
with ``preconditioner="diag"`` (rebuilt every 5 iterations) and ``"kfac"`` (every
iteration, and every 5), all from the same initial parameters and subsample seed
(``--seed``).
Reported per run: the GGN products (CG iterations plus the one curvature product
of each iteration) and the wall time until the objective first reaches the plain
run's final objective, and the run's final objective. One process, the runs in
turn, ``--threads`` OpenMP threads (default 1).
"""

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: name -> (preconditioner, preconditioner_every); the exact diagonal is rebuilt every 5
#: iterations only (per-sample Jacobians: on MLP-M it costs more than the whole solve)
RUNS = {"none": (None, 1), "diag-5": ("diag", 5), "kfac": ("kfac", 1), "kfac-5": ("kfac", 5)}
#: the problems, in the report's order (``--problems``)
PROBLEMS = ("digits", "mlp", "mlp-digits", "fashion")
#: the Fashion-MNIST problem's name, in its report section or its "Skipped" line
FASHION = "MLP-M on Fashion-MNIST"


def digits_problem():
    """Return the demo's CNN and data (``ghess.demo.train_digits``)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import ghess as G

    digits = load_digits()
    X = (digits.images / 16.0)[:, None].astype(np.float64)
    X_train, _, y_train, _ = train_test_split(X, digits.target, test_size=0.2, random_state=0,
                                              stratify=digits.target)
    model = G.Sequential(G.Conv2d(1, 16, 3, padding=1), G.ReLU(), G.MaxPool2d(2),
                         G.Conv2d(16, 32, 3, padding=1), G.ReLU(), G.MaxPool2d(2),
                         G.Flatten(), G.Linear(32 * 2 * 2, 10), input_shape=(1, 8, 8))
    return "digits CNN", model, (X_train, y_train), 0.2


def mlp_problem(n_samples=4096):
    """Return MLP-M on a random teacher's labels."""
    from problems import all_problems

    model = all_problems()["MLP-M"][0]()
    rng = np.random.default_rng(1)
    X = rng.normal(size=(n_samples, 784))
    teacher = model.init_params(seed=123) * 3.0
    y = model.forward(teacher, X).argmax(axis=1)
    return "MLP-M", model, (X, y), 0.1


def mlp_digits_problem():
    """Return MLP-M on scikit-learn's digits scaled up to MNIST's 28x28 (bilinear).

    Image inputs, whose pixels are correlated (as in MNIST, which cannot be
    downloaded here), where the synthetic problem's inputs are independent normals:
    KFAC's input factor is what differs between the two.
    """
    from problems import all_problems
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.stack([zoom(image / 16.0, 28 / 8, order=1) for image in digits.images])
    X = images.reshape(len(images), -1).clip(0.0, 1.0)
    X_train, _, y_train, _ = train_test_split(X, digits.target, test_size=0.2, random_state=0,
                                              stratify=digits.target)
    return "MLP-M on digits at 28x28", all_problems()["MLP-M"][0](), (X_train, y_train), 0.2


def fashion_mnist_problem(root=None, n_samples=4096):
    """Return MLP-M on the first ``n_samples`` Fashion-MNIST training images, or None
    (with a note on stderr) when the files are missing."""  # noqa: D205, D209
    from fashion_mnist import load
    from problems import all_problems

    try:
        data = load("train", n_samples, root)
    except FileNotFoundError as exc:
        print(f"skipping {FASHION}: {exc}", file=sys.stderr)
        return None
    return FASHION, all_problems()["MLP-M"][0](), data, 0.1


def run(problem, iterations, threads, seed=0, runs=tuple(RUNS), out=print):
    """Return one row per run: (name, products to target, time to target, final objective).

    ``seed`` draws the subsamples (the initial parameters are always seed 0's);
    ``runs`` are keys of :data:`RUNS`, the plain run first (its objective is the target).
    """
    if runs[0] != "none":
        raise ValueError(f"the runs must start with 'none', the target's run: got {runs}")
    import ghess as G

    name, model, data, subsample = problem
    theta0 = model.init_params(seed=0)
    rows, target = [], None
    for preconditioner, every in (RUNS[key] for key in runs):
        opt = G.NewtonCG(model, G.CrossEntropyLoss(), C=1000.0, subsample=subsample,
                         cg_maxiter=50, seed=seed, n_threads=threads,
                         preconditioner=preconditioner, preconditioner_every=every)
        times, start = [], time.perf_counter()

        def clock(theta, record, times=times, start=start):
            times.append(time.perf_counter() - start)

        _, history = opt.fit(theta0, data, n_iterations=iterations, verbose=False,
                             callback=clock)
        objective = np.array([h.objective for h in history])
        products = np.cumsum([h.cg_iterations + 1 for h in history])
        if target is None:
            target = objective[-1]
        hit = np.nonzero(objective <= target)[0]
        label = "none" if preconditioner is None else (
            preconditioner + ("" if every == 1 else f", every {every}"))
        row = (label, int(products[hit[0]]) if len(hit) else None,
               times[hit[0]] if len(hit) else None, int(hit[0]) + 1 if len(hit) else None,
               float(objective[-1]), int(products[-1]), times[-1])
        rows.append(row)
        out(f"{name}: {label}: {row}")
    return name, target, rows


def report(results, iterations, threads, skipped=(), options=""):
    """Markdown of the runs, with the machine; ``skipped`` names problems without data,
    ``options`` the command's other options."""  # noqa: D205, D209
    from report import cpu_info

    info = cpu_info()
    lines = ["# Preconditioned Newton-CG", "",
             f"`python bench/precondition.py --iterations {iterations} --threads {threads}"
             f"{options}`: "
             "GGN products (CG iterations + one curvature product per iteration) and wall "
             "time until the objective first reaches the plain run's final one.", "",
             f"Machine: {info['cpu']} (family {info['family']}, model {info['model']}), "
             f"{info['logical_cpus']} logical CPUs, "
             f"ISA {' '.join(info['isa'])}; {threads} thread(s).", ""]
    lines += [f"Skipped: {name} (its data are missing; see bench/fashion_mnist.py).\n"
              for name in skipped]
    for name, target, rows in results:
        plain_products, plain_time = rows[0][1], rows[0][2]
        lines += [f"## {name}: target objective {target:.6g} (the plain run after "
                  f"{iterations} iterations)", "",
                  "| preconditioner | products to target | vs none | time to target | vs none "
                  "| iterations to target | final objective | products, all | time, all |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for label, products, seconds, its, final, total, wall in rows:
            if products is None:
                lines.append(f"| {label} | not reached | | | | | {final:.6g} | {total} | "
                             f"{wall:.2f} s |")
                continue
            lines.append(f"| {label} | {products} | {products / plain_products:.2f} | "
                         f"{seconds:.2f} s | {seconds / plain_time:.2f} | {its} | {final:.6g} "
                         f"| {total} | {wall:.2f} s |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=HERE)
    parser.add_argument("--problems", nargs="+", default=PROBLEMS, choices=PROBLEMS)
    parser.add_argument("--seed", type=int, default=0, help="of the subsamples")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS),
                        help="the preconditioners (and rebuild intervals), 'none' first")
    parser.add_argument("--fashion-mnist", metavar="DIR", default=None,
                        help="directory of Fashion-MNIST's *-ubyte.gz files (default: "
                             "$GHESS_FASHION_MNIST, else /usr/share/datasets/fashion-mnist)")
    args = parser.parse_args(argv)
    if args.runs[0] != "none":
        parser.error("--runs must start with none: its final objective is the target")
    sys.path.insert(0, HERE)
    makers = {"digits": digits_problem, "mlp": mlp_problem, "mlp-digits": mlp_digits_problem,
              "fashion": lambda: fashion_mnist_problem(args.fashion_mnist)}
    problems = [makers[name]() for name in args.problems]
    results = [run(problem, args.iterations, args.threads, args.seed, args.runs)
               for problem in problems if problem is not None]
    options = "".join(f" --{name} {' '.join(map(str, value))}" for name, value, default in (
        ("problems", args.problems, PROBLEMS), ("seed", [args.seed], [0]),
        ("runs", args.runs, list(RUNS))) if list(value) != list(default))
    text = report(results, args.iterations, args.threads, options=options,
                  skipped=[FASHION for p in problems if p is None])
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "PRECONDITION.md"), "w") as fh:
        fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
