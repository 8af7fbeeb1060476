"""silu(gate) * up, the Llama MLP's gate, in one pass: out = (g * s) * u, s = sigmoid(g).

s = 1 / (1 + exp(-g)) written without overflow, as autograd/elementwise.py's NumPy form:
e = exp(-|g|), s = (1 if g >= 0 else e) / (1 + e), in g's dtype. `s` is written too (backward
keeps it). exp is the C library's (numba), NumPy's vectorised exp can differ from it in the last
bit: every CPU float32/float64 product of the model takes this kernel, training and serving alike.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, error_model="numpy")
def swiglu_forward(gate, up, out, sig):
    """gate, up (rows, F), any strides (the halves of a fused product); out, sig (rows, F)."""
    one = gate.dtype.type(1.0)
    for r in range(gate.shape[0]):
        for i in range(gate.shape[1]):
            v = gate[r, i]
            e = np.exp(-abs(v))
            si = (one if v >= 0 else e) / (e + one)
            sig[r, i] = si
            out[r, i] = (v * si) * up[r, i]
