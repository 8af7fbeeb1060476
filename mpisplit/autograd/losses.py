"""Loss primitives: the (dense, one-rank) cross-entropy over the last axis."""

from __future__ import annotations

from typing import Any

from mpisplit.autograd.tensor import Function, Tensor
from mpisplit.runtime.backend import get_array_module


class CrossEntropy(Function):
    """Mean over non-ignored rows of -log softmax(logits)[target]; logits (..., C)."""

    def forward(self, logits: Any, targets: Any = None, ignore_index: int = -100) -> Any:
        xp = get_array_module(logits)
        c = logits.shape[-1]
        z = logits.reshape(-1, c)
        t = targets.reshape(-1)
        valid = t != ignore_index
        safe_t = xp.where(valid, t, 0)
        shifted = z - z.max(axis=-1, keepdims=True)
        sumexp = xp.exp(shifted).sum(axis=-1)
        rows = xp.arange(z.shape[0])
        nll = xp.log(sumexp) - shifted[rows, safe_t]
        count = int(valid.sum())
        self.count = max(count, 1)
        self.save(shifted, sumexp, safe_t, valid)
        self.shape = logits.shape
        return xp.asarray((nll * valid).sum() / self.count, dtype=logits.dtype)

    def backward(self, g: Any) -> Any:
        shifted, sumexp, safe_t, valid = self.saved
        xp = get_array_module(shifted)
        p = xp.exp(shifted)
        p /= sumexp[:, None]
        p[xp.arange(p.shape[0]), safe_t] -= 1.0
        p *= (valid * (g / self.count))[:, None].astype(p.dtype)
        return p.reshape(self.shape)

def cross_entropy(logits: Tensor, targets: Any, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of logits (..., C) against integer targets (...), skipping ignore_index."""
    targets = targets.data if isinstance(targets, Tensor) else targets
    if tuple(targets.shape) != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets shape {tuple(targets.shape)} != logits shape {logits.shape[:-1]}")
    return CrossEntropy.apply(logits, targets=targets, ignore_index=ignore_index)
