"""Checks for users and the test suite: gradients against central finite differences."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mpisplit.autograd.tensor import Tensor


def numerical_grad(f: Callable[[], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar f() with respect to every entry of x (modified in place, restored)."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        plus = f()
        flat[i] = old - eps
        minus = f()
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * eps)
    return grad


def gradcheck(
    fn: Callable[..., Tensor],
    inputs: Sequence[np.ndarray],
    *,
    eps: float = 1e-6,
    seed: int = 0,
) -> float:
    """Largest relative error between autograd and finite-difference gradients.

    `fn(*tensors)` must return a Tensor; it is contracted with a fixed random
    weighting so that every output element takes part; inputs are used in
    float64. The error of one input is ||analytic - numeric|| / ||numeric||;
    the worst over the inputs is returned.
    """
    arrays = [np.array(a, dtype=np.float64, copy=True) for a in inputs]
    tensors = [Tensor(a, requires_grad=True) for a in arrays]
    out = fn(*tensors)
    weights = np.random.default_rng(seed).standard_normal(out.shape)
    (out * Tensor(weights)).sum().backward()

    def scalar() -> float:
        value = fn(*[Tensor(a) for a in arrays])
        return float((value.data * weights).sum())

    worst = 0.0
    for a, t in zip(arrays, tensors):
        numeric = numerical_grad(scalar, a, eps)
        analytic = np.zeros_like(a) if t.grad is None else np.asarray(t.grad)
        scale = max(float(np.linalg.norm(numeric)), 1e-8)
        worst = max(worst, float(np.linalg.norm(analytic - numeric)) / scale)
    return worst


def max_rel_error(actual: Any, expected: Any) -> float:
    """max |actual - expected| / max(max |expected|, tiny): one number per comparison."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: {actual.shape} vs {expected.shape}")
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-300)
    return float(np.abs(actual - expected).max(initial=0.0)) / scale
