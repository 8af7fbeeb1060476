"""LoRA adapters on split projections, laid out so that they need no communication of their own
in the forward pass (the layout vLLM serves).

A projection y = x W (W stored (in, out)) gains y += s (x A) B with A (in, r), B (r, out) and
s = alpha / r (alpha / sqrt(r) with rsLoRA). Hugging Face PEFT stores lora_A.weight = A^T (r, in)
and lora_B.weight = B^T (out, r).

    column-split W (rank i holds output features)   A replicated,            B split like W's outputs
    row-split W (rank i holds input features)       A split like W's inputs,  B replicated

A column layer's input is the same on every rank, so x A is too, and (x A) B_i is this rank's
block of outputs. A row layer's ranks each add s (x_i A_i) B to their partial product before its
all-reduce, which then sums the adapter's product along with the layer's. In the backward the
replicated factor's gradient is partial on each TP rank (A of a column layer sees only this rank's
output columns, B of a row layer only its share of x A): `partial` lists it, to be summed over TP.
Under sequence parallelism a column layer's input is this rank's sequence block: x A is computed
on the block and all-gathered (r columns, not h).

Dropout (PEFT's lora_dropout) applies to the adapter's input only, y = x W + s (drop(x) A) B, a
mask per projection. Its stream follows the input's layout: a column layer's input is the same
on every TP rank, so its mask is drawn from the shared stream (the same on every rank; the local
stream for a sequence block); a row layer's ranks hold different input features and draw theirs
from their local streams. The streams are the model's dropout generators, handed down by the
block, so full recomputation replays the very same masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mpisplit.autograd import ops
from mpisplit.autograd.tensor import Function, Tensor
from mpisplit.nn.module import Module, Parameter
from mpisplit.parallel.mappings import all_gather_from_sp
from mpisplit.runtime.backend import get_array_module

# Hugging Face module names of the Llama family's projections ("all-linear": all of them)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...] = TARGETS
    dropout: float = 0.0
    rslora: bool = False

    def to_meta(self) -> dict:
        """What a checkpoint's meta records of the adapters."""
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), "rslora": self.rslora}

    @classmethod
    def from_meta(cls, meta: dict) -> LoraConfig:
        return cls(rank=int(meta["rank"]), alpha=float(meta["alpha"]), targets=tuple(meta["targets"]),
                   rslora=bool(meta["rslora"]))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def validate(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"--lora-rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"--lora-alpha must be positive, got {self.alpha}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"--lora-targets: {unknown or 'none given'}; choose among {', '.join(TARGETS)} "
                             "or all-linear")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.dropout}")


def parse_targets(text: str) -> tuple[str, ...]:
    """"q_proj,v_proj" or "all-linear" -> the target names, in TARGETS order."""
    names = {t.strip() for t in text.split(",") if t.strip()}
    if names == {"all-linear"}:
        return TARGETS
    return tuple(t for t in TARGETS if t in names) + tuple(sorted(names - set(TARGETS)))


