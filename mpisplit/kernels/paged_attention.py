"""Causal attention of new queries against keys and values in KV-cache blocks (serving).

    paged_attention(q, k_pool, v_pool, tables, starts, counts, out, fmt)

q (N, H, d): the queries of S sequences laid end to end, sequence s's `counts[s]` rows at
positions starts[s] .. starts[s] + counts[s] - 1. k_pool (blocks, KV, d, bs) and v_pool
(blocks, KV, bs, d): the cache, a block's keys transposed (so the scores of its keys are
computed side by side); sequence s's position p is in block tables[s, p // bs] at offset
p % bs (its own new keys included: they are written before this runs). Query head h reads key/value head
h // (H / KV). out (N, H, d) receives softmax(q k^T / sqrt(d)) v over keys 0..p of a query at p.
The pools hold floats (fmt 0) or 16-bit patterns as uint16 (fmt 1: float16, 2: bfloat16;
serving/kv_format.py), each element widened exactly to float64 where it is read.

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
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


@intrinsic
def _half(typingctx, code):
    """float16 bit pattern (uint16) -> float64 (LLVM's fpext: one instruction with F16C or on ARM)."""
    if code != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.DoubleType())

    return types.float64(code), codegen


@intrinsic
def _bfloat(typingctx, code):
    """bfloat16 bit pattern (uint16) -> float64: the pattern is a float32's upper half."""
    if code != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        bits = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.fpext(builder.bitcast(bits, ir.FloatType()), ir.DoubleType())

    return types.float64(code), codegen


def widen(x, fmt):
    """An element of a pool as float64 (fmt: 0 a float, 1 a float16 pattern, 2 a bfloat16 one);
    in compiled code, the overload below."""
    if fmt == 0:
        return float(x)
    bits = np.uint16(x)
    return float(bits.view(np.float16) if fmt == 1 else (np.uint32(bits) << np.uint32(16)).view(np.float32))


@overload(widen)
def _widen(x, fmt):
    if isinstance(x, types.Float):
        return lambda x, fmt: np.float64(x)
    if x == types.uint16:
        return lambda x, fmt: _half(x) if fmt == 1 else _bfloat(x)  # type: ignore[call-arg]
    return None


@numba.njit(cache=True, error_model="numpy")
def _scores(q, row, h0, group, k_pool, table, g, n, scale, scores, tile, fmt):
    """scores[hh, j] = q[row, h0 + hh] . k_j * scale for keys j < n of cache head g, in
    float64, summed over d in order; a block's keys side by side (vectorised across keys),
    each key row loaded once for the group's query heads."""
    d, bs = k_pool.shape[2], k_pool.shape[3]
    for j0 in range(0, n, bs):
        b = table[j0 // bs]
        tile[:, :] = 0.0
        for i in range(d):
            for hh in range(group):
                qi = np.float64(q[row, h0 + hh, i])
                for o in range(bs):
                    tile[hh, o] += qi * widen(k_pool[b, g, i, o], fmt)
        for hh in range(group):
            for o in range(bs):
                scores[hh, j0 + o] = tile[hh, o] * scale


@numba.njit(cache=True, error_model="numpy")
def _weighted_values(scores, group, n, v_pool, table, g, acc, totals, fmt):
    """Softmax numerators exp(s - max) in place, their sums in key order, and acc[hh] = the
    numerators times the values, summed in key order."""
    bs, d = v_pool.shape[2], v_pool.shape[3]
    for hh in range(group):
        mx = -np.inf
        for j in range(n):
            mx = max(mx, scores[hh, j])
        total = 0.0
        for j in range(n):
            w = math.exp(scores[hh, j] - mx)
            scores[hh, j] = w
            total += w
        totals[hh] = total
        acc[hh, :] = 0.0
    for j0 in range(0, n, bs):
        b = table[j0 // bs]
        for o in range(min(bs, n - j0)):
            for hh in range(group):
                w = scores[hh, j0 + o]
                for i in range(d):
                    acc[hh, i] += w * widen(v_pool[b, g, o, i], fmt)


@numba.njit(cache=True, error_model="numpy")
def paged_attention(q, k_pool, v_pool, tables, starts, counts, out, fmt):
    H, d = q.shape[1], q.shape[2]
    kv = k_pool.shape[1]
    group = H // kv
    scale = 1.0 / math.sqrt(d)
    longest = 1
    for s in range(starts.shape[0]):
        longest = max(longest, starts[s] + counts[s])
    bs = k_pool.shape[3]
    scores = np.empty((group, -(-longest // bs) * bs))
    acc = np.empty((group, d))
    tile = np.empty((group, bs))
    totals = np.empty(group)
    row = 0
    for s in range(starts.shape[0]):
        for r in range(counts[s]):
            n = starts[s] + r + 1
            for g in range(kv):
                _scores(q, row, g * group, group, k_pool, tables[s], g, n, scale, scores, tile, fmt)
                _weighted_values(scores, group, n, v_pool, tables[s], g, acc, totals, fmt)
                for hh in range(group):
                    inv = 1.0 / totals[hh]
                    for i in range(d):
                        out[row, g * group + hh, i] = acc[hh, i] * inv
            row += 1
