"""A weight slab kept in GGUF's quantized blocks (serving only).

`QuantizedSlab` holds this rank's rows of a weight in the Hugging Face (out, in) layout as the
file's block bytes (the types kernels/quant_blocks.py lists): a column-split layer's output
rows, whole; a row-split layer's share of each row's blocks. A layer's weight Parameter keeps its
shape and names and gets the slab as `.quantized`; `ops.linear` / `ops.linear_t` then compute with
the blocks (autograd/quantized.py), and the Parameter's own float array is replaced by read-only
zeros that take no memory (models/hf_llama.py load_weights).

A product of few rows (decode: one per sequence) runs the fused kernel, which reads each block
once and dequantizes it in registers; a larger one (a prompt chunk) dequantizes the slab in
tiles of rows and multiplies with BLAS, whichever of the two measured faster for that many rows
(`FUSED_MAX_ROWS`). Inside row_blocks() (batch-invariant serving) every product runs the fused
kernel, whose rows do not depend on the others in the call, so that a row's bits never depend
on the batch. Backward through it is an error: quantized weights are for inference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Rows of x up to which the fused kernel beats dequantize-then-BLAS (benchmarks/bench_quant.py).
FUSED_MAX_ROWS = 32
# Output rows dequantized at a time on the BLAS path (a tile of at most this many x K floats).
TILE_ROWS = 512


class QuantizedSlab:
    """rows x features of a weight as `kind` blocks: `blocks` (rows, features / 32 * block bytes)."""

    def __init__(self, kind: str, blocks: np.ndarray, rows: int, features: int) -> None:
        from mpisplit.kernels.quant_blocks import BLOCK_BYTES, BLOCK_ELEMS

        if kind not in BLOCK_BYTES:
            raise ValueError(f"no quantized kernel for {kind}; expected one of {sorted(BLOCK_BYTES)}")
        n = BLOCK_ELEMS[kind]
        if features % n or blocks.shape != (rows, features // n * BLOCK_BYTES[kind]):
            raise ValueError(f"{kind} blocks of shape {blocks.shape} do not hold a {rows} x {features} slab")
        self.kind, self.rows, self.features = kind, rows, features
        self.blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
        self.group: tuple[tuple[QuantizedSlab, ...], QuantizedSlab] | None = None  # fused_slab's

    @property
    def nbytes(self) -> int:
        return int(self.blocks.nbytes)

    def matmul_t(self, x: np.ndarray) -> np.ndarray:
        """x (M, features) @ W.T: (M, rows), in x's dtype."""
        from mpisplit.autograd.linalg import row_block_size
        from mpisplit.kernels.quant_blocks import block_matmul, dequantize_rows

        if x.shape[0] <= FUSED_MAX_ROWS or row_block_size() is not None:
            return block_matmul(x, self.blocks, self.kind)
        out = np.empty((x.shape[0], self.rows), dtype=x.dtype)
        for lo in range(0, self.rows, TILE_ROWS):
            hi = min(self.rows, lo + TILE_ROWS)
            tile = dequantize_rows(self.blocks[lo:hi], self.kind, self.features, x.dtype, threads=False)
            np.matmul(x, tile.T, out=out[:, lo:hi])
        return out

    def lookup(self, ids: np.ndarray, start: int, dtype: Any) -> np.ndarray:
        """Rows ids - start of the slab dequantized, (*ids.shape, features); zero rows for ids
        outside [start, start + rows) (another rank's part of a vocabulary)."""
        from mpisplit.kernels.quant_blocks import dequantize_rows

        local = np.asarray(ids).reshape(-1) - start
        inside = (local >= 0) & (local < self.rows)
        out = np.zeros((local.size, self.features), dtype=dtype)
        if inside.any():
            out[inside] = dequantize_rows(self.blocks[local[inside]], self.kind, self.features, dtype)
        return out.reshape(*np.shape(ids), self.features)

    def dequantize(self, dtype: Any = np.float32) -> np.ndarray:
        from mpisplit.kernels.quant_blocks import dequantize_rows

        return dequantize_rows(self.blocks, self.kind, self.features, dtype)


def fused_slab(weights: list) -> QuantizedSlab | None:
    """One slab holding the rows of several weights' slabs that take the same input (q, k and v;
    gate and up), so that one product serves them all; None unless every weight is kept in
    blocks of one kind over the same features, unpadded. Built once and kept on the first slab;
    each weight's slab then views its own rows of it (no second copy). The kernel computes
    every output row by itself, so the fused product equals the separate ones bit for bit."""
    found = [getattr(w, "quantized", None) for w in weights]
    slabs: list[QuantizedSlab] = [s for s in found if s is not None]
    if len(slabs) < 2 or len(slabs) != len(found):
        return None
    first = slabs[0]
    if any(s.kind != first.kind or s.features != first.features or w.shape[1] != s.rows
           for w, s in zip(weights, slabs)):
        return None
    group = first.group
    if group is None or len(group[0]) != len(slabs) or any(a is not b for a, b in zip(group[0], slabs)):
        blocks = np.concatenate([s.blocks for s in slabs])
        lo = 0
        for s in slabs:
            s.blocks, lo = blocks[lo: lo + s.rows], lo + s.rows
        group = first.group = (tuple(slabs), QuantizedSlab(first.kind, blocks, lo, first.features))
    return group[1]
