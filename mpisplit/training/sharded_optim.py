"""AdamW with its state sharded over the data-parallel ranks (the distributed optimizer of
Megatron-LM, ZeRO stage 1 of DeepSpeed).

Every rank keeps the whole model, but of the flat gradient block (training/grad_buffer.py,
padded with zeros to a multiple of dp elements) DP rank r owns the contiguous part
[r * m, (r + 1) * m), m = padded size / dp, and holds both AdamW moments for that part only.
One step:

    reduce_scatter_gradients()   the block reduce-scattered over DP: rank r gets the mean of
                                 its part (in pieces of a few MiB, as the all-reduce is sent)
    clip_grad_norm(...)          the global norm from the parts: squares summed over the DP
                                 ranks, split slabs over TP, replicated ones once, stages over PP
    step()                       AdamW on the part (the same elementwise update as AdamW, so the
                                 same bits), then the parameters all-gathered over DP

A ring all-reduce is a reduce-scatter followed by an all-gather, so the two move the bytes of
the unsharded run's one all-reduce (Communicator.stats counts each at the full block's bytes).
Parameters become views of one flat block per dtype, in the gradient block's order, so the
all-gather lands in place.

Checkpoints keep the unsharded layout: `state_arrays()` all-gathers each moment (a collective,
transient memory of the whole state) and `load_state` takes this rank's range of a parameter's
slab, so a sharded run resumes unsharded, at another dp, tp or pp, and the reverse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpisplit.nn.module import Parameter
from mpisplit.parallel.comm import HOST_ALLREDUCE_CHUNK_BYTES, Communicator
from mpisplit.runtime.allocator import release_free_memory
from mpisplit.runtime.backend import get_array_module, is_low_precision, to_numpy
from mpisplit.training import grad_buffer
from mpisplit.training.optim import AdamW, _decays

KINDS = ("exp_avg", "exp_avg_sq")


@dataclass
class _Part:
    """One flat block (one dtype) and this rank's part of it."""

    grads: grad_buffer.GradBuffer
    data: Any  # (dp * m,) the parameters' values; each parameter's `.data` is a view of it
    m: int  # elements per rank
    lo: int  # this rank's part: block elements [lo, lo + m)
    # (parameter index, block lo, block hi) of every parameter that meets the part
    segments: list[tuple[int, int, int]] = field(default_factory=list)
    moments: dict[str, Any] = field(default_factory=dict)  # kind -> (m,) array


