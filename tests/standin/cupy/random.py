"""cupy.random of the stand-in: RandomState draws with NumPy's Philox (not cuRAND's bits)."""

from __future__ import annotations

from typing import Any

import numpy as np

from cupy._array import wrap


class RandomState:
    def __init__(self, seed: int | None = None, method: int = 100) -> None:
        self.method = method
        self.seed(seed)

    def seed(self, seed: int | None = None) -> None:
        self._gen = np.random.Generator(np.random.Philox(seed))

    def random_sample(self, size: Any = None, dtype: Any = float) -> Any:
        return wrap(self._gen.random(size, dtype=dtype), [])

    def standard_normal(self, size: Any = None, dtype: Any = float) -> Any:
        return wrap(self._gen.standard_normal(size, dtype=dtype), [])

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: Any = None, dtype: Any = float) -> Any:
        return wrap((self._gen.normal(loc, scale, size)).astype(dtype), [])

    def uniform(self, low: float = 0.0, high: float = 1.0, size: Any = None, dtype: Any = float) -> Any:
        return wrap(self._gen.uniform(low, high, size).astype(dtype), [])


_default = RandomState()


def seed(value: int | None = None) -> None:
    _default.seed(value)


def random(size: Any = None, dtype: Any = float) -> Any:
    return _default.random_sample(size, dtype)


def standard_normal(size: Any = None, dtype: Any = float) -> Any:
    return _default.standard_normal(size, dtype)
