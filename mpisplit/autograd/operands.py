"""How primitives take their operands: Python scalars become constants of the other side's
dtype and backend, and gradients are summed back over the axes broadcasting added."""

from __future__ import annotations

from typing import Any

from mpisplit.autograd.tensor import Tensor
from mpisplit.runtime.backend import get_array_module


def _unbroadcast(grad: Any, shape: tuple[int, ...]) -> Any:
    """Sum `grad` over the axes that broadcasting added or stretched, back to `shape`."""
    if tuple(grad.shape) == tuple(shape):
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and grad.shape[lead + i] != 1
    )
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


def _as_tensor(x: Any, like: Tensor) -> Tensor:
    """Wrap a Python/NumPy scalar or array as a constant of `like`'s dtype and backend."""
    if isinstance(x, Tensor):
        return x
    xp = like.xp
    return Tensor(xp.asarray(x, dtype=like.dtype))


def _operands(a: Any, b: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        raise TypeError(f"expected at least one Tensor, got {type(a).__name__} and {type(b).__name__}")
    if not isinstance(a, Tensor):
        a = _as_tensor(a, b)
    elif not isinstance(b, Tensor):
        b = _as_tensor(b, a)
    if a.dtype != b.dtype:
        raise TypeError(f"dtype mismatch: {a.dtype} and {b.dtype} (cast one side explicitly)")
    get_array_module(a.data, b.data)  # raises TypeError when NumPy and CuPy are mixed
    return a, b


def _normalize_axes(axis: Any, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    return tuple(a % ndim for a in axis)


def _one_minus_(a: Any) -> None:
    """a <- 1 - a, in place."""
    a *= -1.0
    a += 1.0
