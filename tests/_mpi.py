"""Helpers for tests that run under MPI at any world size."""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from mpisplit.parallel.grid import ProcessGrid


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def grids():
    """One ProcessGrid per TP degree that divides the world size (dp = world / tp)."""
    for tp in divisors(MPI.COMM_WORLD.Get_size()):
        grid = ProcessGrid(tp=tp)
        try:
            yield grid
        finally:
            grid.free()


def gather_slab(param, comm) -> np.ndarray:
    """The full logical array of a Parameter, gathered over its TP communicator."""
    local = np.asarray(param.data).reshape(param.view_shape)
    if param.split_axis is None or comm.size == 1:
        full = local
    else:
        full = np.asarray(comm.mpi.allgather(local))  # small test arrays: pickled gather is fine
        full = np.concatenate(list(full), axis=param.split_axis)
    index = tuple(slice(0, n) for n in param.global_shape)
    return full[index]


def gather_grad(param, comm) -> np.ndarray:
    local = np.asarray(param.grad).reshape(param.view_shape)
    if param.split_axis is None or comm.size == 1:
        full = local
    else:
        full = np.concatenate(comm.mpi.allgather(local), axis=param.split_axis)
    return full[tuple(slice(0, n) for n in param.global_shape)]


def max_rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max(initial=0.0) / max(np.abs(b).max(initial=0.0), 1e-300))


def all_ranks_equal(comm, value) -> bool:
    values = comm.mpi.allgather(value)
    return all(np.array_equal(v, values[0]) for v in values)
