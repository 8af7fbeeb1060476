"""Vocabulary-parallel cross-entropy: the logits stay split, never gathered.

Rank r holds logits z[:, v] for v in its block [start, start + n) of the padded
vocabulary. With m = max_v z (all-reduce MAX), S = sum_v exp(z - m) (all-reduce
SUM) and z_t the target's logit (all-reduce SUM; only its owner contributes):

    loss_i = log S_i - (z_{i,t} - m_i)
    d loss_i / d z_{i,v} = exp(z_{i,v} - m_i) / S_i - [v == t_i]

Padded vocabulary entries (v >= V) are set to -inf before the max, so they never
win and contribute exp(-inf) = 0 to S and to the gradient.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpisplit import kernels
from mpisplit.autograd.tensor import Function, Tensor
from mpisplit.runtime.backend import get_array_module, is_low_precision


class _VocabParallelCrossEntropy(Function):
    def forward(
        self, logits: Any, targets: Any = None, comm: Any = None, vocab_start: int = 0, vocab_size: int = 0,
        ignore_index: int = -100, overwrite: bool = False, normalizer: float | None = None,
    ) -> Any:
        xp = get_array_module(logits)
        n = logits.shape[-1]
        z = logits.reshape(-1, n)
        in_place = overwrite  # z may become a copy below, which is then ours anyway
        self.shape, self.dtype = logits.shape, logits.dtype
        self.fused = kernels.applies(z)
        self.normalizer = normalizer
        if self.fused:
            return self._fused_forward(z, targets, comm, vocab_start, vocab_size, ignore_index, overwrite)
        if is_low_precision(z.dtype):  # 16-bit logits: softmax statistics and loss in float32
            z, in_place = z.astype(xp.float32), True
        t = targets.reshape(-1)
        real = max(0, min(n, vocab_size - vocab_start))  # columns of this rank inside the vocabulary
        if real < n:
            z, in_place = z.copy(), True
            z[:, real:] = -xp.inf
        valid = t != ignore_index
        local_t = t - vocab_start
        owned = valid & (local_t >= 0) & (local_t < real)
        local_t = xp.where(owned, local_t, 0)
        rows = xp.arange(z.shape[0])

        m = comm.allreduce(z.max(axis=1), op="max")  # a rank of padding only offers -inf
        zt = xp.where(owned, z[rows, local_t] - m, 0.0)  # before z may be overwritten
        e = xp.subtract(z, m[:, None], out=z if in_place else None)  # (N, n)
        xp.exp(e, out=e)
        s = comm.allreduce(e.sum(axis=1))
        zt = comm.allreduce(zt)

        if normalizer is not None:
            self.count = normalizer
        elif xp is np:
            self.count = max(int(valid.sum()), 1)
        else:  # stays on the device: no host sync in the forward pass
            self.count = xp.maximum(valid.sum(), 1)
        nll = (xp.log(s) - zt) * valid
        self.save(e, s, local_t, owned, valid)
        return xp.asarray(_per_token(nll.sum(), self.count), dtype=z.dtype)

    def _fused_forward(self, z: Any, targets: Any, comm: Any, vocab_start: int, vocab_size: int,
                       ignore_index: int, overwrite: bool) -> Any:
        """The same three all-reduces, with one pass for the maxima and one for exp and its
        float64 sums (padding columns are skipped, not copied and masked)."""
        from mpisplit.kernels.cross_entropy import exp_rows, row_max

        n, rows = z.shape[1], np.arange(z.shape[0])
        real = max(0, min(n, vocab_size - vocab_start))
        t = targets.reshape(-1)
        valid = t != ignore_index
        local_t = t - vocab_start
        owned = valid & (local_t >= 0) & (local_t < real)
        local_t = np.where(owned, local_t, 0)
        m = np.empty(z.shape[0], dtype=z.dtype)
        row_max(z, real, m)
        m = comm.allreduce(m, op="max")
        zt = np.where(owned, z[rows, local_t] - m, 0.0).astype(z.dtype)  # before z may be overwritten
        e, s = z if overwrite else np.empty_like(z), np.empty(z.shape[0])
        exp_rows(z, real, m, e, s)
        s = comm.allreduce(s.astype(z.dtype))
        zt = comm.allreduce(zt)
        self.count = max(int(valid.sum()), 1) if self.normalizer is None else self.normalizer
        nll = (np.log(s) - zt) * valid
        self.save(e, s, local_t, owned, valid)
        return np.asarray(nll.sum() / self.count, dtype=z.dtype)

    def backward(self, g: Any) -> Any:
        e, s, local_t, owned, valid = self.saved
        if self.fused:
            from mpisplit.kernels.cross_entropy import softmax_grad_rows

            weight = (valid * (float(g) / self.count)).astype(np.float64)
            softmax_grad_rows(e, s, local_t, owned, weight)
            return e.reshape(self.shape)
        xp = get_array_module(e)
        e /= s[:, None]  # softmax over the whole vocabulary, this rank's block
        if xp is np:
            e[xp.arange(e.shape[0])[owned], local_t[owned]] -= 1.0
        else:  # no boolean selection on a GPU: subtract 0 where this rank does not own the target
            e[xp.arange(e.shape[0]), local_t] -= owned.astype(e.dtype)
        e *= (valid * _per_token(g, self.count)).astype(e.dtype)[:, None]
        return e.reshape(self.shape).astype(self.dtype, copy=False)


def _per_token(total: Any, count: Any) -> Any:
    """total / count in total's dtype: a host count is a Python number (which NumPy casts to that
    dtype), a device count a 0-d integer array, cast the same way (else the quotient would be
    float64 and round once more on its way back: other bits than the host's)."""
    return total / (count if isinstance(count, (int, float)) else count.astype(total.dtype))


def check_targets(targets: Any, vocab_size: int, ignore_index: int = -100) -> None:
    """TypeError/ValueError unless targets are integers in [0, vocab_size) or ignore_index.

    Local and identical on every TP rank, so callers run it before any collective."""
    if targets.dtype.kind not in "iu":
        raise TypeError(f"targets must be integers, got dtype {targets.dtype}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        raise ValueError(f"targets must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}")


def vocab_parallel_cross_entropy(
    logits: Tensor, targets: Any, comm: Any, *, vocab_start: int, vocab_size: int, ignore_index: int = -100,
    overwrite_logits: bool = False, normalizer: float | None = None,
) -> Tensor:
    """Mean cross-entropy of split logits (..., n) against full-vocabulary targets (...).

    `vocab_start` is this rank's first vocabulary entry, `vocab_size` the real
    (unpadded) V; rows whose target is `ignore_index` do not count. With `overwrite_logits` the
    logits' array is reused for the softmax (one (N, n) array fewer alive), for callers that
    hold the logits nowhere else, as GPT.loss. With `normalizer` the summed cross-entropy is
    divided by it instead of by the number of counted targets (the targets of a whole training
    step, as training/step.py counts them).
    Three all-reduces of (N,) forward (max, exp-sum, target logit); none backward.
    """
    targets = targets.data if isinstance(targets, Tensor) else targets
    if tuple(targets.shape) != logits.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match logits shape {logits.shape[:-1]}")
    check_targets(targets, vocab_size, ignore_index)
    targets = get_array_module(logits.data).asarray(targets)  # host targets go to the logits' device
    return _VocabParallelCrossEntropy.apply(
        logits, targets=targets, comm=comm, vocab_start=vocab_start, vocab_size=vocab_size, ignore_index=ignore_index,
        overwrite=overwrite_logits, normalizer=normalizer,
    )
