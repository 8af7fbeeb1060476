"""A rank's slab of a GGUF tensor as the file's own quantized blocks (nn/quantized.py keeps it so).

Rows of the Hugging Face (out, in) layout are the file's rows; each row is blocks of 32 input
features. A slab is a range of rows and a range of columns: the rows are taken whole (undoing
llama.cpp's permutation of Llama's Q and K rows, as weights.py does), the columns only as whole
blocks. `slab_blocks` returns None where the blocks cannot be kept: a type without a kernel here
(kernels/quant_blocks.py), or columns that start or end inside a block (a row split whose share
of the input features is not a multiple of 32); the caller then dequantizes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpisplit.kernels.quant_blocks import BLOCK_BYTES, BLOCK_ELEMS


def slab_blocks(weights: Any, name: str, rows: range, cols: range) -> tuple[str, np.ndarray] | None:
    """(kind, blocks (len(rows), len(cols) / 32 * block bytes)) of tensor `name` (Hugging Face
    name, 2-D) of a GGUFWeights, or None when it cannot stay quantized."""
    from mpisplit.models.gguf.weights import _row_index

    kind = weights.gguf_type(name)
    if kind not in BLOCK_BYTES or len(weights.shape(name)) != 2:
        return None
    n = BLOCK_ELEMS[kind]
    if cols.start % n or len(cols) % n or not rows or not cols:
        return None
    t = weights.file.tensors[weights._gguf_name[name]]
    raw = t.data.reshape(weights.shape(name)[0], -1).view(np.uint8)
    if name in weights._permuted:
        raw = raw[_row_index(rows, weights.config["head_dim"])]
    else:
        raw = raw[rows.start:rows.stop]
    size = BLOCK_BYTES[kind]
    part = raw[:, cols.start // n * size: cols.stop // n * size]
    return kind, np.array(part, dtype=np.uint8, order="C")  # owned: never a view of the mapped file
