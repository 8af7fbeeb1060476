"""Python operators and array-style methods on Tensor, each one primitive of `ops`.

`install()` runs once when `mpisplit.autograd` is imported. It lives here, above the
primitives, so that `tensor.py` (which every primitive imports) imports none of them.
"""

from __future__ import annotations

from typing import Any

from mpisplit.autograd import ops
from mpisplit.autograd.tensor import Tensor


def _reshape(self: Tensor, *shape: Any) -> Tensor:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return ops.reshape(self, shape)


def _transpose(self: Tensor, *axes: Any) -> Tensor:
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    return ops.transpose(self, axes or None)


_METHODS = {
    "__add__": lambda self, other: ops.add(self, other),
    "__radd__": lambda self, other: ops.add(other, self),
    "__sub__": lambda self, other: ops.sub(self, other),
    "__rsub__": lambda self, other: ops.sub(other, self),
    "__mul__": lambda self, other: ops.mul(self, other),
    "__rmul__": lambda self, other: ops.mul(other, self),
    "__truediv__": lambda self, other: ops.div(self, other),
    "__rtruediv__": lambda self, other: ops.div(other, self),
    "__neg__": lambda self: ops.neg(self),
    "__matmul__": lambda self, other: ops.matmul(self, other),
    "__getitem__": lambda self, index: ops.getitem(self, index),
    "sum": lambda self, axis=None, keepdims=False: ops.sum(self, axis=axis, keepdims=keepdims),
    "mean": lambda self, axis=None, keepdims=False: ops.mean(self, axis=axis, keepdims=keepdims),
    "reshape": _reshape,
    "transpose": _transpose,
    "exp": lambda self: ops.exp(self),
    "log": lambda self: ops.log(self),
}


def install() -> None:
    """Attach the operators to Tensor (idempotent)."""
    for name, fn in _METHODS.items():
        setattr(Tensor, name, fn)
