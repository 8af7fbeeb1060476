"""Rows of the (vocabulary-parallel) cross-entropy: the row maxima, then exp(z - m) and its
row sums in one pass (the global maxima arrive between the two by an all-reduce), and the
softmax gradient in place. Sums accumulate in float64."""

from __future__ import annotations

import math

import numba


@numba.njit(cache=True, error_model="numpy")
def row_max(z, real, out):
    """out[r] = max of z[r, :real] (-inf when real == 0)."""
    for r in range(z.shape[0]):
        mx = -math.inf
        for j in range(real):
            mx = max(mx, z[r, j])
        out[r] = mx


@numba.njit(cache=True, error_model="numpy")
def exp_rows(z, real, m, e, sums):
    """e[r, j] = exp(z[r, j] - m[r]) for j < real, 0 for the padding after; sums[r] = row sum.
    e may be z itself."""
    for r in range(z.shape[0]):
        total = 0.0
        mr = m[r]
        for j in range(real):
            v = math.exp(z[r, j] - mr)
            e[r, j] = v
            total += v
        for j in range(real, z.shape[1]):
            e[r, j] = 0.0
        sums[r] = total


@numba.njit(cache=True, error_model="numpy")
def softmax_grad_rows(e, s, target, owned, weight):
    """In place: e[r] = weight[r] * (e[r] / s[r] - onehot(target[r]) if owned[r])."""
    for r in range(e.shape[0]):
        inv = 1.0 / s[r]
        wr = weight[r]
        for j in range(e.shape[1]):
            e[r, j] = e[r, j] * inv * wr
        if owned[r]:
            e[r, target[r]] -= wr


