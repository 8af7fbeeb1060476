"""Rows of the (vocabulary-parallel) cross-entropy: the row maxima, then exp(z - m) and its
row sums (the global maxima arrive between the two by an all-reduce), and the softmax
gradient in place.

The exponentials are NumPy's (its exp ufunc is vectorised; a compiled loop would call the
scalar libm exp), taken a block of rows at a time so that the block is still in cache when a
compiled loop sums it. The sums accumulate in float64, reassociated so that they vectorise.
"""

from __future__ import annotations

import numba
import numpy as np

_BLOCK_BYTES = 1 << 19  # rows per block: about half a MiB of logits


def row_max(z, real, out):
    """out[r] = max of z[r, :real] (-inf when real == 0); NaN propagates."""
    if real == 0:
        out[...] = -np.inf
    else:
        np.max(z[:, :real], axis=1, out=out)


@numba.njit(cache=True, error_model="numpy", fastmath={"reassoc"})
def _row_sums(e, sums):
    for r in range(e.shape[0]):
        total = 0.0
        for j in range(e.shape[1]):
            total += np.float64(e[r, j])
        sums[r] = total


def exp_rows(z, real, m, e, sums):
    """e[r, j] = exp(z[r, j] - m[r]) for j < real, 0 for the padding after; sums[r] = row sum
    (float64). e may be z itself."""
    rows = max(1, _BLOCK_BYTES // max(1, z.shape[1] * z.itemsize))
    for r in range(0, z.shape[0], rows):
        zb, eb = z[r:r + rows, :real], e[r:r + rows, :real]
        np.subtract(zb, m[r:r + rows, None], out=eb)
        np.exp(eb, out=eb)
        _row_sums(eb, sums[r:r + rows])
    e[:, real:] = 0.0


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
