"""Training Llama-family models with train.py, as `mpiexec -n N` jobs: fine-tuning a folder
(`--init-from`) at dp x pp x tp layouts with sequence parallelism, recomputation and resume, and
a fresh `--arch llama` model.

    python -m pytest -q tests/test_llama_train.py

Reference: the one-rank run of the same flags (its metrics.jsonl losses); in float64 every
layout's losses equal it to 1e-10 (the reduction order differs). Tiny folder: tests/_dense_llama.py
(Llama: 8 heads and 2 KV heads, so tp = 4 replicates them; untied head).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import _dense_llama as dense
import numpy as np
import pytest
from conftest import REPO_ROOT, clean_mpi_env, mpiexec_path

TRAIN = Path(REPO_ROOT) / "train.py"
COMMON = ["--seq-len", "16", "--batch-size", "8", "--eval-every", "0", "--sample-len", "0", "--no-progress",
          "--log-every", "1", "--dtype", "float64", "--lr", "1e-2", "--warmup", "6", "--steps", "6"]


def run(n: int, args: list[str], cwd: Path, timeout: float = 120) -> None:
    env = clean_mpi_env()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    cmd = [mpiexec_path(), "-n", str(n), sys.executable, str(TRAIN), *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} still running after {timeout} s\n{out}\n{err}")
    assert proc.returncode == 0, f"{' '.join(cmd)}: exit {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"


def losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def llama_work(path: Path) -> Path:
    """`path` with the tiny Llama folder (llama/) and 4000 random token ids (ids.npy)."""
    c = dense.FAMILIES["llama"]
    dense.write_folder(path / "llama", c, dense.arrays(c, seed=4))
    np.save(path / "ids.npy", np.random.default_rng(0).integers(0, c["vocab_size"], size=4000))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return llama_work(tmp_path_factory.mktemp("llama-train"))


def finetune(out: str, *extra: str) -> list[str]:
    return [*COMMON, "--init-from", "llama", "--data", "ids.npy", "--out", out, *extra]


@pytest.fixture(scope="module")
def baseline(work: Path) -> list[float]:
    run(1, finetune("one"), work)
    return losses(work / "one")


@pytest.mark.parametrize(("n", "flags"), [
    (4, ["--tp", "2", "--dp", "2", "--sequence-parallel", "--recompute", "full"]),
    (4, ["--tp", "2", "--pp", "2", "--micro-batches", "2", "--recompute", "selective"]),
])
def test_fine_tuning_losses_equal_one_rank_at_every_layout(work, baseline, n, flags):
    name = "run-" + "-".join(f.strip("-") for f in flags)
    run(n, finetune(name, *flags), work)
    got = losses(work / name)
    assert len(got) == len(baseline) == 6
    assert np.allclose(got, baseline, rtol=1e-10, atol=0), (flags, got, baseline)


def test_resume_at_another_layout_continues_the_run(work, baseline):
    # resumed at tp = 4: the 2 KV heads replicated twice, their gradients summed over the pairs
    run(2, finetune("resume", "--tp", "2", "--steps", "3"), work)
    run(4, finetune("resume", "--tp", "4", "--resume"), work)
    got = losses(work / "resume")
    assert np.allclose(got, baseline, rtol=1e-10, atol=0), (got, baseline)


def test_mixed_precision_fine_tuning_tracks_float32(work):
    args = [a if a != "float64" else "float32" for a in finetune("fp32")]
    run(2, [*args, "--tp", "2"], work)
    run(2, [*[a if a != "fp32" else "amp" for a in args], "--tp", "2", "--amp", "float16"], work)
    ref, amp = losses(work / "fp32"), losses(work / "amp")
    assert np.all(np.isfinite(amp)) and np.allclose(amp, ref, rtol=2e-2), (amp, ref)


def test_fresh_llama_trains_and_is_the_same_at_tp_2(work):
    fresh = ["--arch", "llama", "--layers", "2", "--hidden", "32", "--heads", "4", "--kv-heads", "2",
             "--intermediate", "48", "--rope-theta", "500", *COMMON]
    (work / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    run(1, [*fresh, "--data", "text.txt", "--out", "fresh1"], work)
    run(2, [*fresh, "--data", "text.txt", "--out", "fresh2", "--tp", "2", "--sequence-parallel"], work)
    one, two = losses(work / "fresh1"), losses(work / "fresh2")
    assert np.allclose(one, two, rtol=1e-10, atol=0), (one, two)
    assert one[-1] < one[0]  # it learns
    meta = json.loads(next((work / "fresh1").glob("step-*/index.json")).read_text())["meta"]["config"]
    assert (meta["family"], meta["n_kv_head"], meta["intermediate_size"], meta["rope_theta"]) == ("llama", 2, 48, 500.0)
