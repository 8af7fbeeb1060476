"""Layers, plain and tensor-parallel.

Weights are stored (in_features, out_features) so that y = x @ W + b (the
layout of GPT-2's Conv1D). A column-split layer holds a block of output
features on each TP rank, a row-split layer a block of input features. A
feature count that the TP degree does not divide is padded up to the next
multiple: the padded columns/rows are zero, receive zero gradient and are never
exposed (outputs are trimmed after a gather; checkpoints store only real rows).

Every layer takes its TP communicator explicitly. With `sequence_parallel=True` a split layer's
input (column) or output (row) is this rank's block of the sequence (axis 1 of (B, T, h)):
the column split all-gathers it first, the row split reduce-scatters its partial sums.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpisplit.autograd import Tensor, ops
from mpisplit.autograd.quantized import QuantizedLinear
from mpisplit.autograd.tensor import Function
from mpisplit.nn.module import Module, Parameter
from mpisplit.nn.quantized import fused_slab
from mpisplit.parallel.mappings import (
    copy_to_tp,
    gather_from_tp,
    pad_last,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_tp,
)
from mpisplit.runtime.backend import resolve_dtype


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def local_size(n: int, tp: int) -> int:
    """Features per rank when n is split over tp ranks (padded up: ceil(n / tp))."""
    return -(-n // tp)


def _check_input(x: Tensor, features: int, dtype: np.dtype, layer: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{layer}: expected a Tensor input, got {type(x).__name__}")
    if x.shape[-1:] != (features,):
        raise ValueError(f"{layer}: expected last dimension {features}, got input shape {x.shape}")
    if x.dtype != dtype:
        raise TypeError(f"{layer}: input dtype {x.dtype} does not match the layer's {dtype}")


def _zeros(shape: tuple[int, ...], dtype: np.dtype, xp: Any = np) -> Any:
    return xp.zeros(shape, dtype=dtype)


class _SequenceGatherLinear(Function):
    """all-gather(x) @ w (+ b) for x this rank's (B, T/t, k) block of the sequence.

    Keeps only the block for backward (not the gathered (B, T, k) input): backward all-gathers
    it again for the weight gradient and reduce-scatters the input gradient."""

    def forward(self, x: Any, w: Any, b: Any = None, comm: Any = None) -> Any:
        self.comm, self.has_bias = comm, b is not None
        full = comm.allgather(x, axis=1)  # (B, T, k)
        self.save(x, w)
        out = full.reshape(-1, full.shape[-1]) @ w  # (B*T, n)
        if b is not None:
            out += b
        return out.reshape(*full.shape[:-1], w.shape[-1])

    def backward(self, g: Any) -> tuple[Any, ...]:
        x, w = self.saved
        g2 = g.reshape(-1, g.shape[-1])  # (B*T, n)
        gx = gw = gb = None
        if self.needs_input_grad[0]:
            gx = self.comm.reduce_scatter((g2 @ w.T).reshape(*g.shape[:-1], w.shape[0]), axis=1)
        if self.needs_input_grad[1]:
            full = self.comm.allgather(x, axis=1)
            gw = full.reshape(-1, full.shape[-1]).T @ g2
        if self.has_bias and self.needs_input_grad[2]:
            gb = g2.sum(axis=0)
        return (gx, gw, gb) if self.has_bias else (gx, gw)


def sequence_parallel_linear(x: Tensor, weight: Tensor, bias: Tensor | None, comm: Any) -> Tensor:
    """The entry of a column split under sequence parallelism: x (B, T/t, k) blocks -> the
    (B, T, n_local) output. forward: all-gather, then the local GEMM; backward: reduce-scatter
    of dX, and a second all-gather of x for dW (only the block is kept in between)."""
    if comm.size == 1:
        return ops.linear(x, weight, bias)
    inputs = (x, weight) if bias is None else (x, weight, bias)
    return _SequenceGatherLinear.apply(*inputs, comm=comm)


class Linear(Module):
    """Unsplit y = x @ W + b (the same on every rank); W (in, out)."""

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool = True, dtype: Any = "float32",
        std: float = 0.02, seed: int | None = None,
    ) -> None:
        _check_positive(in_features=in_features, out_features=out_features)
        self.in_features, self.out_features = in_features, out_features
        self.dtype = resolve_dtype(dtype)
        self.weight = Parameter(_zeros((in_features, out_features), self.dtype), init=("normal", std))
        self.bias = Parameter(_zeros((out_features,), self.dtype)) if bias else None
        if seed is not None:
            self.reset_parameters(seed)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.in_features, self.dtype, "Linear")
        return ops.linear(x, self.weight, self.bias)


class ColumnParallelLinear(Module):
    """Y_i = X A_i: rank i holds output features [i*n, (i+1)*n) of A (n = ceil(out / tp)).

    Input: the full X, the same on every rank (the f operator: identity forward,
    all-reduce of dX backward). Output: this rank's block of features, or the whole
    Y when `gather_output` (all-gather forward, split backward).
    """

    lora: Any = None  # a LoRA adapter (nn/lora.py), set by models/lora.py

    def __init__(
        self, in_features: int, out_features: int, tp_comm: Any, *, bias: bool = True,
        gather_output: bool = False, dtype: Any = "float32", std: float = 0.02, seed: int | None = None,
    ) -> None:
        _check_positive(in_features=in_features, out_features=out_features)
        self.comm = tp_comm
        self.in_features, self.out_features = in_features, out_features
        self.gather_output = gather_output
        self.dtype = resolve_dtype(dtype)
        tp, rank = tp_comm.size, tp_comm.rank
        self.local_out_features = n = local_size(out_features, tp)
        self.weight = Parameter(
            _zeros((in_features, n), self.dtype), split_axis=1, start=rank * n,
            global_shape=(in_features, out_features), init=("normal", std),
        )
        self.bias = (
            Parameter(_zeros((n,), self.dtype), split_axis=0, start=rank * n, global_shape=(out_features,))
            if bias else None
        )
        if seed is not None:
            self.reset_parameters(seed)

    def forward(self, x: Tensor, *, sequence_parallel: bool = False, rngs: Any = None) -> Tensor:
        """`rngs`: the model's (shared, local) dropout streams, for a LoRA adapter's dropout."""
        _check_input(x, self.in_features, self.dtype, "ColumnParallelLinear")
        if sequence_parallel:
            y = sequence_parallel_linear(x, self.weight, self.bias, self.comm)  # (B, T, n)
            (y,) = _with_lora([y], [self], x, self.comm, True, rngs)
        else:
            xt = copy_to_tp(x, self.comm)
            (y,) = _with_lora([ops.linear(xt, self.weight, self.bias)], [self], xt, self.comm, False, rngs)  # (..., n)
        if not self.gather_output:
            return y
        y = gather_from_tp(y, self.comm)  # (..., tp * n)
        return y if y.shape[-1] == self.out_features else y[..., : self.out_features]


class RowParallelLinear(Module):
    """Y = sum_i X_i A_i: rank i holds input features [i*n, (i+1)*n) of A (n = ceil(in / tp)).

    Input: this rank's block of X (`input_is_parallel`, e.g. the output of a
    ColumnParallelLinear), or the full X, which is split here. The partial
    products are all-reduced (the g operator) and the bias, replicated, is added
    once after the reduction.
    """

    lora: Any = None  # a LoRA adapter (nn/lora.py), set by models/lora.py

    def __init__(
        self, in_features: int, out_features: int, tp_comm: Any, *, bias: bool = True,
        input_is_parallel: bool = True, dtype: Any = "float32", std: float = 0.02, seed: int | None = None,
    ) -> None:
        _check_positive(in_features=in_features, out_features=out_features)
        self.comm = tp_comm
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel = input_is_parallel
        self.dtype = resolve_dtype(dtype)
        tp, rank = tp_comm.size, tp_comm.rank
        self.local_in_features = n = local_size(in_features, tp)
        self.weight = Parameter(
            _zeros((n, out_features), self.dtype), split_axis=0, start=rank * n,
            global_shape=(in_features, out_features), init=("normal", std),
        )
        self.bias = Parameter(_zeros((out_features,), self.dtype)) if bias else None
        if seed is not None:
            self.reset_parameters(seed)

    def forward(self, x: Tensor, *, sequence_parallel: bool = False, rngs: Any = None) -> Tensor:
        """`rngs`: the model's (shared, local) dropout streams, for a LoRA adapter's dropout."""
        if self.input_is_parallel:
            _check_input(x, self.local_in_features, self.dtype, "RowParallelLinear (parallel input)")
        else:
            _check_input(x, self.in_features, self.dtype, "RowParallelLinear")
            x = scatter_to_tp(pad_last(x, self.local_in_features * self.comm.size), self.comm)
        partial = ops.linear(x, self.weight)
        if self.lora is not None:  # the adapter's share joins the partial products before their sum
            partial = self.lora.add_row(partial, x, rngs)
        if sequence_parallel:  # (B, T/t, out): the bias is added on the shard, its gradient partial
            y = reduce_scatter_to_sp(partial, self.comm, axis=1)
        else:
            y = reduce_from_tp(partial, self.comm)
        return y if self.bias is None else y + self.bias


def column_group(x: Tensor, layers: list[Any], comm: Any, sequence_parallel: bool = False,
                 rngs: Any = None) -> list[Tensor]:
    """Several column-split layers (anything with `weight` (k, n_i), `bias` and `lora`) on the
    same input, which enters the TP region once: one all-reduce of dX backward for all of them.
    Under sequence parallelism their slabs are concatenated into one product, so the sequence
    blocks are all-gathered once (and once more in backward) for the group. A layer's LoRA
    adapter (nn/lora.py) adds its product to the layer's (`rngs`: for its dropout)."""
    if not sequence_parallel:
        xt = copy_to_tp(x, comm)  # the gradients of every branch meet here, then one all-reduce
        fused = fused_slab([layer.weight for layer in layers]) if len(layers) > 1 else None
        if fused is not None:  # kept in quantized blocks (serving): one product for the group
            y = QuantizedLinear.apply(xt, slab=fused, padded=fused.rows)
            ys = ops.split(y, [layer.weight.shape[1] for layer in layers], axis=-1)
            ys = [y if layer.bias is None else y + layer.bias for y, layer in zip(ys, layers)]
        else:
            ys = [ops.linear(xt, layer.weight, layer.bias) for layer in layers]
        return _with_lora(ys, layers, xt, comm, False, rngs)
    widths = [layer.weight.shape[1] for layer in layers]
    biases = [layer.bias for layer in layers]
    w = ops.concat([layer.weight for layer in layers], axis=1)  # (k, sum n_i)
    b = None if biases[0] is None else ops.concat(biases, axis=0)
    y = sequence_parallel_linear(x, w, b, comm)  # (B, T, sum n_i)
    ys = ops.split(y, widths, axis=-1) if len(layers) > 1 else [y]
    return _with_lora(ys, layers, x, comm, True, rngs)


def _with_lora(ys: list[Tensor], layers: list[Any], x: Tensor, comm: Any, sequence_parallel: bool,
               rngs: Any = None) -> list[Tensor]:
    return [y if layer.lora is None else layer.lora.add_column(y, x, comm, sequence_parallel, rngs)
            for y, layer in zip(ys, layers)]