class LoRA(Module):
    """The adapter of one projection whose weight slab is `weight` (row: split by input features)."""

    def __init__(self, weight: Parameter, *, row: bool, config: LoraConfig) -> None:
        fan_in, fan_out = weight.global_shape
        r, dtype, xp = config.rank, weight.dtype, get_array_module(weight.data)
        bound = ("uniform", 1.0 / math.sqrt(fan_in))  # PEFT's kaiming_uniform_(a=sqrt(5)) of A
        if row:
            n = weight.shape[0]
            self.a = Parameter(xp.zeros((n, r), dtype), split_axis=0, start=weight.start, global_shape=(fan_in, r),
                               init=bound)
            self.b = Parameter(xp.zeros((r, fan_out), dtype))
        else:
            n = weight.shape[1]
            self.a = Parameter(xp.zeros((fan_in, r), dtype), init=bound)
            self.b = Parameter(xp.zeros((r, n), dtype), split_axis=1, start=weight.start, global_shape=(r, fan_out))
            self.b.replicas, self.b.replica_rank = weight.replicas, weight.replica_rank
        self.row, self.scale, self.dropout = row, config.scale, config.dropout

    @property
    def partial(self) -> Parameter:
        """The replicated factor, whose gradient is partial on each TP rank."""
        return self.b if self.row else self.a

    def add_column(self, y: Tensor, x: Tensor, comm: Any, sequence_parallel: bool, rngs: Any = None) -> Tensor:
        """y + s (x A) B_i for this rank's output block y; x is the TP region's input (after
        copy_to_tp), or this rank's sequence block under sequence parallelism. `rngs`: the
        model's (shared, local) dropout streams."""
        x = self._drop(x, rngs, 1 if sequence_parallel else 0)
        u = ops.linear(x, self.a) * self.scale  # scaled while it has r columns
        if sequence_parallel:
            u = all_gather_from_sp(u, comm, axis=1)
        return _AddProduct.apply(y, u, self.b)

    def add_row(self, partial: Tensor, x: Tensor, rngs: Any = None) -> Tensor:
        """partial + s (x_i A_i) B: this rank's share joins the partial product before its reduction."""
        return _AddProduct.apply(partial, ops.linear(self._drop(x, rngs, 1), self.a) * self.scale, self.b)

    def _drop(self, x: Tensor, rngs: Any, stream: int) -> Tensor:
        """x after the adapter's dropout (training only), drawn from rngs[stream]."""
        p = self.dropout if self.training else 0.0
        if p == 0.0:
            return x
        if rngs is None:
            raise RuntimeError("LoRA dropout needs the model's dropout streams (rngs) in training")
        return ops.dropout(x, p, rngs[stream])


class _AddProduct(Function):
    """y + u @ b written into y's array: y is a layer's fresh product that nothing else holds or
    saves, so the adapter costs no (B, T, n) array of its own between forward and backward."""

    def forward(self, y: Any, u: Any, b: Any) -> Any:
        y += u @ b
        self.save(u, b)
        return y

    def backward(self, g: Any) -> tuple[Any, Any, Any]:
        u, b = self.saved
        gu = g @ b.T if self.needs_input_grad[1] else None
        gb = u.reshape(-1, u.shape[-1]).T @ g.reshape(-1, g.shape[-1]) if self.needs_input_grad[2] else None
        return g, gu, gb


class RowAdapters:
    """Which served adapter each row of a serving batch uses (ids (N,): 0 none, k the k-th);
    one object shared by every AdapterSet of a model, set for the length of a forward pass."""

    def __init__(self) -> None:
        self.ids: Any = None


class AdapterSet:
    """The served adapters of one projection (their slabs, as LoRA lays them out): each row of
    a batch adds the product of its own adapter, computed row by row (a stacked product of
    one-row matrices), so a row's bits do not depend on the other rows or their adapters.
    Inference only: the rows are added into the product's array."""

    def __init__(self, rows: RowAdapters, factors: dict[int, tuple[Any, Any, float]]) -> None:
        self.rows, self.factors = rows, factors

    def add_column(self, y: Tensor, x: Tensor, comm: Any, sequence_parallel: bool, rngs: Any = None) -> Tensor:
        if sequence_parallel:
            raise ValueError("served adapters run without sequence parallelism")
        return self._add(y, x)

    def add_row(self, partial: Tensor, x: Tensor, rngs: Any = None) -> Tensor:
        return self._add(partial, x)

    def _add(self, y: Tensor, x: Tensor) -> Tensor:
        ids = self.rows.ids
        if ids is None:
            return y
        xp = get_array_module(y.data)
        out, inp = y.data.reshape(-1, y.shape[-1]), x.data.reshape(-1, x.shape[-1])
        for k, (a, b, scale) in self.factors.items():
            rows = xp.flatnonzero(ids == k)
            if len(rows):
                u = xp.matmul(inp[rows][:, None, :], a) * scale  # (R, 1, r): one row per product
                out[rows] += xp.matmul(u, b)[:, 0, :]
        return y
