"""LoRA fine-tuning with train.py, as `mpiexec -n N` jobs on a tiny random Llama folder in float64:
the same losses at every layout and after a resume at another one, the base weights untouched
and out of the optimizer, the checkpoint's adapter/ folder loaded by PEFT, and --lora-from.

    python -m pytest -q tests/test_lora_train.py

References: the one-rank run's losses (1e-10); the folder's own weights; transformers + PEFT
(`PeftModel.from_pretrained` on the adapter folder) in full float64 against our model with the
adapters read from the checkpoint's shards (1e-10).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import clean_mpi_env, mpiexec_path
from mpi4py import MPI
from test_llama_train import TRAIN, llama_work, losses, run

from mpisplit.models.hf_layout import hf_name
from mpisplit.training.checkpoint import CheckpointReader

pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs")
COMMON = ["--init-from", "llama", "--data", "ids.npy", "--seq-len", "16", "--batch-size", "8", "--eval-every", "0",
          "--sample-len", "0", "--no-progress", "--log-every", "1", "--dtype", "float64", "--lr", "1e-2",
          "--warmup", "6", "--lora-rank", "4", "--lora-alpha", "8"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return llama_work(tmp_path_factory.mktemp("lora-train"))


@pytest.fixture(scope="module")
def baseline(work: Path) -> list[float]:
    run(1, [*COMMON, "--steps", "6", "--out", "one"], work)
    return losses(work / "one")


@pytest.mark.parametrize(("n", "flags"), [
    (4, ["--tp", "2", "--dp", "2", "--sequence-parallel", "--recompute", "full"]),
    (4, ["--tp", "2", "--pp", "2", "--micro-batches", "2"]),
    (4, ["--tp", "4"]),  # the 2 KV heads replicated: their adapters' B too
    (2, ["--tp", "1", "--dp", "2", "--shard-optimizer"]),
])
def test_losses_equal_one_rank_at_every_layout(work, baseline, n, flags):
    name = "run-" + "-".join(f.strip("-") for f in flags)
    run(n, [*COMMON, "--steps", "6", *flags, "--out", name], work)
    got = losses(work / name)
    assert len(got) == 6 and np.allclose(got, baseline, rtol=1e-10, atol=0), (flags, got, baseline)
    assert baseline[-1] < baseline[0] - 0.5  # the adapters learn


@pytest.mark.parametrize("flags", [[], ["--shard-optimizer", "--dp", "2", "--tp", "1"]])
def test_mixed_precision_lora_tracks_float32(work, flags):
    """--amp float16: the adapters' float32 master weights, the frozen base cast once."""
    fp32 = [a if a != "float64" else "float32" for a in COMMON]
    name = "amp" + "-".join(f.strip("-") for f in flags)
    run(2, [*fp32, "--steps", "6", "--tp", "2", "--out", "fp32"], work)
    run(2, [*fp32, "--steps", "6", *(flags or ["--tp", "2"]), "--amp", "float16", "--out", name], work)
    ref, amp = losses(work / "fp32"), losses(work / name)
    assert np.all(np.isfinite(amp)) and np.allclose(amp, ref, rtol=2e-2), (amp, ref)
    assert ref[-1] < ref[0] - 0.5


def test_resume_at_another_layout(work, baseline):
    run(2, [*COMMON, "--steps", "3", "--tp", "2", "--out", "resume"], work)
    run(4, [*COMMON, "--steps", "6", "--tp", "2", "--pp", "2", "--resume", "--out", "resume"], work)
    assert np.allclose(losses(work / "resume"), baseline, rtol=1e-10, atol=0)


def _checkpoint(work: Path, run_name: str) -> Path:
    return max((work / run_name).glob("step-*"))


