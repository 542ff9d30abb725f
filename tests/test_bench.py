"""bench/run.py runs end to end on its tiny configurations (a smoke test, not a timing test)."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "run.py")
COMPETITORS = ("torch", "jax", "curvlinops")

pytestmark = [pytest.mark.skipif(not os.path.exists(SCRIPT), reason="no bench/ directory"),
              pytest.mark.end_to_end]


def run_quick(output, env=None):
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--output", str(output)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = (output / "RESULTS_quick.md").read_text()
    results = json.loads((output / "results_quick.json").read_text())["results"]
    return report, results


def check_ghess_rows(report, results):
    assert report.startswith("# ghess benchmark results")
    assert "## SUMMARY" in report
    for problem in ("tiny", "tiny-cnn"):
        assert f"## {problem}, float64, 1 thread(s)" in report
        assert f"| {problem} | float64 | 1 |" in report  # its summary row
    for name in ("ghess GGN product (stored)", "ghess Hessian product (stored)",
                 "ghess loss+grad", "ghess per-sample Jacobians",
                 "ghess per-sample Jacobians (out=)", "numpy GGN product"):
        assert f"| {name} |" in report
    assert [(r["problem"], r["dtype"], r["threads"]) for r in results] == [
        ("tiny", "float64", 1), ("tiny-cnn", "float64", 1)]
    for res in results:
        assert set(res["peak_memory_mib"]) == set(res["timings"]) == set(res["kernel_share"])
        assert res["blas_rates"] if res["threads"] == 1 else res["blas_rates"] == {}
        assert all(rate > 0 for by_lib in res["blas_rates"].values() for rate in by_lib.values())
        assert all(rel <= 1e-10 for rel in res["agreement"].values())
        # ghess's flops are counted from its layers, not taken as nominal multiples
        assert res["flops_source"]["ghess GGN product (stored)"] == "ghess (layers)"
        assert res["flops"]["ghess GGN product (stored)"] > 2 * res["forward_flops"]
    assert "| ghess operation | competitor | ghess (ms) | competitor (ms) | " in report


def test_bench_quick_writes_report(tmp_path):
    report, results = run_quick(tmp_path)
    check_ghess_rows(report, results)
    for res in results:
        for label in ("torch", "JAX", "curvlinops"):  # each either ran or was skipped
            ran = any(name.startswith(label + " ") for name in res["timings"])
            assert ran != (label in res["skipped"]), (label, res["skipped"])


def test_bench_quick_without_competitors(tmp_path):
    # modules that shadow the real ones and fail to import, as in a venv without them
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for module in COMPETITORS:
        (hidden / f"{module}.py").write_text(f"raise ImportError('{module} hidden by test')\n")
    path = os.pathsep.join(filter(None, [str(hidden), os.environ.get("PYTHONPATH")]))
    report, results = run_quick(tmp_path, env=dict(os.environ, PYTHONPATH=path))
    check_ghess_rows(report, results)
    for res in results:
        assert set(res["skipped"]) == {"torch", "JAX", "curvlinops"}
        assert all(name.startswith(("ghess ", "numpy ")) for name in res["timings"])
    assert "Skipped JAX: JAX is not importable" in report


def _load_bench(module):
    """Import ``bench.<module>``: ``bench`` is a package of the repository root."""
    import importlib

    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    return importlib.import_module(f"bench.{module}")


def test_peak_table_lists_misses_with_needed_rate():
    bench = _load_bench("report")
    counted = "ghess (layers)"
    res = {"problem": "P", "dtype": "float64", "threads": 1, "conv": False, "gemm_gflops": 40.0,
           "timings": {"ghess GGN product (stored)": 0.010, "JAX GGN product": 0.015,
                       "ghess Hessian product (stored)": 0.010, "JAX Hessian product": 0.020,
                       "ghess loss+grad": 0.010, "torch loss+grad": 0.009},
           "flops": {"ghess GGN product (stored)": 3e8, "JAX GGN product": 6e8,
                     "ghess Hessian product (stored)": 3e8, "JAX Hessian product": 6e8,
                     "ghess loss+grad": 2e8, "torch loss+grad": 2e8},
           "flops_source": {"ghess GGN product (stored)": counted, "JAX GGN product": "XLA",
                            "ghess Hessian product (stored)": counted,
                            "JAX Hessian product": "XLA", "ghess loss+grad": counted,
                            "torch loss+grad": "PyTorch FlopCounterMode"}}
    rows = [line for line in bench.peak_lines([res]) if line.startswith("| P |")]
    # GGN: 1.5x < 2x, needs 2 * 3e8 / 15 ms = 40 GFLOP/s = 100% of the peak
    assert rows[0] == ("| P | float64 | 1 | GGN product | JAX GGN product | 30.0 (75%) "
                       "| 40.0 (100%) | 40.0 (100%) | 40.0 |")
    # Hessian passes (2x >= 1.5x): no row; loss+grad misses (0.9x)
    assert len(rows) == 2 and rows[1].startswith("| P | float64 | 1 | loss+grad | torch")
    res["timings"]["torch loss+grad"] = 0.011
    assert len([line for line in bench.peak_lines([res]) if line.startswith("| P |")]) == 1


def test_interleaved_rounds_settle_between_libraries(monkeypatch):
    """With ``settle``, a library's operations run together in each round.

    Each library's turn starts with an idle pause and one untimed call of its
    quickest operation; without ``settle``, each round is one pass in order.
    """
    bench = _load_bench("timing")
    calls, sleeps = [], []
    monkeypatch.setattr(bench.time, "sleep", lambda seconds: sleeps.append(seconds)
                        or calls.append("sleep"))

    def op(name, seconds):
        def run():
            calls.append(name)
            t0 = bench.time.perf_counter()
            while bench.time.perf_counter() - t0 < seconds:
                pass
        return run

    fns = {"a slow": op("a slow", 0.002), "a quick": op("a quick", 0.0005),
           "b only": op("b only", 0.001)}
    timed = bench.interleaved_times(fns, 3, budget=0.0, settle=0.5)
    assert {name: runs for name, (_, runs, _) in timed.items()} == {
        "a slow": 3, "a quick": 3, "b only": 3}
    warm_up, rounds = calls[:3], calls[3:]
    assert warm_up == ["a slow", "a quick", "b only"]
    assert rounds == 3 * ["sleep", "a quick", "a slow", "a quick", "sleep", "b only", "b only"]
    assert sleeps == 6 * [0.5]

    calls.clear()
    bench.interleaved_times(fns, 3, budget=0.0)
    assert calls[3:] == 3 * ["a slow", "a quick", "b only"]


def test_thread_scaling_reports_the_machines_own_gemm_speedup():
    bench = _load_bench("report")
    res = {"problem": "CNN-C", "dtype": "float32", "threads": 2, "gemm_gflops": 120.0,
           "gemm_gflops_1thread": 80.0,
           "timings": {"ghess GGN product (stored)": 0.010,
                       "ghess GGN product (stored, 1 thread)": 0.018,
                       "ghess Hessian product (stored)": 0.020,
                       "ghess Hessian product (stored, 1 thread)": 0.030}}
    rows = bench.thread_scaling([res, dict(res, threads=1)])
    assert [(op, round(s, 2), m) for _, _, op, s, m in rows] == [
        ("GGN product", 1.8, 1.5), ("Hessian product", 1.5, 1.5)]
    del res["gemm_gflops_1thread"]  # results of runs before it was measured
    assert [m for *_, m in bench.thread_scaling([res])] == [None, None]


def private_ghess_uses(source):
    """Lines of ``source`` that use a private ghess module (``ghess._x``, or an alias's)."""
    aliases = {"ghess"} | set(re.findall(r"\bimport\s+ghess\s+as\s+(\w+)", source))
    names = "|".join(sorted(aliases))
    pattern = re.compile(rf"\b(?:{names})\s*\.\s*_[A-Za-z]"
                         r"|\bfrom\s+ghess(?:\.\w+)*\s+import\s+\(?\s*_[A-Za-z]"
                         r"|\bfrom\s+ghess\._|\bimport\s+ghess\._")
    return [line for line in source.splitlines() if pattern.search(line)]


def test_private_ghess_uses_are_found():
    for line in ("from ghess import _kernels", "import ghess._engine", "from ghess._base import x",
                 "ghess._kernels.gemm_rowmajor(", "x = ghess. _engine"):
        assert private_ghess_uses(line) == [line], line
    assert private_ghess_uses("import ghess as G\nG._kernels.f()") == ["G._kernels.f()"]
    for line in ("import ghess", "from ghess import testing", "ghess.testing.reference_ggn_matvec",
                 "self._kernels", "model.__class__"):
        assert private_ghess_uses(line) == [], line


def test_private_ghess_modules_are_used_only_in_bench_internals():
    # ghess's private modules are being renamed: bench/_internals.py is the one place
    # that names them, so that a rename is remapped there
    users = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "bench")):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and path != os.path.join(ROOT, "bench", "_internals.py"):
                with open(path) as fh:
                    lines = private_ghess_uses(fh.read())
                if lines:
                    users[os.path.relpath(path, ROOT)] = lines
    assert users == {}
    with open(os.path.join(ROOT, "bench", "_internals.py")) as fh:
        assert private_ghess_uses(fh.read())  # the hooks are there, and found


