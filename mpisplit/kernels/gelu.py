"""GELU (tanh approximation) forward and backward in one pass each.

gelu(x) = 0.5 x (1 + tanh(u)), u = c (x + 0.044715 x^3), c = sqrt(2/pi);
gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2), t = tanh(u).
Only x is kept for backward; t is recomputed there.

float32 uses `tanh32` (mpisplit.kernels.tanh32, pure arithmetic that the compiler vectorises,
within 4e-7 of tanh); float64 calls the C library's tanh.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from mpisplit.kernels.tanh32 import tanh32

_C = math.sqrt(2.0 / math.pi)
_A = 0.044715
_C32, _A32, _A3_32 = np.float32(_C), np.float32(_A), np.float32(3.0 * _A)
_HALF, _ONE = np.float32(0.5), np.float32(1.0)


@numba.njit(cache=True, error_model="numpy")
def gelu_forward_f32(x, out):
    xf, of = x.reshape(-1), out.reshape(-1)
    for i in range(xf.size):
        v = xf[i]
        t = tanh32(_C32 * (v + _A32 * v * v * v))
        of[i] = _HALF * v * (_ONE + t)


@numba.njit(cache=True, error_model="numpy")
def gelu_backward_f32(x, g, out):
    xf, gf, of = x.reshape(-1), g.reshape(-1), out.reshape(-1)
    for i in range(xf.size):
        v = xf[i]
        v2 = v * v
        t = tanh32(_C32 * (v + _A32 * v2 * v))
        d = _HALF * (_ONE + t) + _HALF * v * (_ONE - t * t) * _C32 * (_ONE + _A3_32 * v2)
        of[i] = gf[i] * d


@numba.njit(cache=True, error_model="numpy")
def gelu_forward_f64(x, out):
    xf, of = x.reshape(-1), out.reshape(-1)
    for i in range(xf.size):
        v = xf[i]
        of[i] = 0.5 * v * (1.0 + math.tanh(_C * (v + _A * v * v * v)))


@numba.njit(cache=True, error_model="numpy")
def gelu_backward_f64(x, g, out):
    xf, gf, of = x.reshape(-1), g.reshape(-1), out.reshape(-1)
    for i in range(xf.size):
        v = xf[i]
        v2 = v * v
        t = math.tanh(_C * (v + _A * v2 * v))
        of[i] = gf[i] * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * _C * (1.0 + 3.0 * _A * v2))


def gelu_forward(x, out):
    """out = gelu(x) for C-contiguous arrays of any shape (compiled once, for 1-D views)."""
    (gelu_forward_f32 if x.dtype == np.float32 else gelu_forward_f64)(x.reshape(-1), out.reshape(-1))


def gelu_backward(x, g, out):
    """out = g * gelu'(x), C-contiguous arrays of any shape."""
    (gelu_backward_f32 if x.dtype == np.float32 else gelu_backward_f64)(x.reshape(-1), g.reshape(-1),
                                                                        out.reshape(-1))
