"""Rotary embedding of decoding rows in one pass: x (B, T, n, d) with tables cos, sin (T, d).

out[t, i, :h] = x1 c1 - x2 s1 and out[t, i, h:] = x2 c2 + x1 s2 (h = d / 2, x = cat(x1, x2)),
each product rounded, then the difference or sum rounded, in x's dtype: the operations of
autograd/rotary.py's NumPy form in its order, so the bits are the same (tested); one call
instead of six NumPy operations and their temporaries.
"""

from __future__ import annotations

import numba


@numba.njit(cache=True, error_model="numpy")
def rope_rows(x, cos, sin, out):
    B, T, n, d = x.shape
    h = d // 2
    for bb in range(B):
        for t in range(T):
            for i in range(n):
                for j in range(h):
                    a, b = x[bb, t, i, j], x[bb, t, i, h + j]
                    p, q = a * cos[t, j], b * sin[t, j]
                    out[bb, t, i, j] = p - q
                    r, s = b * cos[t, h + j], a * sin[t, h + j]
                    out[bb, t, i, h + j] = r + s
