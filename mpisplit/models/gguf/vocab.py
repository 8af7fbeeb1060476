"""A Hugging Face byte-level BPE tokenizer (tokenizer.json) as GGUF tokenizer metadata: the
inverse of tokenizer.py's "gpt2" kind.

    vocab = read_vocab("folder", vocab_size=49152)    # ValueError naming what is not supported
    vocab.add_to(writer)                               # tokenizer.ggml.* and tokenizer.chat_template

What llama.cpp reads, and where it comes from here:

    tokenizer.ggml.model        "gpt2" (byte-level BPE: tokens spelled in GPT-2's byte alphabet)
    tokenizer.ggml.pre          llama.cpp's name of the pre-tokenizer split, found by matching the
                                tokenizer.json pre_tokenizer against tokenizer.py's _SPLITS
    tokenizer.ggml.tokens       the vocabulary by id; ids the tokenizer lacks up to the model's
                                vocab_size are "[PAD{i}]" (as llama.cpp's converter pads)
    tokenizer.ggml.token_type   added special tokens CONTROL, other added tokens USER_DEFINED,
                                padding UNUSED, the rest NORMAL
    tokenizer.ggml.merges, *_token_id, add_bos/add_eos_token, tokenizer.chat_template
                                gguf.SpecialVocab, the package's own reader of tokenizer.json,
                                tokenizer_config.json and config.json

SentencePiece tokenizers (tokenizer.ggml.model "llama") are not written: llama.cpp's converter
takes their scores from tokenizer.model, which a tokenizer.json does not carry.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpisplit.models.gguf.reader import require_gguf
from mpisplit.models.gguf.tokenizer import (
    _GPT2_SPLIT,
    _SPLITS,
    CONTROL,
    NORMAL,
    UNUSED,
    USER_DEFINED,
)

# llama.cpp's names for the splits tokenizer.py reads, the first that fits is written ("gpt2" and
# "default" also read as the GPT-2 split here, but llama.cpp's "default" is another split).
_PRE_NAMES = ("gpt-2", "smollm", "llama-bpe", "smaug-bpe", "qwen2")


@dataclass
class GGUFVocab:
    """A tokenizer's GGUF metadata; `special` is a gguf.SpecialVocab."""

    tokens: list[str]
    types: list[int]
    pre: str
    special: Any
    padded: int  # "[PAD{i}]" tokens added up to the model's vocab_size

    def add_to(self, writer: Any) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        self.special.add_to_gguf(writer, quiet=True)


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is missing: a GGUF file needs the model's tokenizer (tokenizer.json); "
            "pass --tokenizer FOLDER"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")  # noqa: TRY004 - a bad file
    return data


def _splits(pre: Any, where: Path) -> list[str]:
    """The regular expressions a tokenizer.json pre_tokenizer splits by, in order, ending with the
    byte-level step (ValueError for any other kind of pre-tokenizer)."""
    kind = pre.get("type") if isinstance(pre, dict) else None
    if kind == "Sequence":
        return [s for step in pre.get("pretokenizers", []) for s in _splits(step, where)] or ["?"]
    if kind == "ByteLevel" and not pre.get("add_prefix_space", False):
        return ([_GPT2_SPLIT] if pre.get("use_regex", True) else []) + ["<byte-level>"]
    if kind == "Split" and pre.get("behavior") == "Isolated" and not pre.get("invert", False):
        pattern = pre.get("pattern") or {}
        if isinstance(pattern.get("Regex"), str):
            return [pattern["Regex"]]
    if kind == "Digits" and pre.get("individual_digits", False):
        return [r"\p{N}"]
    raise ValueError(f"{where}: pre-tokenizer {json.dumps(pre)[:200]} is not one GGUF files name (llama.cpp's "
                     f"tokenizer.ggml.pre {list(_PRE_NAMES)})")


def pre_tokenizer_name(tokenizer: dict, where: Path) -> str:
    """llama.cpp's tokenizer.ggml.pre for a tokenizer.json's pre-tokenizer and BPE model."""
    steps = _splits(tokenizer.get("pre_tokenizer"), where)
    if steps[-1:] != ["<byte-level>"] or "<byte-level>" in steps[:-1]:
        raise ValueError(f"{where}: the pre-tokenizer does not end with one byte-level step; only byte-level "
                         "BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM) are written to GGUF")
    found = (tuple(steps[:-1]), bool(tokenizer["model"].get("ignore_merges", False)))
    for name in _PRE_NAMES:
        if _SPLITS[name] == found:
            return name
    raise ValueError(f"{where}: the pre-tokenizer splits {list(found[0])} (ignore_merges={found[1]}) are none "
                     f"of llama.cpp's {list(_PRE_NAMES)} that GGUF files name")


def _tokens(tokenizer: dict, vocab_size: int, where: Path) -> tuple[list[str], list[int], int]:
    """(tokens, token types, padding count) by id, `vocab_size` of them."""
    by_id: dict[int, tuple[str, int]] = {i: (t, NORMAL) for t, i in tokenizer["model"]["vocab"].items()}
    for added in tokenizer.get("added_tokens") or []:
        by_id[added["id"]] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    if by_id and (max(by_id) >= vocab_size or min(by_id) < 0):
        raise ValueError(f"{where}: token ids run from {min(by_id)} to {max(by_id)}; the model has "
                         f"{vocab_size} rows of embeddings")
    tokens = [by_id[i][0] if i in by_id else f"[PAD{i}]" for i in range(vocab_size)]
    types = [by_id[i][1] if i in by_id else UNUSED for i in range(vocab_size)]
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"{where}: the vocabulary spells two ids alike; a GGUF file maps each text to one id")
    return tokens, types, vocab_size - len(by_id)


def read_vocab(folder: str | os.PathLike, vocab_size: int) -> GGUFVocab:
    """The GGUF metadata of `folder`'s tokenizer.json (+ tokenizer_config.json, config.json)."""
    folder = Path(folder)
    where = folder / "tokenizer.json"
    tokenizer = _load_json(where)
    model = tokenizer.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("byte_fallback", False) \
            or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{where}: model {(model or {}).get('type')!r} is not a byte-level BPE; only those "
                         "(tokenizer.ggml.model 'gpt2') are written to GGUF")
    pre = pre_tokenizer_name(tokenizer, where)
    tokens, types, padded = _tokens(tokenizer, vocab_size, where)
    gguf = require_gguf()
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ValueError(f"{where} has no merges; a byte-level BPE needs them")
    return GGUFVocab(tokens, types, pre, special, padded)
