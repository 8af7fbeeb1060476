"""Opening a GGUF file (llama.cpp's format) and reading its metadata, through the `gguf` package.

    f = GGUFFile("model.gguf")          # FileNotFoundError / ValueError on a missing or corrupt file
    f.arch                              # general.architecture, e.g. "llama"
    f.get("llama.block_count", int)     # a metadata value, checked against the type asked for
    f.tensors["token_embd.weight"]      # gguf.ReaderTensor: GGUF shape (ne0 first), type, memmapped data

The parsing itself is `gguf.GGUFReader`'s; this file only turns what it raises on a truncated or
corrupt file (IndexError, reshape errors, unknown enum values) into one ValueError naming the
file, and checks that every tensor's bytes lie inside it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_MISSING = object()
# Exceptions GGUFReader lets through on malformed input: short reads index empty arrays,
# counts that overrun reshape badly, unknown type codes fail IntEnum lookups.
_PARSE_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError, MemoryError)


def require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ValueError(
            "reading GGUF files needs the 'gguf' package: pip install gguf (or mpisplit[gguf])"
        ) from None
    return gguf


class GGUFFile:
    """A GGUF file's metadata and tensor table; tensor data stays memory-mapped until read."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"GGUF file {str(self.path)!r} does not exist")
        if not self.path.is_file():
            raise ValueError(f"{str(self.path)!r} is not a file (a GGUF model is one .gguf file)")
        gguf = require_gguf()
        try:
            self.reader = gguf.GGUFReader(self.path)
        except _PARSE_ERRORS as exc:
            raise ValueError(f"{self.path} is not a readable GGUF file (corrupt or truncated?): {exc}") from None
        if self.reader.byte_order != "I":
            raise ValueError(f"{self.path} is a big-endian GGUF file; only little-endian files are read")
        size = self.path.stat().st_size
        self.tensors = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise ValueError(
                    f"{self.path} is truncated: tensor {t.name!r} ({t.tensor_type.name}) needs bytes "
                    f"[{t.data_offset}, {t.data_offset + t.n_bytes}) of a {size}-byte file"
                )

    def __contains__(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        """Metadata value `key` (a list for arrays), which must be of `kind`; `default` when absent
        (ValueError naming the key when there is no default)."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise ValueError(f"{self.path}: metadata key {key!r} is missing")
            return default
        try:
            value = field.contents()
        except _PARSE_ERRORS as exc:
            raise ValueError(f"{self.path}: metadata key {key!r} cannot be read: {exc}") from None
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a GGUF bool where a count is expected is an error.
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            names = "/".join(k.__name__ for k in kinds)
            raise ValueError(f"{self.path}: metadata key {key!r} is {value!r}; expected a {names}")
        return value

    @property
    def arch(self) -> str:
        return self.get("general.architecture", str)

    def close(self) -> None:
        # The memmap closes once nothing refers to it; the tensors' data are views of it.
        self.tensors = {}
        self.reader = None
