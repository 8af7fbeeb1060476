"""The serving forward's blocks on plain arrays: the arithmetic of the modules, without their
per-call cost.

A decode step of a small model is mostly Python: each block's modules wrap every array in a
Tensor, check shapes and dtypes, and dispatch through autograd Functions (about 17 a block),
some 250 us a block on the CPU, as long as the products themselves for SmolLM2-135M. Here a
pass runs the same Functions' forwards on the blocks' arrays (`Function.compute`, the fused
quantized groups as nn/linear.column_group forms them): the same operations in the same order,
so the logits are the same bits as through the modules (tested).

It takes Llama-family models (RMSNorm, rotary grouped-query attention, SwiGLU) on NumPy arrays
without LoRA adapters; anything else goes through the modules (serving/batch.py).

    blocks = lean_blocks(model)      # None where it does not apply
    x = lean_forward(blocks, x, positions, kv, segments, index, attend)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpisplit.autograd.elementwise import SwiGLU
from mpisplit.autograd.linalg import Linear
from mpisplit.autograd.quantized import QuantizedLinear
from mpisplit.autograd.reductions import RMSNorm as RMSNormFn
from mpisplit.autograd.rotary import rotary_array
from mpisplit.nn.gqa import GroupedQueryAttention
from mpisplit.nn.mlp import SwiGLUMLP
from mpisplit.nn.quantized import fused_slab
from mpisplit.nn.rmsnorm import RMSNorm


def _linear(x: Any, layer: Any, bias: bool = True) -> Any:
    """x @ W (+ b) of one layer, as ops.linear computes it (blocks or floats); `bias` False: the
    product alone (a row-split layer adds its bias after the all-reduce)."""
    w = layer.weight
    b = () if layer.bias is None or not bias else (layer.bias.data,)
    slab = getattr(w, "quantized", None)
    if slab is not None:
        return QuantizedLinear.compute(x, *b, slab=slab, padded=w.shape[1])
    return Linear.compute(x, w.data, *b)


def _group(x: Any, layers: list) -> list:
    """Layers on the same input, as nn/linear.column_group computes them: one product of their
    fused quantized slab where there is one, else one each."""
    fused = fused_slab([layer.weight for layer in layers])
    if fused is None:
        return [_linear(x, layer) for layer in layers]
    y = QuantizedLinear.compute(x, slab=fused, padded=fused.rows)
    out, lo = [], 0
    for layer in layers:
        part = y[..., lo: lo + layer.weight.shape[1]]
        lo += layer.weight.shape[1]
        out.append(part if layer.bias is None else part + layer.bias.data)
    return out


def _row_parallel(x: Any, layer: Any) -> Any:
    """A row-split layer on its parallel input: partial product, all-reduce, bias."""
    y = _linear(x, layer, bias=False)
    if layer.comm.size > 1:
        y = layer.comm.allreduce(y)
    return y if layer.bias is None else y + layer.bias.data


def _block(b: Any, x: Any, positions: Any, layer: int, kv: Any, segments: list, index: Any, attend: Any) -> Any:
    """One Llama-family block on x (1, P, h), as Block.forward and serving/batch.py compute it."""
    a, mlp = b.attn, b.mlp
    h = RMSNormFn.compute(x, b.ln_1.weight.data, eps=b.ln_1.eps)
    q, k, v = _group(h, [a.q_proj, a.k_proj, a.v_proj])
    B, T, d = q.shape[0], q.shape[1], a.head_size
    q, k, v = q.reshape(B, T, a.local_heads, d), k.reshape(B, T, a.local_kv_heads, d), v.reshape(B, T, -1, d)
    cos, sin = a.rotary.at(positions, q)
    y = attend(a, rotary_array(q, cos, sin), rotary_array(k, cos, sin), v, layer, kv, segments, index)
    x = x + _row_parallel(y, a.o_proj)
    h = RMSNormFn.compute(x, b.ln_2.weight.data, eps=b.ln_2.eps)
    gate, up = _group(h, [mlp.gate_proj, mlp.up_proj])
    return x + _row_parallel(SwiGLU.compute(gate, up), mlp.down_proj)


def _takes(block: Any) -> bool:
    a, mlp = block.attn, block.mlp
    if not (type(block.ln_1) is RMSNorm and type(block.ln_2) is RMSNorm and type(a) is GroupedQueryAttention
            and type(mlp) is SwiGLUMLP and a.o_proj.input_is_parallel and mlp.down_proj.input_is_parallel):
        return False
    layers: list[Any] = [a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    return all(getattr(layer, "lora", None) is None and type(layer.weight.data) is np.ndarray for layer in layers)


def lean_blocks(model: Any) -> list[Any] | None:
    """The model's blocks when lean_forward takes them all, else None (checked at each call:
    attached adapters or a device move change the answer; cheap)."""
    if getattr(model, "served_adapters", None) is not None or not all(_takes(b) for b in model.h):
        return None
    return list(model.h)


def lean_forward(blocks: list[Any], x: Any, positions: Any, kv: Any, segments: list, index: Any,
                 attend: Any) -> Any:
    """x (1, P, h) through every block; `attend` is serving/batch.py's attention over the pool."""
    for layer, block in enumerate(blocks):
        x = _block(block, x, positions, layer, kv, segments, index, attend)
    return x