def _imported_by(module):
    """Which of numpy, ghess, scipy and bench._internals importing ``module`` imports."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import " + module + "; "
            "print(' '.join(m for m in ('numpy', 'ghess', 'scipy', 'bench._internals') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_bench_modules_import_no_numpy_before_the_worker_pins_its_cores():
    # a worker sets its thread counts and pins its cores before numpy starts its BLAS
    assert _imported_by("bench.run") == ["bench._internals"]  # whose imports are lazy
    # bench/ab.py runs on two builds of ghess: the public API only
    assert _imported_by("bench.ab") == []


def test_ab_same_build_twice_gives_ratios_and_no_differences(tmp_path):
    script = os.path.join(ROOT, "bench", "ab.py")
    output = tmp_path / "AB.md"
    proc = subprocess.run([sys.executable, script, "--a", sys.executable, "--b", sys.executable,
                           "--quick", "--output", str(output)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = output.read_text()
    assert report in proc.stdout + "\n"  # printed too
    assert "## Machine" in report and "AVX2: " in report and "AVX-512: " in report
    header = ("| problem | dtype | threads | op | A median (ms) | B median (ms) | B/A "
              "| B/A 95% CI | max rel diff |")
    assert header in report
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| tiny")]
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("| " + problem, "float32", "1", op) for problem in ("tiny", "tiny-cnn")
        for op in ("loss+grad", "GGN product", "Hessian product")]
    for row in rows:
        a, b, ratio = float(row[4]), float(row[5]), float(row[6])
        # the medians are printed to 0.001 ms and the ratio to 0.001: the ratio must lie
        # within what the rounded medians allow (a tiny problem's 0.09 ms leaves ~1% slack)
        half = 0.0005
        assert a > half and b > half
        assert (b - half) / (a + half) - half <= ratio <= (b + half) / (a - half) + half
        assert row[8] == "0 |"  # the same build: identical numbers
    assert "Numbers unchanged: yes" in report
    assert report.count("GHESS_ISA (unset)") == 2  # each side's ISA setting is named


def test_ab_times_the_operations_asked_for(tmp_path):
    # per-sample Jacobians, with --operations only; the loss+gradient beside them
    script = os.path.join(ROOT, "bench", "ab.py")
    output = tmp_path / "AB.md"
    proc = subprocess.run([sys.executable, script, "--a", sys.executable, "--b", sys.executable,
                           "--quick", "--operations", "per-sample Jacobians", "loss+grad",
                           "--output", str(output)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split(" | ") for line in output.read_text().splitlines()
            if line.startswith("| tiny")]
    assert [(r[0], r[3]) for r in rows] == [
        ("| " + problem, op) for problem in ("tiny", "tiny-cnn")
        for op in ("per-sample Jacobians", "loss+grad")]
    assert all(row[8] == "0 |" for row in rows)


def test_ab_environment_per_side():
    ab = _load_bench("ab")
    assert ab.parse_env(["GHESS_ISA=avx2", "X=a=b", "EMPTY="], "--a-env") == {
        "GHESS_ISA": "avx2", "X": "a=b", "EMPTY": ""}
    for bad in (["GHESS_ISA"], ["=avx2"]):
        with pytest.raises(SystemExit, match="--b-env takes VAR=VALUE pairs"):
            ab.parse_env(bad, "--b-env")


def test_ab_max_rel_diff_and_interval(tmp_path):
    import numpy as np

    ab = _load_bench("ab")
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(a, loss=np.array(2.0), grad=np.array([1.0, -4.0], dtype=np.float32))
    np.savez(b, loss=np.array(2.0), grad=np.array([1.0, -4.002], dtype=np.float32))
    assert ab.max_rel_diff(a, a) == 0
    assert ab.max_rel_diff(a, b) == pytest.approx(0.002 / 4, rel=1e-4)
    low, high = ab.ratio_interval([1.0, 1.0, 1.0, 1.0], [1.1, 1.1, 1.1, 1.1])
    assert low == pytest.approx(1.1) and high == pytest.approx(1.1)
    assert ab.auto_rounds(0.01, 5, 10.0) == 100 and ab.auto_rounds(1.0, 5, 10.0) == 5


def test_scaling_mode_reports_libraries_serial_fraction_and_stages(tmp_path):
    # the thread-scaling mode end to end on a tiny conv net (a smoke test, not a timing test)
    script = os.path.join(ROOT, "bench", "scaling.py")
    proc = subprocess.run([sys.executable, script, "--problems", "tiny-cnn", "--batch", "24",
                           "--threads", "1", "2", "--stages", "--repeats", "3", "--budget", "0",
                           "--libraries", "ghess", "torch", "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = (tmp_path / "SCALING.md").read_text()
    results = json.loads((tmp_path / "scaling.json").read_text())["results"]
    assert [(r["problem"], r["batch"], r["threads"]) for r in results] == [
        ("tiny-cnn", 24, 1), ("tiny-cnn", 24, 2)]
    assert "## tiny-cnn, N=24, float32" in report
    for op in ("loss+grad", "GGN product", "Hessian product", "EF product"):
        assert f"| {op} | ghess | " in report and f"| {op} | ghess serial | | " in report
        assert re.search(rf"\| {re.escape(op)} \| ghess \| [\d.]+ \| [\d.]+ \(x[\d.]+\) \|",
                         report)
    assert "### ghess stages, 1 vs 2 threads" in report
    assert re.search(r"\| kernel conv\.\w+ \| \d+ \| [\d.]+ \| [\d.]+ \|", report)
    for r in results:  # ghess's stored-mode operations only, each profiled stage by stage
        ghess_ops = {n for n in r["timings"] if n.startswith("ghess ")}
        assert ghess_ops == {"ghess loss+grad", "ghess GGN product (stored)",
                             "ghess Hessian product (stored)", "ghess EF product (stored)"}
        assert set(r["stages"]) == ghess_ops
        for profile in r["stages"].values():
            assert all(t >= 0 for name, t in profile["stages"].items()
                       if name != "(python, outside stages)")
        ran = any(n.startswith("torch") for n in r["timings"])
        assert ran != ("torch" in r["skipped"])


def test_stage_times_are_exclusive():
    import time

    sys.path.insert(0, ROOT)
    try:
        from bench import scaling, stages
    finally:
        sys.path.remove(ROOT)

    inner = stages._timed("inner", lambda: time.sleep(0.03))

    def outer_work():
        time.sleep(0.02)
        inner()

    outer = stages._timed("outer", outer_work)
    median, per_call, calls = stages.profile(outer, 2)
    assert calls == {"outer": 1, "inner": 1}
    assert 0.03 <= per_call["inner"] < 0.025 + 0.03
    assert 0.02 <= per_call["outer"] < 0.02 + 0.025  # the inner call's time is not its own
    assert median >= 0.05
    assert scaling.karp_flatt(2.0, 2) == 0 and scaling.karp_flatt(1.0, 2) == 1
    assert abs(scaling.karp_flatt(4.0, 8) - 1 / 7) < 1e-12


def test_mpi_scaling_reports_ranks_bytes_and_model(tmp_path):
    # bench/mpi.py end to end on a tiny conv net (a smoke test, not a timing test)
    pytest.importorskip("mpi4py")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "mpi.py"), "--problems",
                           "tiny-cnn", "--budget", "0", "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    if "no mpiexec" in proc.stderr:
        pytest.skip("no mpiexec")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = (tmp_path / "MPI.md").read_text()
    runs = json.loads((tmp_path / "mpi.json").read_text())["runs"]
    assert "## tiny-cnn, N = 16, float32" in report and "Shards on 2 ranks: [8, 8]." in report
    run = runs["tiny-cnn float32"]
    assert set(run) == {"1 rank", "2 ranks", "1 proc, 1 thr", "1 proc, 2 thr", "network"}
    itemsize, n_params = 4, 4 * 9 + 4 + 64 * 3 + 3
    for op in ("GGN product", "Hessian product"):
        # a product is one reduction; a vector this small is gathered whole (one collective)
        assert run["2 ranks"]["collectives"][f"{op} @16"] == [["Allgather", n_params * itemsize]]
        assert run["2 ranks"]["sent"][f"{op} @16"] == n_params * itemsize
        assert re.search(rf"\| {op} \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+x \| "
                         rf"[\d.]+x \| {n_params * itemsize:,} \| 1 Allgather \|", report)
    for scale in (16, 160):  # the model at every rank count, for the data and 10x it
        assert re.search(rf"\| GGN product \| {scale} \| cluster \| 1\.0 \|( [\d.]+ \|){{8}}",
                         report)
    assert run["network"]["alpha"] >= 0 and run["network"]["bandwidth"] > 0


def test_conv_layers_times_each_convolution_beside_pytorch(tmp_path):
    pytest.importorskip("torch")
    script = os.path.join(ROOT, "bench", "conv_layers.py")
    proc = subprocess.run([sys.executable, script, "--threads", "1", "--dtypes", "float64",
                           "--samples", "2", "--budget", "0.01", "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "conv_layers.json") as fh:
        (result,) = json.load(fh)
    rows = result["rows"]
    # CNN-S's two convolutions and CNN-C's three, each checked against PyTorch
    assert [row["layer"].split(":")[0] for row in rows] == [
        "CNN-S conv1", "CNN-S conv2", "CNN-C conv1", "CNN-C conv2", "CNN-C conv3"]
    for row in rows:
        assert len(row["errors"]) == 6 and max(row["errors"].values()) < 1e-12, row
        assert len(row["times"]) == 9 and min(row["times"].values()) > 0
    report = (tmp_path / "CONV_LAYERS.md").read_text()
    assert "## float64, 1 thread(s)" in report and report.count("| all layers |") == 3


def _write_idx(path, array, header=None):
    """Write ``array`` (uint8) as a gzipped IDX file, or with another ``header``."""
    import gzip

    import numpy as np

    array = np.asarray(array, dtype=np.uint8)
    if header is None:
        header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
            int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.tobytes())


def test_fashion_mnist_reads_idx_files_and_names_what_is_missing(tmp_path, monkeypatch):
    import numpy as np

    fashion = _load_bench("fashion_mnist")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([9, 0, 3, 7, 1], dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    X, y = fashion.load("train", 3, root=str(tmp_path))
    assert X.shape == (3, 784) and X.dtype == np.float64 and y.dtype == np.int64
    np.testing.assert_array_equal(X, images[:3].reshape(3, -1) / 255.0)
    np.testing.assert_array_equal(y, labels[:3])
    monkeypatch.setenv("GHESS_FASHION_MNIST", str(tmp_path))
    assert fashion.load()[0].shape == (5, 784)  # the environment's directory, all samples
    with pytest.raises(ValueError, match=r"n_samples must lie in \[1, 5\].*got 6"):
        fashion.load("train", 6)
    with pytest.raises(ValueError, match=r"split must be one of \['test', 'train'\]"):
        fashion.load("validation")
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        fashion.load("test")
    _write_idx(tmp_path / "bad.gz", labels, header=bytes([0, 0, 0x0D, 1, 0, 0, 0, 5]))
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        fashion.read_idx(tmp_path / "bad.gz")
    _write_idx(tmp_path / "short.gz", labels, header=bytes([0, 0, 0x08, 1, 0, 0, 0, 6]))
    with pytest.raises(ValueError, match=r"shape \(6,\), 6 bytes, but 5 bytes follow"):
        fashion.read_idx(tmp_path / "short.gz")


def test_precondition_report_names_a_skipped_problem():
    precondition = _load_bench("precondition")
    sys.path.insert(0, os.path.join(ROOT, "bench"))  # its lazy imports, as its main does
    try:
        rows = [("none", 10, 1.0, 5, 0.5, 10, 1.0), ("kfac", 6, 0.8, 3, 0.4, 9, 1.2)]
        text = precondition.report([("toy", 0.5, rows)], 5, 1,
                                   skipped=("MLP-M on Fashion-MNIST",))
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    assert "Skipped: MLP-M on Fashion-MNIST" in text
    assert "| kfac | 6 | 0.60 | 0.80 s | 0.80 | 3 | 0.4 | 9 | 1.20 s |" in text
    assert "(family " in text
