"""The training loop as a library call: `ms.train(TrainConfig)` in this process, on the
world's ranks, against the same run on one rank (COMM_SELF, tp = 1) in float64, and its
result against what it wrote to the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mpi4py import MPI

import mpisplit as ms
from mpisplit.training import TrainConfig, train

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(180)]

TEXT = "the quick brown fox jumps over the lazy dog; " * 40


def _config(out: Path, data: Path, **kw: object) -> TrainConfig:
    # 12 heads: tp = 1, 2, 3 and 4 all divide them; batch 12: dp = 1, 2, 3 and 4 divide it.
    fields = {
        "layers": 2, "hidden": 24, "heads": 12, "seq_len": 16, "batch_size": 12, "steps": 6, "warmup": 6, "lr": 1e-2,
        "dtype": "float64", "eval_every": 3, "eval_iters": 2, "log_every": 1, "sample_len": 0, "progress": False,
        "plot": False, "collective_timeout": 0, "data": str(data), "out": str(out),
    }
    return TrainConfig(**{**fields, **kw})


@pytest.fixture()
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder every rank of the world sees (rank 0 makes it)."""
    world = MPI.COMM_WORLD
    path = world.bcast(str(tmp_path_factory.mktemp("trainer")) if world.Get_rank() == 0 else None)
    path = Path(path)
    if world.Get_rank() == 0:
        (path / "text.txt").write_text(TEXT, encoding="utf-8")
    world.Barrier()
    return path


def _one_rank_reference(folder: Path) -> list[dict]:
    rank = MPI.COMM_WORLD.Get_rank()
    ref = train(_config(folder / f"ref-{rank}", folder / "text.txt", tp=1), MPI.COMM_SELF)
    ms.limit_blas_threads(MPI.COMM_WORLD)  # the one-rank run took every core: give them back
    assert ref.exit_code == 0
    return ref.history


@pytest.mark.parametrize("layout", ["tp", "dp"])
def test_train_in_process_equals_one_rank(folder: Path, layout: str) -> None:
    world = MPI.COMM_WORLD
    n = world.Get_size()
    layout_kw = {"tp": n} if layout == "tp" else {"tp": 1, "dp": n}
    result = train(_config(folder / f"world-{layout}", folder / "text.txt", **layout_kw))
    ref = _one_rank_reference(folder)
    assert result.exit_code == 0 and result.step == 6
    assert [r["step"] for r in result.history] == [1, 2, 3, 4, 5, 6]
    for got, want in zip(result.history, ref):
        assert abs(got["loss"] - want["loss"]) < 1e-10, (got, want)
        assert abs(got["grad_norm"] - want["grad_norm"]) < 1e-9, (got, want)
        assert ("val_loss" in got) == ("val_loss" in want) == (got["step"] in (3, 6))
        if "val_loss" in got:
            assert abs(got["val_loss"] - want["val_loss"]) < 1e-10
    assert result.val_loss == result.history[-1]["val_loss"]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.checkpoint == folder / f"world-{layout}" / "step-00000006"
    assert (result.checkpoint / "index.json").is_file()
    if world.Get_rank() == 0:  # what the run folder got is what the call returned
        lines = (folder / f"world-{layout}" / "metrics.jsonl").read_text().splitlines()
        written = [json.loads(line) for line in lines]
        assert [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in written] == [
            {k: v for k, v in r.items() if k != "tokens_per_s"} for r in result.history
        ]


def test_train_bad_config_raises_on_every_rank(folder: Path) -> None:
    with pytest.raises(ValueError, match="--hidden 25 is not a multiple of --heads 12"):
        train(_config(folder / "bad", folder / "text.txt", hidden=25))
    (folder / "a-file").write_text("x") if MPI.COMM_WORLD.Get_rank() == 0 else None
    MPI.COMM_WORLD.Barrier()
    with pytest.raises(ValueError, match="is an existing file, not a folder"):
        train(_config(folder / "a-file", folder / "text.txt"))
