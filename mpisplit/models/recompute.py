"""Full activation recomputation: a block's forward keeps only its input; backward runs the
block's forward again (with the dropout generators as they were, so every mask is the same)
and back-propagates through that fresh graph.

    none       every activation of the block is kept for backward
    selective  the attention core (weights, their dropout) is recomputed (nn/attention.py)
    full       only each block's input is kept (this file)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from mpisplit.autograd.tensor import Function, Tensor, is_grad_enabled, no_grad

RECOMPUTE_MODES = ("none", "selective", "full")


def check_recompute(mode: Any) -> str:
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {list(RECOMPUTE_MODES)}, got {mode!r}")
    return mode


class _Recomputed(Function):
    """x -> run(x, rngs) without a graph; backward: run it again with a graph, then backward."""

    def forward(self, x: Any, run: Callable[[Tensor, tuple], Tensor], rngs: tuple = ()) -> Any:
        self.run = run
        self.rngs_before = tuple(copy.deepcopy(r) for r in rngs)  # where the masks were drawn from
        with no_grad():
            out = run(Tensor(x), rngs).data
        self.save(x)
        return out

    def backward(self, g: Any) -> Any:
        (x,) = self.saved
        inp = Tensor(x, requires_grad=True)
        out = self.run(inp, tuple(copy.deepcopy(r) for r in self.rngs_before))
        out.backward(g)  # parameter gradients accumulate in their .grad as usual
        return inp.grad


def recomputed(run: Callable[[Tensor, tuple], Tensor], x: Tensor, rngs: tuple) -> Tensor:
    """run(x, rngs) keeping only x for backward (plain run(x, rngs) when no graph is recorded)."""
    if not (is_grad_enabled() and x.requires_grad):
        return run(x, rngs)
    return _Recomputed.apply(x, run=run, rngs=rngs)
