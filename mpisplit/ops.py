"""Differentiable primitives: one small `Function` per operation.

Each `forward` works on raw arrays of one backend (`xp` is NumPy or CuPy) and
saves only what its `backward` needs. Public wrappers at the bottom accept
Tensors and Python scalars.
"""

from __future__ import annotations

import builtins
import math
from typing import Any

import numpy as np

from .backend import get_array_module, is_low_precision, scatter_add
from .tensor import Function, Tensor

# ----------------------------------------------------------------- helpers


def _unbroadcast(grad: Any, shape: tuple[int, ...]) -> Any:
    """Sum `grad` over the axes that broadcasting added or stretched, back to `shape`."""
    if tuple(grad.shape) == tuple(shape):
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and grad.shape[lead + i] != 1
    )
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


def _as_tensor(x: Any, like: Tensor) -> Tensor:
    """Wrap a Python/NumPy scalar or array as a constant of `like`'s dtype and backend."""
    if isinstance(x, Tensor):
        return x
    xp = like.xp
    return Tensor(xp.asarray(x, dtype=like.dtype))


def _operands(a: Any, b: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        raise TypeError(f"expected at least one Tensor, got {type(a).__name__} and {type(b).__name__}")
    if not isinstance(a, Tensor):
        a = _as_tensor(a, b)
    elif not isinstance(b, Tensor):
        b = _as_tensor(b, a)
    if a.dtype != b.dtype:
        raise TypeError(f"dtype mismatch: {a.dtype} and {b.dtype} (cast one side explicitly)")
    get_array_module(a.data, b.data)  # raises TypeError when NumPy and CuPy are mixed
    return a, b


def _normalize_axes(axis: Any, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    return tuple(a % ndim for a in axis)


# ------------------------------------------------------------- arithmetic


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


class MatMul(Function):
    """a @ b with NumPy broadcasting of the batch dimensions."""

    def forward(self, a: Any, b: Any) -> Any:
        self.save(a, b)
        return a @ b

    def backward(self, g: Any) -> tuple[Any, Any]:
        a, b = self.saved
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = _unbroadcast(g @ b.swapaxes(-1, -2), a.shape)
        if self.needs_input_grad[1]:
            if b.ndim == 2:
                # (..., m, k) x (..., m, n): fold the batch into one GEMM instead of a sum of GEMMs.
                gb = a.reshape(-1, a.shape[-1]).T @ g.reshape(-1, g.shape[-1])
            else:
                gb = _unbroadcast(a.swapaxes(-1, -2) @ g, b.shape)
        return ga, gb


class Linear(Function):
    """x @ w (+ b) for x (..., k), w (k, n), b (n,): one GEMM each way."""

    def forward(self, x: Any, w: Any, b: Any = None) -> Any:
        self.save(x, w)
        self.has_bias = b is not None
        out = x.reshape(-1, x.shape[-1]) @ w  # (M, n)
        if b is not None:
            out += b
        return out.reshape(*x.shape[:-1], w.shape[-1])

    def backward(self, g: Any) -> tuple[Any, ...]:
        x, w = self.saved
        g2 = g.reshape(-1, g.shape[-1])  # (M, n)
        gx = (g2 @ w.T).reshape(x.shape) if self.needs_input_grad[0] else None
        gw = x.reshape(-1, x.shape[-1]).T @ g2 if self.needs_input_grad[1] else None
        if not self.has_bias:
            return gx, gw
        gb = g2.sum(axis=0) if self.needs_input_grad[2] else None
        return gx, gw, gb


class LinearT(Function):
    """x @ w^T for x (..., k) and w (n, k) stored row-major (a tied embedding table):
    both gradients come out contiguous in their parameter's own layout."""

    def forward(self, x: Any, w: Any) -> Any:
        self.save(x, w)
        out = x.reshape(-1, x.shape[-1]) @ w.T  # (M, n)
        return out.reshape(*x.shape[:-1], w.shape[0])

    def backward(self, g: Any) -> tuple[Any, Any]:
        x, w = self.saved
        g2 = g.reshape(-1, g.shape[-1])  # (M, n)
        gx = (g2 @ w).reshape(x.shape) if self.needs_input_grad[0] else None
        gw = g2.T @ x.reshape(-1, x.shape[-1]) if self.needs_input_grad[1] else None  # (n, k)
        return gx, gw


# -------------------------------------------------------------- reductions


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


# ------------------------------------------------------------ shape moves


class Reshape(Function):
    def forward(self, a: Any, shape: tuple[int, ...] = ()) -> Any:
        self.shape = a.shape
        return a.reshape(shape)

    def backward(self, g: Any) -> Any:
        return g.reshape(self.shape)


class Transpose(Function):
    def forward(self, a: Any, axes: Any = None) -> Any:
        self.axes = tuple(range(a.ndim))[::-1] if axes is None else tuple(ax % a.ndim for ax in axes)
        return a.transpose(self.axes)

    def backward(self, g: Any) -> Any:
        return g.transpose(np.argsort(self.axes))


def _is_basic_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in items)


class GetItem(Function):
    def forward(self, a: Any, index: Any = None) -> Any:
        self.shape, self.index, self.dtype = a.shape, index, a.dtype
        return a[index]

    def backward(self, g: Any) -> Any:
        xp = get_array_module(g)
        out = xp.zeros(self.shape, dtype=self.dtype)
        if _is_basic_index(self.index):
            out[self.index] = g
        else:  # advanced indexing may repeat positions: accumulate
            scatter_add(out, self.index, g)
        return out


class Concat(Function):
    def forward(self, *arrays: Any, axis: int = 0) -> Any:
        xp = get_array_module(*arrays)
        self.axis = axis % arrays[0].ndim
        self.sizes = [a.shape[self.axis] for a in arrays]
        return xp.concatenate(arrays, axis=self.axis)

    def backward(self, g: Any) -> tuple[Any, ...]:
        bounds = np.cumsum(self.sizes)[:-1]
        xp = get_array_module(g)
        return tuple(xp.split(g, bounds, axis=self.axis))


# ------------------------------------------------------------- elementwise


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


def _one_minus_(a: Any) -> None:
    """a <- 1 - a, in place."""
    a *= -1.0
    a += 1.0


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

    def backward(self, g: Any) -> tuple[Any, Any, Any]:
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


class Embedding(Function):
    """weight[ids] for a table (V, h) and integer ids of any shape."""

    def forward(self, weight: Any, ids: Any = None) -> Any:
        self.ids = ids
        self.wshape, self.dtype = weight.shape, weight.dtype
        return weight[ids]

    def backward(self, g: Any) -> Any:
        xp = get_array_module(g)
        gw = xp.zeros(self.wshape, dtype=self.dtype)
        scatter_add(gw, self.ids.reshape(-1), g.reshape(-1, self.wshape[-1]))
        return gw


class CrossEntropy(Function):
    """Mean over non-ignored rows of -log softmax(logits)[target]; logits (..., C)."""

    def forward(self, logits: Any, targets: Any = None, ignore_index: int = -100) -> Any:
        xp = get_array_module(logits)
        c = logits.shape[-1]
        z = logits.reshape(-1, c)
        t = targets.reshape(-1)
        valid = t != ignore_index
        safe_t = xp.where(valid, t, 0)
        shifted = z - z.max(axis=-1, keepdims=True)
        sumexp = xp.exp(shifted).sum(axis=-1)
        rows = xp.arange(z.shape[0])
        nll = xp.log(sumexp) - shifted[rows, safe_t]
        count = int(valid.sum())
        self.count = max(count, 1)
        self.save(shifted, sumexp, safe_t, valid)
        self.shape = logits.shape
        return xp.asarray((nll * valid).sum() / self.count, dtype=logits.dtype)

    def backward(self, g: Any) -> Any:
        shifted, sumexp, safe_t, valid = self.saved
        xp = get_array_module(shifted)
        p = xp.exp(shifted)
        p /= sumexp[:, None]
        p[xp.arange(p.shape[0]), safe_t] -= 1.0
        p *= (valid * (g / self.count))[:, None].astype(p.dtype)
        return p.reshape(self.shape)


def causal_mask(t_q: int, t_k: int, offset: int, xp: Any, dtype: Any) -> Any:
    """(t_q, t_k) additive mask: 0 where key j <= offset + query i, -inf after."""
    i = xp.arange(t_q)[:, None] + offset
    j = xp.arange(t_k)[None, :]
    return xp.where(j > i, -xp.inf, 0.0).astype(dtype)


class Attention(Function):
    """softmax(q k^T / sqrt(d) + causal mask) v for q (..., Tq, d), k, v (..., Tk, d).

    Query i sits at absolute position `offset + i` and sees keys 0..offset+i
    (offset = Tk - Tq when decoding against a key/value cache).
    """

    def forward(self, q: Any, k: Any, v: Any, causal: bool = True, offset: int | None = None) -> Any:
        xp = get_array_module(q)
        d = q.shape[-1]
        self.scale = 1.0 / math.sqrt(d)
        scores = q @ k.swapaxes(-1, -2)  # (..., Tq, Tk)
        scores *= self.scale
        if causal:
            t_q, t_k = q.shape[-2], k.shape[-2]
            scores += causal_mask(t_q, t_k, t_k - t_q if offset is None else offset, xp, scores.dtype)
        scores -= scores.max(axis=-1, keepdims=True)
        xp.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)  # now the attention weights
        self.save(q, k, v, scores)
        return scores @ v

    def backward(self, g: Any) -> tuple[Any, Any, Any]:
        q, k, v, att = self.saved
        gv = att.swapaxes(-1, -2) @ g if self.needs_input_grad[2] else None
        gs = g @ v.swapaxes(-1, -2)  # d loss / d att
        # softmax backward: att * (gs - sum(gs * att))
        gs -= (gs * att).sum(axis=-1, keepdims=True)
        gs *= att
        gs *= self.scale
        gq = gs @ k if self.needs_input_grad[0] else None
        gk = gs.swapaxes(-1, -2) @ q if self.needs_input_grad[1] else None
        return gq, gk, gv


