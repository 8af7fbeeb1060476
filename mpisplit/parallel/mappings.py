"""Differentiable collectives: the operators that join split layers.

Three tiers: the raw collectives live on `Communicator`; each pair of
(forward, backward) collectives below is one `Function`; the public wrappers at
the bottom say the pair in one line and return their input at once when the
group has one rank (no Function, no copy, nothing counted).
"""

from __future__ import annotations

from typing import Any

from mpisplit.autograd import ops
from mpisplit.autograd.tensor import Function, Tensor
from mpisplit.runtime.backend import get_array_module


def _chunk(x: Any, comm: Any, axis: int) -> Any:
    """This rank's equal block of `x` along `axis` (a view)."""
    n = x.shape[axis] // comm.size
    index = [slice(None)] * x.ndim
    index[axis] = slice(comm.rank * n, (comm.rank + 1) * n)
    return x[tuple(index)]


class _CopyToTP(Function):
    def forward(self, x: Any, comm: Any = None) -> Any:
        self.comm = comm
        return x

    def backward(self, g: Any) -> Any:
        return self.comm.allreduce(g)


class _ReduceFromTP(Function):
    def forward(self, x: Any, comm: Any = None) -> Any:
        return comm.allreduce(x)

    def backward(self, g: Any) -> Any:
        return g


class _GatherFromTP(Function):
    def forward(self, x: Any, comm: Any = None, axis: int = -1) -> Any:
        self.comm, self.axis = comm, axis % x.ndim
        return comm.allgather(x, axis=self.axis)

    def backward(self, g: Any) -> Any:
        return _chunk(g, self.comm, self.axis)


class _ScatterToTP(Function):
    def forward(self, x: Any, comm: Any = None, axis: int = -1) -> Any:
        self.comm, self.axis = comm, axis % x.ndim
        return _chunk(x, comm, self.axis)

    def backward(self, g: Any) -> Any:
        return self.comm.allgather(g, axis=self.axis)


class _ReduceScatterToSP(Function):
    def forward(self, x: Any, comm: Any = None, axis: int = 0) -> Any:
        self.comm, self.axis = comm, axis % x.ndim
        return comm.reduce_scatter(x, axis=self.axis)

    def backward(self, g: Any) -> Any:
        return self.comm.allgather(g, axis=self.axis)


class _AllGatherFromSP(Function):
    def forward(self, x: Any, comm: Any = None, axis: int = 0) -> Any:
        self.comm, self.axis = comm, axis % x.ndim
        return comm.allgather(x, axis=self.axis)

    def backward(self, g: Any) -> Any:
        return self.comm.reduce_scatter(g, axis=self.axis)


def _check_divisible(x: Tensor, comm: Any, axis: int, what: str) -> None:
    n = x.shape[axis]
    if n % comm.size:
        raise ValueError(f"{what}: axis {axis} of shape {x.shape} (length {n}) is not divisible by {comm.size} ranks")


def copy_to_tp(x: Tensor, comm: Any) -> Tensor:
    """f operator. forward: identity; backward: all-reduce."""
    return x if comm.size == 1 else _CopyToTP.apply(x, comm=comm)


def reduce_from_tp(x: Tensor, comm: Any) -> Tensor:
    """g operator. forward: all-reduce; backward: identity."""
    return x if comm.size == 1 else _ReduceFromTP.apply(x, comm=comm)


def gather_from_tp(x: Tensor, comm: Any, axis: int = -1) -> Tensor:
    """forward: all-gather along `axis` (the last by default); backward: keep this rank's block."""
    return x if comm.size == 1 else _GatherFromTP.apply(x, comm=comm, axis=axis)


def scatter_to_tp(x: Tensor, comm: Any, axis: int = -1) -> Tensor:
    """forward: keep this rank's block along `axis`; backward: all-gather."""
    if comm.size == 1:
        return x
    _check_divisible(x, comm, axis, "scatter_to_tp")
    return _ScatterToTP.apply(x, comm=comm, axis=axis)


def reduce_scatter_to_sp(x: Tensor, comm: Any, axis: int = 0) -> Tensor:
    """Sequence parallel exit. forward: reduce-scatter along `axis`; backward: all-gather."""
    if comm.size == 1:
        return x
    _check_divisible(x, comm, axis, "reduce_scatter_to_sp")
    return _ReduceScatterToSP.apply(x, comm=comm, axis=axis)


def all_gather_from_sp(x: Tensor, comm: Any, axis: int = 0) -> Tensor:
    """Sequence parallel entry. forward: all-gather along `axis`; backward: reduce-scatter."""
    return x if comm.size == 1 else _AllGatherFromSP.apply(x, comm=comm, axis=axis)


def pad_last(x: Tensor, size: int) -> Tensor:
    """Zero-pad the last axis of x up to `size` (differentiable; identity when already that size)."""
    n = x.shape[-1]
    if n == size:
        return x
    xp = get_array_module(x.data)
    zeros = Tensor(xp.zeros((*x.shape[:-1], size - n), dtype=x.dtype))
    return ops.concat([x, zeros], axis=-1)
