"""A CuPy stand-in for tests: importable as `cupy` only with tests/standin on PYTHONPATH.

Backed by NumPy, strict where GPU code breaks without a GPU: device arrays are a type of
their own (no implicit host conversion, no mixing with NumPy arrays), a device count and a
memory limit, CUDA-aware MPI reported by default (mpi4py's Query_cuda_support answers from
CUPY_STANDIN_CUDA_AWARE), NCCL carried by MPI, and a stream-order check on every pointer that
leaves for MPI or NCCL (cupy._state). It cannot judge CUDA itself: kernels' speed, real
asynchrony, device memory, CUDA's own numerics.

Module functions not written here are NumPy's, applied to the arrays behind stand-in arrays;
a NumPy array among their arguments is a TypeError, as in CuPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cupy import _state, cuda, random  # noqa: F401
from cupy._array import _HOST_ERROR, call, ndarray, unwrap, wrap
from cupy._state import StreamOrderError  # noqa: F401
from cupy.cuda import get_default_memory_pool, get_default_pinned_memory_pool  # noqa: F401

__version__ = "13.99.0+standin"
standin = True


def _report_cuda_support() -> None:
    # The MPI library's answer to "CUDA-aware?" comes from the stand-in's setting.
    from mpi4py import MPI

    MPI.Query_cuda_support = lambda: _state.settings.cuda_aware  # type: ignore[attr-defined]


_report_cuda_support()


def set_cuda_aware(value: bool) -> None:
    _state.settings.cuda_aware = bool(value)


def array(obj: Any, dtype: Any = None, copy: bool = True, order: str = "K", ndmin: int = 0) -> ndarray:
    """A new device array from host data (a copy on the current stream) or a device array."""
    if isinstance(obj, ndarray):
        return wrap(np.array(obj._a, dtype=dtype, copy=True, order=order, ndmin=ndmin), []) if copy or (
            dtype is not None and np.dtype(dtype) != obj.dtype) else obj
    host = np.array(unwrap(obj) if isinstance(obj, (list, tuple)) and not _has_host(obj) else obj,
                    dtype=dtype, copy=True, order=order, ndmin=ndmin)
    return wrap(host, [])


def _has_host(obj: Any) -> bool:
    return any(isinstance(v, np.ndarray) for v in obj)


def asarray(a: Any, dtype: Any = None, order: Any = None) -> ndarray:
    if isinstance(a, ndarray) and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return array(a, dtype=dtype, copy=True, order=order or "K")


asanyarray = asarray


def ascontiguousarray(a: Any, dtype: Any = None) -> ndarray:
    if not isinstance(a, ndarray):
        raise TypeError(_HOST_ERROR if isinstance(a, np.ndarray) else f"unsupported type {type(a).__name__}")
    if a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return wrap(np.ascontiguousarray(a._a, dtype=dtype), [])


def asnumpy(a: Any, stream: Any = None, order: str = "C", out: Any = None, blocking: bool = True) -> np.ndarray:
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out, blocking=blocking)
    return np.asarray(a, order=order)


def get_array_module(*args: Any) -> Any:
    import sys

    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else np


def copyto(dst: ndarray, src: Any, casting: str = "same_kind", where: Any = True) -> None:
    if not isinstance(dst, ndarray):
        raise TypeError(f"copyto: destination must be a cupy.ndarray, got {type(dst).__name__}")
    np.copyto(dst._a, unwrap(src), casting=casting, where=unwrap(where))
    dst._buf.written()


def _creation(name: str) -> Any:
    fn = getattr(np, name)

    def create(*args: Any, **kwargs: Any) -> ndarray:
        return call(fn, args, kwargs)

    create.__name__ = name
    return create


for _name in ("empty", "zeros", "ones", "full", "arange", "linspace", "eye", "identity",
              "empty_like", "zeros_like", "ones_like", "full_like"):
    globals()[_name] = _creation(_name)


def __getattr__(name: str) -> Any:
    """NumPy's function `name` on stand-in arrays; NumPy's constants and types as they are."""
    value = getattr(np, name)
    if isinstance(value, (type, np.dtype, float, int)) or value is None:
        return value
    if callable(value):
        def function(*args: Any, **kwargs: Any) -> Any:
            return call(value, args, kwargs)

        function.__name__ = name
        return function
    return value
