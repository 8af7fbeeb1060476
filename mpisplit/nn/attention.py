"""Causal self-attention with the heads split over the TP ranks (GPT-2 layout).

The fused QKV projection W (h, 3h) has columns [Q | K | V], head j of each in
columns [j*hs, (j+1)*hs). Rank r holds heads [r*H/t, (r+1)*H/t) of Q, K and V
alike: a local weight (h, 3h/t) = [Q_r | K_r | V_r] (splitting the fused block
by thirds would hand a rank whole Q and half of K instead). In the shard view
the global weight is (h, 3, h), split along its last axis.

Forward: f (identity; all-reduce of dX backward) -> local QKV -> attention on
the local heads -> row-split output projection (one all-reduce). Two
all-reduces per block in all: this one and the MLP's.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np

from mpisplit import kernels
from mpisplit.autograd import ops
from mpisplit.autograd.tensor import Function, Tensor, is_grad_enabled
from mpisplit.nn.linear import RowParallelLinear, _check_input, sequence_parallel_linear
from mpisplit.nn.module import Module, Parameter
from mpisplit.nn.packing import Packing, packed_mask
from mpisplit.parallel.mappings import copy_to_tp
from mpisplit.runtime.backend import get_array_module, is_low_precision, resolve_dtype


def valid_tp_degrees(n_heads: int) -> list[int]:
    return [d for d in range(1, n_heads + 1) if n_heads % d == 0]


def dropout_mask(att: Any, p: float, rng: Any) -> Any:
    """The scaled keep-mask of attention-weight dropout (None when p == 0)."""
    if p <= 0.0:
        return None
    mask = (rng.random(att.shape, dtype=ops.draw_dtype(att.dtype)) >= p).astype(att.dtype)
    mask *= 1.0 / (1.0 - p)
    return mask


def causal_weights(q: Any, k: Any, scale: float, starts: Any = None) -> Any:
    """softmax(q k^T * scale + causal mask) for q (B, ..., T, hs), k (B, ..., T, hs) that broadcast
    against each other (grouped query heads: q (B, kv, g, T, hs), k (B, kv, 1, T, hs)). With
    `starts` (B, T) (packed rows, nn/packing.py) query i sees keys starts[b, i]..i only."""
    xp = get_array_module(q)
    att = q @ k.swapaxes(-1, -2)  # (..., T, T)
    T = att.shape[-1]
    if kernels.applies(att):  # scale, mask and softmax in one pass per row
        from mpisplit.kernels.softmax import causal_softmax_forward, packed_softmax_forward

        if starts is None:
            causal_softmax_forward(att, scale)
        else:
            packed_softmax_forward(att, scale, starts)
        return att
    low = is_low_precision(att.dtype)  # 16-bit compute: the softmax runs in float32
    if low:
        att = att.astype(xp.float32)
    att *= scale
    att += ops.causal_mask(T, T, 0, xp, att.dtype) if starts is None else packed_mask(starts, att.ndim, att.dtype)
    att -= att.max(axis=-1, keepdims=True)
    xp.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    if low:
        att = att.astype(q.dtype)  # weights kept (and multiplied) in 16 bits
    return att


def causal_softmax_backward(ga: Any, att: Any, scale: float) -> Any:
    """d loss / d scores from d loss / d weights `ga` (overwritten where possible)."""
    if kernels.applies(ga, att):
        from mpisplit.kernels.softmax import causal_softmax_backward as fused

        fused(att, ga, scale)
        return ga
    xp, dtype = get_array_module(ga), ga.dtype
    low = is_low_precision(dtype)
    if low:  # softmax backward in float32
        ga, att = ga.astype(xp.float32), att.astype(xp.float32)
    ga -= (ga * att).sum(axis=-1, keepdims=True)
    ga *= att
    ga *= scale
    if low:
        ga = ga.astype(dtype)
    return ga


class _HeadAttention(Function):
    """qkv (B, T, 3, nh, hs) -> causal attention of each head -> (B, T, nh*hs).

    One Function for the whole head computation, so the graph holds the QKV
    activation and the attention weights once, and no copies for the head split.
    Dropout on the attention weights uses `rng` (a Generator) when p > 0. With `recompute`
    (selective recomputation) only qkv is kept: backward recomputes the weights, and redraws
    the dropout mask from a copy of the generator taken before the forward drew it. `starts`
    (B, T): packed rows (nn/packing.py), each query seeing its own sequence only.
    """

    def forward(self, qkv: Any, p: float = 0.0, rng: Any = None, recompute: bool = False,
                starts: Any = None) -> Any:
        B, T, _, nh, hs = qkv.shape
        self.scale, self.starts = 1.0 / math.sqrt(hs), starts
        self.p, self.replay = p, copy.deepcopy(rng) if recompute and p > 0.0 else None
        att = self._weights(qkv)
        mask = dropout_mask(att, p, rng)
        v = qkv[:, :, 2].transpose(0, 2, 1, 3)  # (B, nh, T, hs)
        y = (att if mask is None else att * mask) @ v  # (B, nh, T, hs)
        if recompute:
            self.save(qkv, None, None)
        else:
            self.save(qkv, att, mask)
        return y.transpose(0, 2, 1, 3).reshape(B, T, nh * hs)

    def _weights(self, qkv: Any) -> Any:
        """softmax(q k^T / sqrt(hs) + causal mask): (B, nh, T, T)."""
        q = qkv[:, :, 0].transpose(0, 2, 1, 3)  # (B, nh, T, hs)
        k = qkv[:, :, 1].transpose(0, 2, 1, 3)
        return causal_weights(q, k, self.scale, self.starts)

    def backward(self, g: Any) -> Any:
        qkv, att, mask = self.saved
        if att is None:  # selective recomputation: the weights and the very same mask again
            att = self._weights(qkv)
            mask = dropout_mask(att, self.p, self.replay)
        xp = get_array_module(g)
        B, T, _, nh, hs = qkv.shape
        q = qkv[:, :, 0].transpose(0, 2, 1, 3)
        k = qkv[:, :, 1].transpose(0, 2, 1, 3)
        v = qkv[:, :, 2].transpose(0, 2, 1, 3)
        gy = g.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)  # (B, nh, T, hs)
        gqkv = xp.empty_like(qkv)
        dropped = att if mask is None else att * mask
        gqkv[:, :, 2] = (dropped.transpose(0, 1, 3, 2) @ gy).transpose(0, 2, 1, 3)
        ga = gy @ v.transpose(0, 1, 3, 2)  # d loss / d (dropped) attention
        if mask is not None:
            ga *= mask
        ga = causal_softmax_backward(ga, att, self.scale)
        gqkv[:, :, 0] = (ga @ k).transpose(0, 2, 1, 3)
        gqkv[:, :, 1] = (ga.transpose(0, 1, 3, 2) @ q).transpose(0, 2, 1, 3)
        return gqkv


class KVCache:
    """Keys and values of one block's local heads for incremental decoding.

    Preallocated for `max_len` positions: (B, nh_local, max_len, hs) each.
    """

    def __init__(self, batch: int, n_heads: int, max_len: int, head_size: int, dtype: Any, xp: Any = np) -> None:
        self.k = xp.zeros((batch, n_heads, max_len, head_size), dtype=dtype)
        self.v = xp.zeros_like(self.k)
        self.length = 0

    def append(self, k: Any, v: Any) -> tuple[Any, Any]:
        t = k.shape[2]
        if self.length + t > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; cannot add {t} to {self.length}")
        self.k[:, :, self.length:self.length + t] = k
        self.v[:, :, self.length:self.length + t] = v
        self.length += t
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


class QKVProjection(Module):
    """The local columns [Q_r | K_r | V_r] of the fused QKV weight (h, 3*hl) and bias (3*hl)."""

    def __init__(self, hidden: int, local_width: int, start: int, dtype: np.dtype, std: float) -> None:
        hl = local_width
        self.weight = Parameter(
            np.zeros((hidden, 3 * hl), dtype=dtype), split_axis=2, start=start,
            view_shape=(hidden, 3, hl), global_shape=(hidden, 3, hidden), init=("normal", std),
        )
        self.bias = Parameter(
            np.zeros((3 * hl,), dtype=dtype), split_axis=1, start=start, view_shape=(3, hl), global_shape=(3, hidden),
        )


class ParallelSelfAttention(Module):
    """Multi-head causal self-attention, heads split over the TP ranks."""

    def __init__(
        self, hidden: int, n_heads: int, tp_comm: Any, *, dropout: float = 0.0, dtype: Any = "float32",
        std: float = 0.02, proj_std: float | None = None,
    ) -> None:
        tp = tp_comm.size
        if hidden % n_heads:
            raise ValueError(f"hidden size {hidden} is not divisible by the number of heads {n_heads}")
        if n_heads % tp:
            raise ValueError(
                f"{n_heads} attention heads cannot be split over tp={tp} ranks; "
                f"tp values that work: {valid_tp_degrees(n_heads)}"
            )
        self.comm = tp_comm
        self.hidden, self.n_heads, self.dropout = hidden, n_heads, dropout
        self.dtype = resolve_dtype(dtype)
        self.head_size = hidden // n_heads
        self.local_heads = n_heads // tp
        self.local_kv_heads = self.local_heads  # every head has its own keys and values
        hl = self.local_heads * self.head_size
        start = tp_comm.rank * hl
        self.c_attn = QKVProjection(hidden, hl, start, self.dtype, std)
        self.c_proj = RowParallelLinear(
            hidden, hidden, tp_comm, dtype=dtype, std=std if proj_std is None else proj_std,
        )

    def forward(
        self, x: Tensor, rng: Any = None, cache: KVCache | None = None, *, sequence_parallel: bool = False,
        recompute_core: bool = False, packing: Packing | None = None, rngs: Any = None,
    ) -> Tensor:
        """x (B, T, h), the same on every TP rank -> (B, T, h), the same on every TP rank.

        `rng` drives attention-weight dropout (per-rank stream: the ranks hold
        different heads). With `cache`, no graph is recorded: the new positions are
        appended to the cache and attend to everything cached before them. With
        `sequence_parallel`, x and the output are this rank's (B, T/t, h) block of the sequence.
        With `packing`, each token attends within its own packed sequence only. `rngs` is the
        blocks' common signature (LoRA's dropout streams; GPT-2's fused projection has no adapters).
        """
        _check_input(x, self.hidden, self.dtype, "ParallelSelfAttention")
        if sequence_parallel:
            qkv = sequence_parallel_linear(x, self.c_attn.weight, self.c_attn.bias, self.comm)  # (B, T, 3*hl)
        else:
            qkv = ops.linear(copy_to_tp(x, self.comm), self.c_attn.weight, self.c_attn.bias)  # (B, T, 3*hl)
        B, T = qkv.shape[:2]
        qkv = qkv.reshape(B, T, 3, self.local_heads, self.head_size)
        if cache is not None:
            if is_grad_enabled():
                raise RuntimeError("decoding with a KV cache must run under no_grad()")
            y = self._decode(qkv.data, cache)
        else:
            p = self.dropout if self.training else 0.0
            starts = None if packing is None else packing.on(qkv.data)[1]
            y = _HeadAttention.apply(qkv, p=p, rng=rng, recompute=recompute_core, starts=starts)  # (B, T, hl)
        return self.c_proj(y, sequence_parallel=sequence_parallel)

    def rows_qkv(self, x: Tensor, positions: Any) -> tuple[Any, Any, Any]:
        """Decoding rows x (1, N, h) -> arrays q, k, v (1, N, nh_local, hs) (positions are the
        model's learned table, added before the blocks)."""
        qkv = ops.linear(copy_to_tp(x, self.comm), self.c_attn.weight, self.c_attn.bias).data  # (1, N, 3*hl)
        qkv = qkv.reshape(*qkv.shape[:2], 3, self.local_heads, self.head_size)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    @property
    def out_proj(self) -> RowParallelLinear:
        return self.c_proj

    def _decode(self, qkv: Any, cache: KVCache) -> Tensor:
        B, T = qkv.shape[:2]
        q = qkv[:, :, 0].transpose(0, 2, 1, 3)  # (B, nh, T, hs)
        k, v = cache.append(qkv[:, :, 1].transpose(0, 2, 1, 3), qkv[:, :, 2].transpose(0, 2, 1, 3))
        y = ops.Attention().forward(q, k, v, causal=True, offset=cache.length - T)
        return Tensor(y.transpose(0, 2, 1, 3).reshape(B, T, -1))

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        xp = get_array_module(self.c_attn.weight.data)
        return KVCache(batch, self.local_heads, max_len, self.head_size, self.dtype, xp)
