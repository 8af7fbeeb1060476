"""Activation recomputation: selective (attention core) and full (each block) against none.

References: the same model and layout without recomputation, dropout on (masks must be replayed
exactly): loss and every gradient to 1e-10, at every TP degree the world allows and with
sequence parallelism and pipeline stages. What the graph keeps for backward: selective drops
exactly the attention weights (B, heads/t, T, T) of every block; full keeps less still.
"""

import numpy as np
import pytest
from _mpi import grids, max_rel
from mpi4py import MPI
from test_gpt import _gather

from mpisplit.models.config import GPTConfig
from mpisplit.models.gpt import GPT
from mpisplit.parallel.grid import ProcessGrid
from mpisplit.training.step import StepRunner

pytestmark = pytest.mark.mpi

CFG = {"vocab_size": 23, "block_size": 8, "n_layer": 2, "n_head": 4, "n_embd": 16}
B, T = 4, 8


def _batch():
    rng = np.random.default_rng(2)
    return rng.integers(0, CFG["vocab_size"], size=(2, B, T))


def _run(grid, mode, dropout=0.1, sp=False, m=1):
    model = GPT(GPTConfig(**CFG, dropout=dropout), grid, dtype="float64", seed=7, recompute=mode,
                sequence_parallel=sp)
    idx, targets = _batch()
    loss = StepRunner(model, grid, m).forward_backward(idx, targets)
    return loss, {n: _gather(p.grad, p, grid.tp_comm) for n, p in model.named_parameters()}


def _assert_same(got, want, where):
    assert abs(got[0] - want[0]) < 1e-12 * abs(want[0]), (where, got[0], want[0])
    for name, g in want[1].items():
        assert max_rel(got[1][name], g) < 1e-10, (where, name)


def test_recompute_modes_equal_none_with_dropout():
    for grid in grids():
        if 4 % grid.tp:
            continue
        want = _run(grid, "none")
        for mode in ("selective", "full"):
            _assert_same(_run(grid, mode), want, (grid.tp, mode))


def test_recompute_with_sequence_parallel_and_stages():
    size = MPI.COMM_WORLD.size
    layouts = [(tp, pp) for tp in (1, 2) for pp in (1, 2) if tp * pp == size]
    if not layouts:
        pytest.skip("needs a world of 2 or 4 ranks")
    for tp, pp in layouts:
        with ProcessGrid(tp=tp, pp=pp) as grid:
            want = _run(grid, "none", sp=True, m=2)
            for mode in ("selective", "full"):
                _assert_same(_run(grid, mode, sp=True, m=2), want, (tp, pp, mode))


def _saved_bytes(loss):
    """Bytes of the arrays the graph behind `loss` keeps for backward (each array once)."""
    seen, total, stack, visited = set(), 0, [loss], set()
    while stack:
        t = stack.pop()
        if id(t) in visited or t._ctx is None:
            continue
        visited.add(id(t))
        for a in t._ctx.saved:
            if hasattr(a, "nbytes") and id(a) not in seen:
                seen.add(id(a))
                total += a.nbytes
        stack.extend(t._ctx.inputs)
    return total


def test_what_each_mode_keeps_for_backward():
    idx, targets = _batch()
    for grid in grids():
        if 4 % grid.tp:
            continue
        kept = {}
        for mode in ("none", "selective", "full"):
            model = GPT(GPTConfig(**CFG, dropout=0.0), grid, dtype="float64", seed=7, recompute=mode)
            kept[mode] = _saved_bytes(model.loss(idx, targets))
        heads = CFG["n_head"] // grid.tp
        weights = CFG["n_layer"] * B * heads * T * T * 8  # the attention weights of every block
        assert kept["none"] - kept["selective"] == weights, (grid.tp, kept)
        assert kept["full"] < kept["selective"], (grid.tp, kept)
