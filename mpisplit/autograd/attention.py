"""The attention core: softmax(q k^T / sqrt(d) + causal mask) v over heads, one fused primitive."""

from __future__ import annotations

import math
from typing import Any

from mpisplit.autograd.tensor import Function, Tensor
from mpisplit.runtime.backend import get_array_module


def causal_mask(t_q: int, t_k: int, offset: int, xp: Any, dtype: Any) -> Any:
    """(t_q, t_k) additive mask: 0 where key j <= offset + query i, -inf after."""
    i = xp.arange(t_q)[:, None] + offset
    j = xp.arange(t_k)[None, :]
    return xp.where(j > i, -xp.inf, 0.0).astype(dtype)


class Attention(Function):
    """softmax(q k^T / sqrt(d) + causal mask) v for q (..., Tq, d), k, v (..., Tk, d).

    Query i sits at absolute position `offset + i` and sees keys 0..offset+i
    (offset = Tk - Tq when decoding against a key/value cache).
    """

    def forward(self, q: Any, k: Any, v: Any, causal: bool = True, offset: int | None = None) -> Any:
        xp = get_array_module(q)
        d = q.shape[-1]
        self.scale = 1.0 / math.sqrt(d)
        scores = q @ k.swapaxes(-1, -2)  # (..., Tq, Tk)
        scores *= self.scale
        if causal:
            t_q, t_k = q.shape[-2], k.shape[-2]
            scores += causal_mask(t_q, t_k, t_k - t_q if offset is None else offset, xp, scores.dtype)
        scores -= scores.max(axis=-1, keepdims=True)
        xp.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)  # now the attention weights
        self.save(q, k, v, scores)
        return scores @ v

    def backward(self, g: Any) -> tuple[Any, Any, Any]:
        q, k, v, att = self.saved
        gv = att.swapaxes(-1, -2) @ g if self.needs_input_grad[2] else None
        gs = g @ v.swapaxes(-1, -2)  # d loss / d att
        # softmax backward: att * (gs - sum(gs * att))
        gs -= (gs * att).sum(axis=-1, keepdims=True)
        gs *= att
        gs *= self.scale
        gq = gs @ k if self.needs_input_grad[0] else None
        gk = gs.swapaxes(-1, -2) @ q if self.needs_input_grad[1] else None
        return gq, gk, gv



def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, offset: int | None = None) -> Tensor:
    """Scaled dot-product attention; q (..., Tq, d), k and v (..., Tk, d)."""
    if q.shape[-1] != k.shape[-1] or k.shape != v.shape:
        raise ValueError(f"attention shapes do not match: q {q.shape}, k {k.shape}, v {v.shape}")
    return Attention.apply(q, k, v, causal=causal, offset=offset)
