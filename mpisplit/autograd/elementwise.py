"""Elementwise primitives: arithmetic with broadcasting, exp/log, tanh, ReLU, tanh-GELU, dropout."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mpisplit import kernels
from mpisplit.autograd.operands import _one_minus_, _operands, _unbroadcast
from mpisplit.autograd.tensor import Function, Tensor
from mpisplit.runtime.backend import get_array_module, is_low_precision


class Add(Function):
    def forward(self, a: Any, b: Any) -> Any:
        self.shapes = (a.shape, b.shape)
        return a + b

    def backward(self, g: Any) -> tuple[Any, Any]:
        sa, sb = self.shapes
        return (
            _unbroadcast(g, sa) if self.needs_input_grad[0] else None,
            _unbroadcast(g, sb) if self.needs_input_grad[1] else None,
        )


class Sub(Function):
    def forward(self, a: Any, b: Any) -> Any:
        self.shapes = (a.shape, b.shape)
        return a - b

    def backward(self, g: Any) -> tuple[Any, Any]:
        sa, sb = self.shapes
        return (
            _unbroadcast(g, sa) if self.needs_input_grad[0] else None,
            _unbroadcast(-g, sb) if self.needs_input_grad[1] else None,
        )


class Mul(Function):
    def forward(self, a: Any, b: Any) -> Any:
        self.save(a, b)
        return a * b

    def backward(self, g: Any) -> tuple[Any, Any]:
        a, b = self.saved
        return (
            _unbroadcast(g * b, a.shape) if self.needs_input_grad[0] else None,
            _unbroadcast(g * a, b.shape) if self.needs_input_grad[1] else None,
        )


class Div(Function):
    def forward(self, a: Any, b: Any) -> Any:
        self.save(a, b)
        return a / b

    def backward(self, g: Any) -> tuple[Any, Any]:
        a, b = self.saved
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = _unbroadcast(g / b, a.shape)
        if self.needs_input_grad[1]:
            gb = _unbroadcast(-g * a / (b * b), b.shape)
        return ga, gb


class Neg(Function):
    def forward(self, a: Any) -> Any:
        return -a

    def backward(self, g: Any) -> Any:
        return -g

class Exp(Function):
    def forward(self, a: Any) -> Any:
        xp = get_array_module(a)
        out = xp.exp(a)
        self.save(out)
        return out

    def backward(self, g: Any) -> Any:
        (out,) = self.saved
        return g * out


class Log(Function):
    def forward(self, a: Any) -> Any:
        self.save(a)
        return get_array_module(a).log(a)

    def backward(self, g: Any) -> Any:
        (a,) = self.saved
        return g / a


class Tanh(Function):
    def forward(self, a: Any) -> Any:
        out = get_array_module(a).tanh(a)
        self.save(out)
        return out

    def backward(self, g: Any) -> Any:
        (out,) = self.saved
        return g * (1 - out * out)


class ReLU(Function):
    def forward(self, a: Any) -> Any:
        mask = a > 0
        self.save(mask)
        return a * mask

    def backward(self, g: Any) -> Any:
        (mask,) = self.saved
        return g * mask


_GELU_C = math.sqrt(2.0 / math.pi)


class GELU(Function):
    """tanh approximation: 0.5 x (1 + tanh(c (x + 0.044715 x^3))), c = sqrt(2/pi)."""

    def forward(self, x: Any) -> Any:
        if kernels.applies(x):  # one fused pass; only x is kept, backward recomputes the rest
            from mpisplit.kernels.gelu import gelu_forward

            out = np.empty_like(x)
            gelu_forward(x, out)
            self.save(x, None)
            return out
        xp = get_array_module(x)
        x2 = x * x
        t = x2 * 0.044715
        t += 1.0
        t *= x
        t *= _GELU_C
        xp.tanh(t, out=t)  # t = tanh(inner)
        self.save(x, t)
        out = t + 1.0
        out *= x
        out *= 0.5
        return out

    def backward(self, g: Any) -> Any:
        x, t = self.saved
        if t is None:
            from mpisplit.kernels.gelu import gelu_backward

            g = np.ascontiguousarray(g, dtype=x.dtype)
            out = np.empty_like(x)
            gelu_backward(x, g, out)
            return out
        # d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3*0.044715 x^2)
        inner_d = x * x
        inner_d *= 3 * 0.044715
        inner_d += 1.0
        inner_d *= _GELU_C
        inner_d *= x
        sech2 = t * t
        _one_minus_(sech2)
        inner_d *= sech2
        inner_d += t
        inner_d += 1.0
        inner_d *= 0.5
        inner_d *= g
        return inner_d


def draw_dtype(dtype: Any) -> Any:
    """Generators draw float32 or float64 only: 16-bit compute dtypes draw float32."""
    return dtype if np.dtype(dtype).itemsize >= 4 else np.float32


class Dropout(Function):
    """Zero each element with probability p and scale the rest by 1/(1-p)."""

    def forward(self, x: Any, p: float = 0.0, rng: Any = None) -> Any:
        keep = rng.random(x.shape, dtype=draw_dtype(x.dtype)) >= p
        mask = keep.astype(x.dtype)
        mask *= 1.0 / (1.0 - p)
        self.save(mask)
        return x * mask

    def backward(self, g: Any) -> Any:
        (mask,) = self.saved
        return g * mask

def add(a: Any, b: Any) -> Tensor:
    return Add.apply(*_operands(a, b))


def sub(a: Any, b: Any) -> Tensor:
    return Sub.apply(*_operands(a, b))


def mul(a: Any, b: Any) -> Tensor:
    return Mul.apply(*_operands(a, b))


def div(a: Any, b: Any) -> Tensor:
    return Div.apply(*_operands(a, b))


def neg(a: Tensor) -> Tensor:
    return Neg.apply(a)


def exp(a: Tensor) -> Tensor:
    return Exp.apply(a)


def log(a: Tensor) -> Tensor:
    return Log.apply(a)


def tanh(a: Tensor) -> Tensor:
    return Tanh.apply(a)


def relu(a: Tensor) -> Tensor:
    return ReLU.apply(a)


def gelu(a: Tensor) -> Tensor:
    """GELU, tanh approximation (GPT-2)."""
    return GELU.apply(a)


def dropout(x: Tensor, p: float, rng: Any, training: bool = True) -> Tensor:
    """Inverted dropout driven by `rng` (a NumPy or CuPy Generator); identity when p == 0 or not training."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    return Dropout.apply(x, p=p, rng=rng)


