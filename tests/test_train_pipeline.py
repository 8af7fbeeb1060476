"""train.py with pipeline stages and micro-batches, end to end, as `mpiexec -n N` jobs.

References: the float64 metrics.jsonl of the same run on one rank with one micro-batch (losses
and gradient norms to 1e-9), a resume at another layout, and generation at pp = 1 from a
pp = 2 checkpoint; bad pipeline layouts give one clear error line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_train import (
    STEPS,
    TRAIN,
    assert_one_error_line,
    assert_same_run,
    generate,
    launch,
    records,
    tiny,
    train,
)

from mpisplit.training.data import default_corpus

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with data.txt: the 20,000 characters test_train.py trains on."""
    path = tmp_path_factory.mktemp("train-pipeline")
    (path / "data.txt").write_text(default_corpus()[:20_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_rank(work: Path) -> dict[int, dict]:
    train(1, tiny("pp-ref", "--steps", str(STEPS)), work)
    return records(work / "pp-ref")


@pytest.mark.parametrize("n, flags", [
    (1, ["--micro-batches", "4"]),  # gradient accumulation
    (2, ["--pp", "2", "--micro-batches", "4"]),
    (2, ["--pp", "2", "--micro-batches", "1"]),  # m < pp
    (4, ["--pp", "2", "--tp", "2", "--micro-batches", "2"]),
    (4, ["--pp", "2", "--dp", "2", "--tp", "1", "--micro-batches", "2"]),
    (2, ["--tp", "2", "--sequence-parallel"]),
    (4, ["--pp", "2", "--tp", "2", "--micro-batches", "2", "--sequence-parallel"]),
    (2, ["--tp", "2", "--recompute", "selective"]),
    (2, ["--pp", "2", "--micro-batches", "2", "--recompute", "full"]),
], ids=["accumulate", "pp2-m4", "pp2-m1", "pp2xtp2", "pp2xdp2", "sp-tp2", "sp-pp2xtp2", "selective", "full-pp2"])
def test_pipeline_run_equals_one_rank(work: Path, one_rank: dict[int, dict], n: int, flags: list[str]) -> None:
    out = "pp-" + "-".join(f.strip("-") for f in flags)
    result = train(n, tiny(out, "--steps", str(STEPS), *flags), work)
    if "--pp" in flags:
        assert " x pp 2 x " in result.stdout
    if "--sequence-parallel" in flags:
        assert "sequence parallel" in result.stdout
    assert_same_run(records(work / out), one_rank, 1e-9)


def test_pipeline_checkpoint_resumes_and_generates_at_pp1(work: Path, one_rank: dict[int, dict]) -> None:
    train(2, tiny("pp-half", "--steps", "6", "--pp", "2", "--micro-batches", "2"), work)
    # Resume the pp = 2 checkpoint at pp = 1, tp = 2: the run continues as the one-rank run.
    result = train(2, tiny("pp-half", "--steps", str(STEPS), "--tp", "2", "--resume"), work)
    assert "resumed from" in result.stdout
    assert_same_run(records(work / "pp-half"), one_rank, 1e-9)
    # A pp = 2 checkpoint (step 6), read whole by generation on one and two ranks.
    args = ["--ckpt", str(work / "pp-half" / "step-00000006"), "--prompt", "the", "--max-new-tokens", "12",
            "--dtype", "float64"]
    texts = []
    for n in (1, 2):
        gen = generate(n, args, work)
        assert gen.returncode == 0, gen.stderr
        texts.append(gen.stdout)
    assert texts[0] == texts[1] and texts[0].startswith("the") and len(texts[0].rstrip("\n")) == 15


def test_mixed_precision_through_the_pipeline(work: Path) -> None:
    """--amp float16 at pp = 2 follows the same float16 run at pp = 1 (tp = 2): the loss scale
    seeds the last stage's backward and float16 activations cross the stage boundary."""
    amp = ["--amp", "float16", "--dtype", "float32", "--steps", "6", "--micro-batches", "2"]
    train(2, tiny("amp-tp2", *amp, "--tp", "2"), work)
    train(2, tiny("amp-pp2", *amp, "--pp", "2"), work)
    want, got = records(work / "amp-tp2"), records(work / "amp-pp2")
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:
        assert got[step]["loss_scale"] == want[step]["loss_scale"]
        assert abs(got[step]["loss"] - want[step]["loss"]) < 1e-3 * want[step]["loss"], step
        assert abs(got[step]["grad_norm"] - want[step]["grad_norm"]) < 2e-2 * want[step]["grad_norm"], step


def test_help_lists_the_pipeline_flags(work: Path) -> None:
    result = launch(None, [str(TRAIN), "--help"], work)
    assert result.returncode == 0
    for flag in ("--pp", "--micro-batches", "--sequence-parallel", "--recompute"):
        assert flag in result.stdout


@pytest.mark.parametrize("flags, needles", [
    (["--pp", "3"], ["--pp 3", "world size 2"]),
    (["--pp", "2", "--layers", "1"], ["--pp 2", "--layers 1"]),
    (["--micro-batches", "3"], ["--micro-batches 3", "batch of 8"]),
    (["--tp", "2", "--sequence-parallel", "--seq-len", "15"], ["--seq-len 15", "tp=2"]),
], ids=["pp-vs-world", "fewer-blocks", "micro-batches", "sp-seq-len"])
def test_bad_pipeline_layout_one_clear_error(work: Path, flags: list[str], needles: list[str]) -> None:
    argv = [str(TRAIN), *tiny("pp-bad", "--steps", "2"), *flags]  # a later --dtype overrides TINY's
    assert_one_error_line(launch(2, argv, work), *needles)
