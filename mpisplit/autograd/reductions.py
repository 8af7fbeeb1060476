"""Reductions and normalisation: sum and mean, softmax and log-softmax, layer norm."""

from __future__ import annotations

from typing import Any

import numpy as np

from mpisplit import kernels
from mpisplit.autograd.elementwise import mul
from mpisplit.autograd.operands import _normalize_axes
from mpisplit.autograd.tensor import Function, Tensor
from mpisplit.runtime.backend import get_array_module, is_low_precision


class Sum(Function):
    def forward(self, a: Any, axis: Any = None, keepdims: bool = False) -> Any:
        self.shape = a.shape
        self.axes = _normalize_axes(axis, a.ndim)
        self.keepdims = keepdims
        xp = get_array_module(a)
        return xp.asarray(a.sum(axis=self.axes, keepdims=keepdims))

    def backward(self, g: Any) -> Any:
        xp = get_array_module(g)
        if not self.keepdims:
            g = g.reshape([1 if i in self.axes else n for i, n in enumerate(self.shape)])
        return xp.broadcast_to(g, self.shape)


class Softmax(Function):
    def forward(self, a: Any, axis: int = -1) -> Any:
        xp = get_array_module(a)
        self.axis = axis
        out = a - a.max(axis=axis, keepdims=True)
        xp.exp(out, out=out)
        out /= out.sum(axis=axis, keepdims=True)
        self.save(out)
        return out

    def backward(self, g: Any) -> Any:
        (out,) = self.saved
        gx = g * out
        gx -= out * gx.sum(axis=self.axis, keepdims=True)
        return gx


class LogSoftmax(Function):
    def forward(self, a: Any, axis: int = -1) -> Any:
        xp = get_array_module(a)
        self.axis = axis
        shifted = a - a.max(axis=axis, keepdims=True)
        out = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        self.save(out)
        return out

    def backward(self, g: Any) -> Any:
        (out,) = self.saved
        xp = get_array_module(g)
        return g - xp.exp(out) * g.sum(axis=self.axis, keepdims=True)


# ---------------------------------------------------------- network pieces


class LayerNorm(Function):
    """(x - mean) / sqrt(var + eps) * w + b over the last axis; var is biased."""

    def forward(self, x: Any, w: Any, b: Any, eps: float = 1e-5) -> Any:
        self.fused = kernels.applies(x, w, b)
        if self.fused:  # keeps x and two per-row statistics, not xhat
            return self._fused_forward(x, w, b, eps)
        xp = get_array_module(x)
        low = is_low_precision(x.dtype)  # float16/bfloat16: statistics and xhat in float32
        if low:
            x = x.astype(xp.float32)
        mu = x.mean(axis=-1, keepdims=True)
        xhat = x - mu
        var = (xhat * xhat).mean(axis=-1, keepdims=True)
        rstd = 1.0 / xp.sqrt(var + eps)
        xhat *= rstd
        self.save(xhat, rstd, w)
        out = xhat * w
        out += b
        return out.astype(w.dtype) if low else out

    def _fused_forward(self, x: Any, w: Any, b: Any, eps: float) -> Any:
        from mpisplit.kernels.layernorm import layernorm_forward

        h = x.shape[-1]
        rows = x.size // h
        out = np.empty_like(x)
        mean, rstd = np.empty(rows), np.empty(rows)
        layernorm_forward(x.reshape(rows, h), w, b, float(eps), out.reshape(rows, h), mean, rstd)
        self.save(x, rstd, w, mean)
        return out

    def _fused_backward(self, g: Any) -> tuple[Any, Any, Any]:
        from mpisplit.kernels.layernorm import layernorm_backward

        x, rstd, w, mean = self.saved
        h = x.shape[-1]
        rows = x.size // h
        g = np.ascontiguousarray(g, dtype=x.dtype).reshape(rows, h)
        gx = np.empty_like(x) if self.needs_input_grad[0] else None
        sum_w, sum_b = np.zeros(h), np.zeros(h)  # float64 accumulators
        layernorm_backward(x.reshape(rows, h), w, mean, rstd, g, None if gx is None else gx.reshape(rows, h),
                           sum_w, sum_b)
        gw = sum_w.astype(w.dtype) if self.needs_input_grad[1] else None
        gb = sum_b.astype(w.dtype) if self.needs_input_grad[2] else None
        return gx, gw, gb

    def backward(self, g: Any) -> tuple[Any, Any, Any]:
        if self.fused:
            return self._fused_backward(g)
        xhat, rstd, w = self.saved
        h = xhat.shape[-1]
        low = is_low_precision(w.dtype)  # 16-bit weights, float32 statistics
        if low:
            g = g.astype(xhat.dtype)
        gx = gw = gb = None
        if self.needs_input_grad[1]:
            gw = (g * xhat).reshape(-1, h).sum(axis=0)
        if self.needs_input_grad[2]:
            gb = g.reshape(-1, h).sum(axis=0)
        if self.needs_input_grad[0]:
            gxhat = g * w
            # dx = rstd * (gxhat - mean(gxhat) - xhat * mean(gxhat * xhat))
            proj = (gxhat * xhat).mean(axis=-1, keepdims=True)
            gx = gxhat - gxhat.mean(axis=-1, keepdims=True)
            gx -= xhat * proj
            gx *= rstd
        if low:
            gx, gw, gb = (None if a is None else a.astype(w.dtype) for a in (gx, gw, gb))
        return gx, gw, gb