class ShardedAdamW(AdamW):
    """AdamW whose moments live 1/dp on each rank of `dp_comm` (a Communicator)."""

    checkpoint_type = "AdamW"  # saved in AdamW's layout, loadable by either

    def __init__(
        self, params: Iterable[Parameter], dp_comm: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, weight_decay: float = 0.0, decay_filter: Callable[[Parameter], bool] = _decays,
    ) -> None:
        if not isinstance(dp_comm, Communicator):
            raise TypeError(f"ShardedAdamW takes the DP Communicator (grid.dp_comm), got {type(dp_comm).__name__}")
        self.dp_comm = dp_comm
        super().__init__(params, lr, betas, eps, weight_decay, decay_filter)

    def _block_multiple(self) -> int:
        return self.dp_comm.size  # every rank's part of the same length

    def _init_state(self) -> None:
        dp, r = self.dp_comm.size, self.dp_comm.rank
        index = {id(p): i for i, p in enumerate(self.params)}
        self.parts = []
        self._offsets = {}  # parameter index -> (its part, its offset in the block)
        for buf in grad_buffer.attach(self.params, multiple=dp):
            xp = get_array_module(buf.flat)
            # zeros (calloc'ed: pages appear as the parameters are copied in, while the arrays
            # they replace are released), not zeros_like, which writes every page at once
            data = xp.zeros(buf.flat.size, dtype=buf.flat.dtype)
            m = data.size // dp
            part = _Part(buf, data, m, r * m)
            offset = 0
            for p in buf.params:
                self._offsets[index[id(p)]] = (part, offset)
                data[offset: offset + p.size] = p.data.reshape(-1)
                p.data = data[offset: offset + p.size].reshape(p.shape)
                lo, hi = max(offset, part.lo), min(offset + p.size, part.lo + m)
                if lo < hi:
                    part.segments.append((index[id(p)], lo, hi))
                offset += p.size
            part.moments = {kind: xp.zeros(m, dtype=data.dtype) for kind in KINDS}
            self.parts.append(part)
        if isinstance(self.parts[0].data, np.ndarray):
            release_free_memory()  # the parameters' first arrays, now copied into the blocks

    # ------------------------------------------------------------------ the step

    def _pieces(self, part: _Part) -> list[slice]:
        """Ranges of a part sent as one collective each: the block in pieces of about
        HOST_ALLREDUCE_CHUNK_BYTES, like the unsharded all-reduce."""
        step = max(1, HOST_ALLREDUCE_CHUNK_BYTES // part.data.itemsize // self.dp_comm.size)
        return [slice(lo, min(part.m, lo + step)) for lo in range(0, part.m, step)]

    def _collect_gradients(self) -> None:
        # A gradient that is not its block's view (replaced by code outside backward) is
        # copied in, so that the block holds every gradient of the step.
        for p in self.params:
            if p.grad is not None and p.grad is not p.grad_store:
                p.grad_store[...] = p.grad
                p.grad = p.grad_store

    def reduce_scatter_gradients(self) -> None:
        """This rank's part of the block = the mean of that part over the DP ranks; the rest
        of the block is left as it is (not this rank's to read). Collective over dp_comm."""
        self._collect_gradients()
        dp = self.dp_comm.size
        if dp == 1:
            return
        for part in self.parts:
            blocks = part.grads.flat.reshape(dp, part.m)  # row q: rank q's part
            for s in self._pieces(part):
                self.dp_comm.reduce_scatter_rows_(blocks, s)
            blocks[self.dp_comm.rank] *= 1.0 / dp

    def clip_grad_norm(self, max_norm: float, tp_comm: Any, pp_comm: Any = None) -> float:
        """Scale this rank's part so that the global gradient norm is at most max_norm;
        returns the norm before clipping (the same on every rank). Collective."""
        norm = self.global_grad_norm(tp_comm, pp_comm)
        if max_norm > 0 and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for part in self.parts:
                part.grads.flat[part.lo: part.lo + part.m] *= scale
        return norm

    def global_grad_norm(self, tp_comm: Any, pp_comm: Any = None) -> float:
        """optim.global_grad_norm from the parts: each rank's squares summed over DP."""
        sums = np.zeros(2)  # squares of split slabs, of replicated parameters
        for part in self.parts:
            flat = part.grads.flat
            for i, lo, hi in part.segments:
                p = self.params[i]
                if p.grad is None or p.pipeline_copy:
                    continue
                g = flat[lo:hi]
                if is_low_precision(g.dtype):
                    g = g.astype(np.float32)
                sums[0 if p.split_axis is not None else 1] += float(to_numpy(get_array_module(g).vdot(g, g)))
        if self.dp_comm.size > 1:
            sums = self.dp_comm.allreduce(sums)
        if tp_comm.size > 1:
            # replicated squares from TP rank 0 only: every TP rank then adds the same numbers
            sums = tp_comm.allreduce(np.array([sums[0], sums[1] if tp_comm.rank == 0 else 0.0]))
        total = float(sums[0] + sums[1])
        if pp_comm is not None and pp_comm.size > 1:
            total = float(pp_comm.allreduce(np.array([total]))[0])
        return math.sqrt(total)

    def step(self) -> None:
        """AdamW on this rank's part, then every parameter all-gathered. Collective."""
        self.step_count += 1
        step_size, root_bias = self._bias_terms()
        for part in self.parts:
            grads = part.grads.flat
            for i, lo, hi in part.segments:
                if self.params[i].grad is None:
                    continue
                local = slice(lo - part.lo, hi - part.lo)
                self._apply(part.data[lo:hi], grads[lo:hi], part.moments["exp_avg"][local],
                            part.moments["exp_avg_sq"][local], self._decay(i), step_size, root_bias)
            self._all_gather(part)

    def _all_gather(self, part: _Part) -> None:
        dp = self.dp_comm.size
        if dp == 1:
            return
        blocks = part.data.reshape(dp, part.m)
        for s in self._pieces(part):
            self.dp_comm.allgather_rows_(blocks, s)

    # ------------------------------------------------------------------ memory and checkpoints

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (both moments of its parts)."""
        return sum(a.nbytes for part in self.parts for a in part.moments.values())

    def state_kinds(self) -> list[str]:
        return list(KINDS)

    def state_arrays(self) -> dict[str, list[Any]]:
        """Every parameter's whole moments, all-gathered over DP (collective; transient arrays
        of the whole state): the layout of an unsharded AdamW's, for checkpoints."""
        dp = self.dp_comm.size
        out: dict[str, list[Any]] = {kind: [None] * len(self.params) for kind in KINDS}
        for part in self.parts:
            xp = get_array_module(part.data)
            for kind in KINDS:
                full = xp.empty(dp * part.m, dtype=part.data.dtype)
                blocks = full.reshape(dp, part.m)
                blocks[self.dp_comm.rank] = part.moments[kind]
                for s in self._pieces(part):
                    self.dp_comm.allgather_rows_(blocks, s)
                for i, (owner, offset) in self._offsets.items():
                    if owner is part:
                        p = self.params[i]
                        out[kind][i] = full[offset: offset + p.size].reshape(p.shape)
        return out

    def load_state(self, kind: str, i: int, value: Any) -> None:
        """This rank's range of parameter i's moment `kind` from `value` (its whole slab)."""
        if kind not in KINDS:
            raise ValueError(f"unknown AdamW state {kind!r}; expected one of {list(KINDS)}")
        part, offset = self._offsets[i]
        p = self.params[i]
        lo, hi = max(offset, part.lo), min(offset + p.size, part.lo + part.m)
        if lo < hi:
            xp = get_array_module(part.data)
            flat = np.asarray(value).reshape(-1)[lo - offset: hi - offset]
            part.moments[kind][lo - part.lo: hi - part.lo] = xp.asarray(flat, dtype=part.data.dtype)
