"""The README's Python example runs as written (under mpiexec at 2 ranks) and its
quick-start commands name files that exist."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mpi4py import MPI

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _mpiexec() -> str:
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else "mpiexec"


@pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI job")
def test_python_api_example_runs_at_two_ranks(tmp_path):
    block = re.search(r"## Python API.*?```python\n(.*?)```", README, re.DOTALL)
    assert block, "README has no Python API example"
    script = tmp_path / "example.py"
    script.write_text(block.group(1), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run(
        [_mpiexec(), "-n", "2", sys.executable, str(script)], capture_output=True, text=True, timeout=120,
        env=env, cwd=tmp_path, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = re.findall(r"(SGD|AdamW) loss ([\d.]+)", proc.stdout)
    assert [name for name, _ in losses] == ["SGD", "AdamW"]
    assert all(0 < float(v) < 10 for _, v in losses)


def test_quick_start_names_what_exists():
    quick = README[README.index("## Quick start"):README.index("## On a cluster")]
    assert 'pip install -e ".[mpich,test]"' in quick and "mpirun -n 4 python train.py" in quick
    assert "python tests/run_mpi.py" in quick
    assert (REPO / "train.py").is_file() and (REPO / "tests" / "run_mpi.py").is_file()
    # .ci/run calls exactly the README's test command
    assert "\npython tests/run_mpi.py\n" in (REPO / ".ci" / "run").read_text() + "\n"
