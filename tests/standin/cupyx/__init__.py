"""cupyx of the stand-in: scatter_add and pinned host memory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from cupy import _state
from cupy._array import ndarray, unwrap
from cupy._state import DeviceSynchronized  # noqa: F401
from cupy.cuda.pinned import empty_pinned, zeros_pinned  # noqa: F401


def scatter_add(a: ndarray, slices: Any, value: Any) -> None:
    if not isinstance(a, ndarray):
        raise TypeError(f"scatter_add: a must be a cupy.ndarray, got {type(a).__name__}")
    np.add.at(a._a, unwrap(slices, index=True), unwrap(value))
    a._buf.written()


@contextlib.contextmanager
def allow_synchronize(allow: bool) -> Iterator[None]:
    """Inside, with allow=False, any host synchronisation raises DeviceSynchronized."""
    before = _state.settings.allow_sync
    _state.settings.allow_sync = bool(allow)
    try:
        yield
    finally:
        _state.settings.allow_sync = before
