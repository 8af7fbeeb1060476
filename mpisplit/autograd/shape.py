"""Shape primitives: reshape, transpose, indexing, concatenation and split, and the embedding lookup."""

from __future__ import annotations

import builtins
from typing import Any

import numpy as np

from mpisplit.autograd.tensor import Function, Tensor, grad_target, pending_grad
from mpisplit.runtime.backend import get_array_module, scatter_add


class Reshape(Function):
    def forward(self, a: Any, shape: tuple[int, ...] = ()) -> Any:
        self.shape = a.shape
        return a.reshape(shape)

    def backward(self, g: Any) -> Any:
        return g.reshape(self.shape)


class Transpose(Function):
    def forward(self, a: Any, axes: Any = None) -> Any:
        self.axes = tuple(range(a.ndim))[::-1] if axes is None else tuple(ax % a.ndim for ax in axes)
        return a.transpose(self.axes)

    def backward(self, g: Any) -> Any:
        return g.transpose(np.argsort(self.axes))


def _is_basic_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in items)


class GetItem(Function):
    def forward(self, a: Any, index: Any = None) -> Any:
        self.shape, self.index, self.dtype = a.shape, index, a.dtype
        return a[index]

    def backward(self, g: Any) -> Any:
        xp = get_array_module(g)
        out = xp.zeros(self.shape, dtype=self.dtype)
        if _is_basic_index(self.index):
            out[self.index] = g
        else:  # advanced indexing may repeat positions: accumulate
            scatter_add(out, self.index, g)
        return out


class Concat(Function):
    def forward(self, *arrays: Any, axis: int = 0) -> Any:
        xp = get_array_module(*arrays)
        self.axis = axis % arrays[0].ndim
        self.sizes = [a.shape[self.axis] for a in arrays]
        return xp.concatenate(arrays, axis=self.axis)

    def backward(self, g: Any) -> tuple[Any, ...]:
        bounds = np.cumsum(self.sizes)[:-1]
        xp = get_array_module(g)
        return tuple(xp.split(g, bounds, axis=self.axis))


class Embedding(Function):
    """weight[ids] for a table (V, h) and integer ids of any shape."""

    def forward(self, weight: Any, ids: Any = None) -> Any:
        self.ids = ids
        self.wshape, self.dtype = weight.shape, weight.dtype
        return weight[ids]

    def backward(self, g: Any) -> Any:
        xp = get_array_module(g)
        rows = g.reshape(-1, self.wshape[-1])
        acc = pending_grad(self.inputs[0], self.dtype, xp)  # a tied head's, say: add the rows into it
        if acc is not None:
            scatter_add(acc, self.ids.reshape(-1), rows)
            return None
        gw = grad_target(self.inputs[0], self.wshape, self.dtype, xp)
        gw[...] = 0
        scatter_add(gw, self.ids.reshape(-1), rows)
        return gw


def reshape(a: Tensor, shape: tuple[int, ...]) -> Tensor:
    return Reshape.apply(a, shape=tuple(shape))


def transpose(a: Tensor, axes: Any = None) -> Tensor:
    return Transpose.apply(a, axes=axes)


def getitem(a: Tensor, index: Any) -> Tensor:
    if isinstance(index, Tensor):
        index = index.data
    return GetItem.apply(a, index=index)


def concat(tensors: list[Tensor], axis: int = 0) -> Tensor:
    if not tensors:
        raise ValueError("concat needs at least one tensor")
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise TypeError(f"concat: mixed dtypes {sorted(str(d) for d in dtypes)}")
    return Concat.apply(*tensors, axis=axis)


def split(a: Tensor, sections: int | list[int], axis: int = -1) -> list[Tensor]:
    """Split into equal `sections` (an int that divides the axis) or pieces of the given sizes."""
    n = a.shape[axis]
    if isinstance(sections, int):
        if sections <= 0 or n % sections:
            raise ValueError(f"split: axis of length {n} cannot be split into {sections} equal parts")
        sizes = [n // sections] * sections
    else:
        sizes = list(sections)
        if builtins.sum(sizes) != n:
            raise ValueError(f"split: sizes {sizes} do not add up to the axis length {n}")
    out, start = [], 0
    ax = axis % a.ndim
    for s in sizes:
        index = (slice(None),) * ax + (slice(start, start + s),)
        out.append(getitem(a, index))
        start += s
    return out


def embedding(weight: Tensor, ids: Any) -> Tensor:
    """Rows of `weight` (V, h) selected by integer `ids` (any shape) -> (*ids.shape, h)."""
    ids = ids.data if isinstance(ids, Tensor) else ids
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding ids must be integers, got dtype {ids.dtype}")
    return Embedding.apply(weight, ids=ids)
