"""Training batches of a chat corpus (`mpisplit prepare --chat`): one conversation per row.

Step s draws B_global conversations with a generator seeded by (seed, split, s), as the token
windows of training/data.py are drawn, so any dp x tp layout sees the same global batch and a
resumed run continues exactly; data-parallel rank d takes rows [d*B/dp, (d+1)*B/dp). A row holds
one conversation from its first token: inputs its tokens but the last, targets the next tokens
where the loss mask counts them and IGNORE (-100) elsewhere; the rest of the row is padding (the
eos id as input, IGNORE as target), which causal attention keeps out of the conversation's logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mpisplit.data.tokens import ShardedTokens
from mpisplit.training.data import TokenDataset

IGNORE = -100


class ChatDataset(TokenDataset):
    masked = True  # targets carry IGNORE: the step's loss is normalised by the counted targets

    def __init__(self, folder: str | Path, manifest: dict[str, Any], vocab_size: int) -> None:
        folder = Path(folder)
        self.folder, self.manifest = folder, manifest
        self.pad = int(manifest["tokenizer"]["eos_id"])
        self.splits = {s: _Split(folder, manifest, s) for s in ("train", "val")}
        super().__init__(self.splits["train"].tokens, self.splits["val"].tokens, vocab_size)

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
        """This DP rank's rows of the global batch of step `step`: idx, targets (B/dp, T) int64."""
        if batch_size % dp:
            raise ValueError(f"batch size {batch_size} is not divisible by dp={dp}")
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


class _Split:
    """A split's token and mask shards (memory-mapped) and its conversation offsets."""

    def __init__(self, folder: Path, manifest: dict[str, Any], split: str) -> None:
        part = manifest[split]
        self.tokens = ShardedTokens([folder / s["file"] for s in part["shards"]], manifest["dtype"])
        self.masks = ShardedTokens([folder / s["file"] for s in part["mask"]["shards"]], "uint8")
        self.offsets = np.load(folder / part["index"]["file"], allow_pickle=False)
        self.conversations = len(self.offsets) - 1

    def conversation(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
        return self.tokens[lo:hi], self.masks[lo:hi]
