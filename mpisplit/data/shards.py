"""Writing one split (train or val) of a prepared corpus: token shards and a document index.

Shards `{split}-00000.bin`, `{split}-00001.bin`, ... are raw little-endian token ids, each at
most `shard_bytes`; together they are the split's documents concatenated (a document may span
two shards). `{split}-index.npy` holds the token offset of every document's start and, last, the
total (int64, documents + 1 values). Each file's sha256 is computed as it is written.
"""

from __future__ import annotations

import hashlib
import math
import os
from array import array
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mpisplit.runtime.files import sha256_file

_FLUSH_TOKENS = 1 << 20  # documents are buffered and written this many tokens at a time


class SplitWriter:
    def __init__(self, folder: Path, split: str, dtype: str, vocab_size: int, shard_bytes: int) -> None:
        self.folder, self.split, self.dtype = folder, split, np.dtype(dtype).newbyteorder("<")
        self.vocab_size = vocab_size
        self.shard_tokens = max(1, shard_bytes // self.dtype.itemsize)
        self.offsets = array("q", [0])
        self.counts = np.zeros(vocab_size, dtype=np.int64)  # unigram counts, for the entropy
        self.shards: list[dict[str, Any]] = []
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._file: BinaryIO | None = None
        self._hash: Any = None
        self._in_shard = 0

    @property
    def documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def tokens(self) -> int:
        return self.offsets[-1]

    def add(self, document: np.ndarray) -> None:
        """One document's ids (its eos included)."""
        self.offsets.append(self.offsets[-1] + len(document))
        self._pending.append(document)
        self._pending_tokens += len(document)
        if self._pending_tokens >= _FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        tokens = np.concatenate(self._pending).astype(self.dtype, copy=False)
        self._pending, self._pending_tokens = [], 0
        self.counts += np.bincount(tokens, minlength=self.vocab_size)[: self.vocab_size]
        while len(tokens):
            file = self._file
            if file is None or self._in_shard == self.shard_tokens:
                file = self._next_shard()
            take = min(len(tokens), self.shard_tokens - self._in_shard)
            data = tokens[:take].tobytes()
            file.write(data)
            self._hash.update(data)
            self._in_shard += take
            tokens = tokens[take:]

    def _next_shard(self) -> BinaryIO:
        """Close the open shard and open the next one, which it returns (also `self._file`)."""
        self._close_shard()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        file = open(self.folder / name, "wb")  # noqa: SIM115 - closed by _close_shard
        self._file = file
        self._hash, self._in_shard = hashlib.sha256(), 0
        self.shards.append({"file": name, "tokens": 0, "bytes": 0, "sha256": ""})
        return file

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.shards[-1].update(tokens=self._in_shard, bytes=self._in_shard * self.dtype.itemsize,
                               sha256=self._hash.hexdigest())
        self._file = None

    def close(self) -> dict[str, Any]:
        """Write what is buffered and the index; what manifest.json records of this split."""
        self._flush()
        self._close_shard()
        index = self.folder / f"{self.split}-index.npy"
        np.save(index, np.frombuffer(self.offsets, dtype=np.int64))
        return {
            "documents": self.documents, "tokens": self.tokens, "shards": self.shards,
            "index": {"file": index.name, "sha256": sha256_file(index)},
        }


def entropy_of_counts(counts: np.ndarray) -> float:
    """Entropy in nats of the distribution the counts give."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def split_of(i: int, fraction: float) -> str:
    """The split of document i: held out when floor((i + 1) f) > floor(i f)."""
    return "val" if math.floor((i + 1) * fraction) > math.floor(i * fraction) else "train"
