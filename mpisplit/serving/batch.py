"""One forward pass over many sequences at once, each reading and writing its own blocks of
the paged KV cache (any decoder: the model's parts do the work; attention caches its local
key/value heads, grouped or not).

The tokens of every running sequence are laid end to end in one row of the batch:
x (1, N, h), N = the tokens fed this step (a prompt chunk for a sequence still in prefill,
one token for one that decodes). The linear layers, norms and the MLP see all N rows
together; attention runs per sequence, its queries against its own blocks' keys and values
(kernels/paged_attention.py on the CPU: each query row by itself; on a GPU or without the
compiled kernels, the sequence's blocks gathered into one array, then the model's attention).
So a sequence never sees another's keys.

Batch invariance: a BLAS gemm gives a row the same bits whatever the other rows hold, but
its rounding can depend on how many rows the call has: OpenBLAS computes a one-row product
with a separate kernel, and (its AVX-512 kernels) products below about 2^20 multiply-adds
with small-matrix kernels that round differently from the blocked ones. With
`batch_invariant`, every matrix product of the linear layers and the head runs on exactly
ROW_BLOCK rows per call (`autograd.linalg.row_blocks`; the batch is padded to a multiple of
it, a padding row being token 0 at position 0, dropped after), and calls of one shape give a
row the same bits wherever it sits. With the compiled attention, every part of the pass is
then computed row by row in a fixed order: a sequence's logits do not depend on what else
runs with it, how its prompt was cut into chunks, or whether its first blocks came from the
prefix cache. `check_batch_invariance` tests this property of the machine's BLAS at start-up.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpisplit import kernels
from mpisplit.autograd import Tensor, no_grad
from mpisplit.autograd.linalg import row_blocks
from mpisplit.nn.gqa import grouped_decode
from mpisplit.parallel.mappings import gather_from_tp
from mpisplit.runtime.backend import get_array_module, to_numpy
from mpisplit.serving.kv_pool import PagedKV
from mpisplit.serving.lean import lean_blocks, lean_forward

ROW_BLOCK = 8  # rows per matrix-product call in a batched forward


@dataclass(frozen=True)
class Segment:
    """`count` tokens of a sequence at positions start .. start+count-1; its block table
    `blocks` covers every position up to the last."""

    blocks: tuple[int, ...]
    start: int
    count: int


@dataclass(frozen=True)
class _Index:
    """Where this pass's rows live in the pool: row i's position is written to block
    blocks[i], offset offsets[i]; tables/starts/counts as the attention kernel reads them."""

    rows: int
    blocks: Any
    offsets: Any
    tables: np.ndarray
    starts: np.ndarray
    counts: np.ndarray

    @classmethod
    def of(cls, segments: list[Segment], positions: np.ndarray, block_size: int, xp: Any) -> _Index:
        """`positions`: the rows' positions, the segments' end to end."""
        owner = np.repeat(np.arange(len(segments)), [s.count for s in segments])
        tables = np.zeros((len(segments), max(len(s.blocks) for s in segments)), dtype=np.int64)
        for i, s in enumerate(segments):
            tables[i, : len(s.blocks)] = s.blocks
        blocks = tables[owner, positions // block_size]
        return cls(len(positions), xp.asarray(blocks), xp.asarray(positions % block_size), tables,
                   np.array([s.start for s in segments], dtype=np.int64),
                   np.array([s.count for s in segments], dtype=np.int64))


def _gathered(pool: Any, blocks: tuple[int, ...], end: int, keys: bool) -> Any:
    """A sequence's positions 0..end-1 of one layer's pool -> (1, kv, end, hs); key blocks are
    stored transposed, (kv, hs, bs)."""
    xp = get_array_module(pool)
    bs = pool.shape[3] if keys else pool.shape[2]
    nb = -(-end // bs)
    part = pool[xp.asarray(blocks[:nb])]  # (nb, kv, hs, bs) or (nb, kv, bs, hs)
    part = part.transpose(1, 0, 3, 2) if keys else part.transpose(1, 0, 2, 3)
    return part.reshape(1, part.shape[0], nb * bs, part.shape[3])[:, :, :end]


def _attention(attn: Any, x: Tensor, positions: Any, layer: int, kv: PagedKV, segments: list[Segment],
               index: _Index) -> Tensor:
    """The block's attention over the segments: x (1, P, h) -> (1, P, h), one all-reduce."""
    q, k_new, v_new = attn.rows_qkv(x, positions)  # (1, P, nh, hs), (1, P, kv, hs)
    return attn.out_proj(Tensor(attend(attn, q, k_new, v_new, layer, kv, segments, index)))


