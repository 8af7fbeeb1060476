"""LayerNorm over the last axis of a (rows, h) array, forward and backward, one row at a time.

Statistics in float64 whatever the dtype (two passes: mean, then the biased variance of the
centred values). Forward writes only the output and keeps (mean, rstd) per row; backward
recomputes xhat = (x - mean) * rstd from the input, so nothing of size (rows, h) is saved
beyond the input itself. Weight and bias gradients are summed over rows in float64.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, error_model="numpy")
def layernorm_forward(x, w, b, eps, out, mean, rstd):
    rows, h = x.shape
    for r in range(rows):
        mu = 0.0
        for j in range(h):
            mu += x[r, j]
        mu /= h
        var = 0.0
        for j in range(h):
            d = x[r, j] - mu
            var += d * d
        rs = 1.0 / np.sqrt(var / h + eps)
        mean[r], rstd[r] = mu, rs
        for j in range(h):
            out[r, j] = (x[r, j] - mu) * rs * w[j] + b[j]


@numba.njit(cache=True, error_model="numpy")
def layernorm_backward(x, w, mean, rstd, g, gx, gw, gb):
    """gx (rows, h) = input gradient (may be None: skipped); gw, gb (h,) float64, accumulated."""
    rows, h = x.shape
    for r in range(rows):
        mu, rs = mean[r], rstd[r]
        sum_g, sum_gx = 0.0, 0.0
        for j in range(h):
            xhat = (x[r, j] - mu) * rs
            gj = g[r, j]
            gw[j] += gj * xhat
            gb[j] += gj
            gxhat = gj * w[j]
            sum_g += gxhat
            sum_gx += gxhat * xhat
        if gx is None:
            continue
        mean_g, mean_gx = sum_g / h, sum_gx / h
        for j in range(h):
            xhat = (x[r, j] - mu) * rs
            gx[r, j] = rs * (g[r, j] * w[j] - mean_g - xhat * mean_gx)
