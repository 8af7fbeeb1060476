"""Pinned host memory: NumPy arrays that remember the asynchronous copies still reading them.

Freeing such a buffer, or writing it from the host, while a copy that reads it is queued and
not synchronised is a stream-order violation (real pinned memory would be read after reuse).
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from cupy import _state


class _Pinned:
    def __init__(self) -> None:
        self.stream: _state.StreamState | None = None
        self.seq = 0

    def pending(self) -> bool:
        return self.stream is not None and self.stream.done < self.seq


_pinned: dict[int, _Pinned] = {}


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _freed(key: int, record: _Pinned) -> None:
    _pinned.pop(key, None)
    if record.pending():
        _state.defer(
            f"pinned host buffer freed at {_state.caller()} while a copy queued as work #{record.seq} on "
            f"{record.stream} still reads it"
        )


def empty_pinned(shape: Any, dtype: Any = float, order: str = "C") -> np.ndarray:
    a = np.empty(shape, dtype=dtype, order=order)
    record = _Pinned()
    _pinned[id(a)] = record
    weakref.finalize(a, _freed, id(a), record)
    return a


def zeros_pinned(shape: Any, dtype: Any = float, order: str = "C") -> np.ndarray:
    a = empty_pinned(shape, dtype, order)
    a[...] = 0
    return a


def reading(host: np.ndarray, stream: _state.StreamState, seq: int) -> None:
    """An asynchronous copy (work `seq` on `stream`) reads `host`."""
    record = _pinned.get(id(_root(host)))
    if record is not None:
        record.stream, record.seq = stream, seq


def check_host_write(host: Any, what: str) -> None:
    if not isinstance(host, np.ndarray):
        return
    record = _pinned.get(id(_root(host)))
    if record is not None and record.pending():
        raise _state.violation(
            f"{what} at {_state.caller()} writes a pinned host buffer that a copy queued as work "
            f"#{record.seq} on {record.stream} still reads"
        )
