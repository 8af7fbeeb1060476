"""A small corpus and tokenizers made by the tests themselves (nothing is downloaded)."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs!",
    "How vexingly quick daft zebras jump.",
    "Sphinx of black quartz, judge my vow.",
    "Grüße aus Köln: ünïcode ✓ works too.",
    "Two driven jocks help fax my big quiz.",
]
EOS = "<|endoftext|>"


def make_bpe(folder: Path, vocab_size: int = 120) -> Path:
    """A byte-level BPE trained on SENTENCES, saved as folder/tokenizer.json; eos is id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 4, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def make_word_level(folder: Path, vocab_size: int) -> Path:
    """Words w0 .. w{vocab_size - 1} with ids 0 .. vocab_size - 1 (w0 is eos), split on spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w0"}))
    return folder


def documents(n: int, seed: int = 0) -> list[str]:
    """n documents of 1-12 sentences each."""
    rng = np.random.default_rng(seed)
    return [" ".join(SENTENCES[j] for j in rng.integers(0, len(SENTENCES), size=rng.integers(1, 13)))
            for _ in range(n)]


def write_inputs(root: Path, docs: list[str]) -> tuple[list[Path], list[str]]:
    """The documents spread over a folder of text files (two levels), a JSONL file and a
    gzipped JSONL file; returns the inputs to name and the documents in prepare's order."""
    third = len(docs) // 3
    folder = root / "texts"
    for i, doc in enumerate(docs[:third]):
        path = folder / ("b" if i % 2 else "a") / f"{i:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(doc, encoding="utf-8")
    (folder / ".hidden").write_text("not a document")
    lines = root / "lines.jsonl"
    lines.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs[third:2 * third])))
    with gzip.open(root / "more.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[2 * third:])
    # prepare walks the folder in sorted order: a/000, a/002, ..., b/001, b/003, ...
    walked = [docs[i] for i in range(0, third, 2)] + [docs[i] for i in range(1, third, 2)]
    return [folder, lines, root / "more.jsonl.gz"], walked + docs[third:]


def encode_each(tok_folder: Path, docs: list[str]) -> list[list[int]]:
    """Each document encoded alone by the `tokenizers` library, then eos."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_folder / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    return [tok.encode(d, add_special_tokens=False).ids + [eos] for d in docs]


def val_indices(n: int, f: float) -> list[int]:
    """The documents prepare holds out: floor((i + 1) f) > floor(i f), else the last one."""
    held = [i for i in range(n) if math.floor((i + 1) * f) > math.floor(i * f)]
    return held or [n - 1]


def docs_text_file(folder: Path, chars: int = 20000) -> Path:
    """folder/tiny.txt: the first `chars` characters of CPython's documentation topics (the text
    train.py's default run reads), for the tests that launch train.py."""
    import pydoc_data.topics

    text = "".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))[:chars]
    path = folder / "tiny.txt"
    path.write_text(text, encoding="utf-8")
    return path
