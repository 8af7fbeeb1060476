"""train.py and `python -m mpisplit.generate` end to end, as `mpiexec -n N` jobs.

    python -m pytest -q tests/test_train.py        (launches its own MPI jobs; about a minute)

References: the metrics.jsonl of an uninterrupted run (a resumed run must continue it
exactly), the same run at other dp x tp layouts, the corpus's unigram entropy, and the
flags README.md names.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, clean_mpi_env, mpiexec_path
from safetensors.numpy import load_file

from mpisplit.training.data import default_corpus

TRAIN = Path(REPO_ROOT) / "train.py"
README = Path(REPO_ROOT) / "README.md"

# A model that trains a step in milliseconds. The learning rate warms up over all 12 steps, so
# the schedule does not depend on --steps: a 6-step run is the first half of a 12-step run.
TINY = [
    "--layers", "2", "--hidden", "24", "--heads", "4", "--seq-len", "16", "--batch-size", "8",
    "--eval-every", "0", "--sample-len", "0", "--no-progress", "--log-every", "1",
    "--dtype", "float64", "--lr", "1e-2", "--warmup", "12",
]  # fmt: skip
STEPS = 12


def env(fault: str | None = None) -> dict[str, str]:
    e = clean_mpi_env()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        e[var] = "1"
    e.pop("MPISPLIT_FAULT", None)
    if fault is not None:
        e["MPISPLIT_FAULT"] = fault
    return e


def launch(
    n: int | None, argv: list[str], cwd: Path, timeout: float = 60, fault: str | None = None
) -> subprocess.CompletedProcess:
    """`mpiexec -n n python argv...` (plain `python` when n is None); on timeout the whole
    process group is killed and the test fails, so a hang never outlives the test."""
    cmd = (
        [sys.executable, *argv]
        if n is None
        else [mpiexec_path(), "-n", str(n), sys.executable, *argv]
    )
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env(fault),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"{' '.join(cmd)} still running after {timeout} s\nstdout:\n{out}\nstderr:\n{err}"
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def train(
    n: int, args: list[str], cwd: Path, timeout: float = 60, fault: str | None = None
) -> subprocess.CompletedProcess:
    result = launch(n, [str(TRAIN), *args], cwd, timeout, fault)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def records(folder: Path) -> dict[int, dict]:
    """metrics.jsonl by step; every step logged once."""
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    by_step = {}
    for line in lines:
        rec = json.loads(line)
        assert rec["step"] not in by_step, f"step {rec['step']} logged twice in {folder}"
        by_step[rec["step"]] = rec
    return by_step


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with data.txt: 20,000 characters of English prose (vocabulary ~86)."""
    path = tmp_path_factory.mktemp("train")
    (path / "data.txt").write_text(default_corpus()[:20_000], encoding="utf-8")
    return path


def tiny(out: str, *extra: str) -> list[str]:
    return [*TINY, "--data", "data.txt", "--out", out, *extra]


@pytest.fixture(scope="module")
def straight(work: Path) -> dict[int, dict]:
    """12 uninterrupted steps at n=2, tp=2, saving at steps 6 and 12."""
    train(2, tiny("straight", "--steps", str(STEPS), "--save-every", "6", "--tp", "2"), work)
    recs = records(work / "straight")
    assert sorted(recs) == list(range(1, STEPS + 1))
    assert (work / "straight" / "step-00000006" / "index.json").is_file()
    return recs


# ------------------------------------------------------------------ resume and layouts