def sum(a: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
    return Sum.apply(a, axis=axis, keepdims=keepdims)


def mean(a: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
    count = 1
    for ax in _normalize_axes(axis, a.ndim):
        count *= a.shape[ax]
    return mul(Sum.apply(a, axis=axis, keepdims=keepdims), 1.0 / count)


def softmax(a: Tensor, axis: int = -1) -> Tensor:
    return Softmax.apply(a, axis=axis)


def log_softmax(a: Tensor, axis: int = -1) -> Tensor:
    return LogSoftmax.apply(a, axis=axis)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    if weight.shape != (x.shape[-1],) or bias.shape != (x.shape[-1],):
        raise ValueError(f"layer_norm: weight {weight.shape} and bias {bias.shape} must be ({x.shape[-1]},)")
    return LayerNorm.apply(x, weight, bias, eps=eps)


class RMSNorm(Function):
    """x / sqrt(mean(x^2) + eps) * w over the last axis (Llama). The statistics are float32 or
    wider: 16-bit inputs are normalised in float32, cast back, then scaled by w (as transformers
    does)."""

    def forward(self, x: Any, w: Any, eps: float = 1e-6) -> Any:
        if kernels.applies(x, w) and x.ndim:  # one compiled pass a row (kernels/rmsnorm.py)
            return self._fused_forward(x, w, eps)
        xp = get_array_module(x)
        low = is_low_precision(x.dtype)
        xf = x.astype(xp.float32) if low else x
        sq = xf * xf
        var = sq.sum(axis=-1, keepdims=True) / sq.shape[-1]  # .mean(axis=-1) bit for bit, less Python
        rstd = 1.0 / xp.sqrt(var + eps)
        xhat = xf * rstd
        if low:
            xhat = xhat.astype(x.dtype)
        self.save(xhat, rstd, w)
        return xhat * w

    def _fused_forward(self, x: Any, w: Any, eps: float) -> Any:
        from mpisplit.kernels.rmsnorm import rmsnorm_forward

        h = x.shape[-1]
        out, rstd = np.empty_like(x), np.empty(x.size // h)
        xhat = np.empty_like(x) if self.requires_grad else out  # without a graph: written, then overwritten
        rmsnorm_forward(x.reshape(-1, h), w, float(eps), out.reshape(-1, h), xhat.reshape(-1, h), rstd)
        if self.requires_grad:
            self.save(xhat, rstd.astype(x.dtype).reshape(*x.shape[:-1], 1), w)
        return out

    def backward(self, g: Any) -> tuple[Any, Any]:
        xhat, rstd, w = self.saved
        h = xhat.shape[-1]
        gw = (g * xhat).reshape(-1, h).sum(axis=0) if self.needs_input_grad[1] else None
        gx = None
        if self.needs_input_grad[0]:
            low = is_low_precision(w.dtype)
            gxhat = g * w
            xh = xhat
            if low:
                gxhat, xh = gxhat.astype(rstd.dtype), xhat.astype(rstd.dtype)
            # dx = rstd * (gxhat - xhat * mean(gxhat * xhat))
            gx = gxhat - xh * (gxhat * xh).mean(axis=-1, keepdims=True)
            gx *= rstd
            if low:
                gx = gx.astype(w.dtype)
        return gx, gw


def rms_norm(x: Tensor, w: Tensor, eps: float = 1e-6) -> Tensor:
    return RMSNorm.apply(x, w, eps=eps)
