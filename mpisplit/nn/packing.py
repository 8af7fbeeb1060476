"""Packed rows: several sequences side by side in one row of a batch, with no attention between them.

A packed batch carries, beside its token ids (B, T), the position of every token in its own
sequence (B, T): 0 where a sequence starts, then 1, 2, ... . That one array says everything:

    start[b, i] = i - positions[b, i]          the column where token i's sequence starts
    query i sees key j  iff  start[b, i] <= j <= i   (a block-diagonal causal mask)

Rotary and learned positions read `positions` instead of 0..T-1, so each sequence is computed as
if it were alone in its row (the attention weights outside its block are exact zeros).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpisplit.runtime.backend import get_array_module


def check_positions(positions: Any, shape: tuple[int, int], block_size: int) -> np.ndarray:
    """positions as an int64 (B, T) host array, or ValueError saying what is wrong."""
    p = np.asarray(positions)
    if p.dtype.kind not in "iu" or p.shape != tuple(shape):
        raise ValueError(f"packed positions must be integers of the token ids' shape {tuple(shape)}, "
                         f"got {p.dtype} {p.shape}")
    p = p.astype(np.int64)
    if p.size == 0:
        return p
    if (p[:, 0] != 0).any():
        raise ValueError(f"packed positions must start each row at 0, got {p[:, 0].tolist()}")
    step_ok = (p[:, 1:] == 0) | (p[:, 1:] == p[:, :-1] + 1)
    if not step_ok.all():
        b, t = np.argwhere(~step_ok)[0]
        raise ValueError(f"packed positions must restart at 0 or count up by one: row {b} has "
                         f"{p[b, t]}, {p[b, t + 1]} at columns {t}, {t + 1}")
    if p.max() >= block_size:
        raise ValueError(f"a packed sequence reaches position {p.max()}, beyond block_size={block_size}")
    return p


class Packing:
    """The positions (B, T) of a packed batch (checked by check_positions) and what follows from them."""

    def __init__(self, positions: np.ndarray) -> None:
        self.positions = positions
        self.starts = np.arange(positions.shape[1]) - positions  # (B, T)
        self._on: dict[str, tuple[Any, Any]] = {}

    def rows(self, lo: int, hi: int) -> Packing:
        """The packing of rows lo..hi (a micro-batch)."""
        return Packing(self.positions[lo:hi])

    def block(self, rank: int, n: int) -> np.ndarray:
        """The positions of sequence block `rank` of length n (sequence parallelism): (B, n)."""
        return self.positions[:, rank * n:(rank + 1) * n]

    def on(self, like: Any) -> tuple[Any, Any]:
        """(positions, starts) on the device of `like`, copied there once."""
        xp = get_array_module(like)
        if xp.__name__ not in self._on:
            self._on[xp.__name__] = (xp.asarray(self.positions), xp.asarray(self.starts))
        return self._on[xp.__name__]


def packed_mask(starts: Any, ndim: int, dtype: Any) -> Any:
    """The additive mask (B, 1, ..., T, T) for scores of `ndim` dimensions: 0 where query i
    sees key j (start <= j <= i), -inf elsewhere."""
    xp = get_array_module(starts)
    B, T = starts.shape
    i = xp.arange(T)[:, None]
    j = xp.arange(T)[None, :]
    hidden = (j > i)[None] | (j[None] < starts[:, :, None])  # (B, T, T)
    mask = xp.where(hidden, -xp.inf, 0.0).astype(dtype)
    return mask.reshape(B, *([1] * (ndim - 3)), T, T)
