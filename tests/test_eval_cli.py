"""`mpisplit eval --ppl FILE|DIR` at 1 and 2 ranks against lm-eval's own rolling windows
(lm_eval.utils.get_rolling_token_windows, the model's eos, or the corpus's, as the prefix token)
scored by a float64 one-rank forward pass of the same model in this process, and the
bits-per-byte and perplexity formulas; for a prepared corpus, its val shards read with NumPy."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from _serving import CHARS, serve_env, tiny_model, write_char_checkpoint
from conftest import mpiexec_command
from mpi4py import MPI

from mpisplit.serving.sampling import log_softmax

pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own MPI jobs")

# Longer than the character model's 64 positions: three windows roll over it.
TEXT = ("the cat sat on the mat and the dog ate the hat then the cat ran off to see the fox, "
        "a quick brown fox jumps over the lazy dog")
EOS = 3


def run(ranks: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [*mpiexec_command(ranks), sys.executable, "-m", "mpisplit", "eval", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=serve_env(), timeout=300, check=False)


def reference() -> tuple[float, int]:
    utils = pytest.importorskip("lm_eval.utils", reason="the reference windows are lm-eval's")
    model = tiny_model(len(CHARS), 11)
    tokens = [CHARS.index(c) for c in TEXT]
    total, count = 0.0, 0
    windows = utils.get_rolling_token_windows(tokens, prefix_token=EOS, max_seq_len=64, context_len=1)
    for context, target in map(utils.make_disjoint_window, windows):
        ids = context + target
        logits = np.asarray(model(np.array([ids[:-1]])).data[0], dtype=np.float64)
        for j, t in enumerate(target):
            total += float(log_softmax(logits[len(context) - 1 + j])[t])
            count += 1
    model.grid.free()
    return total, count


@pytest.mark.parametrize("ranks", [1, 2])
def test_perplexity_equals_lm_evals_rolling_windows(tmp_path, ranks) -> None:
    ckpt = write_char_checkpoint(tmp_path / "char", eos_token_ids=[EOS])
    (tmp_path / "t.txt").write_text(TEXT)
    done = run(ranks, "--ckpt", str(ckpt), "--ppl", str(tmp_path / "t.txt"), "--dtype", "float64", "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    total, count = reference()
    assert got["tokens"] == count == len(TEXT)  # with the eos prefix every character is scored
    assert abs(got["loglikelihood"] - total) < 1e-9
    assert got["perplexity"] == pytest.approx(math.exp(-total / count), rel=1e-12)
    assert got["bits_per_byte"] == pytest.approx(-total / (len(TEXT.encode()) * math.log(2)), rel=1e-12)
    assert got["word_perplexity"] == pytest.approx(math.exp(-total / len(TEXT.split())), rel=1e-12)


def test_a_missing_file_is_an_error_on_every_rank(tmp_path) -> None:
    ckpt = write_char_checkpoint(tmp_path / "char")
    done = run(2, "--ckpt", str(ckpt), "--ppl", str(tmp_path / "none.txt"))
    assert done.returncode != 0 and "none.txt" in done.stderr


def _prepared(tmp_path):
    """A tiny GPT-2 folder (context 128) and a corpus prepared with its tokenizer: twelve
    documents, four held out (several windows roll over the val stream)."""
    from _chat import TEXT, write_chat_folder

    from mpisplit.data.prepare import PrepareOptions, prepare

    model, bpe = write_chat_folder(tmp_path / "gpt2")
    words = TEXT.split()
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"{i:02d}.txt").write_text(" ".join(words[(7 * i + j) % len(words)] for j in range(60 + 9 * i)))
    manifest = prepare([docs], tmp_path / "gpt2", tmp_path / "corpus",
                       PrepareOptions(val_fraction=1 / 3, eos="<|im_end|>", progress=False))
    return model, bpe, manifest


def _split_reference(corpus, manifest, model, bpe) -> tuple[float, int, int, int]:
    """(log-likelihood, tokens, bytes, words): the val shards read with NumPy, lm-eval's rolling
    windows after the corpus's eos, one float64 forward pass per window; the documents decoded."""
    utils = pytest.importorskip("lm_eval.utils", reason="the reference windows are lm-eval's")
    import re

    val = manifest["val"]
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    tokens = np.concatenate([np.fromfile(corpus / s["file"], dtype=dtype) for s in val["shards"]]).astype(int).tolist()
    eos = manifest["tokenizer"]["eos_id"]
    total = 0.0
    windows = utils.get_rolling_token_windows(tokens, prefix_token=eos, max_seq_len=128, context_len=1)
    for context, target in map(utils.make_disjoint_window, windows):
        ids = context + target
        logits = np.asarray(model(np.array([ids[:-1]])).data[0], dtype=np.float64)
        total += sum(float(log_softmax(logits[len(context) - 1 + j])[t]) for j, t in enumerate(target))
    offsets = np.load(corpus / val["index"]["file"])
    texts = [bpe.decode(tokens[lo: hi - 1], skip_special_tokens=False) for lo, hi in itertools.pairwise(offsets)]
    return total, len(tokens), sum(len(t.encode()) for t in texts), sum(len(re.split(r"\s+", t)) for t in texts)


@pytest.mark.parametrize("ranks", [1, 2])
def test_perplexity_of_a_prepared_split(tmp_path, ranks) -> None:
    model, bpe, manifest = _prepared(tmp_path)
    done = run(ranks, "--hf", str(tmp_path / "gpt2"), "--ppl", str(tmp_path / "corpus"), "--dtype", "float64",
               "--json", "--batch", "2")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    total, count, nbytes, words = _split_reference(tmp_path / "corpus", manifest, model, bpe)
    model.grid.free()
    assert count > 2 * 128 and manifest["val"]["documents"] == 4  # windows roll over documents
    assert got["tokens"] == count and (got["bytes"], got["words"]) == (nbytes, words)
    assert abs(got["loglikelihood"] - total) < 1e-9 * abs(total)
    assert got["bits_per_byte"] == pytest.approx(-total / (nbytes * math.log(2)), rel=1e-12)
    assert got["word_perplexity"] == pytest.approx(math.exp(-total / words), rel=1e-12)


def test_a_split_of_another_tokenizer_is_refused(tmp_path) -> None:
    from _chat import write_chat_folder

    _prepared(tmp_path)
    other, _ = write_chat_folder(tmp_path / "other", seed=3)
    other.grid.free()
    (tmp_path / "other" / "tokenizer.json").write_text((tmp_path / "other" / "tokenizer.json").read_text() + "\n")
    done = run(2, "--hf", str(tmp_path / "other"), "--ppl", str(tmp_path / "corpus"))
    assert done.returncode != 0 and "is not the tokenizer the corpus was prepared with" in done.stderr
