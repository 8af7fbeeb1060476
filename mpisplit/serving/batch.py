"""One forward pass over many sequences at once, each in its own KV-cache slot (any decoder:
the model's parts do the work; attention caches its local key/value heads, grouped or not).

The tokens of every running sequence are laid end to end in one row of the batch:
x (1, N, h), N = the tokens fed this step (a prompt chunk for a sequence still in prefill,
one token for one that decodes). The linear layers, LayerNorms and the MLP see all N rows
together; attention runs per sequence, its queries against its own slot's keys and values,
with the causal mask offset by the slot's length. So a sequence never sees another's keys,
and its arithmetic in attention is exactly that of decoding it alone.

Batch invariance: a BLAS gemm gives a row the same bits whatever the other rows hold, but
its rounding can depend on how many rows the call has: OpenBLAS computes a one-row product
with a separate kernel, and (its AVX-512 kernels) products below about 2^20 multiply-adds
with small-matrix kernels that round differently from the blocked ones. Every matrix product
of the linear layers and the head therefore runs on exactly ROW_BLOCK rows per call
(`autograd.linalg.row_blocks`; the batch is padded to a multiple of it, a padding row being
token 0 at position 0, dropped after), and calls of one shape give a row the same bits
wherever it sits, so a sequence's logits do not depend on what else runs with it.
`check_batch_invariance` tests this property of the machine's BLAS at start-up.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpisplit.autograd import Tensor, no_grad
from mpisplit.autograd.linalg import row_blocks
from mpisplit.nn.gqa import grouped_decode
from mpisplit.parallel.mappings import gather_from_tp
from mpisplit.runtime.backend import get_array_module, to_numpy

ROW_BLOCK = 8  # rows per matrix-product call in a batched forward


@dataclass(frozen=True)
class Segment:
    """`count` tokens of the sequence in cache slot `slot`, at positions start .. start+count-1."""

    slot: int
    start: int
    count: int


class SlotCache:
    """Keys and values of every block's local key/value heads for `slots` sequences: per layer
    k, v (slots, kv_local, max_len, hs). A slot's length is kept by the caller."""

    def __init__(self, model: Any, slots: int, max_len: int | None = None) -> None:
        n = model.config.block_size if max_len is None else max_len
        attn = model.h[0].attn
        xp = get_array_module(attn.out_proj.weight.data)
        shape = (slots, attn.local_kv_heads, n, attn.head_size)
        self.k = [xp.zeros(shape, dtype=model.dtype) for _ in model.h]
        self.v = [xp.zeros(shape, dtype=model.dtype) for _ in model.h]
        self.slots, self.max_len = slots, n


def _attention(attn: Any, x: Tensor, positions: Any, layer: int, cache: SlotCache, segments: list[Segment]) -> Tensor:
    """The block's attention over the segments: x (1, N, h) -> (1, N, h), one all-reduce."""
    q, k_new, v_new = attn.rows_qkv(x, positions)  # (1, N, nh, hs), (1, N, kv, hs)
    xp = get_array_module(q)
    y = xp.zeros((1, q.shape[1], attn.local_heads * attn.head_size), dtype=q.dtype)  # padding rows stay 0
    k_all, v_all = cache.k[layer], cache.v[layer]
    row = 0
    for seg in segments:
        rows = slice(row, row + seg.count)
        end = seg.start + seg.count
        k_all[seg.slot, :, seg.start: end] = k_new[0, rows].transpose(1, 0, 2)
        v_all[seg.slot, :, seg.start: end] = v_new[0, rows].transpose(1, 0, 2)
        k = k_all[seg.slot: seg.slot + 1, :, :end]  # (1, kv, end, hs), as a one-sequence cache holds it
        v = v_all[seg.slot: seg.slot + 1, :, :end]
        out = grouped_decode(q[:, rows], k, v, seg.start)  # (1, t, nh, hs)
        y[:, rows] = out.reshape(1, seg.count, -1)
        row += seg.count
    return attn.out_proj(Tensor(y))


def _embed(model: Any, ids: np.ndarray, positions: np.ndarray) -> Tensor:
    """Token (+ learned position) embeddings of ids (1, P) at positions (P,)."""
    x = model.wte(ids)  # (1, P, h)
    if model.wpe is None:
        return x
    xp = get_array_module(model.wpe.weight.data)
    return x + Tensor(model.wpe.weight.data[xp.asarray(positions)])


def forward_segments(model: Any, tokens: np.ndarray, segments: list[Segment], cache: SlotCache,
                     batch_invariant: bool = True) -> np.ndarray:
    """tokens (N,) laid out as `segments` -> float64 logits (len(segments), vocab) at the last
    token of each segment, the same on every TP rank. Writes the new keys and values into
    `cache`. Collective over the model's TP communicator. Without `batch_invariant`, one BLAS
    call per matrix product and no padding (faster; a row's last bits may then depend on the batch)."""
    n = int(tokens.shape[0])
    if n != sum(s.count for s in segments) or n == 0:
        raise ValueError(f"{n} tokens do not fill segments of {[s.count for s in segments]}")
    per_call = ROW_BLOCK if batch_invariant else 1
    padded = -(-n // per_call) * per_call
    ids = np.zeros((1, padded), dtype=np.int64)
    ids[0, :n] = tokens
    positions = np.zeros(padded, dtype=np.int64)
    positions[:n] = np.concatenate([np.arange(s.start, s.start + s.count) for s in segments])
    if int(positions.max()) >= model.config.block_size:
        raise ValueError(f"position {int(positions.max())} is past block_size={model.config.block_size}")
    with no_grad(), row_blocks(ROW_BLOCK) if batch_invariant else contextlib.nullcontext():
        x = _embed(model, ids, positions)  # (1, P, h)
        for layer, block in enumerate(model.h):
            x = x + _attention(block.attn, block.ln_1(x), positions, layer, cache, segments)
            x = x + block.mlp(block.ln_2(x))
        x = model.ln_f(x)
        last = np.cumsum([s.count for s in segments]) - 1
        last = np.append(last, np.full(-len(last) % per_call, n - 1))  # the head's rows padded too
        xp = get_array_module(x.data)
        rows = Tensor(x.data[:, xp.asarray(last)])  # (1, S', h)
        local = model.head.logits(rows)
        full = gather_from_tp(local, model.grid.tp_comm).data[0, : len(segments), : model.config.vocab_size]
    return np.asarray(to_numpy(full), dtype=np.float64)


def check_batch_invariance(model: Any) -> bool:
    """Whether this machine computes a sequence's logits bit for bit alike alone and beside
    others (the property the padding above relies on). Collective; uses a scratch cache."""
    cache = SlotCache(model, 3, max_len=min(8, model.config.block_size))
    V = model.config.vocab_size
    prompt = np.arange(3, dtype=np.int64) % V
    alone = forward_segments(model, prompt, [Segment(0, 0, 3)], cache)
    other = (np.arange(4, dtype=np.int64) * 7 + 1) % V
    both = forward_segments(
        model, np.concatenate([other[:1], prompt, other[1:]]),
        [Segment(1, 0, 1), Segment(2, 0, 3), Segment(0, 0, 3)], cache,
    )
    return bool(np.array_equal(alone[0], both[1]))
