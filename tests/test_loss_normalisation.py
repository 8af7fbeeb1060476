"""The loss of a step with masked targets: the summed cross-entropy over the counted targets
divided by their number over every micro-batch and data-parallel rank (not a mean of
per-micro-batch means).

Reference: the one-rank float64 model's mean cross-entropy over the whole global batch in one
piece (ignored targets left out), which is that formula; checked itself against log-softmax of
its gathered logits. Every dp x pp x tp layout the world allows, with two micro-batches whose
counted targets differ, alone and with sequence parallelism: loss and every gradient to 1e-10.
The mean of per-micro-batch means is shown to differ from it, so the check can fail.
"""

import numpy as np
import pytest
from _mpi import max_rel
from mpi4py import MPI
from test_gpt import _gather, _global_weights, _load

from mpisplit.models.config import GPTConfig
from mpisplit.models.gpt import GPT
from mpisplit.parallel.grid import ProcessGrid
from mpisplit.training.optim import average_gradients
from mpisplit.training.step import StepRunner

pytestmark = pytest.mark.mpi

CFG = GPTConfig(vocab_size=23, block_size=8, n_layer=2, n_head=4, n_embd=16, dropout=0.0)
B, T = 12, 4
IGNORE = -100


def _batch():
    rng = np.random.default_rng(3)
    idx, targets = rng.integers(0, CFG.vocab_size, size=(2, B, T))
    keep = rng.random((B, T)) < np.linspace(0.15, 0.95, B)[:, None]  # rows count very different numbers
    keep[:, -1] = True  # every row counts at least one target
    return idx, np.where(keep, targets, IGNORE)


@pytest.fixture(scope="module")
def reference():
    weights = _global_weights(CFG, seed=6)
    idx, targets = _batch()
    with ProcessGrid(tp=1, comm=MPI.COMM_SELF) as g:
        model = _load(GPT(CFG, g, dtype="float64", init=False), weights)
        logits = model(idx).data
        loss = model.loss(idx, targets)
        loss.backward()
        grads = {name: _gather(p.grad, p, g.tp_comm) for name, p in model.named_parameters()}
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    counted = targets != IGNORE
    formula = -logp[counted, targets[counted]].sum() / counted.sum()
    assert abs(loss.item() - formula) < 1e-13 * formula
    return weights, idx, targets, loss.item(), grads


def _layouts(size):
    return [(tp, size // (tp * pp), pp, sp) for tp in (1, 2, 4) for pp in (1, 2) for sp in (False, True)
            if size % (tp * pp) == 0 and B % ((size // (tp * pp)) * 2) == 0 and not (sp and tp == 1)]


def test_mean_of_means_differs(reference):
    """The check below can fail: the mean of the two half-batches' means is not the reference."""
    weights, idx, targets, ref_loss, _ = reference
    with ProcessGrid(tp=1, comm=MPI.COMM_SELF) as g:
        model = _load(GPT(CFG, g, dtype="float64", init=False), weights)
        halves = [model.loss(idx[s], targets[s]).item() for s in (slice(0, B // 2), slice(B // 2, B))]
    assert abs(np.mean(halves) - ref_loss) > 1e-3 * ref_loss


def test_every_layout_equals_one_rank(reference):
    weights, idx, targets, ref_loss, ref_grads = reference
    count = int((targets != IGNORE).sum())
    for tp, dp, pp, sp in _layouts(MPI.COMM_WORLD.size):
        with ProcessGrid(tp=tp, dp=dp, pp=pp) as grid:
            model = _load(GPT(CFG, grid, dtype="float64", init=False, sequence_parallel=sp), weights)
            rows = slice(grid.dp_rank * (B // dp), (grid.dp_rank + 1) * (B // dp))
            runner = StepRunner(model, grid, 2, synchronous=True)
            loss = runner.forward_backward(idx[rows], targets[rows], target_count=count)
            average_gradients(model.parameters(), grid.dp_comm)
            loss = float(grid.dp_comm.allreduce(np.array([loss]))[0]) / dp
            assert abs(loss - ref_loss) < 1e-12 * ref_loss, (tp, dp, pp, sp, loss, ref_loss)
            for name, p in model.named_parameters():
                assert max_rel(_gather(p.grad, p, grid.tp_comm), ref_grads[name]) < 1e-10, (tp, dp, pp, sp, name)
            summed = runner.evaluate(idx[rows], targets[rows], summed=True)
            total = float(grid.dp_comm.allreduce(np.array([summed]))[0])
            assert abs(total / count - ref_loss) < 1e-12 * ref_loss, (tp, dp, pp, sp, total / count)


def test_fine_tuning_shape_comes_from_the_folder():
    """--heads and --hidden describe a fresh model: with --init-from the folder's shape counts
    (SmolLM2's 9 heads train at tp 3 although the default --heads 4 does not split over 3)."""
    from mpisplit.training.config import TrainConfig

    assert TrainConfig(init_from="some-folder").validate(3) == (3, 1)
    with pytest.raises(ValueError, match="--heads 4 cannot be split over tp=3"):
        TrainConfig().validate(3)
