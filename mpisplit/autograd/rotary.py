"""Rotary position embedding in the Hugging Face (half-split) convention.

    rotate_half(x) = cat(-x2, x1)  for x = cat(x1, x2) split in halves of the head dimension
    rope(x) = x * cos + rotate_half(x) * sin,   cos, sin = cat(f, f) per position

Meta's original Llama rotates interleaved pairs (x0, x1), (x2, x3), ...; Hugging Face folders
store q and k permuted so that the half split is right for them.
Backward is the inverse rotation: dx = g * cos + rotate_half^T(g * sin), rotate_half^T(z) = cat(z2, -z1).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpisplit import kernels
from mpisplit.autograd.tensor import Function, Tensor
from mpisplit.runtime.backend import get_array_module


def _rope(x: Any, c: Any, s: Any, sign: float) -> Any:
    """sign=+1: x * c + rotate_half(x) * s; sign=-1: x * c + rotate_half^T(x * s); c, s broadcast
    against x. Written per half, (x1 c1 - x2 s1, x2 c2 + x1 s2) and (x1 c1 + x2 s2, x2 c2 - x1 s1):
    the same roundings as the whole-width form (negation is exact and a + (-b) is a - b), with no
    rotated copy of x."""
    xp = get_array_module(x)
    half = x.shape[-1] // 2
    out = xp.empty(np.broadcast_shapes(x.shape, c.shape), dtype=xp.result_type(x, c))
    x1, x2, o1, o2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    c1, c2, s1, s2 = c[..., :half], c[..., half:], s[..., :half], s[..., half:]
    xp.multiply(x1, c1, out=o1)
    xp.multiply(x2, c2, out=o2)
    if sign > 0:
        o1 -= x2 * s1
        o2 += x1 * s2
    else:
        o1 += x2 * s2
        o2 -= x1 * s1
    return out


class Rotary(Function):
    """x (B, T, n, d) rotated by per-position tables cos, sin (T, d), or (B, T, d) when each row
    has its own positions (packed rows); not differentiated."""

    def forward(self, x: Any, cos: Any = None, sin: Any = None) -> Any:
        c, s = cos[..., None, :], sin[..., None, :]  # (T, 1, d) or (B, T, 1, d): broadcast over heads
        self.c, self.s = c, s
        return _rope(x, c, s, 1.0)

    def backward(self, g: Any) -> Any:
        return _rope(g, self.c, self.s, -1.0)


def rotary(x: Tensor, cos: Any, sin: Any) -> Tensor:
    """rope(x) for x (B, T, n, d) and tables (T, d) or (B, T, d) in x's dtype on x's device."""
    B, T, _, d = x.shape
    if d % 2 or cos.shape not in ((T, d), (B, T, d)) or sin.shape != cos.shape:
        raise ValueError(f"rotary: x {x.shape} needs even d and cos/sin of shape (T, d) or (B, T, d), "
                         f"got {cos.shape}, {sin.shape}")
    return Rotary.apply(x, cos=cos, sin=sin)


def rotary_array(x: Any, cos: Any, sin: Any) -> Any:
    """rope(x) on a raw array (decoding, no graph): x (..., T, n, d), tables (T, d). The compiled
    kernel where it applies (kernels/rope.py: the same operations, the same bits)."""
    if x.ndim >= 3 and kernels.applies(x, cos, sin, contiguous=False):
        from mpisplit.kernels.rope import rope_rows

        x4 = x.reshape(-1, *x.shape[-3:])
        out = np.empty(x4.shape, dtype=x.dtype)
        rope_rows(x4, cos, sin, out)
        return out.reshape(x.shape)
    return _rope(x, cos[:, None, :], sin[:, None, :], 1.0)
