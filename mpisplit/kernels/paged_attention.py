"""Causal attention of new queries against keys and values in KV-cache blocks (serving).

    paged_attention(q, k_pool, v_pool, tables, starts, counts, out)

q (N, H, d): the queries of S sequences laid end to end, sequence s's `counts[s]` rows at
positions starts[s] .. starts[s] + counts[s] - 1. k_pool, v_pool (blocks, KV, bs, d): the
cache; sequence s's position p is in block tables[s, p // bs] at offset p % bs (its own new
keys included: they are written before this runs). Query head h reads key/value head
h // (H / KV). out (N, H, d) receives softmax(q k^T / sqrt(d)) v over keys 0..p of a query at p.

Each query row is computed by itself, in one fixed order: the dot products over d, the
maximum, exp, the sum over keys 0..p in order and the weighted sum of values in order, all
in float64. So a row's bits depend only on its query and the keys and values at positions
0..p: not on which other rows are computed with it, how the prompt was cut into chunks,
whether its first blocks were computed by another request (prefix caching) or again after a
preemption, nor whether it is a prompt row or a decoding one.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _dot(a, b):
    """sum_i a[i] b[i] in float64; reassociated (vectorised) in one order fixed by len(a)."""
    total = 0.0
    for i in range(a.shape[0]):
        total += np.float64(a[i]) * np.float64(b[i])
    return total


@numba.njit(cache=True, error_model="numpy")
def _row(qh, k_pool, v_pool, table, g, n, scale, scores, acc, out_row):
    """One query head against keys 0..n-1 of one sequence (head g of the cache)."""
    bs = k_pool.shape[2]
    mx = -np.inf
    for j in range(n):
        s = _dot(qh, k_pool[table[j // bs], g, j % bs]) * scale
        scores[j] = s
        mx = max(mx, s)
    acc[:] = 0.0
    total = 0.0
    for j in range(n):
        w = math.exp(scores[j] - mx)
        total += w
        vj = v_pool[table[j // bs], g, j % bs]
        for i in range(acc.shape[0]):
            acc[i] += w * np.float64(vj[i])
    inv = 1.0 / total
    for i in range(acc.shape[0]):
        out_row[i] = acc[i] * inv


@numba.njit(cache=True, error_model="numpy")
def paged_attention(q, k_pool, v_pool, tables, starts, counts, out):
    H, d = q.shape[1], q.shape[2]
    group = H // k_pool.shape[1]
    scale = 1.0 / math.sqrt(d)
    longest = 1
    for s in range(starts.shape[0]):
        longest = max(longest, starts[s] + counts[s])
    scores = np.empty(longest)
    acc = np.empty(d)
    row = 0
    for s in range(starts.shape[0]):
        for r in range(counts[s]):
            n = starts[s] + r + 1
            for h in range(H):
                _row(q[row, h], k_pool, v_pool, tables[s], h // group, n, scale, scores, acc, out[row, h])
            row += 1