def attend(attn: Any, q: Any, k_new: Any, v_new: Any, layer: int, kv: PagedKV, segments: list[Segment],
           index: _Index) -> Any:
    """The rows' new keys and values written into their blocks, then each query row against its
    own sequence's: q (1, P, nh, hs), k_new and v_new (1, P, kv, hs) -> (1, P, nh * hs) (padding
    rows 0), before the output projection."""
    xp = get_array_module(q)
    n = index.rows
    k_pool, v_pool = kv.k[layer], kv.v[layer]
    k_pool[index.blocks, :, :, index.offsets] = kv.fmt.encode(k_new[0, :n])
    v_pool[index.blocks, :, index.offsets] = kv.fmt.encode(v_new[0, :n])
    y = xp.zeros((1, q.shape[1], attn.local_heads * attn.head_size), dtype=q.dtype)  # padding rows stay 0
    qs = xp.ascontiguousarray(q[0, :n])
    if kernels.applies(qs) and (kv.fmt.packed or kernels.applies(qs, k_pool, v_pool)):
        from mpisplit.kernels.paged_attention import paged_attention

        out = np.empty_like(qs)
        paged_attention(qs, k_pool, v_pool, index.tables, index.starts, index.counts, out, kv.fmt.code)
        y[0, :n] = out.reshape(n, -1)
        return y
    row = 0
    for seg in segments:
        end = seg.start + seg.count
        k, v = (kv.fmt.decode(_gathered(pool, seg.blocks, end, keys), q.dtype)
                for pool, keys in ((k_pool, True), (v_pool, False)))
        out = grouped_decode(qs[None, row: row + seg.count], k, v, seg.start)  # (1, t, nh, hs)
        y[:, row: row + seg.count] = out.reshape(1, seg.count, -1)
        row += seg.count
    return y


def _embed(model: Any, ids: np.ndarray, positions: np.ndarray) -> Tensor:
    """Token (+ learned position) embeddings of ids (1, P) at positions (P,)."""
    x = model.wte(ids)  # (1, P, h)
    if model.wpe is None:
        return x
    xp = get_array_module(model.wpe.weight.data)
    return x + Tensor(model.wpe.weight.data[xp.asarray(positions)])


