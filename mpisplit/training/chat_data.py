"""Training batches of a chat corpus (`mpisplit prepare --chat`): one conversation per row.

Step s draws B_global conversations with a generator seeded by (seed, split, s), as the token
windows of training/data.py are drawn, so any dp x tp layout sees the same global batch and a
resumed run continues exactly; data-parallel rank d takes rows [d*B/dp, (d+1)*B/dp). A row holds
one conversation from its first token: inputs its tokens but the last, targets the next tokens
where the loss mask counts them and IGNORE (-100) elsewhere; the rest of the row is padding (the
eos id as input, IGNORE as target), which causal attention keeps out of the conversation's logits.

Packed (`--pack`): a split's conversations are packed into rows of seq_len inputs by best-fit
decreasing (training/row_packing.py), once per epoch in an order drawn from (seed, split, epoch),
and the rows of each epoch shuffled by the same generator; step s takes rows s*B..(s+1)*B-1 of
that endless stream, so each epoch shows every conversation once. Each row comes with the
positions of its tokens in their conversation (nn/packing.py): attention stays within each
conversation and positions restart at its first token, so it trains as if alone in its row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mpisplit.data.tokens import ShardedTokens
from mpisplit.training.data import TokenDataset
from mpisplit.training.row_packing import best_fit_decreasing

IGNORE = -100


class ChatDataset(TokenDataset):
    masked = True  # targets carry IGNORE: the step's loss is normalised by the counted targets

    def __init__(self, folder: str | Path, manifest: dict[str, Any], vocab_size: int) -> None:
        folder = Path(folder)
        self.folder, self.manifest = folder, manifest
        self.pad = int(manifest["tokenizer"]["eos_id"])
        self.splits = {s: _Split(folder, manifest, s) for s in ("train", "val")}
        self.packed: int | None = None  # the row length of packed rows, or None (one conversation a row)
        super().__init__(self.splits["train"].tokens, self.splits["val"].tokens, vocab_size)

    def use_packing(self, seq_len: int) -> None:
        self.packed = seq_len

    def train_entropy(self) -> float:
        return float(self.manifest["train_unigram_entropy"])

    def check_seq_len(self, seq_len: int) -> None:
        longest = max(self.manifest["train"]["longest"], self.manifest["val"]["longest"])
        if longest > seq_len + 1:
            raise ValueError(
                f"--data {str(self.folder)!r} holds conversations of up to {longest} tokens; --seq-len {seq_len} "
                f"fits {seq_len + 1} (inputs and the next-token targets): raise --seq-len, or prepare the corpus "
                f"again with --seq-len {seq_len} --truncate")

    def batch(
        self, split: str, seed: int, step: int, batch_size: int, seq_len: int, dp_rank: int = 0, dp: int = 1,
    ) -> tuple[np.ndarray, np.ndarray]:
        """This DP rank's rows of the global batch of step `step`: idx, targets (B/dp, T) int64
        (one conversation per row)."""
        if batch_size % dp:
            raise ValueError(f"batch size {batch_size} is not divisible by dp={dp}")
        if self.packed is not None:
            raise ValueError("packed rows carry their positions: draw them with rows(), not batch()")
        part = self.splits[split]
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, step])
        picks = rng.integers(0, part.conversations, size=batch_size)
        per = batch_size // dp
        x = np.full((per, seq_len), self.pad, dtype=np.int64)
        y = np.full((per, seq_len), IGNORE, dtype=np.int64)
        for row, k in enumerate(picks[dp_rank * per: (dp_rank + 1) * per]):
            ids, mask = part.conversation(int(k))
            n = min(len(ids) - 1, seq_len)
            x[row, :n] = ids[:n]
            y[row, :n] = np.where(mask[1: n + 1] != 0, ids[1: n + 1], IGNORE)
        return x, y

    def rows(
        self, split: str, seed: int, step: int, batch_size: int, seq_len: int, dp_rank: int = 0, dp: int = 1,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """idx, targets and, packed, the positions (B/dp, T) of this DP rank's rows of step `step`."""
        if self.packed is None:
            return (*self.batch(split, seed, step, batch_size, seq_len, dp_rank, dp), None)
        if batch_size % dp:
            raise ValueError(f"batch size {batch_size} is not divisible by dp={dp}")
        if seq_len != self.packed:
            raise ValueError(f"rows of {seq_len} tokens asked of data packed into rows of {self.packed}")
        part = self.splits[split]
        per = batch_size // dp
        first = step * batch_size + dp_rank * per  # in the endless stream of rows
        x = np.full((per, seq_len), self.pad, dtype=np.int64)
        y = np.full((per, seq_len), IGNORE, dtype=np.int64)
        positions = np.zeros((per, seq_len), dtype=np.int64)
        for row in range(per):
            epoch, k = divmod(first + row, part.row_count(seq_len))
            at = 0
            for c in part.epoch_rows(seed, split, epoch, seq_len)[k]:
                ids, mask = part.conversation(c)
                n = len(ids) - 1
                x[row, at: at + n] = ids[:n]
                y[row, at: at + n] = np.where(mask[1:] != 0, ids[1:], IGNORE)
                positions[row, at: at + n] = np.arange(n)
                at += n
            positions[row, at:] = np.arange(seq_len - at)  # the padding: a sequence of its own
        return x, y, positions


class _Split:
    """A split's token and mask shards (memory-mapped) and its conversation offsets."""

    def __init__(self, folder: Path, manifest: dict[str, Any], split: str) -> None:
        part = manifest[split]
        self.tokens = ShardedTokens([folder / s["file"] for s in part["shards"]], manifest["dtype"])
        self.masks = ShardedTokens([folder / s["file"] for s in part["mask"]["shards"]], "uint8")
        self.offsets = np.load(folder / part["index"]["file"], allow_pickle=False)
        self.conversations = len(self.offsets) - 1
        self._count: tuple[int | None, int] = (None, 0)  # (seq_len, rows per epoch)
        self._rows_key: tuple | None = None  # (seed, split, epoch, seq_len) of the rows kept
        self._rows: list[list[int]] = []

    def conversation(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
        return self.tokens[lo:hi], self.masks[lo:hi]

    def row_count(self, seq_len: int) -> int:
        """Rows per epoch when packed into rows of seq_len inputs: the same every epoch (the
        lengths are placed longest first whatever their order, so the rows fill alike)."""
        if self._count[0] != seq_len:
            self._count = (seq_len, len(best_fit_decreasing(np.diff(self.offsets) - 1, seq_len)))
        return self._count[1]

    def epoch_rows(self, seed: int, split: str, epoch: int, seq_len: int) -> list[list[int]]:
        """The packed rows of `epoch`, in their shuffled order (the latest epoch's kept)."""
        key = (seed, split, epoch, seq_len)
        if self._rows_key != key:
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, epoch, 7])
            inputs = np.diff(self.offsets) - 1  # a conversation of n tokens fills n - 1 input columns
            rows = best_fit_decreasing(inputs, seq_len, order=rng.permutation(self.conversations))
            self._rows_key, self._rows = key, [rows[i] for i in rng.permutation(len(rows))]
        return self._rows
