"""Rotary position embedding in the Hugging Face (half-split) convention.

    rotate_half(x) = cat(-x2, x1)  for x = cat(x1, x2) split in halves of the head dimension
    rope(x) = x * cos + rotate_half(x) * sin,   cos, sin = cat(f, f) per position

Meta's original Llama rotates interleaved pairs (x0, x1), (x2, x3), ...; Hugging Face folders
store q and k permuted so that the half split is right for them.
Backward is the inverse rotation: dx = g * cos + rotate_half^T(g * sin), rotate_half^T(z) = cat(z2, -z1).
"""

from __future__ import annotations

from typing import Any

from mpisplit.autograd.tensor import Function, Tensor
from mpisplit.runtime.backend import get_array_module


def _rotate_half(x: Any, sign: float) -> Any:
    """sign=+1: cat(-x2, x1) (rotate_half); sign=-1: cat(x2, -x1) (its transpose)."""
    xp = get_array_module(x)
    half = x.shape[-1] // 2
    out = xp.empty_like(x)
    out[..., :half] = x[..., half:]
    out[..., half:] = x[..., :half]
    if sign > 0:
        out[..., :half] *= -1
    else:
        out[..., half:] *= -1
    return out


class Rotary(Function):
    """x (B, T, n, d) rotated by per-position tables cos, sin (T, d) (not differentiated)."""

    def forward(self, x: Any, cos: Any = None, sin: Any = None) -> Any:
        c, s = cos[:, None, :], sin[:, None, :]  # (T, 1, d): broadcast over batch and heads
        self.c, self.s = c, s
        out = x * c
        out += _rotate_half(x, 1.0) * s
        return out

    def backward(self, g: Any) -> Any:
        out = g * self.c
        out += _rotate_half(g * self.s, -1.0)
        return out


def rotary(x: Tensor, cos: Any, sin: Any) -> Tensor:
    """rope(x) for x (B, T, n, d) and tables (T, d) in x's dtype on x's device."""
    if x.shape[-1] % 2 or cos.shape != (x.shape[1], x.shape[-1]) or sin.shape != cos.shape:
        raise ValueError(f"rotary: x {x.shape} needs even d and cos/sin of shape (T, d), got {cos.shape}, {sin.shape}")
    return Rotary.apply(x, cos=cos, sin=sin)


def rotary_array(x: Any, cos: Any, sin: Any) -> Any:
    """rope(x) on a raw array (decoding, no graph): x (..., T, n, d), tables (T, d)."""
    out = x * cos[:, None, :]
    out += _rotate_half(x, 1.0) * sin[:, None, :]
    return out
