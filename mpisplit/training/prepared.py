"""Training data from a folder `mpisplit prepare` wrote, or encoded by `--tokenizer FOLDER`.

    --data CORPUS                    a fresh model with the corpus's vocabulary
    --data CORPUS --tokenizer TOK    the same, after checking CORPUS was prepared with TOK
    --data CORPUS --init-from HF     fine-tuning, after checking CORPUS was prepared with HF's tokenizer
    --tokenizer TOK [--data FILE]    FILE (text, or ids) or the default corpus encoded by TOK

A chat corpus (`prepare --chat`) gives one conversation per row with masked targets
(training/chat_data.py). A prepared corpus is checked against its manifest (every file's size on every rank; the
sha256 of the files shared out over the ranks) and memory-mapped read-only: each rank copies
only its batch's windows. Call under `agree`: errors differ between ranks only by the files a
rank hashes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mpisplit.data.manifest import check_digests, check_sizes, is_prepared, read_manifest
from mpisplit.data.tokenizer import tokenizer_digests
from mpisplit.data.tokens import ShardedTokens
from mpisplit.models.hf import is_gguf
from mpisplit.models.hf import read_config as read_hf_config
from mpisplit.models.hf_tokenizer import load_hf_tokenizer
from mpisplit.training import data as inputs
from mpisplit.training.config import TrainConfig
from mpisplit.training.data import TextDataset, TokenDataset


class PreparedDataset(TokenDataset):
    """The train and validation streams of a prepared corpus (ShardedTokens)."""

    def __init__(self, folder: str | Path, manifest: dict[str, Any], vocab_size: int) -> None:
        folder = Path(folder)
        self.folder, self.manifest = folder, manifest
        streams = {s: ShardedTokens([folder / sh["file"] for sh in manifest[s]["shards"]], manifest["dtype"])
                   for s in ("train", "val")}
        super().__init__(streams["train"], streams["val"], vocab_size)

    def train_entropy(self) -> float:
        return float(self.manifest["train_unigram_entropy"])  # counted by prepare


def uses_tokens(config: TrainConfig) -> bool:
    """Whether this module provides the run's data (else training/data.py's inputs do)."""
    return config.tokenizer is not None or (config.data is not None and is_prepared(config.data))


def load_tokens(config: TrainConfig, rank: int = 0, size: int = 1) -> tuple[TokenDataset, str, Any]:
    """(dataset, what the ranks compare, the GPT-2 config of init_from or None)."""
    if config.tokenizer is not None and config.init_from is not None:
        raise ValueError("--tokenizer builds a fresh model and --init-from fine-tunes one (whose folder has its "
                         "tokenizer): pass one of them")
    if config.data is not None and is_prepared(config.data):
        return _prepared(config, config.data, rank, size)
    if config.tokenizer is None:  # the caller checks uses_tokens first
        raise TypeError("load_tokens needs a tokenizer or a prepared corpus")
    tok = load_hf_tokenizer(_tokenizer_folder(config.tokenizer))
    if tok is None:
        raise ValueError(f"--tokenizer {config.tokenizer!r} has no tokenizer: expected tokenizer.json, "
                         "or vocab.json + merges.txt")
    if config.data is None:
        ids = tok.encode(inputs.default_corpus())
    elif Path(config.data).suffix == ".npy" or _holds_integers(config.data):
        ids = inputs.load_token_ids(config.data, tok.vocab_size)
    else:
        ids = tok.encode(inputs.load_text(config.data))
    return TextDataset.from_ids(ids, tok.vocab_size), inputs.ids_digest(ids), None


def _prepared(config: TrainConfig, data: str, rank: int, size: int) -> tuple[TokenDataset, str, Any]:
    """The dataset of the prepared corpus in folder `data` (config.data)."""
    folder = Path(data)
    manifest = read_manifest(folder)
    check_sizes(folder, manifest)
    check_digests(folder, manifest, rank, size)
    vocab_size, hf_config = int(manifest["tokenizer"]["vocab_size"]), None
    if config.init_from is not None:
        check_tokenizer(manifest, config.init_from, "--init-from")
        hf_config = read_hf_config(config.init_from)
        if vocab_size > hf_config.vocab_size:
            raise ValueError(f"--data {config.data!r} has a vocabulary of {vocab_size} tokens; the model in "
                             f"{config.init_from!r} has {hf_config.vocab_size}")
        vocab_size = hf_config.vocab_size
    elif config.tokenizer is not None:
        check_tokenizer(manifest, config.tokenizer, "--tokenizer")
    dataset: TokenDataset
    if manifest.get("kind") == "chat":
        from mpisplit.training.chat_data import ChatDataset

        dataset = ChatDataset(folder, manifest, vocab_size)
    else:
        dataset = PreparedDataset(folder, manifest, vocab_size)
    return dataset, json.dumps(manifest, sort_keys=True), hf_config


def check_tokenizer(manifest: dict[str, Any], folder: str, flag: str) -> None:
    """The tokenizer files of `folder` are the ones the corpus was prepared with (sha256)."""
    if is_gguf(folder):
        raise ValueError(
            f"{flag} {folder!r}: the tokenizer inside a GGUF file cannot be checked against the corpus's "
            f"tokenizer files; convert it first (mpisplit convert --from-gguf {folder} FOLDER), prepare the "
            f"corpus with FOLDER and pass {flag} FOLDER"
        )
    have = tokenizer_digests(_tokenizer_folder(folder))
    want = manifest["tokenizer"]["files"]
    if have != want:
        differ = sorted(n for n in set(have) | set(want) if have.get(n) != want.get(n))
        raise ValueError(
            f"{flag} {folder!r} is not the tokenizer the corpus was prepared with: its files {sorted(have)} "
            f"differ from the manifest's {sorted(want)} in {differ}"
        )


def _tokenizer_folder(folder: str) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder!r} does not exist")
    return path


def _holds_integers(path: str) -> bool:
    words = inputs.load_text(path).replace(",", " ").split()
    return bool(words) and all(w.lstrip("-").isdigit() for w in words)
