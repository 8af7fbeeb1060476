"""Pipeline parallelism (1F1B) and micro-batches against the one-rank float64 model.

Reference: the whole model built in-process on COMM_SELF with the same global weights, one
forward and backward of the whole global batch (loss and every gradient). Layouts: every
(tp, dp, pp) the world size allows, pp = 1 included (gradient accumulation over micro-batches).
Also: the point-to-point messages and bytes of one step against their formula, the stage
partition, and the layout errors that every rank raises before any message.
"""

import numpy as np
import pytest
from _mpi import max_rel
from conftest import world
from mpi4py import MPI
from test_gpt import _gather, _global_weights, _load

from mpisplit.models.config import GPTConfig
from mpisplit.models.gpt import GPT
from mpisplit.models.partition import stage_blocks
from mpisplit.parallel.grid import ProcessGrid
from mpisplit.parallel.pipeline import warmup_count
from mpisplit.training.optim import average_gradients, global_grad_norm
from mpisplit.training.step import StepRunner

pytestmark = pytest.mark.mpi

CFG = GPTConfig(vocab_size=23, block_size=8, n_layer=4, n_head=4, n_embd=16, dropout=0.0)
B, T = 12, 5  # 12 rows: every dp in 1..4 divides them


def _layouts(size):
    """Every (tp, dp, pp) with tp * dp * pp == size that the model can hold (tp | heads)."""
    out = []
    for tp in (1, 2, 4):
        for pp in range(1, size + 1):
            if size % (tp * pp) == 0 and pp <= CFG.n_layer:
                out.append((tp, size // (tp * pp), pp))
    return out


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, CFG.vocab_size, size=(B, T)), rng.integers(0, CFG.vocab_size, size=(B, T))


@pytest.fixture(scope="module")
def reference():
    weights = _global_weights(CFG)
    idx, targets = _batch()
    with ProcessGrid(tp=1, comm=MPI.COMM_SELF) as g:
        model = _load(GPT(CFG, g, dtype="float64", init=False), weights)
        loss = model.loss(idx, targets)
        loss.backward()
        grads = {name: _gather(p.grad, p, g.tp_comm) for name, p in model.named_parameters()}
        norm = global_grad_norm(model.parameters(), g.tp_comm)
    return weights, idx, targets, loss.item(), grads, norm


def _run(grid, weights, idx, targets, m):
    model = _load(GPT(CFG, grid, dtype="float64", init=False), weights)
    rows = B // grid.dp
    x, y = idx[grid.dp_rank * rows:(grid.dp_rank + 1) * rows], targets[grid.dp_rank * rows:(grid.dp_rank + 1) * rows]
    runner = StepRunner(model, grid, m, synchronous=True)  # synchronous sends: a misordered schedule hangs
    loss = runner.forward_backward(x, y)
    average_gradients(model.parameters(), grid.dp_comm)
    loss = float(grid.dp_comm.allreduce(np.array([loss]))[0]) / grid.dp
    return model, runner, loss


def test_every_layout_and_micro_batch_count_equals_one_rank(reference):
    weights, idx, targets, ref_loss, ref_grads, ref_norm = reference
    size = MPI.COMM_WORLD.size
    for tp, dp, pp in _layouts(size):
        for m in (1, 2, 3, 4, 6):
            if (B // dp) % m:
                continue
            with ProcessGrid(tp=tp, dp=dp, pp=pp) as grid:
                model, _, loss = _run(grid, weights, idx, targets, m)
                where = f"tp={tp} dp={dp} pp={pp} m={m}"
                assert abs(loss - ref_loss) < 1e-12 * abs(ref_loss), (where, loss, ref_loss)
                for name, p in model.named_parameters():
                    assert max_rel(_gather(p.grad, p, grid.tp_comm), ref_grads[name]) < 1e-10, (where, name)
                norm = global_grad_norm(model.parameters(), grid.tp_comm, grid.pp_comm)
                assert abs(norm - ref_norm) < 1e-10 * ref_norm, (where, norm, ref_norm)
                # Every parameter of the model lives on exactly one stage (the head's copy aside).
                owned = [n for n, p in model.named_parameters() if not p.pipeline_copy]
                everywhere = sorted(n for names in grid.pp_comm.mpi.allgather(owned) for n in names)
                assert everywhere == sorted(ref_grads), where


def test_point_to_point_messages_and_bytes_per_step(reference):
    """Stage s sends M activations forward (s < p-1) and M gradients back (s > 0), each of
    (B/dp/M, T, h) float64, and receives as many; the tied head adds one all-reduce of wte."""
    weights, idx, targets, *_ = reference
    size = MPI.COMM_WORLD.size
    for tp, dp, pp in _layouts(size):
        if pp == 1:
            continue
        for m in (1, 3):
            if (B // dp) % m:
                continue
            with ProcessGrid(tp=tp, dp=dp, pp=pp) as grid:
                model, runner, _ = _run(grid, weights, idx, targets, m)
                s = grid.pp_rank
                messages = m * ((s < pp - 1) + (s > 0))
                nbytes = messages * (B // dp // m) * T * CFG.n_embd * 8
                stats = runner.link.stats()
                assert stats["send"] == {"calls": messages, "bytes": nbytes}, (tp, dp, pp, m, stats)
                assert stats["recv"] == {"calls": messages, "bytes": nbytes}, (tp, dp, pp, m, stats)
                if grid.embed_comm is not None:
                    assert grid.embed_comm.stats()["allreduce"] == {"calls": 1, "bytes": model.wte.weight.data.nbytes}


def test_stage_partition_and_warmup():
    assert [len(stage_blocks(10, 4, s)) for s in range(4)] == [3, 3, 2, 2]
    assert [list(stage_blocks(4, 2, s)) for s in range(2)] == [[0, 1], [2, 3]]
    assert [list(stage_blocks(5, 5, s)) for s in range(5)] == [[0], [1], [2], [3], [4]]
    assert [warmup_count(4, s, 8) for s in range(4)] == [3, 2, 1, 0]
    assert [warmup_count(4, s, 1) for s in range(4)] == [1, 1, 1, 0]
    with pytest.raises(ValueError, match="pp=3 stages needs at least 3 blocks, the model has n_layer=2"):
        stage_blocks(2, 3, 0)


@world(min_size=2)  # two ranks for two stages
def test_bad_layouts_raise_on_every_rank_before_any_message():
    size = MPI.COMM_WORLD.size
    cfg = GPTConfig(**{**CFG.to_dict(), "n_layer": 1})
    pp = 2 if size % 2 == 0 else size  # two stages (with dp = size / 2), or one stage per rank
    with ProcessGrid(tp=1, pp=pp) as grid:
        with pytest.raises(ValueError, match=f"pp={grid.pp} stages needs at least {grid.pp} blocks"):
            GPT(cfg, grid, dtype="float64")
        model = GPT(CFG, grid, dtype="float64")
        runner = StepRunner(model, grid, 5)
        idx, targets = _batch()
        rows = B // grid.dp
        with pytest.raises(ValueError, match=f"--micro-batches 5 does not divide a DP rank's batch of {rows}"):
            runner.forward_backward(idx[:rows], targets[:rows])
        assert runner.link.stats()["send"]["calls"] == 0 and runner.link.stats()["recv"]["calls"] == 0
        with pytest.raises(ValueError, match="needs the whole model; this is stage"):
            model.loss(idx, targets)
    MPI.COMM_WORLD.Barrier()
