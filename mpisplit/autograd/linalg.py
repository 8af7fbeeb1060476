"""Matrix products: a @ b with batch broadcasting, the fused x @ W + b, and the tied-head x @ W^T."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mpisplit.autograd.operands import _operands, _unbroadcast
from mpisplit.autograd.quantized import QuantizedLinear
from mpisplit.autograd.tensor import Function, Tensor, grad_target
from mpisplit.runtime.backend import get_array_module

_rows = threading.local()


@contextmanager
def row_blocks(rows: int) -> Iterator[None]:
    """Inside: Linear and LinearT multiply `rows` rows per BLAS call (the row count must be a
    multiple of it). A BLAS may round a row differently with the number of rows in the call
    (OpenBLAS's small-matrix kernels, its one-row kernel); calls of one fixed shape give every
    row the same bits wherever it sits, which batched serving needs."""
    if rows < 1:
        raise ValueError(f"row_blocks needs rows >= 1, got {rows}")
    before = getattr(_rows, "size", None)
    _rows.size = rows
    try:
        yield
    finally:
        _rows.size = before


def row_block_size() -> int | None:
    """The rows per product set by an enclosing row_blocks(), or None."""
    return getattr(_rows, "size", None)


def _rows_times(x2: Any, w: Any) -> Any:
    """x2 (M, k) @ w (k, n), in blocks of the row_blocks() size when one is set."""
    size = row_block_size()
    if size is None:
        return x2 @ w
    if x2.shape[0] % size:
        raise ValueError(f"{x2.shape[0]} rows are not a multiple of row_blocks({size})")
    if x2.shape[0] == size:
        return x2 @ w
    xp = get_array_module(x2)
    out = xp.empty((x2.shape[0], w.shape[1]), dtype=xp.result_type(x2, w))
    for lo in range(0, x2.shape[0], size):
        xp.matmul(x2[lo:lo + size], w, out=out[lo:lo + size])
    return out


class MatMul(Function):
    """a @ b with NumPy broadcasting of the batch dimensions."""

    def forward(self, a: Any, b: Any) -> Any:
        self.save(a, b)
        return a @ b

    def backward(self, g: Any) -> tuple[Any, Any]:
        a, b = self.saved
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = _unbroadcast(g @ b.swapaxes(-1, -2), a.shape)
        if self.needs_input_grad[1]:
            if b.ndim == 2:
                # (..., m, k) x (..., m, n): fold the batch into one GEMM instead of a sum of GEMMs.
                gb = a.reshape(-1, a.shape[-1]).T @ g.reshape(-1, g.shape[-1])
            else:
                gb = _unbroadcast(a.swapaxes(-1, -2) @ g, b.shape)
        return ga, gb


class Linear(Function):
    """x @ w (+ b) for x (..., k), w (k, n), b (n,): one GEMM each way."""

    def forward(self, x: Any, w: Any, b: Any = None) -> Any:
        self.save(x, w)
        self.has_bias = b is not None
        out = _rows_times(x.reshape(-1, x.shape[-1]), w)  # (M, n)
        if b is not None:
            out += b
        return out.reshape(*x.shape[:-1], w.shape[-1])

    def backward(self, g: Any) -> tuple[Any, ...]:
        x, w = self.saved
        xp = get_array_module(g)
        g2 = g.reshape(-1, g.shape[-1])  # (M, n)
        gx = (g2 @ w.T).reshape(x.shape) if self.needs_input_grad[0] else None
        gw = None
        if self.needs_input_grad[1]:  # straight into the weight's gradient buffer when it has one
            out = grad_target(self.inputs[1], w.shape, g.dtype, xp)
            gw = xp.matmul(x.reshape(-1, x.shape[-1]).T, g2, out=out)
        if not self.has_bias:
            return gx, gw
        gb = None
        if self.needs_input_grad[2]:
            gb = g2.sum(axis=0, out=grad_target(self.inputs[2], (g2.shape[1],), g.dtype, xp))
        return gx, gw, gb


class LinearT(Function):
    """x @ w^T for x (..., k) and w (n, k) stored row-major (a tied embedding table):
    both gradients come out contiguous in their parameter's own layout."""

    def forward(self, x: Any, w: Any) -> Any:
        self.save(x, w)
        out = _rows_times(x.reshape(-1, x.shape[-1]), w.T)  # (M, n)
        return out.reshape(*x.shape[:-1], w.shape[0])

    def backward(self, g: Any) -> tuple[Any, Any]:
        x, w = self.saved
        xp = get_array_module(g)
        g2 = g.reshape(-1, g.shape[-1])  # (M, n)
        gx = (g2 @ w).reshape(x.shape) if self.needs_input_grad[0] else None
        gw = None
        if self.needs_input_grad[1]:  # (n, k)
            out = grad_target(self.inputs[1], w.shape, g.dtype, xp)
            gw = xp.matmul(g2.T, x.reshape(-1, x.shape[-1]), out=out)
        return gx, gw


def matmul(a: Tensor, b: Tensor) -> Tensor:
    a, b = _operands(a, b)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"matmul needs operands of at least 2 dimensions, got shapes {a.shape} and {b.shape}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul shape mismatch: {a.shape} @ {b.shape}")
    return MatMul.apply(a, b)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight + bias with weight stored (in_features, out_features)."""
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"linear: input features {x.shape[-1]} != weight rows {weight.shape[0]} (weight {weight.shape})")
    if x.dtype != weight.dtype:
        raise TypeError(f"linear: input dtype {x.dtype} != weight dtype {weight.dtype}")
    get_array_module(x.data, weight.data)
    slab = getattr(weight, "quantized", None)
    if slab is not None:  # kept in quantized blocks (nn/quantized.py): forward only
        return QuantizedLinear.apply(x, *(() if bias is None else (bias,)), slab=slab, padded=weight.shape[1])
    if bias is None:
        return Linear.apply(x, weight)
    return Linear.apply(x, weight, bias)


def linear_t(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight^T with weight stored (out_features, in_features), e.g. a tied LM head."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_t: input features {x.shape[-1]} != weight columns {weight.shape[1]}")
    if x.dtype != weight.dtype:
        raise TypeError(f"linear_t: input dtype {x.dtype} != weight dtype {weight.dtype}")
    slab = getattr(weight, "quantized", None)
    if slab is not None:
        return QuantizedLinear.apply(x, slab=slab, padded=weight.shape[0])
    return LinearT.apply(x, weight)
