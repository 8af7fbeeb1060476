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

Mixed precision (`shard_master_weights(mp)`): the optimizer is built on the float32 master
parameters, then keeps the master weights of its part only, besides the moments. step()
updates the float32 part, rounds it to the 16-bit dtype (what MixedPrecision.update_model does
to every weight of an unsharded run: the same bits) and all-gathers the 16-bit block, of which
the compute model's parameters are views; half the bytes of gathering float32.

Checkpoints (training/state.py): `state_pieces()` gives this rank's range of every moment (and,
sharded, master weight) as pieces of the parameter's slab, which each DP rank writes itself;
`local_range(i)` and `load_range` read back only this rank's range, from pieces or whole slabs
of any layout. So a sharded run resumes unsharded, at another dp, tp or pp, and the reverse,
and no rank gathers the state.
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
    # (dp * m,) the parameters' values, each parameter's `.data` a view of it (once the master
    # weights are sharded: the 16-bit compute model's values, its parameters the views)
    data: Any
    m: int  # elements per rank
    lo: int  # this rank's part: block elements [lo, lo + m)
    # (parameter index, block lo, block hi) of every parameter that meets the part
    segments: list[tuple[int, int, int]] = field(default_factory=list)
    moments: dict[str, Any] = field(default_factory=dict)  # kind -> (m,) array
    master: Any = None  # (m,) float32 master weights of the part once shard_master_weights ran

    def values(self) -> tuple[Any, int]:
        """The array AdamW updates and the block element its index 0 stands for."""
        return (self.data, 0) if self.master is None else (self.master, self.lo)


class ShardedAdamW(AdamW):
    """AdamW whose moments (and, with shard_master_weights, master weights) live 1/dp on each
    rank of `dp_comm` (a Communicator)."""

    checkpoint_type = "AdamW"  # the same tensors as AdamW's checkpoints, loadable by either
    holds_master_weights = False  # True once shard_master_weights ran

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

    def shard_master_weights(self, mp: Any) -> None:
        """Keep the float32 master weights of this rank's part only. `mp` (MixedPrecision) pairs
        this optimizer's (master) parameters with the 16-bit ones of its compute model, which
        become views of one 16-bit block per part; step() then writes the model, and
        mp.update_model() does nothing. A master parameter's `.data` becomes its twin's: the
        values the model computes with. Call once the master weights are final (loaded)."""
        if self.holds_master_weights:
            raise ValueError("shard_master_weights: the master weights are already sharded")
        twin = {id(m): p for p, m in mp.trained}
        if set(twin) != {id(p) for p in self.params}:
            raise ValueError("shard_master_weights: the MixedPrecision's master parameters are not this optimizer's")
        for part in self.parts:
            xp = get_array_module(part.data)
            low = xp.zeros(part.data.size, dtype=mp.dtype)  # calloc'ed, as in _init_state
            offset = 0
            for p in part.grads.params:
                q = twin[id(p)]
                low[offset: offset + p.size] = q.data.reshape(-1)  # = the master rounded (update_model)
                q.data = p.data = low[offset: offset + p.size].reshape(q.shape)
                offset += p.size
            part.master = part.data[part.lo: part.lo + part.m].copy()
            part.data = low  # the float32 block is released with its last view
        mp.model_written_by_optimizer = True
        self.holds_master_weights = True
        if isinstance(self.parts[0].data, np.ndarray):
            release_free_memory()

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
                if p.grad is None or p.pipeline_copy or p.replica_rank > 0:  # replicas: counted by the first
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
            values, base = part.values()
            for i, lo, hi in part.segments:
                if self.params[i].grad is None:
                    continue
                local = slice(lo - part.lo, hi - part.lo)
                self._apply(values[lo - base: hi - base], grads[lo:hi], part.moments["exp_avg"][local],
                            part.moments["exp_avg_sq"][local], self._decay(i), step_size, root_bias)
            if part.master is not None:  # rounded to nearest, as MixedPrecision.update_model
                part.data[part.lo: part.lo + part.m] = part.master
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
        """Bytes of optimizer state this rank holds (both moments of its parts, and the master
        weights of its parts once sharded)."""
        return sum(a.nbytes for part in self.parts for a in (*part.moments.values(), part.master) if a is not None)

    def state_kinds(self) -> list[str]:
        return list(KINDS)

    def state_arrays(self) -> dict[str, list[Any]]:
        raise TypeError("ShardedAdamW holds 1/dp of each moment: its checkpoint state is state_pieces()")

    def local_range(self, i: int) -> tuple[int, int]:
        """[lo, hi): the elements of parameter i's flattened slab that this rank's part holds
        (lo == hi: none)."""
        part, offset = self._offsets[i]
        lo, hi = max(offset, part.lo), min(offset + self.params[i].size, part.lo + part.m)
        return (lo - offset, hi - offset) if lo < hi else (0, 0)

    def state_pieces(self) -> dict[str, list[tuple[int, int, Any]]]:
        """This rank's range of every parameter's state: kind -> one (lo, hi, values) per
        parameter, values the elements [lo, hi) of its flattened slab (views on the host, no
        copy); kinds: the moments, and "master" once the master weights are sharded."""
        kinds = [*KINDS, "master"] if self.holds_master_weights else list(KINDS)
        out: dict[str, list[tuple[int, int, Any]]] = {kind: [] for kind in kinds}
        for i in range(len(self.params)):
            part, offset = self._offsets[i]
            lo, hi = self.local_range(i)
            at = slice(offset + lo - part.lo, offset + hi - part.lo)
            for kind in kinds:
                array = part.master if kind == "master" else part.moments[kind]
                out[kind].append((lo, hi, to_numpy(array[at])))
        return out

    def load_range(self, kind: str, i: int, values: Any) -> None:
        """This rank's range of parameter i's `kind` (a moment, or "master" once sharded) from
        `values`, the elements local_range(i) of its flattened slab."""
        if kind not in KINDS and not (kind == "master" and self.holds_master_weights):
            raise ValueError(f"unknown AdamW state {kind!r}; expected one of {list(KINDS)}")
        part, offset = self._offsets[i]
        lo, hi = self.local_range(i)
        if hi > lo:
            xp = get_array_module(part.grads.flat)
            array = part.master if kind == "master" else part.moments[kind]
            array[offset + lo - part.lo: offset + hi - part.lo] = xp.asarray(values, dtype=array.dtype)

    def load_state(self, kind: str, i: int, value: Any) -> None:
        """This rank's range of parameter i's moment `kind` from `value` (its whole slab)."""
        lo, hi = self.local_range(i)
        self.load_range(kind, i, np.asarray(value).reshape(-1)[lo:hi])
