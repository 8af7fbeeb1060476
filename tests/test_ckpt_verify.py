"""A corrupted checkpoint file read by rank 1 only, through every door that loads a checkpoint
(`mpisplit generate`, `mpisplit serve`, `train.py --resume`) as 2-rank jobs: each ends every
rank with one error line naming the file and both sha256 digests, before any weight is used;
the server never reports healthy. The checkpoint is a real tp=2 training run's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, mpiexec_command
from mpi4py import MPI
from test_cli import run

from mpisplit.training.data import default_corpus

pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs")

TRAIN = Path(REPO_ROOT) / "train.py"
TINY = ["--layers", "2", "--hidden", "24", "--heads", "4", "--seq-len", "16", "--batch-size", "8",
        "--eval-every", "0", "--sample-len", "0", "--no-progress", "--dtype", "float64", "--tp", "2"]


def launch(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`mpiexec -n 2 python argv...`; the whole process group killed (and the test failed) on timeout."""
    return run([*mpiexec_command(2), sys.executable, *argv], cwd)


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory):
    """A run folder whose checkpoint has one flipped byte in the middle of tp01-of-02."""
    work = tmp_path_factory.mktemp("verify")
    (work / "data.txt").write_text(default_corpus()[:5000], encoding="utf-8")
    done = launch([str(TRAIN), *TINY, "--data", "data.txt", "--out", "run", "--steps", "2"], work)
    assert done.returncode == 0, done.stderr
    (step,) = sorted((work / "run").glob("step-*"))
    shard = step / "tp01-of-02.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    return work, shard


def assert_names_the_file(result: subprocess.CompletedProcess, shard: Path) -> None:
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.fullmatch(rf"error: rank 1: checkpoint file \S*{re.escape(shard.name)} is corrupt: "
                        r"sha256 [0-9a-f]{64}, the index records [0-9a-f]{64}", lines[0]), lines[0]


def test_generate_refuses_the_corrupted_file(corrupted):
    work, shard = corrupted
    result = launch(["-m", "mpisplit.generate", "--ckpt", "run", "--prompt", "the ", "--max-new-tokens", "4"], work)
    assert_names_the_file(result, shard)
    assert result.stdout == ""


def test_serve_refuses_the_corrupted_file(corrupted):
    work, shard = corrupted
    result = launch(["-m", "mpisplit.serve", "--ckpt", "run", "--port", "0"], work)
    assert_names_the_file(result, shard)
    assert "serving" not in result.stdout


def test_resume_refuses_the_corrupted_file(corrupted):
    work, shard = corrupted
    result = launch([str(TRAIN), *TINY, "--data", "data.txt", "--out", "run", "--steps", "4", "--resume"], work)
    assert_names_the_file(result, shard)
