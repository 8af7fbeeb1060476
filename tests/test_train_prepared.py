"""Training from a prepared corpus, end to end, as `mpiexec -n N` jobs.

    python -m pytest -q tests/test_train_prepared.py

References: the same run on one rank with the same tokens held in memory (the `tokenizers`
library applied document by document, split by the validation rule's formula; no prepared
folder), losses, gradient norms and validation losses to 1e-9 in float64 at dp = 2 and pp = 2
and bit for bit at one rank; a resumed run against it; bad input as one clear error line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _corpus import documents, encode_each, make_bpe, make_word_level, val_indices, write_inputs
from test_train import TINY, assert_one_error_line, launch, records, rel, train

from mpisplit.data.prepare import PrepareOptions, prepare

pytestmark = pytest.mark.timeout(300)
STEPS = 12
HELPER = Path(__file__).with_name("_train_in_memory.py")
TRAIN_PY = [str(Path(__file__).parents[1] / "train.py")]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """work/corpus prepared from 80 documents with work/tok, and work/train.npy, work/val.npy:
    the same documents encoded one by one here."""
    path = tmp_path_factory.mktemp("train-prepared")
    tok = make_bpe(path / "tok")
    inputs, ordered = write_inputs(path / "inputs", documents(80, seed=7))
    prepare(inputs, tok, path / "corpus", PrepareOptions(val_fraction=0.1, workers=1, progress=False))
    encoded = encode_each(tok, ordered)
    held = set(val_indices(len(ordered), 0.1))
    np.save(path / "train.npy", np.concatenate([e for i, e in enumerate(encoded) if i not in held]))
    np.save(path / "val.npy", np.concatenate([encoded[i] for i in sorted(held)]))
    return path


def flags(out: str, *extra: str) -> list[str]:
    return [*TINY, "--eval-every", "4", "--eval-iters", "2", "--out", out, "--steps", str(STEPS), *extra]


def from_corpus(out: str, *extra: str) -> list[str]:
    return flags(out, "--data", "corpus", "--tokenizer", "tok", *extra)


@pytest.fixture(scope="module")
def in_memory(work: Path) -> dict[int, dict]:
    vocab = json.loads((work / "corpus" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    result = launch(None, [str(HELPER), "train.npy", "val.npy", str(vocab), *flags("memory")], work)
    assert result.returncode == 0, result.stderr
    recs = records(work / "memory")
    assert recs[STEPS]["loss"] < recs[1]["loss"] - 0.05  # training moved the loss
    assert sum("val_loss" in r for r in recs.values()) == 3
    return recs


def assert_same(got: dict[int, dict], want: dict[int, dict], tol: float) -> None:
    assert sorted(got) == sorted(want)
    for step, rec in want.items():
        for key in ("loss", "grad_norm", "val_loss"):
            if key in rec:
                assert rel(got[step][key], rec[key]) <= tol, (step, key, got[step][key], rec[key])


def test_one_rank_equals_in_memory_bitwise(work: Path, in_memory: dict[int, dict]) -> None:
    result = train(1, from_corpus("one"), work)
    assert "data: corpus," in result.stdout and "vocabulary 257" in result.stdout
    assert_same(records(work / "one"), in_memory, 0.0)


@pytest.mark.parametrize("extra", [["--dp", "2", "--tp", "1"], ["--pp", "2", "--micro-batches", "2"]],
                         ids=["dp2", "pp2"])
def test_layouts_equal_in_memory(work: Path, in_memory: dict[int, dict], extra: list[str]) -> None:
    out = "-".join(e.strip("-") for e in extra)
    train(2, from_corpus(out, *extra), work)
    assert_same(records(work / out), in_memory, 1e-9)


def test_resume_is_exact(work: Path, in_memory: dict[int, dict]) -> None:
    train(2, from_corpus("resumed", "--dp", "2", "--tp", "1", "--steps", "6"), work)
    result = train(2, from_corpus("resumed", "--dp", "2", "--tp", "1", "--resume"), work)
    assert "resumed from" in result.stdout
    assert_same(records(work / "resumed"), in_memory, 1e-9)


def test_fresh_model_has_the_tokenizers_vocabulary(work: Path) -> None:
    """--tokenizer with --arch llama: a fresh Llama-family model whose vocabulary is the tokenizer's."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(work / "tok" / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    train(2, from_corpus("llama", "--arch", "llama", "--kv-heads", "2", "--steps", "2", "--tp", "2"), work)
    meta = json.loads((work / "llama" / "step-00000002" / "index.json").read_text())["meta"]["config"]
    assert meta["family"] == "llama" and meta["vocab_size"] == vocab == 257


def test_init_from_checks_the_tokenizer(work: Path) -> None:
    """A checkpoint of a run on the corpus, exported with its tokenizer, fine-tunes on it; a
    folder with another tokenizer is refused on every rank."""
    train(1, from_corpus("base", "--steps", "2"), work)
    done = launch(1, ["-m", "mpisplit.convert", "--to-hf", "base", "hf"], work)
    assert done.returncode == 0, done.stderr
    shutil.copy(work / "tok" / "tokenizer.json", work / "hf" / "tokenizer.json")
    result = train(2, flags("tuned", "--data", "corpus", "--init-from", "hf", "--steps", "2", "--tp", "2"), work)
    assert "data: corpus," in result.stdout
    make_word_level(work / "other", 257)
    shutil.copy(work / "other" / "tokenizer.json", work / "hf" / "tokenizer.json")
    bad = launch(2, [*TRAIN_PY, *flags("x", "--data", "corpus", "--init-from", "hf", "--steps", "2")], work)
    assert_one_error_line(bad, "--init-from 'hf' is not the tokenizer the corpus was prepared with",
                          "in ['tokenizer.json']")


def _corrupt(work: Path, case: str) -> tuple[list[str], list[str]]:
    bad = work / f"bad-{case}"
    shutil.copytree(work / "corpus", bad)
    shard = bad / "train-00000.bin"
    data = bytearray(shard.read_bytes())
    if case == "sha256":
        data[3] ^= 1
        shard.write_bytes(bytes(data))
        return ["--data", bad.name], ["train-00000.bin", "has sha256", "manifest.json says"]
    shard.write_bytes(bytes(data[:-2]))
    return ["--data", bad.name], ["train-00000.bin", f"has {len(data) - 2} bytes; manifest.json says {len(data)}"]


@pytest.mark.parametrize("case", ["sha256", "size", "seq-len", "tokenizer", "no-tokenizer"])
def test_bad_input_one_clear_error(work: Path, case: str) -> None:
    if case in ("sha256", "size"):
        data, needles = _corrupt(work, case)
        args = flags(f"bad-{case}-run", *data)
    elif case == "seq-len":
        val = len(np.load(work / "val.npy"))
        args = [*from_corpus("bad-seq"), "--seq-len", str(val)]
        needles = [f"sequence length {val} needs at least {val + 1} tokens per split", f"{val} validation tokens"]
    elif case == "tokenizer":
        make_word_level(work / "other", 257)
        args = flags("bad-tok", "--data", "corpus", "--tokenizer", "other")
        needles = ["--tokenizer 'other' is not the tokenizer the corpus was prepared with"]
    else:
        args = flags("bad-no-tok", "--tokenizer", "absent")
        needles = ["tokenizer folder 'absent' does not exist"]
    result = launch(2, [*TRAIN_PY, *args], work)
    assert_one_error_line(result, *needles)
    assert not (work / args[args.index("--out") + 1] / "metrics.jsonl").exists()
