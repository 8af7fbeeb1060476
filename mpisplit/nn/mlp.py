"""The Megatron MLP: column-split fc, GELU on the local slab, row-split proj (one all-reduce each way)."""

from __future__ import annotations

from typing import Any

from mpisplit.autograd import Tensor, ops
from mpisplit.nn.linear import ColumnParallelLinear, RowParallelLinear
from mpisplit.nn.module import Module


class ParallelMLP(Module):
    """GELU MLP: column split (h -> ffn) then row split (ffn -> h).

    The hidden activation stays split between the two, so a forward pass costs
    exactly one all-reduce (after the row split) and a backward pass one more
    (the input gradient of the column split).
    """

    def __init__(
        self, hidden: int, ffn_hidden: int, tp_comm: Any, *, activation: str = "gelu", dtype: Any = "float32",
        std: float = 0.02, proj_std: float | None = None, seed: int | None = None,
    ) -> None:
        if activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {activation!r}")
        self.activation = activation
        self.c_fc = ColumnParallelLinear(hidden, ffn_hidden, tp_comm, dtype=dtype, std=std)
        self.c_proj = RowParallelLinear(
            ffn_hidden, hidden, tp_comm, dtype=dtype, std=std if proj_std is None else proj_std,
        )
        if seed is not None:
            self.reset_parameters(seed)

    def forward(self, x: Tensor, *, sequence_parallel: bool = False) -> Tensor:
        """x (B, T, h), or (B, T/t, h) sequence shards with `sequence_parallel`; the output alike."""
        h = self.c_fc(x, sequence_parallel=sequence_parallel)  # (B, T, ffn/t)
        h = ops.gelu(h) if self.activation == "gelu" else ops.relu(h)
        return self.c_proj(h, sequence_parallel=sequence_parallel)
