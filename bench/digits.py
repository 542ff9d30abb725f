"""NewtonCGClassifier against scikit-learn's MLPClassifier on digits: accuracy and wall time.

Usage::

    python bench/digits.py                      # writes bench/DIGITS.md
    python bench/digits.py --seeds 2 --output /tmp/d   # a quick run elsewhere

The 8x8 digits, a 75/25 stratified split, standardised on the training part.
Every estimator has one hidden layer of 100 ReLU units and ``alpha=1e-4``
(scikit-learn's defaults); MLPClassifier runs with ``solver="lbfgs"`` and
``"adam"`` (``max_iter=200``, its default), NewtonCGClassifier with its
defaults. Each estimator is fitted once per seed (``random_state``), the seeds
interleaved so a drift in the machine's speed hits all alike, each fit after
0.2 s of idling (a thread pool still spinning after the previous fit would take
a core from the next, as in ``bench/run.py``); reported are the
median fit time, the mean and the worst test accuracy over the seeds, and each
MLPClassifier's median time over NewtonCGClassifier's. One process; for each
thread count (``--threads``, default 1 and 2) every library runs at that count
(BLAS through threadpoolctl, ghess's OpenMP through ``n_threads``).
"""

import argparse
import os
import sys
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench.report import machine_info  # noqa: E402
from bench.timing import SETTLE  # noqa: E402


def estimators(threads):
    from sklearn.neural_network import MLPClassifier

    from ghess.sklearn import NewtonCGClassifier

    return {
        "ghess NewtonCGClassifier": NewtonCGClassifier(n_threads=threads),
        "sklearn MLPClassifier (lbfgs)": MLPClassifier(solver="lbfgs", max_iter=200),
        "sklearn MLPClassifier (adam)": MLPClassifier(solver="adam", max_iter=200),
    }


def run(seeds, threads):
    from sklearn.base import clone
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, stratify=y,
                                                        random_state=0)
    scaler = StandardScaler().fit(X_train)
    X_train, X_test = scaler.transform(X_train), scaler.transform(X_test)
    protos = estimators(threads)
    rows = {name: {"time": [], "accuracy": [], "iterations": []} for name in protos}
    with threadpool_limits(threads), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name, proto in protos.items():  # warm-up: imports, BLAS pools, ghess's plans
            clone(proto).set_params(random_state=0).fit(X_train, y_train)
        for seed in range(seeds):
            for name, proto in protos.items():
                est = clone(proto).set_params(random_state=seed)
                time.sleep(SETTLE)  # the previous fit's thread pools stop spinning
                t0 = time.perf_counter()
                est.fit(X_train, y_train)
                rows[name]["time"].append(time.perf_counter() - t0)
                rows[name]["accuracy"].append(est.score(X_test, y_test))
                rows[name]["iterations"].append(est.n_iter_)
    return rows


def report(tables, seeds):
    """Markdown: machine, versions, and one table per thread count."""
    import sklearn

    info = machine_info([])
    lines = ["# NewtonCGClassifier vs MLPClassifier on digits", "",
             f"Machine: {info['cpu']}, {info['cores']} cores. Python {info['python']}, NumPy "
             f"{info['numpy']}, SciPy {info['scipy']}, scikit-learn {sklearn.__version__}, "
             f"ghess {info['ghess']}, BLAS {', '.join(info['blas'])}.", "",
             f"Produced by `python bench/digits.py` ({seeds} seeds; method in its docstring).",
             ""]
    for threads, rows in tables.items():
        ours = np.median(rows["ghess NewtonCGClassifier"]["time"])
        lines += [f"## {threads} thread(s)", "",
                  "| estimator | test accuracy (mean) | worst | fit time (median, s) | "
                  "time / ghess's | iterations (median) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, row in rows.items():
            t = np.median(row["time"])
            lines.append(f"| {name} | {np.mean(row['accuracy']):.4f} | "
                         f"{min(row['accuracy']):.4f} | {t:.3f} | {t / ours:.2f}x | "
                         f"{int(np.median(row['iterations']))} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--output", default=HERE, help="directory for DIGITS.md")
    args = parser.parse_args(argv)
    text = report({t: run(args.seeds, t) for t in args.threads}, args.seeds)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "DIGITS.md"), "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
