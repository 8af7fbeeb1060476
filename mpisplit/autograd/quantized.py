"""x @ W (+ b) for a weight kept quantized (nn/quantized.py's QuantizedSlab, duck-typed here:
`rows`, `matmul_t(x)`): forward only."""

from __future__ import annotations

from typing import Any

import numpy as np

from mpisplit.autograd.tensor import Function


class QuantizedLinear(Function):
    """x @ W (+ b) with W the (in, out) weight whose transpose `slab` holds (its rows: the outputs);
    `padded`: the output width, past the slab's rows (a padded column split) zeros."""

    def forward(self, x: Any, b: Any = None, *, slab: Any, padded: int) -> Any:
        x2 = x.reshape(-1, x.shape[-1])
        out = slab.matmul_t(np.ascontiguousarray(x2))
        if padded > slab.rows:  # a column split padded past the real features: zeros there
            out = np.concatenate([out, np.zeros((out.shape[0], padded - slab.rows), dtype=out.dtype)], axis=1)
        if b is not None:
            out += b
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def backward(self, g: Any) -> tuple[Any, ...]:
        raise RuntimeError("weights kept in GGUF's quantized blocks serve only: load the model dequantized "
                           "(mpisplit serve --dequantize, or GPT.from_pretrained without keep_quantized) to train or fine-tune it")
