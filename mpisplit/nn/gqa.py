"""Grouped-query attention with rotary positions (the Llama family), heads split over TP.

Weights are stored (in, out) like every layer here: q (h, H*d), k and v (h, KV*d), o (H*d, h).
Query heads split over the t TP ranks (H % t == 0): rank r holds heads [r*H/t, (r+1)*H/t).
Key/value heads split the same way when KV % t == 0; when t > KV (t % KV == 0) each KV head is
replicated on the t/KV consecutive ranks whose query heads read it: rank r holds KV head
r // (t/KV). A replicated head's gradient is partial on each of its ranks (each sees only its own
query heads) and is summed over them before the optimizer (`kv_replica_comm`).

Query head j attends with KV head j // (H/KV) (the same grouping as transformers'
repeat_kv), computed without copies: q (B, kv, g, T, d) against k (B, kv, 1, T, d).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np

from mpisplit.autograd import ops
from mpisplit.autograd.rotary import rotary_array
from mpisplit.autograd.tensor import Function, Tensor, is_grad_enabled
from mpisplit.nn.attention import KVCache, causal_softmax_backward, causal_weights, dropout_mask
from mpisplit.nn.linear import RowParallelLinear, _check_input, column_group
from mpisplit.nn.module import Module, Parameter
from mpisplit.nn.packing import Packing
from mpisplit.nn.rotary import RotaryTables
from mpisplit.runtime.backend import get_array_module, resolve_dtype


def kv_layout(n_heads: int, n_kv_heads: int, tp: int, rank: int) -> tuple[int, int, int, int]:
    """(local KV heads, first global KV head of this rank, replicas, replica rank) at this TP degree."""
    if n_kv_heads % tp == 0:
        n = n_kv_heads // tp
        return n, rank * n, 1, 0
    if tp % n_kv_heads:
        raise ValueError(f"{n_kv_heads} key/value heads can neither be split nor replicated over tp={tp} ranks")
    rep = tp // n_kv_heads
    return 1, rank // rep, rep, rank % rep


class HeadProjection(Module):
    """The columns of a projection (h, heads*d) for this rank's heads: weight (h, n*d), bias (n*d)."""

    lora: Any = None  # a LoRA adapter (nn/lora.py), set by models/lora.py

    def __init__(self, hidden: int, heads: int, head_dim: int, layout: tuple[int, int, int, int], *,
                 bias: bool, dtype: np.dtype, std: float) -> None:
        n, first, replicas, replica_rank = layout
        width, start = n * head_dim, first * head_dim
        self.weight = Parameter(np.zeros((hidden, width), dtype=dtype), split_axis=1, start=start,
                                global_shape=(hidden, heads * head_dim), init=("normal", std))
        self.bias = Parameter(np.zeros((width,), dtype=dtype), split_axis=0, start=start,
                              global_shape=(heads * head_dim,)) if bias else None
        for p in (self.weight, self.bias):
            if p is not None:
                p.replicas, p.replica_rank = replicas, replica_rank


def _grouped(x: Any, kv: int) -> Any:
    """(B, T, n, d) -> (B, kv, n/kv, T, d) view: query heads grouped by the KV head they read."""
    B, T, n, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, kv, n // kv, T, d)


