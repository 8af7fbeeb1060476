"""`prepare(inputs, tokenizer_folder, out)`: a corpus tokenized once into memory-mappable shards.

    out/
      manifest.json               format, tokenizer (files' sha256, vocabulary, eos id), dtype,
                                  document and token counts, every file's size and sha256
      train-00000.bin ...         the training documents' ids, each followed by eos
      train-index.npy             token offsets of the training documents
      val-00000.bin, val-index.npy   the held-out documents, likewise

Validation documents are whole documents: document i (counted from 0 over the non-empty
documents) is held out when floor((i + 1) f) > floor(i f), which spaces round(n f) of them
evenly; when that picks none, the last document is held out. A corpus of one document (one
text file, not cut by `split_text`) holds out its last max(1, round(n f)) tokens instead. Everything is written into a
temporary folder beside `out`, renamed to `out` only once complete, so an interrupted prepare
leaves nothing at `out`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpisplit.data.chat_corpus import check_chat_options, write_chat
from mpisplit.data.documents import check_split_text, input_files, iter_documents
from mpisplit.data.encode import encoded_batches, text_batches, usable_cores
from mpisplit.data.manifest import FORMAT, MANIFEST
from mpisplit.data.shards import SplitWriter, entropy_of_counts, split_of
from mpisplit.data.tokenizer import open_tokenizer, token_dtype
from mpisplit.runtime.files import fsync_dir, fsync_file

SHARD_BYTES = 1 << 30


@dataclass
class PrepareOptions:
    field: str = "text"  # the JSONL field holding a document
    split_text: str = "file"  # how a text file becomes documents: "file", "blank-lines" or a size ("64KiB")
    val_fraction: float = 0.005  # share of documents held out for validation (at least one)
    workers: int = 0  # encoding processes (0: the cores this process may use)
    shard_bytes: int = SHARD_BYTES  # largest shard file
    eos: str | None = None  # the end-of-document token (None: the tokenizer folder's)
    progress: bool = True  # a progress bar in input bytes
    chat: bool = False  # JSONL conversations, rendered by the chat template, with a loss mask (chat_corpus.py)
    train_on: str = "assistant"  # chat: which tokens count in the loss ("assistant", "last", "all")
    seq_len: int | None = None  # chat: the most tokens a conversation may have
    truncate: bool = False  # chat: cut a longer conversation to seq_len tokens instead of refusing it
    chat_template: str | None = None  # chat: a template file instead of the tokenizer folder's

    def validate(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction must lie in (0, 1), got {self.val_fraction}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if self.shard_bytes < 8:
            raise ValueError(f"shard size must be at least 8 bytes, got {self.shard_bytes}")
        if not self.field:
            raise ValueError("--field must name a JSONL field")
        check_split_text(self.split_text)
        check_chat_options(self.train_on, self.seq_len, self.truncate)


def prepare(inputs: list[str | os.PathLike], tokenizer: str | os.PathLike, out: str | os.PathLike,
            options: PrepareOptions | None = None) -> dict[str, Any]:
    """Tokenize `inputs` into the folder `out` (which must not exist); returns the manifest."""
    opts = options or PrepareOptions()
    opts.validate()
    out = Path(out)
    if out.exists():
        raise ValueError(f"--out {str(out)!r} already exists: choose a new folder (prepare never overwrites)")
    tok = open_tokenizer(tokenizer, opts.eos)
    files = input_files(inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = _write_chat(files, tok, tmp, opts) if opts.chat else _write(files, tok, tmp, opts)
        manifest["inputs"] = [str(p) for p in inputs]
        _write_manifest(tmp, manifest)
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # also on Ctrl-C: nothing half-written is left
        raise
    return manifest


def _write(files: list[Path], tok: Any, folder: Path, opts: PrepareOptions) -> dict[str, Any]:
    dtype = token_dtype(tok.vocab_size)
    splits = {s: SplitWriter(folder, s, dtype, tok.vocab_size, opts.shard_bytes) for s in ("train", "val")}
    workers = opts.workers or usable_cores()
    total = sum(p.stat().st_size for p in files)
    batches = encoded_batches(text_batches(iter_documents(files, opts.field, opts.split_text)), tok.tokenizer, tok.folder,
                              tok.eos_id, workers)
    held: tuple[int, np.ndarray] | None = None  # the latest document, routed once the next arrives
    with _progress(total, opts.progress) as bar:
        for i, document in _documents(batches, bar):
            if held is not None:
                splits[split_of(held[0], opts.val_fraction)].add(held[1])
            held = (i, document)
        bar.update(total - bar.n)
    if held is None:
        raise ValueError(f"empty corpus: the inputs ({len(files)} file(s)) hold no non-empty document")
    holdout = "tail" if held[0] == 0 else "documents"
    if holdout == "tail":
        _hold_out_tail(held[1], splits, opts.val_fraction)
    else:
        splits["val" if splits["val"].documents == 0 else split_of(held[0], opts.val_fraction)].add(held[1])
    train_counts = splits["train"].counts
    result = {name: split.close() for name, split in splits.items()}
    return {
        "format": FORMAT, "tokenizer": tok.describe(), "dtype": dtype, "val_fraction": opts.val_fraction,
        "holdout": holdout,
        "train": result["train"], "val": result["val"],
        "train_unigram_entropy": entropy_of_counts(train_counts), "field": opts.field,
    }


def _documents(batches: Iterator[tuple[np.ndarray, np.ndarray, int]], bar: Any) -> Iterator[tuple[int, np.ndarray]]:
    """(index, ids) of every document, in order; views into each batch's token array."""
    i = 0
    for tokens, lengths, disk in batches:
        for document in np.split(tokens, np.cumsum(lengths)[:-1]):
            yield i, document
            i += 1
        bar.update(disk)


def _write_chat(files: list[Path], tok: Any, folder: Path, opts: PrepareOptions) -> dict[str, Any]:
    total = sum(p.stat().st_size for p in files)
    with _progress(total, opts.progress) as bar:
        manifest = write_chat(files, tok, folder, opts, bar, split_of)
        bar.update(total - bar.n)
    return manifest


def _hold_out_tail(document: np.ndarray, splits: dict[str, SplitWriter], fraction: float) -> None:
    """The single document of a corpus: its last max(1, round(n f)) tokens validate, the rest trains."""
    held = max(1, round(len(document) * fraction))
    if held >= len(document):
        raise ValueError(f"the corpus is a single document of {len(document)} token(s) (its end-of-document "
                         "token included): too short to hold out validation tokens and train on the rest")
    splits["train"].add(document[:-held])
    splits["val"].add(document[-held:])


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare",
                disable=not enabled, dynamic_ncols=True)


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    fsync_file(path)
    fsync_dir(folder)
