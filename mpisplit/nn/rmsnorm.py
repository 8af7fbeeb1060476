"""RMSNorm over the last axis (Llama): a weight, no bias, replicated on every TP rank."""

from __future__ import annotations

from typing import Any

import numpy as np

from mpisplit.autograd import Tensor, ops
from mpisplit.nn.linear import _check_input, _check_positive
from mpisplit.nn.module import Module, Parameter
from mpisplit.runtime.backend import resolve_dtype


class RMSNorm(Module):
    """x / sqrt(mean(x^2) + eps) * weight; statistics in float32 or wider."""

    def __init__(self, features: int, *, eps: float = 1e-6, dtype: Any = "float32") -> None:
        _check_positive(features=features)
        self.features, self.eps = features, eps
        self.dtype = resolve_dtype(dtype)
        self.weight = Parameter(np.ones((features,), dtype=self.dtype), init=("ones",))

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.features, self.dtype, "RMSNorm")
        return ops.rms_norm(x, self.weight, eps=self.eps)
