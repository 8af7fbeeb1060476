"""Products with weights kept in GGUF's quantized blocks, dequantized in registers.

A weight matrix W (R output rows, K input features) is its GGUF bytes as they are: each row
K / 32 blocks along the input features (the Hugging Face (out, in) layout), one block

    Q8_0  fp16 d, 32 x int8 q             (34 B)   w = d * q
    Q4_0  fp16 d, 16 B of 4-bit q          (18 B)   w = d * (q - 8)
    Q4_1  fp16 d, fp16 m, 16 B of 4-bit q  (20 B)   w = d * q + m

where byte j of a 4-bit block holds element j in its low nibble and element j + 16 in its high
one. `block_matmul(x, blocks, kind)` = x @ W.T for activations x (N, K): each output row's blocks
are read once for all N rows of x, each block's 32 values formed in registers and multiplied
into 32 lanes that are summed once per output row, so the dequantized matrix never exists (one
row of x has a kernel of its own, its output rows split over the numba threads). The
activations stay in their float type: float32 in serving, float64 in the tests, where the
product equals the float64 product with the dequantized matrix to rounding. `dequantize_rows`
gives the float rows (for a prompt's large N, where BLAS on dequantized tiles is faster).

fp16 scales are read through a 65,536-entry table of their float values (256 KiB, cached).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import prange

BLOCK = 32
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
KINDS = tuple(BLOCK_BYTES)

_F16: dict[str, np.ndarray] = {}


def f16_table(dtype: np.dtype) -> np.ndarray:
    """value of each fp16 bit pattern 0..65535 as `dtype` (exact: fp16 values are exact in float32)."""
    key = np.dtype(dtype).str
    if key not in _F16:
        _F16[key] = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(dtype)
    return _F16[key]


@numba.njit(inline="always")
def _half(row, o, table):
    return table[np.int64(row[o]) | (np.int64(row[o + 1]) << 8)]


# Each kind: `unpack` writes a block's 32 values to w (dequantization), `lanes` adds a block's
# products with x[n, base:base + 32] into the 32 lanes acc[n] (no sum per block: the lanes are
# summed once per output row, so the loop vectorizes).


@numba.njit(inline="always")
def _unpack_q8_0(row, o, table, w):
    d = _half(row, o, table)
    for j in range(32):
        q = np.int32(row[o + 2 + j])
        w[j] = d * (q - ((q >> 7) << 8))  # int8 from its byte


@numba.njit(inline="always")
def _lanes_q8_0(row, o, table, x, n, base, acc):
    d = _half(row, o, table)
    for j in range(32):
        q = np.int32(row[o + 2 + j])
        acc[n, j] += x[n, base + j] * (d * (q - ((q >> 7) << 8)))


@numba.njit(inline="always")
def _unpack_q4_0(row, o, table, w):
    d = _half(row, o, table)
    for j in range(16):
        q = np.int32(row[o + 2 + j])
        w[j] = d * ((q & 15) - 8)
        w[j + 16] = d * ((q >> 4) - 8)


@numba.njit(inline="always")
def _lanes_q4_0(row, o, table, x, n, base, acc):
    d = _half(row, o, table)
    for j in range(16):
        q = np.int32(row[o + 2 + j])
        acc[n, j] += x[n, base + j] * (d * ((q & 15) - 8))
        acc[n, j + 16] += x[n, base + 16 + j] * (d * ((q >> 4) - 8))


@numba.njit(inline="always")
def _unpack_q4_1(row, o, table, w):
    d, m = _half(row, o, table), _half(row, o + 2, table)
    for j in range(16):
        q = np.int32(row[o + 4 + j])
        w[j] = d * (q & 15) + m
        w[j + 16] = d * (q >> 4) + m


@numba.njit(inline="always")
def _lanes_q4_1(row, o, table, x, n, base, acc):
    d, m = _half(row, o, table), _half(row, o + 2, table)
    for j in range(16):
        q = np.int32(row[o + 4 + j])
        acc[n, j] += x[n, base + j] * (d * (q & 15) + m)
        acc[n, j + 16] += x[n, base + 16 + j] * (d * (q >> 4) + m)


def _kernels(unpack, lanes, size):
    """The products and the dequantization for one block kind (its functions compiled in)."""

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def matvec(x, blocks, table, out, chunks):
        # one row of x: each of `chunks` threads a range of output rows, 32 lanes summed once a row
        R, K = blocks.shape[0], x.shape[1]
        for c in prange(chunks):
            acc = np.zeros((1, 32), dtype=x.dtype)
            for r in range(c * R // chunks, (c + 1) * R // chunks):
                row = blocks[r]
                acc[0, :] = 0
                for b in range(K // 32):
                    lanes(row, b * size, table, x, 0, b * 32, acc)
                out[0, r] = acc[0].sum()

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def matmul(x, blocks, table, out):
        N, K = x.shape
        for r in prange(blocks.shape[0]):
            row = blocks[r]
            acc = np.zeros((N, 32), dtype=x.dtype)
            for b in range(K // 32):
                for n in range(N):
                    lanes(row, b * size, table, x, n, b * 32, acc)
            for n in range(N):
                out[n, r] = acc[n].sum()

    @numba.njit(parallel=True, cache=True)
    def dequantize(blocks, table, out):
        for r in prange(out.shape[0]):
            row = blocks[r]
            for b in range(out.shape[1] // 32):
                unpack(row, b * size, table, out[r, b * 32:(b + 1) * 32])

    return matmul, dequantize, matvec


_KERNELS = {"Q8_0": _kernels(_unpack_q8_0, _lanes_q8_0, 34), "Q4_0": _kernels(_unpack_q4_0, _lanes_q4_0, 18),
            "Q4_1": _kernels(_unpack_q4_1, _lanes_q4_1, 20)}


def _check(blocks: np.ndarray, kind: str, k: int) -> None:
    if kind not in BLOCK_BYTES:
        raise ValueError(f"quantized blocks of kind {kind!r} are not supported; expected one of {KINDS}")
    if blocks.dtype != np.uint8 or blocks.ndim != 2 or not blocks.flags.c_contiguous:
        raise ValueError(f"blocks must be a C-contiguous (rows, bytes) uint8 array, got {blocks.dtype} {blocks.shape}")
    if k % BLOCK or blocks.shape[1] != k // BLOCK * BLOCK_BYTES[kind]:
        raise ValueError(f"{kind} rows of {blocks.shape[1]} bytes do not hold {k} features in blocks of {BLOCK}")


def block_matmul(x: np.ndarray, blocks: np.ndarray, kind: str) -> np.ndarray:
    """x (N, K) @ W.T, W (R, K) given as `blocks` (R, K / 32 * block bytes) of `kind`: (N, R) in x's dtype."""
    x = np.ascontiguousarray(x)
    _check(blocks, kind, x.shape[1])
    out = np.empty((x.shape[0], blocks.shape[0]), dtype=x.dtype)
    if x.shape[0] == 1:
        _KERNELS[kind][2](x, blocks, f16_table(x.dtype), out, numba.get_num_threads())
    else:
        _KERNELS[kind][0](x, blocks, f16_table(x.dtype), out)
    return out


def dequantize_rows(blocks: np.ndarray, kind: str, k: int, dtype: Any = np.float32) -> np.ndarray:
    """W (R, K) as `dtype` from its blocks (what gguf.quants.dequantize gives, here in parallel)."""
    _check(blocks, kind, k)
    out = np.empty((blocks.shape[0], k), dtype=dtype)
    _KERNELS[kind][1](blocks, f16_table(out.dtype), out)
    return out
