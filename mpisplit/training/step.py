"""Forward and backward of one step's batch on this rank: M equal micro-batches, run in the 1F1B
pipeline schedule when the grid has pp > 1 stages and one after the other (gradient
accumulation) otherwise. Gradients are those of the mean loss over the batch: each micro-batch's
loss is divided by M. With masked targets (chat data: `target_count`, the counted targets of the
whole step over every micro-batch and DP rank) the loss is the summed cross-entropy divided by
that count, as users expect (not a mean of per-micro-batch means, which weighs a token of a short
micro-batch more): each micro-batch's sum is divided by target_count / dp, so that the DP average
that follows gives sum / target_count. Nothing here reduces over DP: that happens once, after the
last backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mpisplit.autograd.tensor import Tensor, no_grad
from mpisplit.parallel.pipeline import StageLink, forward_only, one_forward_one_backward
from mpisplit.runtime.backend import get_array_module, to_numpy


def check_micro_batches(batch: int, micro_batches: int, what: str = "a DP rank's batch") -> int:
    """Rows per micro-batch, or ValueError when `micro_batches` does not split `batch` evenly."""
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"--micro-batches must be a positive integer, got {micro_batches!r}")
    if batch % micro_batches:
        raise ValueError(f"--micro-batches {micro_batches} does not divide {what} of {batch} sequences")
    return batch // micro_batches


class StepRunner:
    """Runs `net` (a GPT, or one stage of it) over M micro-batches on `grid`.

    `synchronous=True` makes every pipeline send synchronous (see StageLink), for tests."""

    def __init__(self, net: Any, grid: Any, micro_batches: int = 1, *, synchronous: bool = False) -> None:
        self.net, self.grid, self.micro_batches = net, grid, micro_batches
        self.link = StageLink(grid.pp_comm, synchronous=synchronous) if grid.pp > 1 else None

    def _split(self, x: Any, y: Any, positions: Any) -> tuple[list[Any], list[Any], list[Any], int]:
        """The micro-batches' ids, targets and packings (None: plain rows)."""
        rows = check_micro_batches(x.shape[0], self.micro_batches)
        xs = [x[i * rows:(i + 1) * rows] for i in range(self.micro_batches)]
        ys = [y[i * rows:(i + 1) * rows] for i in range(self.micro_batches)]
        packing = None if positions is None else self.net.packing(positions, x.shape)  # checked once, every rank alike
        packs = [None if packing is None else packing.rows(i * rows, (i + 1) * rows) for i in range(self.micro_batches)]
        return xs, ys, packs, rows

    def _stage_step(self, xs: list[Any], ys: list[Any], packs: list[Any], scale: float,
                    normalizer: float | None = None) -> Callable[[int, Tensor | None], Tensor]:
        net = self.net

        def step(i: int, x: Tensor | None) -> Tensor:
            out = net.stage_forward(xs[i] if x is None else x, packs[i])
            if not net.is_last:
                return out
            if normalizer is not None:
                return net.stage_loss(out, ys[i], normalizer=normalizer)
            return net.stage_loss(out, ys[i]) * scale

        return step

    def _loss(self, x: Any, y: Any, normalizer: float | None, packing: Any = None) -> Tensor:
        """One micro-batch's loss: its mean over M, or its sum over `normalizer`."""
        if normalizer is None:
            return self.net.loss(x, y, positions=packing) * (1.0 / self.micro_batches)
        return self.net.loss(x, y, normalizer=normalizer, positions=packing)

    def _normalizer(self, target_count: int | None) -> float | None:
        return None if target_count is None else max(int(target_count), 1) / self.grid.dp

    def forward_backward(self, x: Any, y: Any, *, loss_scale: float = 1.0, target_count: int | None = None,
                         positions: Any = None) -> float:
        """Gradients of the mean loss over this rank's batch (x, y: (B, T) token ids), times
        `loss_scale` (mixed precision), accumulate in the parameters' .grad; returns that mean
        loss (unscaled), the same on every stage. `target_count`: see the module's docstring.
        `positions` (B, T): packed rows (nn/packing.py). A scaled backward may overflow float16: the
        loss scaler finds the non-finite gradients and skips the step, so NumPy's overflow
        warnings are silenced there (and only there)."""
        normalizer = self._normalizer(target_count)
        batch = self._split(x, y, positions)
        if loss_scale == 1.0:
            return self._forward_backward(batch, x.shape[1], None, normalizer)
        with np.errstate(over="ignore", invalid="ignore"):
            return self._forward_backward(batch, x.shape[1], float(loss_scale), normalizer)

    def _forward_backward(self, batch: tuple, seq: int, seed: float | None, normalizer: float | None) -> float:
        m = self.micro_batches
        xs, ys, packs, rows = batch
        like = self._like()
        if self.link is None:
            total = 0.0
            for xi, yi, pk in zip(xs, ys, packs):
                loss = self._loss(xi, yi, normalizer, pk)
                # Seeded with the scale (in the loss's dtype): the loss itself is never scaled.
                loss.backward(None if seed is None else loss.xp.asarray(seed, dtype=loss.dtype))
                total += float(to_numpy(loss.data))
            self.sum_sequence_parallel_gradients()
            self.sum_replica_gradients()
            return total
        shape, dtype = self._boundary(rows, seq)
        outs = one_forward_one_backward(self._stage_step(xs, ys, packs, 1.0 / m, normalizer), m, self.link, shape,
                                        dtype, like, loss_seed=seed)
        self.sum_tied_gradients()
        self.sum_sequence_parallel_gradients()
        self.sum_replica_gradients()
        return self._share_loss(outs)

    def evaluate(self, x: Any, y: Any, *, summed: bool = False, positions: Any = None) -> float:
        """Mean loss over the batch without gradients, the same on every stage; with `summed` the
        summed cross-entropy of the counted targets instead (the caller divides)."""
        m = self.micro_batches
        xs, ys, packs, rows = self._split(x, y, positions)
        normalizer = 1.0 if summed else None
        with no_grad():
            if self.link is None:
                if summed:
                    return sum(float(to_numpy(self._loss(xi, yi, 1.0, pk).data)) for xi, yi, pk in zip(xs, ys, packs))
                return sum(float(to_numpy(self.net.loss(xi, yi, positions=pk).data))
                           for xi, yi, pk in zip(xs, ys, packs)) / m
            shape, dtype = self._boundary(rows, x.shape[1])
            outs = forward_only(self._stage_step(xs, ys, packs, 1.0 / m, normalizer), m, self.link, shape, dtype,
                                self._like())
        return self._share_loss(outs)

    def sum_tied_gradients(self) -> None:
        """wte's gradient summed between the first stage (embedding) and the last (head)."""
        comm = self.grid.embed_comm
        if comm is not None and self.net.config.tie_embeddings and self.net.wte.weight.requires_grad:
            w = self.net.wte.weight
            if w.grad is None:
                w.grad = w.grad_store if w.grad_store is not None else get_array_module(w.data).empty_like(w.data)
                w.grad[...] = 0
            comm.allreduce_(w.grad)

    def sum_sequence_parallel_gradients(self) -> None:
        """Under sequence parallelism, the gradients that each TP rank holds only for its own
        tokens (LayerNorms, row biases, positions), and LoRA's replicated factors (their share of
        the product), summed over TP: one all-reduce, one buffer."""
        params = [p for p in getattr(self.net, "tp_partial_params", []) if p.grad is not None]
        _sum_gradients(params, self.grid.tp_comm)

    def sum_replica_gradients(self) -> None:
        """A key/value head replicated on several TP ranks (tp > kv heads): each rank's gradient
        covers only its own query heads; summed over the ranks that share the head."""
        comm = getattr(self.net, "kv_replica_comm", None)
        if comm is not None:
            _sum_gradients([p for p in self.net.kv_replica_params if p.grad is not None], comm)

    def _boundary(self, rows: int, seq: int) -> tuple[tuple[int, ...], Any]:
        if getattr(self.net, "sequence_parallel", False):
            seq //= self.grid.tp  # sequence blocks cross the stage boundary
        return (rows, seq, self.net.config.n_embd), self._like().dtype  # (b, T, h) in the compute dtype

    def _like(self) -> Any:
        return self.net.parameters()[0].data

    def _share_loss(self, outs: list[Tensor]) -> float:
        """The last stage's sum of the scaled micro-batch losses, sent to every stage."""
        value = np.array([sum(float(to_numpy(o.data)) for o in outs) if self.net.is_last else 0.0])
        self.grid.pp_comm.bcast(value, root=self.grid.pp - 1)
        return float(value[0])


def _sum_gradients(params: list, comm: Any) -> None:
    """All-reduce the gradients of `params` over `comm` in one buffer, back into the same arrays
    (a gradient buffer's views stay its views)."""
    if not params:
        return
    xp = get_array_module(params[0].grad)
    flat = xp.concatenate([p.grad.reshape(-1) for p in params])
    comm.allreduce_(flat)
    offset = 0
    for p in params:
        p.grad[...] = flat[offset: offset + p.grad.size].reshape(p.shape)
        offset += p.size
