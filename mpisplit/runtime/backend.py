"""Array backend: NumPy or CuPy, host copies, dtypes, BLAS threads per rank.

CuPy is never imported here unless a CuPy array is already in hand, so a machine without CuPy
(or without a GPU) never touches it.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Any

import numpy as np

# Model dtypes the library computes in.
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

BLAS_THREADS_ENV = "MPISPLIT_BLAS_THREADS"

# The live threadpoolctl limiter: threadpool_limits applies the limit when it is created;
# keeping a reference keeps it (and lets a later call replace it).
_blas_limiter: Any = None


def is_cupy_array(x: Any) -> bool:
    """True for a CuPy ndarray, decided by the type's module so that CuPy is never imported."""
    # hasattr on the type: reading the instance attribute hands out a device pointer
    return type(x).__module__.split(".", 1)[0] == "cupy" and hasattr(type(x), "__cuda_array_interface__")


def _unwrap(x: Any) -> Any:
    # A Tensor (or anything that is not an array but carries one in .data) -> its array.
    # numpy arrays also have a .data attribute (a memoryview), hence the explicit checks.
    if isinstance(x, (np.ndarray, np.generic)) or is_cupy_array(x):
        return x
    data = getattr(x, "data", None)
    if data is not None and (isinstance(data, np.ndarray) or is_cupy_array(data)):
        return data
    return x


def get_array_module(*arrays: Any) -> ModuleType:
    """The array namespace (numpy or cupy) of the arrays; Python scalars and None are ignored.

    Tensors are looked through to their `.data`. Mixing NumPy and CuPy arrays is a TypeError.
    With no array argument the answer is numpy.
    """
    if all(type(x) is np.ndarray for x in arrays):  # the common case, decided at once
        return np
    numpy_types: list[str] = []
    cupy_types: list[str] = []
    for x in arrays:
        a = _unwrap(x)
        if is_cupy_array(a):
            cupy_types.append(f"{type(a).__module__}.{type(a).__qualname__}")
        elif isinstance(a, (np.ndarray, np.generic)):
            numpy_types.append(f"numpy.{type(a).__qualname__}")
    if numpy_types and cupy_types:
        raise TypeError(
            "cannot mix NumPy and CuPy arrays: got "
            f"{sorted(set(numpy_types))} and {sorted(set(cupy_types))}"
        )
    if cupy_types:
        # Already imported: a CuPy array exists.
        return sys.modules.get("cupy") or importlib.import_module("cupy")
    return np


def to_numpy(x: Any) -> np.ndarray:
    """A host NumPy array of `x` (NumPy array, CuPy array, Tensor-like with `.data`, scalar).

    NumPy input is returned as is (no copy); CuPy input is copied to the host.
    """
    if isinstance(x, np.ndarray):
        return x
    if is_cupy_array(x):
        return x.get()
    a = _unwrap(x)
    if a is not x:
        return to_numpy(a)
    return np.asarray(x)


def resolve_dtype(name_or_dtype: Any) -> np.dtype:
    """np.dtype for "float32"/"float64" or an equivalent NumPy dtype or type; ValueError else."""
    try:
        dtype = np.dtype(name_or_dtype)
    except TypeError:
        dtype = None
    if dtype is None or name_or_dtype is None or dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"unsupported dtype {name_or_dtype!r}; expected one of "
            f"{[d.name for d in SUPPORTED_DTYPES]}"
        )
    return dtype


def is_low_precision(dtype: Any) -> bool:
    """True for 16-bit floats (float16, bfloat16): compute dtypes whose reductions run in float32."""
    dtype = np.dtype(dtype)
    return dtype.itemsize == 2 and dtype.name in ("float16", "bfloat16")  # .name is slow: sizes first


def scatter_add(target: Any, index: Any, values: Any) -> None:
    """target[index] += values with repeated indices accumulated (numpy.add.at semantics).

    NumPy: rows of a 2-D table through the fused kernel when it applies (the same sums in the same
    order), else np.add.at. CuPy: cupyx.scatter_add (atomic adds); a 16-bit target accumulates
    in a float32 copy, since atomic adds of float16 round at every addition.
    """
    if isinstance(target, np.ndarray):
        from mpisplit import kernels

        if kernels.applies(target, values) and isinstance(index, np.ndarray):
            from mpisplit.kernels import scatter

            if scatter.applies(target, index, values):
                scatter.scatter_add_rows(target, index, values)
                return
        np.add.at(target, index, values)
        return
    import cupyx

    if is_low_precision(target.dtype):
        wide = target.astype(np.float32)
        cupyx.scatter_add(wide, index, values.astype(np.float32))
        target[...] = wide.astype(target.dtype)
        return
    cupyx.scatter_add(target, index, values)


def _mpi_comm(comm: Any) -> Any:
    # A Communicator wraps its mpi4py communicator in `.mpi`.
    return getattr(comm, "mpi", comm)


def local_rank_and_size(mpi_comm: Any) -> tuple[int, int]:
    """(rank among the ranks of `mpi_comm` on this node, number of them). Collective."""
    from mpi4py import MPI

    comm = _mpi_comm(mpi_comm)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return node.Get_rank(), node.Get_size()
    finally:
        node.Free()


def _usable_cores() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def _parse_threads(value: Any, source: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, (bool, float)) or n < 1:
        raise ValueError(f"{source} must be a positive integer, got {value!r}")
    return n


def limit_blas_threads(comm: Any = None, threads: int | None = None) -> int:
    """Limit the BLAS thread pools of this process, and numba's (the fused and block kernels),
    so that ranks do not oversubscribe cores.

    threads = the argument, else the environment variable MPISPLIT_BLAS_THREADS, else
    max(1, cores // k): cores = this process's CPU affinity set, k = the number of ranks of
    `comm` (default COMM_WORLD) on this node whose affinity sets overlap it. Without binding
    every rank sees all cores, so k = ranks on the node; with one core set per rank, k = 1.
    Collective over `comm` only in the last case. Returns the thread count applied.
    """
    from threadpoolctl import threadpool_limits

    global _blas_limiter
    if threads is not None:
        n = _parse_threads(threads, "threads")
    elif os.environ.get(BLAS_THREADS_ENV, "").strip():
        n = _parse_threads(os.environ[BLAS_THREADS_ENV].strip(), BLAS_THREADS_ENV)
    else:
        n = _threads_per_rank(comm)
    _blas_limiter = threadpool_limits(limits=n, user_api="blas")
    _limit_numba(n)
    return n


def _limit_numba(n: int) -> None:
    """numba's parallel kernels use at most n threads (and never more than it started with)."""
    try:
        import numba
    except ImportError:
        return
    numba.set_num_threads(max(1, min(n, getattr(numba.config, "NUMBA_NUM_THREADS", n))))


def _threads_per_rank(comm: Any) -> int:
    mine = _usable_cores()
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    comm = _mpi_comm(comm)
    if comm.Get_size() == 1:
        return max(1, len(mine))
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        # Small metadata: lowercase (pickling) allgather is fine.
        sets = node.allgather(sorted(mine))
    finally:
        node.Free()
    sharing = sum(1 for s in sets if mine.intersection(s))
    return max(1, len(mine) // sharing)
