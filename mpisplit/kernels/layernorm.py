"""LayerNorm over the last axis of a (rows, h) array, forward and backward, one row at a time.

Statistics in float64 whatever the dtype (two passes: mean, then the biased variance of the
centred values). Forward writes only the output and keeps (mean, rstd) per row; backward
recomputes xhat = (x - mean) * rstd from the input, so nothing of size (rows, h) is saved
beyond the input itself. Weight and bias gradients are summed over rows in float64.

Only the row sums are compiled with reassociation allowed (so that they vectorise); the
element-wise arithmetic keeps its written order.
"""

from __future__ import annotations

import numba
import numpy as np

_SUMS = {"reassoc"}


@numba.njit(cache=True, error_model="numpy", fastmath=_SUMS)
def _mean_var(row, h):
    mu = 0.0
    for j in range(h):
        mu += np.float64(row[j])
    mu /= h
    var = 0.0
    for j in range(h):
        d = row[j] - mu
        var += d * d
    return mu, var / h


@numba.njit(cache=True, error_model="numpy", fastmath=_SUMS)
def _dot_sums(x, g, w, mu, rs, h):
    """sum_j g_j w_j and sum_j g_j w_j xhat_j."""
    sum_g, sum_gx = 0.0, 0.0
    for j in range(h):
        gxhat = np.float64(g[j]) * w[j]
        sum_g += gxhat
        sum_gx += gxhat * ((x[j] - mu) * rs)
    return sum_g, sum_gx


@numba.njit(cache=True, error_model="numpy")
def layernorm_forward(x, w, b, eps, out, mean, rstd):
    rows, h = x.shape
    for r in range(rows):
        mu, var = _mean_var(x[r], h)
        rs = 1.0 / np.sqrt(var + eps)
        mean[r], rstd[r] = mu, rs
        for j in range(h):
            out[r, j] = (x[r, j] - mu) * rs * w[j] + b[j]


@numba.njit(cache=True, error_model="numpy")
def layernorm_backward(x, w, mean, rstd, g, gx, gw, gb):
    """gx (rows, h) = input gradient (may be None: skipped); gw, gb (h,) float64, accumulated."""
    rows, h = x.shape
    for r in range(rows):
        mu, rs = mean[r], rstd[r]
        for j in range(h):
            gj = g[r, j]
            gw[j] += gj * ((x[r, j] - mu) * rs)
            gb[j] += gj
        if gx is None:
            continue
        sum_g, sum_gx = _dot_sums(x[r], g[r], w, mu, rs, h)
        mean_g, mean_gx = sum_g / h, sum_gx / h
        for j in range(h):
            xhat = (x[r, j] - mu) * rs
            gx[r, j] = rs * (g[r, j] * w[j] - mean_g - xhat * mean_gx)
