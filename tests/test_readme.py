"""Every Python example in README.md runs as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if README.exists() else []


@pytest.mark.skipif(not BLOCKS, reason="README.md not found beside tests/")
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block={i}")
def test_readme_example_runs(index, tmp_path, monkeypatch):
    for optional in ("torch", "sklearn", "matplotlib", "mpi4py"):  # extras: skip if absent
        if re.search(rf"^import .*\b{optional}\b|^from {optional}\b", BLOCKS[index], re.M):
            pytest.importorskip(optional)
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {})
