"""Sequence parallelism against the one-rank float64 model, and its collectives.

Reference: the whole model on COMM_SELF (no sequence parallelism) with the same global weights:
loss and every gradient to 1e-10 at every tp > 1 the world allows, alone and with pipeline
stages and data parallelism. The collectives of one forward and backward against the layout
without it: the all-reduces of activations become all-gathers and reduce-scatters of the same
ring volume. A sequence length that tp does not divide raises on every rank before any collective.
"""

import numpy as np
import pytest
from _mpi import max_rel
from conftest import world
from mpi4py import MPI
from test_gpt import _gather, _global_weights, _load

from mpisplit.models.config import GPTConfig
from mpisplit.models.gpt import GPT
from mpisplit.parallel.grid import ProcessGrid
from mpisplit.training.optim import average_gradients
from mpisplit.training.step import StepRunner

pytestmark = pytest.mark.mpi

CFG = GPTConfig(vocab_size=23, block_size=8, n_layer=2, n_head=4, n_embd=16, dropout=0.0)
B, T = 12, 4  # tp = 2, 4 divide T


def _layouts(size):
    return [(tp, size // (tp * pp), pp) for tp in (2, 4) for pp in (1, 2) if size % (tp * pp) == 0]


@pytest.fixture(scope="module")
def reference():
    weights = _global_weights(CFG, seed=4)
    rng = np.random.default_rng(1)
    idx, targets = rng.integers(0, CFG.vocab_size, size=(2, B, T))
    with ProcessGrid(tp=1, comm=MPI.COMM_SELF) as g:
        model = _load(GPT(CFG, g, dtype="float64", init=False), weights)
        loss = model.loss(idx, targets)
        loss.backward()
        grads = {name: _gather(p.grad, p, g.tp_comm) for name, p in model.named_parameters()}
    return weights, idx, targets, loss.item(), grads


@world(divisible_by=2)  # tp = 2 or 4 divides the world size
def test_sequence_parallel_equals_one_rank(reference):
    weights, idx, targets, ref_loss, ref_grads = reference
    layouts = _layouts(MPI.COMM_WORLD.size)
    assert layouts
    for tp, dp, pp in layouts:
        with ProcessGrid(tp=tp, dp=dp, pp=pp) as grid:
            model = _load(GPT(CFG, grid, dtype="float64", init=False, sequence_parallel=True), weights)
            assert model.sequence_parallel and model.sequence_parallel_params
            rows = slice(grid.dp_rank * (B // dp), (grid.dp_rank + 1) * (B // dp))
            loss = StepRunner(model, grid, 2, synchronous=True).forward_backward(idx[rows], targets[rows])
            average_gradients(model.parameters(), grid.dp_comm)
            loss = float(grid.dp_comm.allreduce(np.array([loss]))[0]) / dp
            assert abs(loss - ref_loss) < 1e-12 * abs(ref_loss), (tp, dp, pp, loss, ref_loss)
            for name, p in model.named_parameters():
                got = _gather(p.grad, p, grid.tp_comm)
                assert max_rel(got, ref_grads[name]) < 1e-10, (tp, dp, pp, name)


def _step_stats(model, grid, idx, targets):
    grid.tp_comm.reset_stats()
    model.loss(idx, targets).backward()
    return grid.tp_comm.stats()


@world(sizes=(2, 4))
def test_same_ring_volume_as_the_all_reduces_it_replaces(reference):
    """Per layer 4 all-reduces of (B, T, h) become 4 all-gathers + 4 reduce-scatters; the
    embedding and the head add one of each way. Ring volume: all-reduce 2(t-1)/t n, all-gather
    and reduce-scatter (t-1)/t n each, so the bytes moved are equal. On top, each column split
    (QKV, fc) all-gathers its input block once more in backward, for its weight gradient: the
    price of keeping only the (B, T/t, h) block between forward and backward."""
    weights, idx, targets, *_ = reference
    tp = MPI.COMM_WORLD.size  # one TP group of 2 or 4 ranks
    with ProcessGrid(tp=tp) as grid:
        plain = _step_stats(_load(GPT(CFG, grid, dtype="float64", init=False), weights), grid, idx, targets)
        sp_model = _load(GPT(CFG, grid, dtype="float64", init=False, sequence_parallel=True), weights)
        sp = _step_stats(sp_model, grid, idx, targets)
    n = B * T * CFG.n_embd * 8  # bytes of one full activation
    exchanges = 4 * CFG.n_layer + 2
    regathers = 2 * CFG.n_layer
    assert plain["allgather"]["calls"] == plain["reduce_scatter"]["calls"] == 0
    assert sp["allgather"] == {"calls": exchanges + regathers, "bytes": (exchanges + regathers) * n}
    assert sp["reduce_scatter"] == {"calls": exchanges, "bytes": exchanges * n}
    removed = plain["allreduce"]["bytes"] - sp["allreduce"]["bytes"]
    assert removed == exchanges * n
    assert plain["allreduce"]["calls"] - sp["allreduce"]["calls"] == exchanges
    ring = (tp - 1) / tp
    replacing = sp["allgather"]["bytes"] - regathers * n + sp["reduce_scatter"]["bytes"]
    assert 2 * ring * removed == ring * replacing


@world(divisible_by=2)  # tp = 2 divides the world size
def test_sequence_length_not_divisible_raises_on_every_rank(reference):
    weights, idx, targets, *_ = reference
    with ProcessGrid(tp=2) as grid:
        model = _load(GPT(CFG, grid, dtype="float64", init=False, sequence_parallel=True), weights)
        grid.tp_comm.reset_stats()
        with pytest.raises(ValueError, match="length 3 is not divisible by 2"):
            model.loss(idx[:, :3], targets[:, :3])
        assert all(v["calls"] == 0 for v in grid.tp_comm.stats().values())
    MPI.COMM_WORLD.Barrier()
