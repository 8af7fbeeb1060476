"""Vocabulary-parallel embedding: each TP rank holds a block of the table's rows.

The vocabulary V is padded up to Vp = ceil(V / t) * t; rank r owns rows
[r*Vp/t, (r+1)*Vp/t). A rank looks up the ids in its range, writes zeros for the
others, and one all-reduce assembles the embeddings. Padded rows are zero and
no id reaches them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpisplit.autograd import ops
from mpisplit.autograd.tensor import Function, Tensor, pending_grad
from mpisplit.nn.linear import local_size
from mpisplit.nn.module import Module, Parameter
from mpisplit.parallel.mappings import (
    all_gather_from_sp,
    copy_to_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
)
from mpisplit.runtime.backend import get_array_module, resolve_dtype, scatter_add, to_numpy


class _LocalLookup(Function):
    """weight[ids - start] for ids in [start, start + n), zero rows elsewhere."""

    def forward(self, weight: Any, ids: Any = None, start: int = 0) -> Any:
        xp = get_array_module(weight)
        n = weight.shape[0]
        local = ids - start
        outside = (local < 0) | (local >= n)
        local = xp.where(outside, 0, local)
        out = weight[local]  # (..., h)
        out[outside] = 0
        self.local, self.outside, self.wshape = local, outside, weight.shape
        return out

    def backward(self, g: Any) -> Any:
        xp = get_array_module(g)
        inside = ~self.outside.reshape(-1)
        rows = g.reshape(-1, self.wshape[1])
        acc = pending_grad(self.inputs[0], g.dtype, xp)  # a tied head's, say: add the rows into it
        gw = xp.zeros(self.wshape, dtype=g.dtype) if acc is None else acc
        if xp is np:
            scatter_add(gw, self.local.reshape(-1)[inside], rows[inside])
        else:  # no boolean selection on a GPU (its size needs a host sync): add zeros instead
            scatter_add(gw, self.local.reshape(-1), rows * inside[:, None])
        return gw if acc is None else None


def check_ids(ids: Any, vocab_size: int, what: str = "token ids") -> None:
    """ValueError naming the offending values when ids are not integers in [0, vocab_size)."""
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{what} must be integers, got dtype {ids.dtype}")
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{what} must lie in [0, {vocab_size}), got values in [{lo}, {hi}]")


class VocabParallelEmbedding(Module):
    """Token embedding table (V, h), rows split over the TP ranks."""

    def __init__(self, vocab_size: int, hidden: int, tp_comm: Any, *, dtype: Any = "float32", std: float = 0.02) -> None:
        if vocab_size <= 0 or hidden <= 0:
            raise ValueError(f"vocab_size and hidden must be positive, got {vocab_size} and {hidden}")
        self.comm = tp_comm
        self.vocab_size, self.hidden = vocab_size, hidden
        self.dtype = resolve_dtype(dtype)
        self.local_vocab = n = local_size(vocab_size, tp_comm.size)
        self.padded_vocab = n * tp_comm.size
        self.vocab_start = tp_comm.rank * n
        self.weight = Parameter(
            np.zeros((n, hidden), dtype=self.dtype), split_axis=0, start=self.vocab_start,
            global_shape=(vocab_size, hidden), init=("normal", std),
        )

    def forward(self, ids: Any, *, sequence_parallel: bool = False) -> Tensor:
        """ids (...) integers, the same on every TP rank -> (..., h), the same on every TP rank;
        with `sequence_parallel` ids (B, T) -> this rank's block (B, T/t, h) (a reduce-scatter)."""
        ids = ids.data if isinstance(ids, Tensor) else ids
        check_ids(to_numpy(ids) if not isinstance(ids, np.ndarray) else ids, self.vocab_size)
        ids = get_array_module(self.weight.data).asarray(ids)  # host ids go to the weight's device
        slab = self.weight.quantized
        if slab is not None:  # quantized blocks (nn/quantized.py, serving): rows dequantized as looked up
            local = Tensor(slab.lookup(ids, self.vocab_start, self.dtype))
            return local if self.comm.size == 1 else reduce_from_tp(local, self.comm)
        if self.comm.size == 1:
            return ops.embedding(self.weight, ids)
        local = _LocalLookup.apply(self.weight, ids=ids, start=self.vocab_start)
        if sequence_parallel:
            return reduce_scatter_to_sp(local, self.comm, axis=1)
        return reduce_from_tp(local, self.comm)

    def logits(self, x: Tensor, *, sequence_parallel: bool = False) -> Tensor:
        """The tied LM head: x (..., h) -> this rank's logits (..., Vp/t) = x @ W_local^T; with
        `sequence_parallel` x is this rank's (B, T/t, h) block, all-gathered first."""
        x = all_gather_from_sp(x, self.comm, axis=1) if sequence_parallel else copy_to_tp(x, self.comm)
        return ops.linear_t(x, self.weight)
