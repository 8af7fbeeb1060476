"""GPTConfig: the shape of a GPT-2 style model (what a checkpoint or a Hugging Face config.json holds)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mpisplit.nn.attention import valid_tp_degrees


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # real (unpadded) vocabulary size
    block_size: int = 1024  # longest sequence: rows of the position table
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads (the TP degree must divide it)
    n_embd: int = 768  # hidden size (a multiple of n_head)
    dropout: float = 0.0  # on embeddings, attention weights and residual branches while training
    layer_norm_eps: float = 1e-5

    def validate(self, tp: int = 1) -> None:
        """ValueError naming the values when the shape cannot be built at this TP degree."""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if self.n_head % tp:
            raise ValueError(
                f"n_head={self.n_head} cannot be split over tp={tp} ranks; "
                f"tp values that work: {valid_tp_degrees(self.n_head)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
