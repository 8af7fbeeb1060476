"""Quantize a loaded model's matrices into GGUF blocks (`mpisplit serve --quantize q8_0|q4_0`).

What `mpisplit serve --gguf` does with a GGUF file's blocks, for any other source (a Hugging Face folder
of GPT-2 or the Llama family, an mpisplit checkpoint): each rank turns its slab of every linear
weight and of the (tied) embedding into Q8_0 or Q4_0 blocks (the `gguf` package's own
quantization, so the blocks are those llama.cpp would write for the same rows) and serves
with them (nn/quantized.py; forward only). A slab whose input features are not whole blocks of
32 stays in floats, and the report says so. The float copy is let go: its pages are replaced by
untouched zero pages, so resident memory is the blocks'.

Blocks hold each row's outputs in the Hugging Face (out, in) layout: a linear layer's weight
(stored (in, out) here) transposed, an embedding's rows as they are. Padding past a split's real
features is zeros, and zeros quantize to zeros exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

KINDS = {"q8_0": "Q8_0", "q4_0": "Q4_0"}


def quantize_model(model: Any, kind: str) -> dict[str, Any]:
    """Every linear and embedding slab of `model` (NumPy arrays) kept as `kind` blocks; the
    report: {"kept": names, "bytes": blocks' bytes on this rank, "dequantized": names left as floats}."""
    from mpisplit.nn.embedding import VocabParallelEmbedding
    from mpisplit.nn.attention import QKVProjection
    from mpisplit.nn.gqa import HeadProjection
    from mpisplit.nn.linear import ColumnParallelLinear, Linear, RowParallelLinear

    check_kind(kind)
    names = {id(p): name for name, p in model.named_parameters()}
    report: dict[str, Any] = {"kept": [], "bytes": 0, "dequantized": []}
    for module in model.modules():
        if isinstance(module, (Linear, ColumnParallelLinear, RowParallelLinear, HeadProjection, QKVProjection)):
            transposed = True
        elif isinstance(module, VocabParallelEmbedding):
            transposed = False
        else:
            continue
        p = module.weight
        if not isinstance(p.data, np.ndarray):
            raise TypeError("--quantize computes on the CPU: load the model there (no --device gpu)")
        name = names.get(id(p), "?")
        if p.quantized is not None:
            continue  # already blocks (a second call): its float array is zeros by now
        slab = quantize_rows(p.data.T if transposed else p.data, KINDS[kind])
        if slab is None:
            report["dequantized"].append(f"{name} ({p.data.shape[0 if transposed else 1]} input features)")
            continue
        p.quantized = slab
        p.data = np.broadcast_to(np.zeros((), dtype=p.data.dtype), p.data.shape)  # zeros in no memory, read-only
        report["kept"].append(name)
        report["bytes"] += slab.nbytes
    return report


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"--quantize takes one of {sorted(KINDS)}, got {kind!r}")


def quantize_rows(rows: np.ndarray, kind: str) -> Any:
    """rows (out, in) as a QuantizedSlab of `kind` blocks, or None when `in` is not whole blocks."""
    from gguf import GGMLQuantizationType, quants

    from mpisplit.kernels.quant_blocks import BLOCK
    from mpisplit.nn.quantized import QuantizedSlab

    out_f, in_f = rows.shape
    if in_f % BLOCK or not out_f:
        return None
    blocks = quants.quantize(np.ascontiguousarray(rows, dtype=np.float32), GGMLQuantizationType[kind])
    return QuantizedSlab(kind, blocks.reshape(out_f, -1), out_f, in_f)
