"""Text data for character-level language models: corpus, tokenizer, batches.

Batches are a pure function of (seed, step): step s draws B_global windows from
the training tokens with a generator seeded by (seed, s), and data-parallel rank
d takes rows [d*B/dp, (d+1)*B/dp). Any dp x tp layout therefore sees the same
global batch at the same step, and a resumed run needs only the step number to
continue the data stream exactly.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from mpisplit.data.shards import entropy_of_counts

_COUNT_BLOCK = 1 << 24  # tokens per bincount of unigram_entropy


def default_corpus() -> str:
    """English prose present on every machine with Python: the CPython reference
    documentation topics that `help()` shows (pydoc_data.topics), about 0.5 MB."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics))


def load_text(path: str | Path) -> str:
    """Read a UTF-8 text file; clear errors for a missing, empty or binary file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"data path {str(path)!r} is not a file")
    raw = path.read_bytes()
    if not raw.strip():
        raise ValueError(f"data file {str(path)!r} is empty")
    if b"\x00" in raw:
        raise ValueError(f"data file {str(path)!r} looks binary (it contains NUL bytes); expected UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"data file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


class CharTokenizer:
    """One token per distinct character of the training text, in sorted order."""

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars) or not chars:
            raise ValueError("tokenizer alphabet must be a non-empty string of distinct characters")
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        unknown = sorted(set(text) - self.index.keys())
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:10])
            raise ValueError(f"{len(unknown)} character(s) not in the model's vocabulary: {shown}")
        return np.fromiter((self.index[c] for c in text), dtype=np.int64, count=len(text))

    def decode(self, ids: Any) -> str:
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))


def unigram_entropy(tokens: Any, vocab_size: int) -> float:
    """Entropy in nats of the token frequencies: the loss of the best model that ignores context.
    Counted a block at a time, so a memory-mapped array is never copied whole."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for lo in range(0, len(tokens), _COUNT_BLOCK):
        counts += np.bincount(np.asarray(tokens[lo: lo + _COUNT_BLOCK]), minlength=vocab_size)[:vocab_size]
    return entropy_of_counts(counts)


def load_token_ids(path: str | Path, vocab_size: int) -> np.ndarray:
    """Token ids from a .npy integer array (memory-mapped, read-only, in its own dtype) or a
    text file of integers separated by whitespace or commas (for models whose tokenizer is not
    available, e.g. GPT-2)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {str(path)!r} does not exist")
    if path.suffix == ".npy":
        try:
            ids = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"{str(path)!r} is not a plain .npy array: {exc}") from None
        if ids.dtype.kind not in "iu":
            raise ValueError(f"{str(path)!r} holds {ids.dtype} values; token ids must be integers")
        ids = ids.reshape(-1)
    else:
        words = load_text(path).replace(",", " ").split()
        try:
            ids = np.array([int(w) for w in words], dtype=np.int64)
        except ValueError:
            raise ValueError(f"{str(path)!r} must hold integer token ids separated by spaces or commas") from None
    if ids.size == 0:
        raise ValueError(f"token file {str(path)!r} holds no ids")
    lo, hi = _id_range(ids)
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids in {str(path)!r} lie in [{lo}, {hi}]; the model has {vocab_size}")
    return ids


def _id_range(ids: np.ndarray) -> tuple[int, int]:
    blocks = range(0, len(ids), _COUNT_BLOCK)
    return (min(int(ids[b: b + _COUNT_BLOCK].min()) for b in blocks),
            max(int(ids[b: b + _COUNT_BLOCK].max()) for b in blocks))


def ids_digest(ids: np.ndarray) -> str:
    """What the ranks compare of token-id data: sha256 of the ids as int64, a block at a time
    (a memory-mapped .npy is never copied whole)."""
    h = hashlib.sha256()
    for lo in range(0, len(ids), _COUNT_BLOCK):
        h.update(np.ascontiguousarray(ids[lo: lo + _COUNT_BLOCK], dtype=np.int64).tobytes())
    return "ids " + h.hexdigest()


class TokenDataset:
    """Train and validation token streams (arrays, memory maps or ShardedTokens) and the
    batches drawn from them. `tokenizer`: the CharTokenizer of character-level data, else None."""

    tokenizer: CharTokenizer | None = None
    masked = False  # whether targets may be ignored (-100): then the step counts its targets

    def __init__(self, train: Any, val: Any, vocab_size: int) -> None:
        self.train, self.val, self.vocab_size = train, val, vocab_size

    def check_seq_len(self, seq_len: int) -> None:
        shortest = min(len(self.train), len(self.val))
        if seq_len + 1 > shortest:
            raise ValueError(
                f"sequence length {seq_len} needs at least {seq_len + 1} tokens per split; "
                f"the data has {len(self.train)} train and {len(self.val)} validation tokens"
            )

    def use_packing(self, seq_len: int) -> None:
        raise ValueError("--pack packs the conversations of a chat corpus (mpisplit prepare --chat); "
                         "windows of a token stream fill their rows already")

    def rows(
        self, split: str, seed: int, step: int, batch_size: int, seq_len: int, dp_rank: int = 0, dp: int = 1,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """batch() and the rows' positions when packed (None: every row one sequence from 0)."""
        return (*self.batch(split, seed, step, batch_size, seq_len, dp_rank, dp), None)

    def train_entropy(self) -> float:
        """The unigram entropy of the training tokens (nats)."""
        return unigram_entropy(self.train, self.vocab_size)

    def batch(
        self, split: str, seed: int, step: int, batch_size: int, seq_len: int, dp_rank: int = 0, dp: int = 1,
    ) -> tuple[np.ndarray, np.ndarray]:
        """This DP rank's rows of the global batch of step `step`: idx, targets (B/dp, T) int64."""
        if batch_size % dp:
            raise ValueError(f"batch size {batch_size} is not divisible by dp={dp}")
        tokens = self.train if split == "train" else self.val
        stream = 0 if split == "train" else 1
        rng = np.random.default_rng([seed, stream, step])
        starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size, endpoint=True)
        per = batch_size // dp
        mine = starts[dp_rank * per: (dp_rank + 1) * per]
        if hasattr(tokens, "windows"):  # ShardedTokens: copied shard by shard
            window = tokens.windows(mine, seq_len + 1)
        else:
            window = np.asarray(tokens[mine[:, None] + np.arange(seq_len + 1)[None, :]], dtype=np.int64)
        return window[:, :-1].copy(), window[:, 1:].copy()  # (B/dp, T) each


class TextDataset(TokenDataset):
    """Encoded text split into train (first 90 %) and validation (last 10 %) tokens.

    `TextDataset.from_ids(ids, vocab_size)` wraps already-tokenized data (no tokenizer)."""

    def __init__(self, text: str, tokenizer: CharTokenizer | None = None, val_fraction: float = 0.1) -> None:
        self.tokenizer = tokenizer or CharTokenizer.from_text(text)
        self.vocab_size = self.tokenizer.vocab_size
        self._split(self.tokenizer.encode(text), val_fraction)

    @classmethod
    def from_ids(cls, ids: np.ndarray, vocab_size: int, val_fraction: float = 0.1) -> TextDataset:
        data = cls.__new__(cls)
        data.tokenizer, data.vocab_size = None, vocab_size
        data._split(ids if isinstance(ids, np.memmap) else np.asarray(ids, dtype=np.int64), val_fraction)
        return data

    def _split(self, tokens: np.ndarray, val_fraction: float) -> None:
        n_val = int(len(tokens) * val_fraction)
        self.train, self.val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]
