"""RMSNorm forward over the last axis of a (rows, h) array, one row at a time.

rstd = 1 / sqrt(sum(x^2) / h + eps) with the sum in float64 in index order (whatever the dtype),
xhat = x * rstd rounded to x's dtype, out = xhat * w in x's dtype; xhat and rstd (rounded to x's
dtype) are written for backward (autograd/reductions.py RMSNorm, which keeps its NumPy backward).
Each row is computed by itself in a fixed order: its bits do not depend on the other rows.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, error_model="numpy")
def rmsnorm_forward(x, w, eps, out, xhat, rstd):
    rows, h = x.shape
    for r in range(rows):
        ss = 0.0
        for j in range(h):
            v = np.float64(x[r, j])
            ss += v * v
        rs = 1.0 / np.sqrt(ss / h + eps)
        rstd[r] = rs
        for j in range(h):
            xh = x.dtype.type(x[r, j] * rs)
            xhat[r, j] = xh
            out[r, j] = xh * w[j]
