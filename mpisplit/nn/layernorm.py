"""LayerNorm over the last axis (replicated weights: every TP rank holds all of them)."""

from __future__ import annotations

from typing import Any

import numpy as np

from mpisplit.autograd import Tensor, ops
from mpisplit.nn.linear import _check_input, _check_positive, _zeros
from mpisplit.nn.module import Module, Parameter
from mpisplit.runtime.backend import resolve_dtype


class LayerNorm(Module):
    """Layer normalisation over the last axis; weight and bias replicated on every rank."""

    def __init__(self, features: int, *, eps: float = 1e-5, dtype: Any = "float32") -> None:
        _check_positive(features=features)
        self.features, self.eps = features, eps
        self.dtype = resolve_dtype(dtype)
        self.weight = Parameter(np.ones((features,), dtype=self.dtype), init=("ones",))
        self.bias = Parameter(_zeros((features,), self.dtype))

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.features, self.dtype, "LayerNorm")
        return ops.layer_norm(x, self.weight, self.bias, eps=self.eps)
