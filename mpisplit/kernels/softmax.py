"""The causal softmax of attention, forward and backward, in place on (..., T, T) scores.

Forward: row i of s becomes softmax(scale * s[i, :i+1]) on keys 0..i and exact zeros after.
Backward: ga = scale * att * (ga - sum_j ga_j att_j), with the sum over the visible keys only
(att is zero elsewhere, so the result is zero there too). float32 scores take the
vectorisable exp of `exp32.py` (the maximum and the scaled scores stay float32, so its loop
does); row sums accumulate in float64 and are compiled with reassociation allowed, so that
they vectorise too.
"""

from __future__ import annotations

import numba
import numpy as np

from mpisplit.kernels.exp32 import exp_nonpositive_any


@numba.njit(cache=True, error_model="numpy", fastmath={"reassoc"})
def _sum(row, n):
    total = 0.0
    for j in range(n):
        total += np.float64(row[j])
    return total


@numba.njit(cache=True, error_model="numpy")
def _scale_max(row, n, scale):
    """Scales row[:n] (n >= 1) in place; returns its maximum in the row's dtype."""
    scale = row.dtype.type(scale)
    mx = row[0] * scale
    for j in range(n):
        v = row[j] * scale
        row[j] = v
        mx = max(mx, v)
    return mx


@numba.njit(cache=True, error_model="numpy")
def _softmax(row, n, scale):
    """row[:n] = softmax(scale * row[:n]) in place (n >= 1)."""
    mx = _scale_max(row, n, scale)
    for j in range(n):
        row[j] = exp_nonpositive_any(row[j] - mx)
    inv = 1.0 / _sum(row, n)
    for j in range(n):
        row[j] *= inv


@numba.njit(cache=True, error_model="numpy")
def causal_softmax_forward(s, scale):
    t_q, t_k = s.shape[-2], s.shape[-1]
    flat = s.reshape(-1, t_q, t_k)
    offset = t_k - t_q
    for m in range(flat.shape[0]):
        for i in range(t_q):
            row = flat[m, i]
            n = max(0, i + offset + 1)  # visible keys
            if n == 0:
                row[:] = 0.0
                continue
            _softmax(row, n, scale)
            for j in range(n, t_k):
                row[j] = 0.0


@numba.njit(cache=True, error_model="numpy", fastmath={"reassoc"})
def _dot(g, a, n):
    total = 0.0
    for j in range(n):
        total += np.float64(g[j]) * a[j]
    return total


@numba.njit(cache=True, error_model="numpy")
def causal_softmax_backward(att, ga, scale):
    """In place on ga: the gradient of the scaled scores given that of the weights."""
    t_q, t_k = att.shape[-2], att.shape[-1]
    a, g = att.reshape(-1, t_q, t_k), ga.reshape(-1, t_q, t_k)
    offset = t_k - t_q
    for m in range(a.shape[0]):
        for i in range(t_q):
            n = i + offset + 1
            dot = _dot(g[m, i], a[m, i], n)
            for j in range(n):
                g[m, i, j] = scale * a[m, i, j] * (g[m, i, j] - dot)
            for j in range(n, t_k):
                g[m, i, j] = 0.0


@numba.njit(cache=True, error_model="numpy")
def packed_softmax_forward(s, scale, starts):
    """causal_softmax_forward of square scores (B, ..., T, T) whose row i of batch row b sees keys
    starts[b, i]..i only (packed sequences, nn/packing.py); exact zeros elsewhere. The backward is
    causal_softmax_backward's: the weights are zero outside the block, and so is its result."""
    t = s.shape[-1]
    flat = s.reshape(-1, t, t)
    per = flat.shape[0] // starts.shape[0]
    for m in range(flat.shape[0]):
        b = m // per
        for i in range(t):
            row = flat[m, i]
            lo = starts[b, i]
            _softmax(row[lo:i + 1], i + 1 - lo, scale)
            for j in range(lo):
                row[j] = 0.0
            for j in range(i + 1, t):
                row[j] = 0.0