def test_base_frozen_and_only_adapters_in_the_optimizer(work, baseline):
    from safetensors.numpy import load_file

    reader = CheckpointReader(_checkpoint(work, "one"))
    files = load_file(str(work / "llama" / "model.safetensors"))
    names = reader.names()
    base = [n for n in names if n.startswith("model/") and ".lora." not in n]
    for n in base:
        hf, transposed = hf_name(n.removeprefix("model/"))
        want = files[hf].T if transposed else files[hf]
        assert np.array_equal(reader.read(n), want), n  # bit for bit: never updated
    optimizer = [n for n in names if n.startswith("optim/")]
    assert optimizer and all(".lora." in n for n in optimizer)
    assert len(optimizer) == 2 * 7 * 2 * 2  # two moments of A and B of 7 projections in 2 blocks
    assert json.loads((work / "one" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    reader.close()


def test_adapter_folder_loads_in_peft(work, baseline):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from test_llama_hf import _hf, _ours

    from mpisplit.models.gpt import GPT
    from mpisplit.models.lora import apply_lora
    from mpisplit.nn.lora import LoraConfig
    from mpisplit.parallel.grid import ProcessGrid

    step = _checkpoint(work, "run-tp-2-pp-2-micro-batches-2")
    config = json.loads((step / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    model = peft.PeftModel.from_pretrained(_hf(work / "llama", _ours(work / "llama")), step / "adapter")
    model = model.to(torch.float64)
    idx = np.random.default_rng(5).integers(0, 101, size=(2, 12))
    theirs = model(input_ids=torch.as_tensor(idx)).logits.detach().numpy()
    reader = CheckpointReader(step)
    with ProcessGrid(tp=1, comm=MPI.COMM_SELF) as g:
        ours = GPT.from_pretrained(work / "llama", g, dtype="float64")
        apply_lora(ours, LoraConfig(rank=4, alpha=8.0), seed=0)
        for n, p in ours.named_parameters():
            if ".lora." in n:
                p.data[...] = reader.read(f"model/{n}")
        logits = ours(idx).data
    reader.close()
    base = _ours(work / "llama")(idx).data
    assert np.abs(logits - base).max() > 1e-3  # the trained adapters change the model
    assert np.abs(logits - theirs).max() < 1e-10 * np.abs(theirs).max()


def test_lora_from_starts_from_a_peft_adapter(work, baseline):
    """A run started from a saved adapter (its settings taken from adapter_config.json) has the
    first loss of that adapter on the model: transformers + PEFT on the same batch."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from test_llama_hf import _hf, _ours

    from mpisplit.training.data import TextDataset

    adapter = _checkpoint(work, "run-tp-2-pp-2-micro-batches-2") / "adapter"
    run(2, [*COMMON[:-4], "--tp", "2", "--lora-from", str(adapter), "--steps", "1", "--out", "from"], work)
    ids = np.load(work / "ids.npy")
    x, y = TextDataset.from_ids(ids, 101).batch("train", 1337, 0, 8, 16)
    model = peft.PeftModel.from_pretrained(_hf(work / "llama", _ours(work / "llama")), adapter).to(torch.float64)
    logits = model(input_ids=torch.as_tensor(x)).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 101), torch.as_tensor(y).reshape(-1)).item()
    assert abs(losses(work / "from")[0] - want) < 1e-10 * want
    assert abs(want - baseline[0]) > 1e-3  # not the base model's loss


def test_dropout_trains_and_resumes_exactly(work, baseline):
    """--lora-dropout: the masks change the losses (the run differs from the baseline), are drawn
    from the checkpointed streams (a run resumed at step 2 continues with the same losses, at tp 2
    with full recomputation, which replays them), and the adapter folder records the rate."""
    flags = [*COMMON, "--lora-dropout", "0.3", "--tp", "2", "--recompute", "full", "--save-every", "2"]
    run(2, [*flags, "--steps", "4", "--out", "dropout"], work)
    run(2, [*flags, "--steps", "2", "--out", "dropout-resumed"], work)
    run(2, [*flags, "--steps", "4", "--resume", "--out", "dropout-resumed"], work)
    got, resumed = losses(work / "dropout"), losses(work / "dropout-resumed")
    assert len(got) == 4 and np.array_equal(got, resumed), (got, resumed)
    assert abs(got[1] - baseline[1]) > 1e-6 and got[0] == pytest.approx(baseline[0], rel=1e-10)  # B starts at 0
    config = json.loads((_checkpoint(work, "dropout") / "adapter" / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.3


def test_bad_lora_flags_are_one_clear_error(work):
    cases = [
        (["--data", "ids.npy", "--lora-rank", "4"], "LoRA adapts a pretrained model: give --init-from FOLDER"),
        ([*COMMON, "--lora-targets", "q_proj,c_attn"], r"--lora-targets: \['c_attn'\]"),
        ([*COMMON[:-4], "--lora-alpha", "8"], "--lora-alpha apply to LoRA: give --lora-rank R too"),
        ([*COMMON, "--lora-from", "llama"], "is not a PEFT adapter folder: it has no adapter_config.json"),
        ([*COMMON, "--lora-dropout", "1"], r"--lora-dropout must be in \[0, 1\), got 1.0"),
    ]
    for flags, message in cases:
        done = subprocess.run([mpiexec_path(), "-n", "2", sys.executable, str(TRAIN), *flags, "--out", "bad"], cwd=work,
                              env=clean_mpi_env(), capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 2, (flags, done.stdout, done.stderr)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert errors and all(re.search(message, e) for e in errors), (flags, done.stderr)


def test_merged_folders_equal_peft(work, baseline):
    """`convert --to-hf` of a LoRA checkpoint and `convert --merge-lora` of its adapter both write
    the base folder with W + s A B: transformers on either gives PEFT's logits of the adapter."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from test_llama_hf import _hf, _ours

    step = _checkpoint(work, "run-tp-2-pp-2-micro-batches-2")
    convert = [mpiexec_path(), "-n", "2", sys.executable, "-m", "mpisplit", "convert"]
    for flags in (["--to-hf", str(step), "merged-ckpt"], ["--merge-lora", "llama", str(step / "adapter"), "merged"]):
        done = subprocess.run([*convert, *flags], cwd=work, env=clean_mpi_env(), capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 0, done.stderr
    idx = torch.as_tensor(np.random.default_rng(6).integers(0, 101, size=(2, 12)))
    model = peft.PeftModel.from_pretrained(_hf(work / "llama", _ours(work / "llama")), step / "adapter")
    want = model.to(torch.float64)(input_ids=idx).logits.detach().numpy()
    for folder in ("merged-ckpt", "merged"):
        got = _hf(work / folder, _ours(work / folder))(input_ids=idx).logits.detach().numpy()
        assert np.abs(got - want).max() < 1e-10 * np.abs(want).max(), folder


def test_serving_loads_a_lora_checkpoint_merged(work, baseline):
    """`mpisplit serve --ckpt` of a LoRA run: the model with its adapters merged (the loader's
    forward against PEFT's logits of the checkpoint's adapter)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from test_llama_hf import _hf, _ours

    from mpisplit.parallel.grid import ProcessGrid
    from mpisplit.serving.loading import load_model_and_tokenizer

    step = _checkpoint(work, "one")
    idx = np.random.default_rng(8).integers(0, 101, size=(1, 10))
    with ProcessGrid(tp=1, comm=MPI.COMM_SELF) as g:
        model, _, _ = load_model_and_tokenizer(g, ckpt=str(step), dtype="float64")
        ours = model(idx).data
    peft_model = peft.PeftModel.from_pretrained(_hf(work / "llama", _ours(work / "llama")), step / "adapter")
    want = peft_model.to(torch.float64)(input_ids=torch.as_tensor(idx)).logits.detach().numpy()
    assert np.abs(ours - want).max() < 1e-10 * np.abs(want).max()