def forward_segments(model: Any, tokens: np.ndarray, segments: list[Segment], kv: PagedKV,
                     batch_invariant: bool = True, every_row: list[bool] | None = None,
                     adapters: list[int] | None = None, lean: bool = True) -> Any:
    """tokens (N,) laid out as `segments` -> float64 logits (len(segments), vocab) at the last
    token of each segment, the same on every TP rank. Writes the new keys and values into
    their blocks of `kv`. Collective over the model's TP communicator. Without
    `batch_invariant`, one BLAS call per matrix product and no padding (faster; a row's last
    bits may then depend on the batch).

    `every_row` (a flag per segment; prompt logprobs): also the logits of every row of the
    flagged segments, from the same pass; then (last-row logits, {segment index: (count, vocab)}).
    `adapters` (per segment; 0: the base model): the served LoRA adapter each segment's rows use
    (models/lora.py attach_served_adapters). `lean`: the blocks on plain arrays where
    serving/lean.py takes the model (the same bits; False: through the modules)."""
    n = int(tokens.shape[0])
    if n != sum(s.count for s in segments) or n == 0:
        raise ValueError(f"{n} tokens do not fill segments of {[s.count for s in segments]}")
    for s in segments:
        if len(s.blocks) * kv.block_size < s.start + s.count:
            raise ValueError(f"{len(s.blocks)} blocks do not hold positions up to {s.start + s.count - 1}")
    per_call = ROW_BLOCK if batch_invariant else 1
    padded = -(-n // per_call) * per_call
    ids = np.zeros((1, padded), dtype=np.int64)
    ids[0, :n] = tokens
    positions = np.zeros(padded, dtype=np.int64)
    positions[:n] = np.concatenate([np.arange(s.start, s.start + s.count) for s in segments])
    if int(positions.max()) >= model.config.block_size:
        raise ValueError(f"position {int(positions.max())} is past block_size={model.config.block_size}")
    index = _Index.of(segments, positions[:n], kv.block_size, get_array_module(kv.k[0]))
    with no_grad(), row_blocks(ROW_BLOCK) if batch_invariant else contextlib.nullcontext(), \
            _row_adapters(model, segments, adapters, padded):
        x = _embed(model, ids, positions)  # (1, P, h)
        blocks = lean_blocks(model) if lean else None
        if blocks is not None:  # the same arithmetic on arrays (serving/lean.py)
            x = Tensor(lean_forward(blocks, x.data, positions, kv, segments, index, attend))
        else:
            for layer, block in enumerate(model.h):
                x = x + _attention(block.attn, block.ln_1(x), positions, layer, kv, segments, index)
                x = x + block.mlp(block.ln_2(x))
        x = model.ln_f(x)
        ends = np.cumsum([s.count for s in segments])
        last = _head(model, x, ends - 1, per_call, n)
        if not every_row or not any(every_row):
            return last
        flagged = [i for i, f in enumerate(every_row) if f]
        wanted = np.concatenate([np.arange(ends[i] - segments[i].count, ends[i]) for i in flagged])
        rows = _head(model, x, wanted, per_call, n)
        bounds = np.cumsum([0] + [segments[i].count for i in flagged])
        return last, {i: rows[bounds[k]: bounds[k + 1]] for k, i in enumerate(flagged)}


@contextlib.contextmanager
def _row_adapters(model: Any, segments: list[Segment], adapters: list[int] | None, padded: int) -> Any:
    """Each row's served adapter set for the pass (padding rows: none)."""
    holder = getattr(model, "served_adapters", None)
    if holder is None or not adapters or not any(adapters):
        yield
        return
    ids = np.zeros(padded, dtype=np.int64)
    ids[: sum(s.count for s in segments)] = np.repeat(adapters, [s.count for s in segments])
    holder.ids = get_array_module(model.parameters()[0].data).asarray(ids)
    try:
        yield
    finally:
        holder.ids = None


def _head(model: Any, x: Tensor, picks: np.ndarray, per_call: int, n: int) -> np.ndarray:
    """float64 logits (len(picks), vocab) of rows `picks` of x (1, P, h), gathered over TP; the
    rows padded to whole row blocks, as every other product of the pass."""
    padded = np.append(picks, np.full(-len(picks) % per_call, n - 1))
    xp = get_array_module(x.data)
    local = model.head.logits(Tensor(x.data[:, xp.asarray(padded)]))  # (1, S', V/t)
    full = gather_from_tp(local, model.grid.tp_comm).data[0, : len(picks), : model.config.vocab_size]
    return np.asarray(to_numpy(full), dtype=np.float64)


def check_batch_invariance(model: Any) -> bool:
    """Whether this machine computes a sequence's logits bit for bit alike alone and beside
    others (the property the padding above relies on). Collective; uses a scratch cache."""
    kv = PagedKV(model, 6, 2)  # the model's dtype: the products' invariance is what is checked
    V = model.config.vocab_size
    prompt = np.arange(3, dtype=np.int64) % V
    alone = forward_segments(model, prompt, [Segment((0, 1), 0, 3)], kv)
    other = (np.arange(4, dtype=np.int64) * 7 + 1) % V
    both = forward_segments(
        model, np.concatenate([other[:1], prompt, other[1:]]),
        [Segment((2,), 0, 1), Segment((3, 4), 0, 3), Segment((5, 0), 0, 3)], kv,
    )
    return bool(np.array_equal(alone[0], both[1]))