class _GroupedAttention(Function):
    """q (B, T, H, d), k and v (B, T, KV, d), rotary applied -> causal attention -> (B, T, H*d).
    With `recompute` only q, k, v are kept and backward recomputes the weights (and redraws the
    dropout mask from a copy of the generator). `starts` (B, T): packed rows (nn/packing.py)."""

    def forward(self, q: Any, k: Any, v: Any, p: float = 0.0, rng: Any = None, recompute: bool = False,
                starts: Any = None) -> Any:
        B, T, H, d = q.shape
        kv = k.shape[2]
        self.scale, self.kv, self.starts = 1.0 / math.sqrt(d), kv, starts
        self.p, self.replay = p, copy.deepcopy(rng) if recompute and p > 0.0 else None
        att = causal_weights(_grouped(q, kv), _grouped(k, kv), self.scale, starts)  # (B, kv, g, T, T)
        mask = dropout_mask(att, p, rng)
        y = (att if mask is None else att * mask) @ _grouped(v, kv)  # (B, kv, g, T, d)
        self.save(q, k, v, None if recompute else att, None if recompute else mask)
        return y.reshape(B, H, T, d).transpose(0, 2, 1, 3).reshape(B, T, H * d)

    def backward(self, g: Any) -> tuple[Any, Any, Any]:
        q, k, v, att, mask = self.saved
        kv = self.kv
        q5, k5, v5 = _grouped(q, kv), _grouped(k, kv), _grouped(v, kv)
        if att is None:  # selective recomputation: the weights and the very same mask again
            att = causal_weights(q5, k5, self.scale, self.starts)
            mask = dropout_mask(att, self.p, self.replay)
        B, T, H, d = q.shape
        gy = g.reshape(B, T, H, d).transpose(0, 2, 1, 3).reshape(B, kv, H // kv, T, d)
        dropped = att if mask is None else att * mask
        gv = (dropped.swapaxes(-1, -2) @ gy).sum(axis=2)  # (B, kv, T, d): summed over the group
        ga = gy @ v5.swapaxes(-1, -2)  # (B, kv, g, T, T)
        if mask is not None:
            ga *= mask
        ga = causal_softmax_backward(ga, att, self.scale)
        gq = (ga @ k5).reshape(B, H, T, d).transpose(0, 2, 1, 3)
        gk = (ga.swapaxes(-1, -2) @ q5).sum(axis=2)
        return gq, gk.transpose(0, 2, 1, 3), gv.transpose(0, 2, 1, 3)


class GroupedQueryAttention(Module):
    """Causal self-attention with rotary positions and grouped-query heads over the TP ranks."""

    def __init__(
        self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, tp_comm: Any, rotary: RotaryTables, *,
        qkv_bias: bool = False, out_bias: bool = False, dropout: float = 0.0, dtype: Any = "float32",
        std: float = 0.02, proj_std: float | None = None,
    ) -> None:
        tp, rank = tp_comm.size, tp_comm.rank
        if n_heads % tp:
            raise ValueError(f"{n_heads} attention heads cannot be split over tp={tp} ranks")
        self.comm, self.rotary = tp_comm, rotary
        self.hidden, self.n_heads, self.n_kv_heads, self.head_size = hidden, n_heads, n_kv_heads, head_dim
        self.dropout, self.dtype = dropout, resolve_dtype(dtype)
        self.local_heads = n_heads // tp
        kv = kv_layout(n_heads, n_kv_heads, tp, rank)
        self.local_kv_heads, self.kv_replicas = kv[0], kv[2]
        q_layout = (self.local_heads, rank * self.local_heads, 1, 0)
        self.q_proj = HeadProjection(hidden, n_heads, head_dim, q_layout, bias=qkv_bias, dtype=self.dtype, std=std)
        self.k_proj = HeadProjection(hidden, n_kv_heads, head_dim, kv, bias=qkv_bias, dtype=self.dtype, std=std)
        self.v_proj = HeadProjection(hidden, n_kv_heads, head_dim, kv, bias=qkv_bias, dtype=self.dtype, std=std)
        self.o_proj = RowParallelLinear(n_heads * head_dim, hidden, tp_comm, bias=out_bias, dtype=dtype,
                                        std=std if proj_std is None else proj_std)

    def project(self, x: Tensor, *, sequence_parallel: bool = False, rngs: Any = None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, h) -> q (B, T, Hl, d), k and v (B, T, KVl, d) of this rank's heads, no rotary."""
        _check_input(x, self.hidden, self.dtype, "GroupedQueryAttention")
        q, k, v = column_group(x, [self.q_proj, self.k_proj, self.v_proj], self.comm, sequence_parallel, rngs)
        B, T = q.shape[:2]
        d = self.head_size
        return (q.reshape(B, T, self.local_heads, d), k.reshape(B, T, self.local_kv_heads, d),
                v.reshape(B, T, self.local_kv_heads, d))

    def forward(
        self, x: Tensor, rng: Any = None, cache: KVCache | None = None, *, sequence_parallel: bool = False,
        recompute_core: bool = False, packing: Packing | None = None, rngs: Any = None,
    ) -> Tensor:
        """x (B, T, h) -> (B, T, h), the same on every TP rank (with `sequence_parallel` this rank's
        (B, T/t, h) block). With `cache`, no graph: positions continue from the cache's length.
        With `packing`, rotary positions restart with each packed sequence, which attends to itself only.
        `rngs`: the model's (shared, local) dropout streams, for the LoRA adapters' dropout."""
        q, k, v = self.project(x, sequence_parallel=sequence_parallel, rngs=rngs)
        T = q.shape[1]
        offset = cache.length if cache is not None else 0
        positions, starts = (slice(offset, offset + T), None) if packing is None else packing.on(q.data)
        cos, sin = self.rotary.at(positions, q.data)
        if cache is not None:
            if is_grad_enabled():
                raise RuntimeError("decoding with a KV cache must run under no_grad()")
            y = self._decode(rotary_array(q.data, cos, sin), rotary_array(k.data, cos, sin), v.data, cache)
        else:
            p = self.dropout if self.training else 0.0
            y = _GroupedAttention.apply(ops.rotary(q, cos, sin), ops.rotary(k, cos, sin), v,
                                        p=p, rng=rng, recompute=recompute_core, starts=starts)  # (B, T, Hl*d)
        return self.o_proj(y, sequence_parallel=sequence_parallel, rngs=rngs)

    def rows_qkv(self, x: Tensor, positions: Any) -> tuple[Any, Any, Any]:
        """Decoding rows x (1, N, h) at `positions` (N,) -> arrays q (1, N, Hl, d), k and v
        (1, N, KVl, d), rotary applied: what the batched server caches and attends with."""
        q, k, v = self.project(x)
        cos, sin = self.rotary.at(positions, q.data)
        return rotary_array(q.data, cos, sin), rotary_array(k.data, cos, sin), v.data

    @property
    def out_proj(self) -> RowParallelLinear:
        return self.o_proj

    def _decode(self, q: Any, k: Any, v: Any, cache: KVCache) -> Tensor:
        B, T = q.shape[:2]
        k_all, v_all = cache.append(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))  # (B, KVl, L, d)
        y = grouped_decode(q, k_all, v_all, cache.length - T)
        return Tensor(y.reshape(B, T, -1))

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        xp = get_array_module(self.q_proj.weight.data)
        return KVCache(batch, self.local_kv_heads, max_len, self.head_size, self.dtype, xp)


def grouped_decode(q: Any, k: Any, v: Any, offset: int) -> Any:
    """Attention of new queries q (B, T, Hl, d) at positions offset.. against cached keys and
    values k, v (B, KVl, L, d) -> (B, T, Hl, d). One query needs no mask (it sees every key)."""
    B, T, H, d = q.shape
    kv = k.shape[1]
    if kv == H:  # one query head per KV head: plain multi-head attention
        y = ops.Attention().forward(q.transpose(0, 2, 1, 3), k, v, causal=T > 1, offset=offset)
    else:
        y = ops.Attention().forward(_grouped(q, kv), k[:, :, None], v[:, :, None], causal=T > 1, offset=offset)
    return y.reshape(B, H, T, d).transpose(0, 2, 1, 3)
