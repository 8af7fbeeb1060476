"""The Megatron MLP: column-split fc, GELU on the local slab, row-split proj (one all-reduce each way)."""

from __future__ import annotations

from typing import Any

from mpisplit.autograd import Tensor, ops
from mpisplit.nn.linear import ColumnParallelLinear, RowParallelLinear, column_group
from mpisplit.nn.module import Module


class ParallelMLP(Module):
    """GELU MLP: column split (h -> ffn) then row split (ffn -> h).

    The hidden activation stays split between the two, so a forward pass costs
    exactly one all-reduce (after the row split) and a backward pass one more
    (the input gradient of the column split).
    """

    def __init__(
        self, hidden: int, ffn_hidden: int, tp_comm: Any, *, activation: str = "gelu", dtype: Any = "float32",
        std: float = 0.02, proj_std: float | None = None, seed: int | None = None, bias: bool = True,
    ) -> None:
        if activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {activation!r}")
        self.activation = activation
        self.c_fc = ColumnParallelLinear(hidden, ffn_hidden, tp_comm, bias=bias, dtype=dtype, std=std)
        self.c_proj = RowParallelLinear(
            ffn_hidden, hidden, tp_comm, bias=bias, dtype=dtype, std=std if proj_std is None else proj_std,
        )
        if seed is not None:
            self.reset_parameters(seed)

    def forward(self, x: Tensor, *, sequence_parallel: bool = False, rngs: Any = None) -> Tensor:
        """x (B, T, h), or (B, T/t, h) sequence shards with `sequence_parallel`; the output alike."""
        h = self.c_fc(x, sequence_parallel=sequence_parallel)  # (B, T, ffn/t)
        h = ops.gelu(h) if self.activation == "gelu" else ops.relu(h)
        return self.c_proj(h, sequence_parallel=sequence_parallel)


class SwiGLUMLP(Module):
    """Llama MLP: down(silu(gate(x)) * up(x)); gate and up column-split, down row-split.

    One all-reduce forward (after down) and one backward (the input gradient, shared by gate and
    up: their input enters the TP region once). Under sequence parallelism gate and up run as one
    product of their concatenated slabs, so the sequence is all-gathered once.
    """

    def __init__(
        self, hidden: int, ffn_hidden: int, tp_comm: Any, *, bias: bool = False, dtype: Any = "float32",
        std: float = 0.02, proj_std: float | None = None,
    ) -> None:
        self.comm = tp_comm
        self.gate_proj = ColumnParallelLinear(hidden, ffn_hidden, tp_comm, bias=bias, dtype=dtype, std=std)
        self.up_proj = ColumnParallelLinear(hidden, ffn_hidden, tp_comm, bias=bias, dtype=dtype, std=std)
        self.down_proj = RowParallelLinear(
            ffn_hidden, hidden, tp_comm, bias=bias, dtype=dtype, std=std if proj_std is None else proj_std,
        )

    def forward(self, x: Tensor, *, sequence_parallel: bool = False, rngs: Any = None) -> Tensor:
        """x (B, T, h), or (B, T/t, h) sequence shards with `sequence_parallel`; the output alike.
        `rngs`: the model's dropout streams (LoRA adapters' dropout)."""
        gate, up = column_group(x, [self.gate_proj, self.up_proj], self.comm, sequence_parallel,
                                rngs)  # (B, T, ffn/t)
        return self.down_proj(ops.swiglu(gate, up), sequence_parallel=sequence_parallel, rngs=rngs)
