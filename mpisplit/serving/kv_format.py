"""How the paged KV cache stores keys and values: in the model's dtype, or in 16 bits.

`--kv-cache-dtype float16|bfloat16` halves a float32 model's KV bytes per token (so twice the
tokens fit in the same memory). The pool then holds the 16-bit bit patterns as uint16 (NumPy
has no bfloat16, and numba no 16-bit float on the CPU): a key or value is rounded to the nearest
16-bit float when written (ties to even; NaN stays NaN), and widened exactly when read (the
attention kernel widens each element to float64 as it does float32 ones; the other paths
decode a sequence's blocks to the model's dtype). float16 keeps 10 bits of mantissa in a range
of +-65504 (keys and values of the usual models are well inside it), bfloat16 keeps 7 bits in
float32's range.

    fmt = kv_format("float16", model.dtype)
    pool[...] = fmt.encode(k)          # float32 -> uint16 bit patterns
    fmt.decode(pool[...], np.float32)  # -> float32, exactly the rounded values
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mpisplit.runtime.backend import get_array_module

# The attention kernel's names for the formats (kernels/paged_attention.py widen()).
FLOAT, FLOAT16, BFLOAT16 = 0, 1, 2
CHOICES = ("float16", "bfloat16")


@dataclass(frozen=True)
class KVFormat:
    name: str  # the model's dtype name, or float16 / bfloat16
    code: int  # FLOAT, FLOAT16 or BFLOAT16
    storage: np.dtype  # what the pool's arrays hold

    @property
    def packed(self) -> bool:
        return self.code != FLOAT

    def encode(self, x: Any) -> Any:
        """Floats -> what the pool stores (the 16-bit patterns of x rounded to nearest, ties to even)."""
        if self.code == FLOAT:
            return x
        xp = get_array_module(x)
        if self.code == FLOAT16:
            with np.errstate(over="ignore"):  # past +-65504 a value rounds to infinity, as it should
                return x.astype(xp.float16).view(xp.uint16)
        u = xp.ascontiguousarray(x, dtype=xp.float32).view(xp.uint32)
        rounded = (u + (xp.uint32(0x7FFF) + ((u >> 16) & xp.uint32(1)))) >> 16
        quiet = (u >> 16) | xp.uint32(0x40)  # a NaN keeps its sign and stays a NaN
        return xp.where(xp.isnan(x), quiet, rounded).astype(xp.uint16)

    def decode(self, a: Any, dtype: Any) -> Any:
        """What the pool stores -> floats of `dtype` (exact: every 16-bit value is a float32)."""
        if self.code == FLOAT:
            return a
        xp = get_array_module(a)
        if self.code == FLOAT16:
            return a.view(xp.float16).astype(dtype)
        return (a.astype(xp.uint32) << 16).view(xp.float32).astype(dtype, copy=False)


def kv_format(name: str | None, model_dtype: Any) -> KVFormat:
    """The format of `--kv-cache-dtype name` (None: the model's dtype) for a model of `model_dtype`."""
    dtype = np.dtype(model_dtype)
    if name is None or name == dtype.name:
        return KVFormat(dtype.name, FLOAT, dtype)
    if name not in CHOICES:
        raise ValueError(f"--kv-cache-dtype must be one of {', '.join(CHOICES)}, got {name!r}")
    if dtype != np.float32:
        raise ValueError(f"--kv-cache-dtype {name} stores a float32 model's keys and values in 16 bits; "
                         f"this model computes in {dtype.name} (serve with --dtype float32)")
    return KVFormat(name, FLOAT16 if name == "float16" else BFLOAT16, np.dtype(np.uint16))
