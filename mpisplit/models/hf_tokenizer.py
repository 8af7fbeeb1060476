"""The tokenizer of a Hugging Face folder, through the `tokenizers` library.

    tokenizer.json              a full tokenizer (e.g. GPT-2's byte-level BPE)
    vocab.json + merges.txt     a byte-level BPE in the older two-file layout

`load_hf_tokenizer(folder)` returns None when the folder has neither: the model then takes
and gives token ids only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


class HFTokenizer:
    """encode(text) -> int64 ids; decode(ids) -> text, as CharTokenizer does."""

    def __init__(self, tokenizer: Any, source: str) -> None:
        self.tokenizer, self.source = tokenizer, source

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> np.ndarray:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: Any) -> str:
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)


def _require_tokenizers(folder: Path) -> Any:
    try:
        import tokenizers
    except ImportError:
        raise ValueError(
            f"{str(folder)!r} has a tokenizer, which needs the 'tokenizers' package: "
            "pip install tokenizers (or mpisplit[serve])"
        ) from None
    return tokenizers


def load_hf_tokenizer(folder: str | os.PathLike, vocab_size: int | None = None) -> HFTokenizer | None:
    """The folder's tokenizer, or None without one. With `vocab_size` (the model's), a
    tokenizer with more tokens than the model has rows is refused."""
    folder = Path(folder)
    if (folder / "tokenizer.json").exists():
        tk = _require_tokenizers(folder)
        tok = HFTokenizer(tk.Tokenizer.from_file(str(folder / "tokenizer.json")), "tokenizer.json")
    elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        tk = _require_tokenizers(folder)
        bpe = tk.Tokenizer(tk.models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
        bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = tk.decoders.ByteLevel()
        tok = HFTokenizer(bpe, "vocab.json + merges.txt")
    else:
        return None
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer in {str(folder)!r} ({tok.source}) has {tok.vocab_size} tokens; "
            f"the model's vocabulary has {vocab_size}"
        )
    return tok
