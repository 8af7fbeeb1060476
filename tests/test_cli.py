"""The `mpisplit` command as a user runs it: subcommands and their --help, the older
`python -m` forms, a clear error for a run folder that is a file, and the loss curve
(written at the end of training and by `mpisplit plot`), checked against metrics.jsonl."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, clean_mpi_env, mpiexec_path
from mpi4py import MPI

pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs")

TINY = [
    "--layers", "2", "--hidden", "24", "--heads", "4", "--seq-len", "16", "--batch-size", "8",
    "--eval-every", "3", "--eval-iters", "2", "--sample-len", "0", "--no-progress", "--log-every", "1",
    "--dtype", "float64", "--steps", "6", "--warmup", "6",
]  # fmt: skip


def mpisplit_cmd() -> str:
    found = Path(sys.executable).parent / "mpisplit"
    return str(found) if found.exists() else shutil.which("mpisplit") or "mpisplit"


def run(cmd: list[str], cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run with a one-thread BLAS; on timeout kill the whole process group and fail."""
    env = clean_mpi_env()
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env.pop("MPISPLIT_FAULT", None)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd} still running after {timeout} s\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli")
    (path / "text.txt").write_text("the quick brown fox jumps over the lazy dog; " * 40, encoding="utf-8")
    return path


def test_every_subcommand_has_help(work: Path) -> None:
    top = run([mpisplit_cmd(), "--help"], work)
    assert top.returncode == 0 and all(c in top.stdout for c in ("train", "generate", "convert", "plot"))
    for command, flag in (("train", "--no-plot"), ("generate", "--max-new-tokens"), ("convert", "--to-hf"),
                          ("plot", "RUN_DIR")):
        result = run([mpisplit_cmd(), command, "--help"], work)
        assert result.returncode == 0, result.stderr
        assert f"usage: mpisplit {command}" in result.stdout and flag in result.stdout
    train_help = run([mpisplit_cmd(), "train", "--help"], work).stdout
    same = run([sys.executable, str(Path(REPO_ROOT) / "train.py"), "--help"], work).stdout
    flags = slice(train_help.index("\noptions:"), None)  # the usage lines wrap after the name
    assert same[same.index("\noptions:"):] == train_help[flags]  # one parser, two names
    for module in ("generate", "convert"):
        old = run([sys.executable, "-m", f"mpisplit.{module}", "--help"], work)
        assert old.returncode == 0 and f"usage: python -m mpisplit.{module}" in old.stdout
    assert run([mpisplit_cmd(), "fly"], work).returncode == 2


def test_out_that_is_a_file_is_one_clear_error(work: Path) -> None:
    (work / "taken").write_text("not a folder")
    cmd = [mpiexec_path(), "-n", "2", mpisplit_cmd(), "train", *TINY, "--data", "text.txt", "--out", "taken"]
    result = run(cmd, work)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: --out taken is an existing file, not a folder: pass a folder name"], lines
    assert (work / "taken").read_text() == "not a folder"


def _blue_pixels(png: Path) -> int:
    import matplotlib.image

    img = matplotlib.image.imread(png)[..., :3]
    blue = np.array([0x1F, 0x77, 0xB4]) / 255  # tab:blue, the train-loss line
    return int((np.abs(img - blue).max(axis=-1) < 0.02).sum())


def test_training_writes_the_loss_curve_and_plot_redraws_it(work: Path) -> None:
    cmd = [mpiexec_path(), "-n", "2", mpisplit_cmd(), "train", *TINY, "--data", "text.txt", "--out", "run"]
    result = run(cmd, work)
    assert result.returncode == 0, result.stderr
    png = work / "run" / "loss.png"
    assert f"loss curve -> {png.relative_to(work)}" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and _blue_pixels(png) > 100

    from mpisplit.training.plot import plot_run

    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    png.unlink()
    drawn = plot_run(work / "run")
    assert drawn.path == png and png.is_file()
    assert drawn.series["loss"] == [(r["step"], r["loss"]) for r in records]
    assert drawn.series["val_loss"] == [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    assert [s for s, _ in drawn.series["val_loss"]] == [3, 6]

    png.unlink()
    again = run([mpisplit_cmd(), "plot", "run"], work)
    assert again.returncode == 0 and again.stdout.strip() == f"loss curve -> {Path('run') / 'loss.png'}"
    assert _blue_pixels(png) > 100


def test_plot_of_a_folder_without_metrics_is_one_clear_error(work: Path) -> None:
    (work / "empty").mkdir(exist_ok=True)
    result = run([mpisplit_cmd(), "plot", "empty"], work)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: empty has no metrics.jsonl: is it a training run folder (--out)?"
