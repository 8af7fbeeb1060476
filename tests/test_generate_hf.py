"""`python -m mpisplit.generate --hf FOLDER` serves Hugging Face GPT-2 weights split over
ranks: the ids it prints equal the library's own greedy decoding at tp=1."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

import mpisplit as ms


def _mpiexec() -> str:
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else "mpiexec"


@pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs")
def test_generate_hf_matches_in_process_greedy_at_1_and_2_ranks(tmp_path):
    grid = ms.ProcessGrid(tp=1, comm=MPI.COMM_SELF)
    cfg = ms.GPTConfig(vocab_size=301, block_size=32, n_layer=2, n_head=4, n_embd=32)
    model = ms.GPT(cfg, grid, dtype="float64", seed=7)
    model.save_pretrained(tmp_path / "hf")
    prompt = np.array([[5, 17, 300, 2]])
    expected = model.generate(prompt, 12)[0]  # greedy
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    for n in (1, 2):
        proc = subprocess.run(
            [_mpiexec(), "-n", str(n), sys.executable, "-m", "mpisplit.generate", "--hf", str(tmp_path / "hf"),
             "--prompt-ids", "5,17,300,2", "--max-new-tokens", "12", "--dtype", "float64"],
            capture_output=True, text=True, timeout=120, env=env, check=False,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = [int(t) for t in proc.stdout.strip().split(",")]
        assert got == expected.tolist(), (n, got, expected.tolist())
    bad = subprocess.run(
        [_mpiexec(), "-n", "2", sys.executable, "-m", "mpisplit.generate", "--hf", str(tmp_path / "hf"),
         "--prompt-ids", "5,999"], capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    assert bad.returncode == 2 and bad.stderr.strip() == "error: prompt ids must lie in [0, 301)"
    grid.free()
