"""`mpisplit prepare`: documents, encoding, shards, the validation split, the manifest, bad input.

    python -m pytest -q tests/test_prepare.py

References: the `tokenizers` library applied to each document on its own (plus the eos id),
the validation rule's formula, the documents' texts, and sha256 computed here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _corpus import documents, encode_each, make_bpe, make_word_level, val_indices, write_inputs
from conftest import clean_mpi_env

from mpisplit.data.manifest import read_manifest
from mpisplit.data.prepare import PrepareOptions, prepare
from mpisplit.data.tokens import ShardedTokens
from mpisplit.training.config import TrainConfig
from mpisplit.training.data import TokenDataset
from mpisplit.training.prepared import load_tokens

pytestmark = pytest.mark.timeout(120)
QUIET = {"progress": False, "workers": 1}


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bpe(tmp_path_factory.mktemp("tok") / "bpe")


def split_documents(out: Path, split: str) -> list[list[int]]:
    manifest = read_manifest(out)
    stream = np.concatenate([np.fromfile(out / s["file"], dtype=manifest["dtype"]) for s in manifest[split]["shards"]])
    offsets = np.load(out / f"{split}-index.npy")
    assert offsets[0] == 0 and offsets[-1] == len(stream) == manifest[split]["tokens"]
    return [stream[a:b].tolist() for a, b in itertools.pairwise(offsets)]


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_equals_the_tokenizer_document_by_document(tmp_path: Path, bpe: Path, workers: int) -> None:
    inputs, ordered = write_inputs(tmp_path, documents(90))
    out = tmp_path / "corpus"
    # shards of 200 bytes (100 uint16 tokens): documents cross shard boundaries
    manifest = prepare(inputs, bpe, out, PrepareOptions(val_fraction=0.05, workers=workers, progress=False,
                                                        shard_bytes=200))
    expected = encode_each(bpe, ordered)
    held = val_indices(len(ordered), 0.05)
    assert held == [19, 39, 59, 79]
    assert split_documents(out, "val") == [expected[i] for i in held]
    assert split_documents(out, "train") == [e for i, e in enumerate(expected) if i not in held]
    assert manifest == read_manifest(out)
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["eos_id"] == 0
    assert manifest["train"]["documents"] == 86 and manifest["val"]["documents"] == 4
    assert manifest["tokenizer"]["files"] == {
        "tokenizer.json": hashlib.sha256((bpe / "tokenizer.json").read_bytes()).hexdigest()}
    train_shards = manifest["train"]["shards"]
    assert len(train_shards) > 2 and all(s["bytes"] <= 200 for s in train_shards)
    for shard in train_shards + manifest["val"]["shards"]:
        data = (out / shard["file"]).read_bytes()
        assert len(data) == shard["bytes"] == 2 * shard["tokens"]
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    tokens = np.concatenate([e for i, e in enumerate(expected) if i not in held])
    p = np.bincount(tokens) / len(tokens)
    assert manifest["train_unigram_entropy"] == pytest.approx(-(p[p > 0] * np.log(p[p > 0])).sum(), rel=1e-12)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["corpus", "lines.jsonl", "more.jsonl.gz", "texts"]


def test_at_least_one_validation_document(tmp_path: Path, bpe: Path) -> None:
    docs = documents(7, seed=3)
    (tmp_path / "in").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "in" / f"{i}.txt").write_text(d)
    (tmp_path / "in" / "9-empty.txt").write_text("")  # skipped: not a document
    manifest = prepare([tmp_path / "in"], bpe, tmp_path / "c", PrepareOptions(**QUIET))  # 7 x 0.005 < 1
    expected = encode_each(bpe, docs)
    assert split_documents(tmp_path / "c", "val") == [expected[-1]]
    assert split_documents(tmp_path / "c", "train") == expected[:-1]
    assert manifest["val"]["documents"] == 1 and manifest["train"]["documents"] == 6


@pytest.mark.parametrize("vocab, dtype", [(65536, "uint16"), (65537, "uint32")])
def test_dtype_switch_at_65536(tmp_path: Path, vocab: int, dtype: str) -> None:
    tok = make_word_level(tmp_path / "tok", vocab)
    top = vocab - 1  # the largest id must survive the dtype
    docs = [f"w1 w{top} w{top - 1}", f"w{top} w2", "w3 w4 w5"]
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d)
    manifest = prepare([tmp_path / f"{i}.txt" for i in range(3)], tok, tmp_path / "c",
                       PrepareOptions(val_fraction=0.5, **QUIET))
    assert manifest["dtype"] == dtype and manifest["tokenizer"]["vocab_size"] == vocab
    assert manifest["train"]["shards"][0]["bytes"] == np.dtype(dtype).itemsize * manifest["train"]["tokens"]
    # document 1 is held out: floor(2 * 0.5) > floor(1 * 0.5)
    assert split_documents(tmp_path / "c", "train") == [[1, top, top - 1, 0], [3, 4, 5, 0]]
    assert split_documents(tmp_path / "c", "val") == [[top, 2, 0]]


def test_batches_equal_the_same_tokens_in_memory(tmp_path: Path, bpe: Path) -> None:
    inputs, _ = write_inputs(tmp_path, documents(60, seed=1))
    out = tmp_path / "corpus"
    manifest = prepare(inputs, bpe, out, PrepareOptions(val_fraction=0.1, shard_bytes=64, **QUIET))
    config = TrainConfig(data=str(out))
    prepared, _, _ = load_tokens(config)
    train = np.concatenate(split_documents(out, "train"))
    val = np.concatenate(split_documents(out, "val"))
    memory = TokenDataset(train, val, manifest["tokenizer"]["vocab_size"])
    assert len(prepared.train) == len(train) and len(prepared.val) == len(val)
    for split in ("train", "val"):
        for step in (0, 1, 17):
            whole = memory.batch(split, 5, step, 8, 24)
            for dp in (1, 2, 4):
                rows = [prepared.batch(split, 5, step, 8, 24, r, dp) for r in range(dp)]
                assert np.array_equal(np.concatenate([x for x, _ in rows]), whole[0])
                assert np.array_equal(np.concatenate([y for _, y in rows]), whole[1])
                assert rows[0][0].dtype == np.int64
    assert np.array_equal(prepared.train[: len(train)], train)  # every shard boundary crossed
    assert prepared.train_entropy() == manifest["train_unigram_entropy"]


def test_windows_cross_shards(tmp_path: Path) -> None:
    parts = [np.arange(0, 5), np.arange(5, 6), np.arange(6, 13)]
    paths = []
    for i, part in enumerate(parts):
        paths.append(tmp_path / f"s{i}.bin")
        part.astype("<u4").tofile(paths[-1])
    tokens = ShardedTokens(paths, "uint32")
    starts = np.array([0, 3, 4, 5, 8])
    assert tokens.windows(starts, 5).tolist() == [list(range(s, s + 5)) for s in starts]
    with pytest.raises(IndexError, match=r"window \[9, 14\) outside the stream of 13 tokens"):
        tokens.windows(np.array([9]), 5)
    tokens.close()


# ------------------------------------------------------------------ bad input


def _bad_inputs(root: Path, case: str) -> tuple[list[Path], str, dict]:
    good = root / "good.txt"
    good.write_text("Sphinx of black quartz. " * 3)
    if case == "not-utf8":
        (root / "bad.txt").write_bytes(b"ok text \xff\xfe more")
        return [good, root / "bad.txt"], r"bad\.txt' is not UTF-8 text: invalid start byte at byte 8", {}
    if case == "not-utf8-gz-jsonl":
        import gzip

        with gzip.open(root / "bad.jsonl.gz", "wb") as f:
            f.write(b'{"text": "a"}\n{"text": "\xc3("}\n')
        return [good, root / "bad.jsonl.gz"], r"bad\.jsonl\.gz' line 2 is not UTF-8 text: .* at byte 24", {}
    if case == "not-json":
        (root / "bad.jsonl").write_text('{"text": "one"}\n\n{"text": "two"\n')
        return [good, root / "bad.jsonl"], r"bad\.jsonl:3: not JSON", {}
    if case == "no-field":
        (root / "bad.jsonl").write_text('{"text": "one"}\n{"body": "two"}\n')
        return [good, root / "bad.jsonl"], r"bad\.jsonl:2: no field 'text' \(the line has \['body'\]\)", {}
    if case == "field-not-string":
        (root / "bad.jsonl").write_text('{"content": 3}\n')
        return [good, root / "bad.jsonl"], r"bad\.jsonl:1: field 'content' holds int", {"field": "content"}
    if case == "empty":
        (root / "e.txt").write_text("")
        (root / "e.jsonl").write_text('{"text": ""}\n')
        return [root / "e.txt", root / "e.jsonl"], "empty corpus", {}
    if case == "one-short-document":  # "x" and eos: 2 tokens, round(2 x 0.9) of them held out
        (root / "x.txt").write_text("x")
        return [root / "x.txt"], "single document of 2 token", {"val_fraction": 0.9}
    if case == "split-text":
        return [good], r"--split-text must be 'file', 'blank-lines' or a size such as 64KiB, got '12 parsecs'", {
            "split_text": "12 parsecs"}
    if case == "missing-input":
        return [good, root / "nope.txt"], r"input '.*nope\.txt' does not exist", {}
    if case == "val-fraction":
        return [good, good], r"--val-fraction must lie in \(0, 1\), got 0\.0", {"val_fraction": 0.0}
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["not-utf8", "not-utf8-gz-jsonl", "not-json", "no-field", "field-not-string",
                                  "empty", "one-short-document", "split-text", "missing-input", "val-fraction"])
def test_bad_input_writes_nothing(tmp_path: Path, bpe: Path, case: str) -> None:
    inputs, message, options = _bad_inputs(tmp_path, case)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=message):
        prepare(inputs, bpe, tmp_path / "corpus", PrepareOptions(**{**QUIET, **options}))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no corpus, no temporary folder


def test_bad_input_with_workers_stops_them(tmp_path: Path, bpe: Path) -> None:
    inputs, _ = write_inputs(tmp_path, documents(30, seed=5))
    (tmp_path / "z-bad.txt").write_bytes(b"fine \x80 then not")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"z-bad\.txt' is not UTF-8 text: invalid start byte at byte 5"):
        prepare([*inputs, tmp_path / "z-bad.txt"], bpe, tmp_path / "c", PrepareOptions(workers=2, progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_tokenizer_and_out_errors(tmp_path: Path, bpe: Path) -> None:
    (tmp_path / "a.txt").write_text("one document")
    (tmp_path / "b.txt").write_text("another one")
    inputs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    with pytest.raises(FileNotFoundError, match="tokenizer folder '.*nowhere' does not exist"):
        prepare(inputs, tmp_path / "nowhere", tmp_path / "c", PrepareOptions(**QUIET))
    (tmp_path / "empty-tok").mkdir()
    with pytest.raises(ValueError, match="has no tokenizer: expected tokenizer.json"):
        prepare(inputs, tmp_path / "empty-tok", tmp_path / "c", PrepareOptions(**QUIET))
    with pytest.raises(ValueError, match="--eos 'nope' is not a token"):
        prepare(inputs, bpe, tmp_path / "c", PrepareOptions(eos="nope", **QUIET))
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        prepare(inputs, bpe, tmp_path / "c", PrepareOptions(**QUIET))


def test_corrupt_shards_are_refused(tmp_path: Path, bpe: Path) -> None:
    inputs, _ = write_inputs(tmp_path, documents(30, seed=2))
    out = tmp_path / "corpus"
    prepare(inputs, bpe, out, PrepareOptions(val_fraction=0.1, **QUIET))
    shard = out / "train-00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1  # same size, other bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"train-00000\.bin' has sha256 [0-9a-f]{16}\.\.\.; manifest\.json says"):
        load_tokens(TrainConfig(data=str(out)))
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(ValueError, match=rf"train-00000\.bin' has {len(data) - 2} bytes; manifest\.json says {len(data)}"):
        load_tokens(TrainConfig(data=str(out)))
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"train-00000\.bin', listed in manifest\.json, does not exist"):
        load_tokens(TrainConfig(data=str(out)))
    other = make_word_level(tmp_path / "other", 300)
    prepare(inputs, bpe, tmp_path / "c2", PrepareOptions(**QUIET))
    with pytest.raises(ValueError, match="--tokenizer .* is not the tokenizer the corpus was prepared with"):
        load_tokens(TrainConfig(data=str(tmp_path / "c2"), tokenizer=str(other)))


def test_command_line(tmp_path: Path, bpe: Path) -> None:
    inputs, _ = write_inputs(tmp_path, documents(12, seed=4))
    cmd = [sys.executable, "-m", "mpisplit", "prepare", "--tokenizer", str(bpe), "--out", str(tmp_path / "c"),
           "--workers", "1", "--val-fraction", "0.25", *map(str, inputs)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=clean_mpi_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert "9 train documents" in done.stdout and "3 validation documents" in done.stdout
    assert "prepare: 100%" in done.stderr  # the progress bar, in bytes
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["val"]["documents"] == 3
    bad = subprocess.run(cmd, check=False, capture_output=True, text=True, env=clean_mpi_env(), timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: --out {str(tmp_path / 'c')!r} already exists: choose a new folder (prepare never overwrites)"]


def test_npy_ids_are_memory_mapped(tmp_path: Path) -> None:
    from mpisplit.training.data import TextDataset, load_token_ids

    ids = np.random.default_rng(0).integers(0, 500, size=4000).astype(np.uint16)
    np.save(tmp_path / "ids.npy", ids)
    mapped = load_token_ids(tmp_path / "ids.npy", 500)
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.uint16
    data = TextDataset.from_ids(mapped, 500)
    assert isinstance(data.train, np.memmap)  # split without a copy
    memory = TextDataset.from_ids(ids.astype(np.int64), 500)
    for split in ("train", "val"):
        x, y = data.batch(split, 1, 3, 8, 32)
        assert x.dtype == np.int64
        assert np.array_equal(x, memory.batch(split, 1, 3, 8, 32)[0]) and np.array_equal(y, memory.batch(split, 1, 3, 8, 32)[1])
    with pytest.raises(ValueError, match=r"lie in \[0, 499\]; the model has 400"):
        load_token_ids(tmp_path / "ids.npy", 400)
