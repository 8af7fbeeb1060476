"""Rotary tables: the inverse frequencies of a rope configuration and cos/sin per position.

    inv_freq_i = 1 / theta^(2i / d),  i = 0 .. d/2 - 1
    linear:  inv_freq / factor
    llama3:  wavelength wl = 2 pi / inv_freq; wl > old/low -> inv_freq / factor (long waves scaled),
             wl < old/high -> inv_freq (short waves kept), between: (1 - s) inv_freq / factor + s inv_freq
             with s = (old / wl - low) / (high - low), old = original_max_position_embeddings,
             low/high = low_freq_factor/high_freq_factor
    cos, sin (T, d) = cos/sin(cat(p * inv_freq, p * inv_freq)) for positions p

The tables are computed in float64 and cast to the model's dtype (transformers computes them in
float32 whatever the model's dtype).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpisplit.runtime.backend import get_array_module

ROPE_TYPES = ("default", "linear", "llama3")


def check_rope_scaling(scaling: dict | None) -> None:
    """ValueError for a rope_scaling this library does not compute exactly."""
    if not scaling:
        return
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"rope scaling type {kind!r} is not supported (supported: {list(ROPE_TYPES)}); "
            f"'dynamic' and 'yarn' change the frequencies with the context and are refused at load"
        )
    need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings")}.get(kind, ())
    for key in need:
        v = scaling.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"rope scaling {kind!r} needs a positive number {key!r}, got {v!r}")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got {scaling}")


def inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """(head_dim / 2,) float64 inverse frequencies of a rope configuration."""
    check_rope_scaling(scaling)
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wl = 2 * np.pi / inv
        s = (old / wl - low) / (high - low)
        smooth = (1 - s) * inv / factor + s * inv
        return np.where(wl > old / low, inv / factor, np.where(wl < old / high, inv, smooth))
    return inv


class RotaryTables:
    """cos and sin (positions, head_dim) of one rope configuration, built once per dtype and
    array module and shared by every attention layer of a model."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, max_positions: int) -> None:
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head dimension, got {head_dim}")
        freqs = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq(head_dim, theta, scaling))
        emb = np.concatenate([freqs, freqs], axis=-1)  # (S, d)
        self.cos64, self.sin64 = np.cos(emb), np.sin(emb)
        self.max_positions = max_positions
        self._cache: dict[tuple[Any, Any], tuple[Any, Any]] = {}

    def tables(self, like: Any) -> tuple[Any, Any]:
        """(cos, sin) for all positions in the dtype and on the device of `like`."""
        xp = get_array_module(like)
        key = (xp.__name__, np.dtype(like.dtype))
        if key not in self._cache:
            self._cache[key] = (xp.asarray(self.cos64.astype(like.dtype)), xp.asarray(self.sin64.astype(like.dtype)))
        return self._cache[key]

    def at(self, positions: Any, like: Any) -> tuple[Any, Any]:
        """(cos, sin) rows of `positions` (an int array or a slice): (T, d) each."""
        cos, sin = self.tables(like)
        if isinstance(positions, slice):
            return cos[positions], sin[positions]
        xp = get_array_module(cos)
        idx = xp.asarray(positions)
        return cos[idx], sin[idx]
