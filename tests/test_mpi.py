"""Data-parallel ghess under MPI: ``mpiexec -n 2`` and ``-n 3`` launched from pytest.

The checks run in ``tests/mpi/distributed_checks.py`` under ``python -m mpi4py`` (an
exception on one rank aborts every rank: the way ghess documents to run MPI jobs).
Skipped without mpi4py and an ``mpiexec`` (``pip install mpich mpi4py``, in the
README's test command).
"""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("mpi4py")
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep
                       + os.environ.get("PATH", ""))
if MPIEXEC is None:
    pytest.skip("no mpiexec (pip install mpich)", allow_module_level=True)

SCRIPT = pathlib.Path(__file__).parent / "mpi" / "distributed_checks.py"


def run(ranks, case, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpi4py",
                           str(SCRIPT), case], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.mark.parametrize("ranks", [2, 3])
def test_distributed_results_equal_one_process_and_agree_across_ranks(ranks):
    done = run(ranks, "agree")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"OK ranks {list(range(ranks))}" in done.stdout


@pytest.mark.parametrize("ranks", [2, 3])
def test_distributed_newton_cg_keeps_every_rank_in_step(ranks):
    done = run(ranks, "newton")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"OK ranks {list(range(ranks))}" in done.stdout


def test_distributed_newton_cg_reports_once_and_stops_together():
    done = run(3, "newton_reports")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "OK ranks [0, 1, 2]" in done.stdout


@pytest.mark.parametrize("case, message", [
    ("params_differ", "ranks disagree on the parameters' values: rank(s) [1]"),
    ("params_wrong_length", "rank 1's parameters: params must have length 334"),
    ("model_differs", "ranks disagree on the model's structure: rank(s) [1]"),
    ("bad_shard", "rank 1's data: X must have shape (n_samples, 1, 5, 5)"),
    ("raises_mid_run", "rank 1 fails between two products"),
    ("newton_bad_shard", "rank 1's data: CrossEntropyLoss: labels must lie in [0, 4)"),
])
def test_faults_end_every_rank_with_a_clear_message(case, message):
    done = run(2, case, timeout=60)  # a hang would hit the timeout
    assert done.returncode != 0
    assert message in done.stdout + done.stderr
    assert "OK" not in done.stdout


@pytest.mark.end_to_end
def test_distributed_demo():
    """``python -m ghess demo --distributed`` launches 2 ranks and trains the digits CNN."""
    pytest.importorskip("sklearn")
    done = subprocess.run([sys.executable, "-m", "ghess", "demo", "--distributed"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "every rank ended with the same parameters: True" in done.stdout