class SwiGLU(Function):
    """silu(gate) * up, silu(x) = x * sigmoid(x) (the Llama MLP's gate). 16-bit inputs are
    computed in float32 and cast back."""

    def forward(self, gate: Any, up: Any) -> Any:
        if gate.shape == up.shape and kernels.applies(gate, up, contiguous=False):  # one compiled pass (kernels/swiglu.py)
            from mpisplit.kernels.swiglu import swiglu_forward

            out = np.empty(gate.shape, dtype=gate.dtype)
            s = np.empty_like(out) if self.requires_grad else out  # without a graph: written, then overwritten
            f = gate.shape[-1] if gate.ndim else 1
            swiglu_forward(gate.reshape(-1, f), up.reshape(-1, f), out.reshape(-1, f), s.reshape(-1, f))
            self.save(gate, up, s)
            return out
        xp = get_array_module(gate)
        low = is_low_precision(gate.dtype)
        g32, u32 = (gate.astype(xp.float32), up.astype(xp.float32)) if low else (gate, up)
        s = _sigmoid(g32)
        self.save(gate, up, s)
        out = g32 * s
        out *= u32
        return out.astype(gate.dtype) if low else out

    def backward(self, g: Any) -> tuple[Any, Any]:
        gate, up, s = self.saved
        dtype = gate.dtype
        if is_low_precision(dtype):
            g, gate, up = g.astype(s.dtype), gate.astype(s.dtype), up.astype(s.dtype)
        silu = gate * s
        gu = g * silu if self.needs_input_grad[1] else None
        gg = None
        if self.needs_input_grad[0]:
            # d silu / dx = s (1 + x (1 - s))
            gg = 1.0 - s
            gg *= gate
            gg += 1.0
            gg *= s
            gg *= up
            gg *= g
        if is_low_precision(dtype):
            gg, gu = (None if a is None else a.astype(dtype) for a in (gg, gu))
        return gg, gu


def _sigmoid(x: Any) -> Any:
    """1 / (1 + exp(-x)) without overflow: exp of a non-positive argument only."""
    xp = get_array_module(x)
    e = xp.abs(x)
    xp.negative(e, out=e)
    xp.exp(e, out=e)  # in (0, 1]
    den = e + 1.0
    xp.copyto(e, 1.0, where=x >= 0)  # numerator: 1 where x >= 0, e below
    return xp.divide(e, den, out=den).astype(x.dtype, copy=False)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return SwiGLU.apply(gate, up)
