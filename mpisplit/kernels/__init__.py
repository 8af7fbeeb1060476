"""Fused CPU kernels for the work around the matmuls, compiled with numba when it is installed.

Each kernel does in one pass over memory what the NumPy path does in several: GELU (forward
and backward), LayerNorm (forward and backward), the causal softmax of attention (forward and
backward), the rows of the cross-entropy, AdamW over its four arrays, and the embedding's
gradient rows (np.add.at's result, bit for bit, at memory speed); for serving, attention over
the paged KV cache, each query row by itself (paged_attention.py). The NumPy code in the
autograd Functions stays the reference and the fallback: it runs on GPUs, for 16-bit dtypes,
on machines without numba, and everywhere when `MPISPLIT_KERNELS=numpy`.

Compiled kernels are cached on disk (numba's `cache=True`), so only the first run on a machine
pays the compilation.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

_MODES = ("auto", "numba", "numpy")


def _mode() -> str:
    mode = os.environ.get("MPISPLIT_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"MPISPLIT_KERNELS must be one of {', '.join(_MODES)}, got {mode!r}")
    return mode


def _numba_importable() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


_ENABLED: bool | None = None


def enabled() -> bool:
    """Whether the fused kernels are in use (decided once per process)."""
    global _ENABLED
    if _ENABLED is None:
        mode = _mode()
        have = _numba_importable()
        if mode == "numba" and not have:
            raise ImportError("MPISPLIT_KERNELS=numba but numba is not installed: pip install numba")
        _ENABLED = have and mode != "numpy"
    return _ENABLED


def set_enabled(value: bool | None) -> None:
    """Force the kernels on or off in this process (None: decide again from the environment)."""
    global _ENABLED
    if value and not _numba_importable():
        raise ImportError("the fused kernels need numba: pip install numba")
    _ENABLED = value


def backend_name() -> str:
    return "numba" if enabled() else "numpy"


def applies(*arrays: Any, contiguous: bool = True) -> bool:
    """True when the fused kernels take these arrays: NumPy, float32 or float64, C-contiguous
    (or, `contiguous` False, in any layout: the views of a fused product)."""
    if not enabled():
        return False
    first = arrays[0]
    for a in arrays:
        if not isinstance(a, np.ndarray) or (contiguous and not a.flags.c_contiguous) or a.dtype != first.dtype:
            return False
    return first.dtype in (np.float32, np.float64)


def warm_up(dtype: Any = np.float32) -> None:
    """Compile (or load from numba's cache) every kernel for `dtype` now, on tiny arrays, so
    that neither the first step's time nor a memory baseline taken after this includes it."""
    if not enabled():
        return
    from mpisplit.kernels import (
        adamw,
        cross_entropy,
        gelu,
        layernorm,
        paged_attention,
        rmsnorm,
        rope,
        scatter,
        softmax,
        swiglu,
    )

    f = np.dtype(dtype).type
    x = np.ones((2, 4), dtype=dtype)
    out, g = np.empty_like(x), np.ones_like(x)
    gelu.gelu_forward(x, out)
    gelu.gelu_backward(x, g, out)
    mean, rstd, gw, gb = np.empty(2), np.empty(2), np.zeros(4), np.zeros(4)
    layernorm.layernorm_forward(x, x[0], x[0], 1e-5, out, mean, rstd)
    layernorm.layernorm_backward(x, x[0], mean, rstd, g, out, gw, gb)
    layernorm.layernorm_backward(x, x[0], mean, rstd, g, None, gw, gb)
    rmsnorm.rmsnorm_forward(x, x[0], 1e-5, out, g.copy(), mean)
    wide = np.ones((2, 8), dtype=dtype)
    for gate in (x, wide[:, :4]):  # contiguous, and a view of a fused product
        swiglu.swiglu_forward(gate, gate, out, out.copy())
    for r in (wide.reshape(1, 2, 1, 8), wide.reshape(1, 2, 2, 4)[:, :, :, :2]):
        rope.rope_rows(r, x[:, :r.shape[3]], x[:, :r.shape[3]], np.empty(r.shape, dtype=dtype))
    s = np.ones((1, 1, 2, 2), dtype=dtype)
    softmax.causal_softmax_forward(s, 1.0)
    softmax.causal_softmax_backward(s, s.copy(), 1.0)
    softmax.packed_softmax_forward(s, 1.0, np.zeros((1, 2), np.int64))
    m, sums = np.empty(2, dtype=dtype), np.empty(2)
    cross_entropy.row_max(x, 4, m)
    cross_entropy.exp_rows(x, 4, m, out, sums)
    cross_entropy.softmax_grad_rows(out, sums.astype(dtype), np.zeros(2, np.int64), np.ones(2, bool), np.ones(2))
    scatter.scatter_add_rows(out, np.array([1, 1, 0]), np.ones((3, 4), dtype=dtype))
    scatter.scatter_add_rows(out, np.array([1, 1, 0], np.int32), np.ones((3, 4), dtype=dtype))
    q, pool = np.ones((1, 2, 2), dtype=dtype), np.ones((1, 1, 2, 2), dtype=dtype)
    for fmt, kv in ((0, pool), (1, pool.astype(np.uint16)), (2, pool.astype(np.uint16))):
        paged_attention.paged_attention(q, kv, kv, np.zeros((1, 1), np.int64), np.zeros(1, np.int64),
                                        np.ones(1, np.int64), np.empty_like(q), fmt)
    p, g, out = x.reshape(-1).copy(), g.reshape(-1), out.reshape(-1)  # AdamW runs on flat views
    adamw.adamw_update(p, g, out, np.ones_like(p), f(0.1), f(0.9), f(0.1), f(1.0), False, f(1.0), f(1e-8), f(1e-3))
