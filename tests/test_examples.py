"""Every script in examples/ runs to the end."""

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).resolve().parents[1] / "examples").glob("*.py"))
NEEDS = {"torch_training_loop.py": "torch", "sklearn_pipeline.py": "sklearn",
         "resnet_curvature.py": "torch"}


@pytest.mark.end_to_end
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path):
    if path.name in NEEDS:
        pytest.importorskip(NEEDS[path.name])
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.strip()
