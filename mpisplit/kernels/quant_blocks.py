"""Products with weights kept in GGUF's quantized blocks, dequantized in registers.

A weight matrix W (R output rows, K input features) is its GGUF bytes as they are: each row
K / 32 blocks along the input features (the Hugging Face (out, in) layout), one block

    Q8_0  fp16 d, 32 x int8 q                            (34 B)   w = d * q
    Q4_0  fp16 d, 16 B of 4-bit q                         (18 B)   w = d * (q - 8)
    Q4_1  fp16 d, fp16 m, 16 B of 4-bit q                 (20 B)   w = d * q + m
    Q5_0  fp16 d, 32 fifth bits, 16 B of 4-bit q          (22 B)   w = d * (q - 16)
    Q5_1  fp16 d, fp16 m, 32 fifth bits, 16 B of 4-bit q  (24 B)   w = d * q + m
    Q4_K  super-blocks of 256: fp16 d, dmin, 8 6-bit scale/min pairs, 4-bit q  (144 B)
    Q5_K  as Q4_K, with 32 bytes of fifth bits                                 (176 B)
    Q6_K  super-blocks of 256: 4 + 2 bits of q, 16 int8 scales, fp16 d         (210 B)

where byte j of the 4-bit quants holds element j in its low nibble and element j + 16 in its
high one, and bit j of the little-endian uint32 is element j's fifth bit.
`block_matmul(x, blocks, kind)` = x @ W.T for activations x (N, K): for each output row, the dot
product of each row of x with the row's blocks (kernels/block_dot.py: vector code, each block
read once and unpacked in registers, for four rows of x at a time), so the dequantized matrix
never exists. The output rows
are split over the numba threads when the product is large enough to pay for waking them.
The activations stay in their float type: float32 in serving, float64 in the tests, where the
product equals the float64 product with the dequantized matrix to rounding. `dequantize_rows`
gives the float rows, equal to gguf's own dequantization (for a prompt's many rows, where BLAS
on dequantized tiles is faster).

fp16 scales are read through a 65,536-entry table of their float values (256 KiB, cached).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import prange

from mpisplit.kernels.block_dot import LAYOUTS, block_dot, block_unpack, stable_identity

BLOCK = 32
BLOCK_BYTES = {kind: lay.size for kind, lay in LAYOUTS.items()}
BLOCK_ELEMS = {kind: lay.elems for kind, lay in LAYOUTS.items()}  # 32; 256 for the K-quants
KINDS = tuple(BLOCK_BYTES)
# Weights x rows of x from which a product is split over the threads (below: one thread, as
# starting them costs about as much as the product; measured with benchmarks/bench_quant.py).
PARALLEL_MIN = 1 << 16

_F16: dict[str, np.ndarray] = {}


def f16_table(dtype: np.dtype) -> np.ndarray:
    """value of each fp16 bit pattern 0..65535 as `dtype` (exact: fp16 values are exact in float32)."""
    key = np.dtype(dtype).str
    if key not in _F16:
        _F16[key] = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(dtype)
    return _F16[key]


def _kernels(kind: str) -> tuple[Any, Any, Any, Any]:
    """The serial and threaded products and the threaded and serial dequantizations for one block kind."""
    dot, dot4, unpack = block_dot(kind), block_dot(kind, 4), block_unpack(kind)

    @numba.njit(inline="always")
    def rows(x, blocks, table, out, lo, hi):
        # output rows lo..hi-1: four rows of x a pass over a weight row, then the rest one by one
        N = x.shape[0]
        for r in range(lo, hi):
            for n in range(0, N - N % 4, 4):
                out[n, r], out[n + 1, r], out[n + 2, r], out[n + 3, r] = dot4(blocks, r, x, n, table)
            for n in range(N - N % 4, N):
                out[n, r] = dot(blocks, r, x, n, table)

    stable_identity(rows, f"rows.{kind}")  # the kernels below close over it: their cache keys

    @numba.njit(cache=True)
    def matmul(x, blocks, table, out):
        rows(x, blocks, table, out, 0, blocks.shape[0])

    @numba.njit(parallel=True, cache=True)
    def matmul_threads(x, blocks, table, out, chunks):
        R = blocks.shape[0]
        for c in prange(chunks):
            rows(x, blocks, table, out, c * R // chunks, (c + 1) * R // chunks)

    @numba.njit(parallel=True, cache=True)
    def dequantize(blocks, table, out):
        for r in prange(out.shape[0]):
            unpack(blocks, r, out, r, table)

    @numba.njit(cache=True)
    def dequantize_serial(blocks, table, out):
        for r in range(out.shape[0]):
            unpack(blocks, r, out, r, table)

    return matmul, matmul_threads, dequantize, dequantize_serial


_KERNELS = {kind: _kernels(kind) for kind in KINDS}


def _check(blocks: np.ndarray, kind: str, k: int) -> None:
    if kind not in BLOCK_BYTES:
        raise ValueError(f"quantized blocks of kind {kind!r} are not supported; expected one of {KINDS}")
    if blocks.dtype != np.uint8 or blocks.ndim != 2 or not blocks.flags.c_contiguous:
        raise ValueError(f"blocks must be a C-contiguous (rows, bytes) uint8 array, got {blocks.dtype} {blocks.shape}")
    n = BLOCK_ELEMS[kind]
    if k % n or blocks.shape[1] != k // n * BLOCK_BYTES[kind]:
        raise ValueError(f"{kind} rows of {blocks.shape[1]} bytes do not hold {k} features in blocks of {n}")


def block_matmul(x: np.ndarray, blocks: np.ndarray, kind: str) -> np.ndarray:
    """x (N, K) @ W.T, W (R, K) given as `blocks` (R, K / 32 * block bytes) of `kind`: (N, R) in x's dtype."""
    x = np.ascontiguousarray(x)
    _check(blocks, kind, x.shape[1])
    out = np.empty((x.shape[0], blocks.shape[0]), dtype=x.dtype)
    threads = numba.get_num_threads()
    if threads > 1 and x.shape[0] * blocks.shape[0] * x.shape[1] >= PARALLEL_MIN:
        _KERNELS[kind][1](x, blocks, f16_table(x.dtype), out, threads)
    else:
        _KERNELS[kind][0](x, blocks, f16_table(x.dtype), out)
    return out


def dequantize_rows(blocks: np.ndarray, kind: str, k: int, dtype: Any = np.float32,
                    threads: bool = True) -> np.ndarray:
    """W (R, K) as `dtype` from its blocks (what gguf.quants.dequantize gives), over numba's
    threads, or (`threads` False) on this one: a tile that BLAS multiplies next, whose own
    threads would otherwise meet numba's spinning ones on the same cores."""
    _check(blocks, kind, k)
    out = np.empty((blocks.shape[0], k), dtype=dtype)
    _KERNELS[kind][2 if threads else 3](blocks, f16_table(out.dtype), out)
    return out