def test_resume_equals_uninterrupted(work: Path, straight: dict[int, dict]) -> None:
    train(2, tiny("half", "--steps", "6", "--tp", "2"), work)
    # The 6-step run saved exactly the state the 12-step run had at step 6 (weights and moments).
    for f in ("tp00-of-02.safetensors", "tp01-of-02.safetensors"):
        got, want = (
            load_file(work / "half/step-00000006" / f),
            load_file(work / "straight/step-00000006" / f),
        )
        assert sorted(got) == sorted(want) and any(k.startswith("optim/exp_avg/") for k in got)
        for name, value in want.items():
            assert got[name].dtype == value.dtype and got[name].tobytes() == value.tobytes(), name
    shutil.copytree(work / "half", work / "half-n4")

    result = train(2, tiny("half", "--steps", str(STEPS), "--tp", "2", "--resume"), work)
    assert "resumed from half/step-00000006 at step 6" in result.stdout
    resumed = records(work / "half")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # same layout: bitwise
        for key in ("loss", "lr", "grad_norm"):
            assert resumed[step][key] == straight[step][key], (step, key)
    assert (work / "half/latest").read_text().strip() == "step-00000012"

    # At tp=4 (n=4) from the checkpoint saved at tp=2.
    result = train(4, tiny("half-n4", "--steps", str(STEPS), "--tp", "4", "--resume"), work)
    assert "world 4 = dp 1 x tp 4" in result.stdout
    resumed = records(work / "half-n4")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(7, STEPS + 1):
        assert rel(resumed[step]["loss"], straight[step]["loss"]) < 1e-6, step
        assert resumed[step]["lr"] == straight[step]["lr"]


def test_resume_after_crash_at_tp1(work: Path, straight: dict[int, dict]) -> None:
    """A job killed after logging step 12 but before its final save: the folder holds the
    step-6 checkpoint and metrics lines 1..12. Resuming alone (n=1, tp=1) rewrites lines
    7..12 and continues the losses."""
    crashed = work / "crashed"
    shutil.copytree(work / "straight", crashed)
    shutil.rmtree(crashed / "step-00000012")
    (crashed / "latest").write_text("step-00000006\n")
    result = train(1, tiny("crashed", "--steps", str(STEPS), "--resume"), work)
    assert "world 1 = dp 1 x tp 1" in result.stdout
    resumed = records(crashed)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, 7):
        assert resumed[step] == straight[step]  # lines before the checkpoint are kept as they were
    for step in range(7, STEPS + 1):
        assert rel(resumed[step]["loss"], straight[step]["loss"]) < 1e-6, step
        assert rel(resumed[step]["grad_norm"], straight[step]["grad_norm"]) < 1e-6, step


