"""The end-of-sequence token ids of a Hugging Face folder, for every model family.

config.json and generation_config.json may each give `eos_token_id` as an integer or a list
(Llama 3 Instruct: [128001, 128008, 128009]; its chat turns end with <|eot_id|>, which is not
the tokenizer's eos). Generation stops at any of them: the union, config.json's first, each
id once, in the order the files list them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FILES = ("config.json", "generation_config.json")


def _read(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise TypeError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def union_eos(*configs: dict, where: str = "config") -> tuple[int, ...]:
    """The union of the configs' `eos_token_id` (each an int, a list or absent), in order, each
    id once. For sources that are not a folder of JSON files (a GGUF file's converted configs)."""
    out: list[int] = []
    for config in configs:
        value = config.get("eos_token_id")
        ids = [] if value is None else value if isinstance(value, list) else [value]
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise ValueError(f"{where}: eos_token_id must be a non-negative integer or a list of them, "
                                 f"got {value!r}")
            if i not in out:
                out.append(i)
    return tuple(out)


def eos_token_ids(folder: str | os.PathLike) -> tuple[int, ...]:
    """The union of config.json's and generation_config.json's eos_token_id (each an int or a
    list; either file may lack it), config.json's first, then the tokenizer's eos token
    (tokenizer_config.json's eos_token in tokenizer.json), without repeats. () when none has one.
    A GGUF file: the same union over the configs its metadata converts to."""
    from mpisplit.models.hf import is_gguf

    if is_gguf(folder):
        from mpisplit.models.gguf.config import generation_config

        # its eos, then llama.cpp's eot/eom: a superset of the converted config.json's eos
        return union_eos(generation_config(folder), where=str(folder))
    folder = Path(folder)
    out: tuple[int, ...] = ()
    for name in FILES:
        out = union_eos({"eos_token_id": list(out)}, _read(folder / name), where=str(folder / name))
    tokenizer_eos = _tokenizer_eos(folder)
    return out + tuple(i for i in tokenizer_eos if i not in out)


def _tokenizer_eos(folder: Path) -> tuple[int, ...]:
    """The id of tokenizer_config.json's eos_token (a string, or {"content": ...}) in tokenizer.json
    (its added tokens, then its vocabulary); () when either file or the token is missing."""
    config, vocab_file = folder / "tokenizer_config.json", folder / "tokenizer.json"
    if not (config.is_file() and vocab_file.is_file()):
        return ()
    token = _read(config).get("eos_token")
    token = token.get("content") if isinstance(token, dict) else token
    if not isinstance(token, str):
        return ()
    tok = _read(vocab_file)
    for added in tok.get("added_tokens") or []:
        if isinstance(added, dict) and added.get("content") == token and isinstance(added.get("id"), int):
            return (added["id"],)
    vocab = (tok.get("model") or {}).get("vocab")
    found = vocab.get(token) if isinstance(vocab, dict) else None
    return (found,) if isinstance(found, int) else ()
