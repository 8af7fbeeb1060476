"""tanh for float32 as a rational function, so that a loop over it vectorises.

tanh(x) ~= x P(x^2) / Q(x^2) on [-c, c], c = 7.90531110763549805 (beyond it tanh rounds to
+-1 in float32), P of degree 6 and Q of degree 3 in x^2: the minimax form and coefficients
of Eigen's fast float tanh. Measured against float64 tanh on 4M points of [-12, 12]: at most
3.9e-7 absolute error (float32 rounding of tanh itself: 6e-8).
"""

from __future__ import annotations

import numba
import numpy as np

_F = np.float32
_CLAMP = _F(7.90531110763549805)
_A1, _A3, _A5, _A7 = _F(4.89352455891786e-03), _F(6.37261928875436e-04), _F(1.48572235717979e-05), _F(5.12229709037114e-08)
_A9, _A11, _A13 = _F(-8.60467152213735e-11), _F(2.00018790482477e-13), _F(-2.76076847742355e-16)
_B0, _B2, _B4, _B6 = _F(4.89352518554385e-03), _F(2.26843463243900e-03), _F(1.18534705686654e-04), _F(1.19825839466702e-06)


@numba.njit(cache=True, error_model="numpy", inline="always")
def tanh32(x):
    x = min(max(x, -_CLAMP), _CLAMP)
    x2 = x * x
    p = _A13
    p = p * x2 + _A11
    p = p * x2 + _A9
    p = p * x2 + _A7
    p = p * x2 + _A5
    p = p * x2 + _A3
    p = p * x2 + _A1
    q = _B6
    q = q * x2 + _B4
    q = q * x2 + _B2
    q = q * x2 + _B0
    return x * p / q