def test_resume_with_fewer_steps_than_the_checkpoint_refuses(
    work: Path, straight: dict[int, dict]
) -> None:
    """--steps below the checkpoint's step: nothing to train. The run must stop with an error
    and leave the folder alone, not save the step-12 weights as step-00000006 (replacing the
    real step-6 checkpoint) and point `latest` at it."""
    run = work / "overshoot"
    shutil.copytree(work / "straight", run)
    before = {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    result = launch(
        2,
        [str(TRAIN), *tiny("overshoot", "--steps", "6", "--tp", "2", "--resume")],
        work,
        timeout=30,
    )
    after = {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    changed = sorted(str(k) for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not [c for c in changed if not c.startswith(".heartbeat")], f"resume changed {changed}"
    assert_one_error_line(result, "--steps 6", "12")


@pytest.fixture(scope="module")
def tp4(work: Path) -> dict[int, dict]:
    train(4, tiny("tp4", "--steps", str(STEPS), "--tp", "4"), work)
    return records(work / "tp4")


def assert_same_run(got: dict[int, dict], want: dict[int, dict], tol: float) -> None:
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step]["lr"] == want[step]["lr"]
        for key in ("loss", "grad_norm"):
            assert rel(got[step][key], want[step][key]) < tol, (
                step,
                key,
                got[step][key],
                want[step][key],
            )


def test_same_seed_same_losses_at_tp_1_2_4(
    work: Path, straight: dict[int, dict], tp4: dict[int, dict]
) -> None:
    train(1, tiny("tp1", "--steps", str(STEPS)), work)
    tp1 = records(work / "tp1")
    # Training moved the loss, so equal losses are not equal by accident.
    assert tp1[STEPS]["loss"] < tp1[1]["loss"] - 0.05
    assert_same_run(straight, tp1, 1e-9)
    assert_same_run(tp4, tp1, 1e-9)


def test_dp2_tp2_equals_tp4(work: Path, tp4: dict[int, dict]) -> None:
    result = train(4, tiny("dp2tp2", "--steps", str(STEPS), "--tp", "2", "--dp", "2"), work)
    assert "world 4 = dp 2 x tp 2" in result.stdout
    assert_same_run(records(work / "dp2tp2"), tp4, 1e-9)


# ------------------------------------------------------------------ command line


def readme_flags(marker: str) -> set[str]:
    """Flags README.md names on lines about `marker`, and in the paragraph on --help."""
    text = README.read_text(encoding="utf-8")
    flags = set()
    for para in text.split("\n\n"):
        for line in para.splitlines():
            if marker in line:
                flags |= set(re.findall(r"(--[a-z][a-z0-9-]*)", line))
        if f"{marker} --help" in para:
            flags |= set(re.findall(r"`(--[a-z][a-z0-9-]*)", para))
    return flags


def test_help_lists_every_readme_flag(work: Path) -> None:
    flags = readme_flags("train.py")
    assert {"--tp", "--dp", "--resume", "--save-every", "--dtype", "--optimizer"} <= flags
    result = launch(None, [str(TRAIN), "--help"], work)
    assert result.returncode == 0 and result.stderr == ""
    missing = sorted(f for f in flags if not re.search(rf"{re.escape(f)}\b", result.stdout))
    assert not missing, f"train.py --help lacks {missing}"
    gen_flags = readme_flags("mpisplit.generate")
    assert {"--ckpt", "--prompt", "--max-new-tokens"} <= gen_flags
    result = launch(None, ["-m", "mpisplit.generate", "--help"], work)
    assert result.returncode == 0
    assert not sorted(f for f in gen_flags if f not in result.stdout)


def assert_one_error_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2 and one "error: ..." line on stderr (rank 0 speaks for all), no traceback."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


BAD_INPUT = {
    "missing file": (["--data", "absent.txt"], ["absent.txt", "does not exist"]),
    "empty file": (["--data", "empty.txt"], ["empty.txt", "is empty"]),
    "binary file": (["--data", "binary.bin"], ["binary.bin", "binary"]),
    "seq-len too long": (
        ["--data", "short.txt", "--seq-len", "16"],
        ["sequence length 16", "9 train and 1 validation"],
    ),
    "heads vs tp": (["--heads", "3", "--tp", "2"], ["--heads 3", "tp=2", "tp values that work"]),
    "tp vs world": (["--tp", "3"], ["--tp 3", "world size 2", "tp values that work: [1, 2]"]),
    "resume, no folder": (["--resume", "--out", "absent"], ["absent", "does not exist"]),
    "resume, empty folder": (["--resume", "--out", "empty-run"], ["empty-run", "no checkpoint"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_one_clear_error(work: Path, case: str) -> None:
    (work / "empty.txt").write_bytes(b"")
    (work / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (work / "short.txt").write_text("ten chars.", encoding="utf-8")
    (work / "empty-run").mkdir(exist_ok=True)
    args, needles = BAD_INPUT[case]
    argv = [
        *TINY,
        "--steps",
        "2",
        "--data",
        "data.txt",
        "--out",
        "bad-input",
        *args,
    ]  # later flags win
    line = assert_one_error_line(launch(2, [str(TRAIN), *argv], work, timeout=30), *needles)
    if case == "heads vs tp":  # with 2 ranks and 3 heads only tp=1 works (3 divides no world of 2)
        listed = [
            int(v)
            for v in re.search(r"tp values that work: \[([\d, ]+)\]", line).group(1).split(",")
        ]
        assert listed == [1], line


# ------------------------------------------------------------------ default run, generation


@pytest.fixture(scope="module")
def default_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess]:
    """The README's first command, shortened: default model, corpus and flags, 40 steps."""
    cwd = tmp_path_factory.mktemp("default")
    result = train(4, ["--steps", "40", "--eval-every", "20"], cwd, timeout=300)
    return cwd / "out", result


@pytest.mark.timeout(420)
def test_default_run(default_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, result = default_run
    entropy = float(
        re.search(
            r"unigram entropy of the training characters: ([\d.]+) nats", result.stdout
        ).group(1)
    )
    assert 2.5 < entropy < 4.5
    recs = records(out)
    assert set(recs) == {10, 20, 30, 40}  # --log-every 10
    for rec in recs.values():
        assert {"step", "loss"} <= set(rec) and math.isfinite(rec["loss"])
    assert "val_loss" in recs[20] and "val_loss" in recs[40]
    assert recs[40]["val_loss"] < entropy, (recs[40]["val_loss"], entropy)
    assert recs[40]["loss"] < recs[10]["loss"]
    assert (out / "latest").read_text().strip() == "step-00000040"
    assert (out / "step-00000040" / "index.json").is_file()
    sample = (out / "sample.txt").read_text(encoding="utf-8")
    assert len(sample) == 301  # the "\n" prompt and 300 characters
    assert (
        f"validation loss {recs[40]['val_loss']:.4f} nats vs unigram entropy {entropy:.4f}"
        in result.stdout
    )


def generate(n: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return launch(n, ["-m", "mpisplit.generate", *args], cwd, timeout=60)


@pytest.mark.timeout(420)
def test_generate_same_at_every_tp(default_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = default_run
    # float64 serving of the float32 weights keeps argmax ties and sampling boundaries between
    # layouts out of reach. After 40 steps the greedy continuation of "the" is not only spaces.
    args = ["--ckpt", str(out), "--prompt", "the", "--max-new-tokens", "40", "--dtype", "float64"]
    texts = {}
    for n in (1, 2, 4):
        result = generate(n, args, out.parent)
        assert result.returncode == 0, result.stderr
        texts[n] = result.stdout
    assert texts[1] == texts[2] == texts[4]
    text = texts[1].rstrip("\n")
    assert text.startswith("the") and len(text) == 43
    assert len(set(text[3:])) >= 2, repr(text)

    # Sampling: every rank draws the same token, so tp=4 matches the library at tp=1 alone.
    sampled = generate(4, [*args, "--temperature", "1.0", "--seed", "5"], out.parent)
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.rstrip("\n") == generate_here(out, "the", 40, temperature=1.0, seed=5)


def generate_here(out: Path, prompt: str, n: int, **kw: float) -> str:
    """The library's generation at tp=1 on COMM_SELF, in this process."""
    from mpi4py import MPI

    import mpisplit as ms
    from mpisplit.training.checkpoint import CheckpointReader
    from mpisplit.training.data import CharTokenizer
    from mpisplit.training.state import load_model, resolve_checkpoint

    with (
        ms.ProcessGrid(tp=1, comm=MPI.COMM_SELF) as grid,
        CheckpointReader(resolve_checkpoint(out)) as reader,
    ):
        model = ms.GPT(ms.GPTConfig(**reader.meta["config"]), grid, dtype="float64", init=False)
        load_model(reader, model)
        tok = CharTokenizer(reader.meta["tokenizer"])
        ids = model.generate(tok.encode(prompt)[None, :], n, **kw)
    return tok.decode(ids[0])


@pytest.mark.timeout(420)
def test_generate_bad_input(default_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = default_run
    chars = json.loads((out / "step-00000040" / "index.json").read_text())["meta"]["tokenizer"]
    foreign = next(c for c in "\u2603\u00e6\u0416" if c not in chars)
    result = generate(2, ["--ckpt", str(out), "--prompt", f"The {foreign}"], out.parent)
    assert_one_error_line(result, "not in the model's vocabulary", repr(foreign))
    result = generate(2, ["--ckpt", str(out.parent / "absent"), "--prompt", "The "], out.parent)
    assert_one_error_line(result, "absent", "does not exist")


def test_mixed_precision_resume_keeps_the_loss_scale(work: Path) -> None:
    """float16 compute, float32 master: an overflow injected at step 2 halves the dynamic loss
    scale before the step-4 checkpoint; the scale is saved and restored, so the resumed --amp
    run continues the uninterrupted one bit for bit (same layout)."""
    amp = ["--dtype", "float32", "--amp", "float16", "--tp", "2"]
    overflow = "inf@step=2"  # one gradient element becomes inf: the step is skipped on every rank
    train(2, tiny("amp-straight", "--steps", "8", "--save-every", "4", *amp), work, fault=overflow)
    train(2, tiny("amp-half", "--steps", "4", *amp), work, fault=overflow)
    train(2, tiny("amp-half", "--steps", "8", "--resume", *amp), work)
    straight, resumed = records(work / "amp-straight"), records(work / "amp-half")
    assert straight[2]["skipped"] and straight[3]["loss_scale"] == straight[1]["loss_scale"] / 2
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        for key in ("loss", "loss_scale", "skipped"):
            assert resumed[step][key] == straight[step][key], (step, key)