# -------------------------------------------------------- public wrappers


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


def matmul(a: Tensor, b: Tensor) -> Tensor:
    a, b = _operands(a, b)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"matmul needs operands of at least 2 dimensions, got shapes {a.shape} and {b.shape}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul shape mismatch: {a.shape} @ {b.shape}")
    return MatMul.apply(a, b)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight + bias with weight stored (in_features, out_features)."""
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"linear: input features {x.shape[-1]} != weight rows {weight.shape[0]} (weight {weight.shape})")
    if x.dtype != weight.dtype:
        raise TypeError(f"linear: input dtype {x.dtype} != weight dtype {weight.dtype}")
    get_array_module(x.data, weight.data)
    if bias is None:
        return Linear.apply(x, weight)
    return Linear.apply(x, weight, bias)


def linear_t(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight^T with weight stored (out_features, in_features), e.g. a tied LM head."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_t: input features {x.shape[-1]} != weight columns {weight.shape[1]}")
    if x.dtype != weight.dtype:
        raise TypeError(f"linear_t: input dtype {x.dtype} != weight dtype {weight.dtype}")
    return LinearT.apply(x, weight)


def sum(a: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
    return Sum.apply(a, axis=axis, keepdims=keepdims)


def mean(a: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
    count = 1
    for ax in _normalize_axes(axis, a.ndim):
        count *= a.shape[ax]
    return mul(Sum.apply(a, axis=axis, keepdims=keepdims), 1.0 / count)


def reshape(a: Tensor, shape: tuple[int, ...]) -> Tensor:
    return Reshape.apply(a, shape=tuple(shape))


def transpose(a: Tensor, axes: Any = None) -> Tensor:
    return Transpose.apply(a, axes=axes)


def getitem(a: Tensor, index: Any) -> Tensor:
    if isinstance(index, Tensor):
        index = index.data
    return GetItem.apply(a, index=index)


def concat(tensors: list[Tensor], axis: int = 0) -> Tensor:
    if not tensors:
        raise ValueError("concat needs at least one tensor")
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise TypeError(f"concat: mixed dtypes {sorted(str(d) for d in dtypes)}")
    return Concat.apply(*tensors, axis=axis)


def split(a: Tensor, sections: int | list[int], axis: int = -1) -> list[Tensor]:
    """Split into equal `sections` (an int that divides the axis) or pieces of the given sizes."""
    n = a.shape[axis]
    if isinstance(sections, int):
        if sections <= 0 or n % sections:
            raise ValueError(f"split: axis of length {n} cannot be split into {sections} equal parts")
        sizes = [n // sections] * sections
    else:
        sizes = list(sections)
        if builtins.sum(sizes) != n:
            raise ValueError(f"split: sizes {sizes} do not add up to the axis length {n}")
    out, start = [], 0
    ax = axis % a.ndim
    for s in sizes:
        index = (slice(None),) * ax + (slice(start, start + s),)
        out.append(getitem(a, index))
        start += s
    return out


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


def softmax(a: Tensor, axis: int = -1) -> Tensor:
    return Softmax.apply(a, axis=axis)


def log_softmax(a: Tensor, axis: int = -1) -> Tensor:
    return LogSoftmax.apply(a, axis=axis)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    if weight.shape != (x.shape[-1],) or bias.shape != (x.shape[-1],):
        raise ValueError(f"layer_norm: weight {weight.shape} and bias {bias.shape} must be ({x.shape[-1]},)")
    return LayerNorm.apply(x, weight, bias, eps=eps)


def dropout(x: Tensor, p: float, rng: Any, training: bool = True) -> Tensor:
    """Inverted dropout driven by `rng` (a NumPy or CuPy Generator); identity when p == 0 or not training."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    return Dropout.apply(x, p=p, rng=rng)


def embedding(weight: Tensor, ids: Any) -> Tensor:
    """Rows of `weight` (V, h) selected by integer `ids` (any shape) -> (*ids.shape, h)."""
    ids = ids.data if isinstance(ids, Tensor) else ids
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding ids must be integers, got dtype {ids.dtype}")
    return Embedding.apply(weight, ids=ids)


def cross_entropy(logits: Tensor, targets: Any, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of logits (..., C) against integer targets (...), skipping ignore_index."""
    targets = targets.data if isinstance(targets, Tensor) else targets
    if tuple(targets.shape) != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets shape {tuple(targets.shape)} != logits shape {logits.shape[:-1]}")
    return CrossEntropy.apply(logits, targets=targets, ignore_index=ignore_index)


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, offset: int | None = None) -> Tensor:
    """Scaled dot-product attention; q (..., Tq, d), k and v (..., Tk, d)."""
    if q.shape[-1] != k.shape[-1] or k.shape != v.shape:
        raise ValueError(f"attention shapes do not match: q {q.shape}, k {k.shape}, v {v.shape}")
    return Attention.apply(q, k, v, causal=causal, offset=offset)
