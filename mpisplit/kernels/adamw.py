"""AdamW in one pass over parameter, gradient and both moments, in the parameters' dtype.

The same operations in the same order and precision as the NumPy path of
mpisplit.training.optim.AdamW (every constant cast to the dtype first), so both give bitwise
the same result: m += (1 - b1)(g - m); v = b2 v + (1 - b2) g^2; p *= decay;
p -= step_size * m / (sqrt(v) * (1 / root_bias) + eps).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, error_model="numpy")
def adamw_update(p, g, m, v, one_minus_b1, b2, one_minus_b2, decay, apply_decay, inv_root_bias, eps,
                 step_size):
    pf, gf, mf, vf = p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1)
    for i in range(pf.size):
        gi = gf[i]
        mi = mf[i] + (gi - mf[i]) * one_minus_b1
        vi = vf[i] * b2 + gi * gi * one_minus_b2
        mf[i], vf[i] = mi, vi
        pi = pf[i] * decay if apply_decay else pf[i]
        pf[i] = pi - mi / (np.sqrt(vi) * inv_root_bias + eps) * step_size
