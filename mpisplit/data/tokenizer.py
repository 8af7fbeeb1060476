"""A tokenizer folder as `mpisplit prepare` and training see it: which files make it (and their
sha256, which a prepared corpus records), its vocabulary size and its end-of-document id.

The eos token is, in order: `eos_token` of tokenizer_config.json or special_tokens_map.json,
`eos_token_id` of config.json or generation_config.json, else the first of EOS_NAMES that the
vocabulary holds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpisplit.models.hf_tokenizer import HFTokenizer, load_hf_tokenizer
from mpisplit.runtime.files import sha256_file

# The files that define the encoding (the model's config.json does not).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")


@dataclass
class TokenizerFolder:
    folder: Path
    tokenizer: HFTokenizer
    files: dict[str, str]  # file name -> sha256
    eos_id: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def describe(self) -> dict[str, Any]:
        """What manifest.json records of the tokenizer."""
        return {"files": self.files, "vocab_size": self.vocab_size, "eos_id": self.eos_id}


def open_tokenizer(folder: str | os.PathLike, eos: str | None = None) -> TokenizerFolder:
    """The folder's tokenizer; `eos` (a token) overrides the folder's end-of-document token."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(path)!r} does not exist")
    tok = load_hf_tokenizer(path)
    if tok is None:
        raise ValueError(f"{str(path)!r} has no tokenizer: expected tokenizer.json, or vocab.json + merges.txt")
    files = tokenizer_digests(path)
    return TokenizerFolder(path, tok, files, _eos_id(path, tok, eos))


def tokenizer_digests(folder: Path) -> dict[str, str]:
    return {name: sha256_file(folder / name) for name in TOKENIZER_FILES if (folder / name).is_file()}


def _eos_id(folder: Path, tok: HFTokenizer, eos: str | None) -> int:
    if eos is not None:
        return _token_id(tok, eos, f"--eos {eos!r}", folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        token = _read_json(folder / name).get("eos_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
            return _token_id(tok, token, f"eos_token {token!r} of {name}", folder)
    for name in ("config.json", "generation_config.json"):
        eid = _read_json(folder / name).get("eos_token_id")
        if isinstance(eid, list) and eid:
            eid = eid[0]
        if isinstance(eid, int) and not isinstance(eid, bool) and 0 <= eid < tok.vocab_size:
            return eid
    for token in EOS_NAMES:
        eid = tok.tokenizer.token_to_id(token)
        if eid is not None:
            return int(eid)
    raise ValueError(
        f"cannot tell the end-of-document token of {str(folder)!r}: no eos_token in tokenizer_config.json, "
        f"no eos_token_id in config.json and none of {list(EOS_NAMES)} in its vocabulary; name it with --eos TOKEN"
    )


def _token_id(tok: HFTokenizer, token: str, what: str, folder: Path) -> int:
    eid = tok.tokenizer.token_to_id(token)
    if eid is None:
        raise ValueError(f"{what} is not a token of the tokenizer in {str(folder)!r}")
    return int(eid)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON: {exc}") from None
    return value if isinstance(value, dict) else {}


def token_dtype(vocab_size: int) -> str:
    """uint16 holds ids up to 65535, so vocabularies of up to 65536 tokens; uint32 beyond."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"
