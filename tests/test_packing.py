"""Packed rows: several sequences in one row, each computed as if it were alone.

Reference: the one-rank float64 model run on each sequence by itself (its own batch row, its
positions from 0): its logits, and the gradients of the summed cross-entropy of every sequence's
counted targets over their number. Ours: the sequences packed into rows with their positions
(nn/packing.py), at every dp x pp x tp layout the world allows, with and without sequence
parallelism, with each recomputation mode, through the fused kernels and the NumPy path: logits,
loss and every gradient to 1e-12. GPT-2 parts (learned positions) and Llama parts (rotary,
grouped-query heads, replicated at tp 4). That unpacked rows would fail the check is shown too.
"""

import numpy as np
import pytest
from _mpi import max_rel
from mpi4py import MPI
from test_gpt import _global_weights, _load
from test_lora import gather

from mpisplit import kernels
from mpisplit.models.config import GPTConfig
from mpisplit.models.gpt import GPT
from mpisplit.nn.packing import Packing, check_positions
from mpisplit.parallel.grid import ProcessGrid
from mpisplit.training.optim import average_gradients
from mpisplit.training.row_packing import best_fit_decreasing
from mpisplit.training.step import StepRunner

pytestmark = pytest.mark.mpi

FAMILIES = {
    "gpt2": GPTConfig(vocab_size=23, block_size=16, n_layer=2, n_head=4, n_embd=16),
    "llama": GPTConfig(vocab_size=23, block_size=16, n_layer=2, n_head=4, n_embd=16, family="llama", norm="rmsnorm",
                       mlp="swiglu", positions="rotary", n_kv_head=2, qkv_bias=False, out_bias=False, mlp_bias=False,
                       tie_embeddings=False, intermediate_size=24),
}
B, T, IGNORE = 12, 12, -100


def _sequences():
    """Sequences (ids, targets with some ignored) packed into B rows of T: their rows and columns."""
    rng = np.random.default_rng(5)
    lengths = rng.integers(2, 10, size=40)
    rows = best_fit_decreasing(lengths, T)[:B]
    seqs = []
    for r, members in enumerate(rows):
        at = 0
        for k in members:
            n = int(lengths[k])
            ids, targets = rng.integers(0, 23, size=(2, n))
            targets[rng.random(n) < 0.3] = IGNORE
            targets[-1] = rng.integers(0, 23)  # at least one counted
            seqs.append((r, at, ids, targets))
            at += n
    return seqs


def _packed(seqs):
    x = np.zeros((B, T), dtype=np.int64)  # padding: token 0, its own sequence, nothing counted
    y = np.full((B, T), IGNORE, dtype=np.int64)
    positions = np.tile(np.arange(T), (B, 1))
    ends = np.zeros(B, dtype=int)
    for r, at, ids, targets in seqs:
        n = len(ids)
        x[r, at:at + n], y[r, at:at + n], positions[r, at:at + n] = ids, targets, np.arange(n)
        ends[r] = max(ends[r], at + n)
    for r in range(B):
        positions[r, ends[r]:] = np.arange(T - ends[r])
    return x, y, positions


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def reference(request):
    cfg = FAMILIES[request.param]
    weights = _global_weights(cfg, seed=8)
    seqs = _sequences()
    count = sum(int((t != IGNORE).sum()) for *_, t in seqs)
    with ProcessGrid(tp=1, comm=MPI.COMM_SELF) as g:
        model = _load(GPT(cfg, g, dtype="float64", init=False), weights)
        logits = [model(ids[None]).data[0] for _, _, ids, _ in seqs]
        total = 0.0
        for _, _, ids, targets in seqs:
            loss = model.loss(ids[None], targets[None], normalizer=count)
            loss.backward()
            total += loss.item()
        grads = {name: gather(p, g.tp_comm) for name, p in model.named_parameters()}
    return cfg, weights, seqs, count, logits, total, grads


def _layouts(size):
    return [(tp, size // (tp * pp), pp, sp) for tp in (1, 2, 4) for pp in (1, 2) for sp in (False, True)
            if size % (tp * pp) == 0 and B % ((size // (tp * pp)) * 2) == 0 and not (sp and tp == 1)]


VARIANTS = [("none", True), ("selective", False), ("full", True), ("none", False)]  # (recompute, fused kernels)


def test_packed_rows_equal_each_sequence_alone(reference):
    cfg, weights, seqs, count, ref_logits, ref_loss, ref_grads = reference
    x, y, positions = _packed(seqs)
    layouts = _layouts(MPI.COMM_WORLD.size)
    assert layouts
    for (tp, dp, pp, sp), (recompute, fused) in [(lay, v) for lay in layouts for v in VARIANTS]:
        kernels.set_enabled(fused and kernels._numba_importable())
        try:
            with ProcessGrid(tp=tp, dp=dp, pp=pp) as grid:
                model = _load(GPT(cfg, grid, dtype="float64", init=False, sequence_parallel=sp,
                                  recompute=recompute), weights)
                where = (tp, dp, pp, sp, recompute, fused)
                if pp == 1 and not sp:
                    logits = model(x, positions).data
                    for (r, at, ids, _), ref in zip(seqs, ref_logits):
                        assert max_rel(logits[r, at:at + len(ids)], ref) < 1e-12, where
                rows = slice(grid.dp_rank * (B // dp), (grid.dp_rank + 1) * (B // dp))
                runner = StepRunner(model, grid, 2, synchronous=True)
                loss = runner.forward_backward(x[rows], y[rows], target_count=count, positions=positions[rows])
                average_gradients(model.parameters(), grid.dp_comm)
                loss = float(grid.dp_comm.allreduce(np.array([loss]))[0]) / dp
                assert abs(loss - ref_loss) < 1e-12 * ref_loss, where
                grads = {n: gather(p, grid.tp_comm) for n, p in model.named_parameters()
                         if not p.pipeline_copy}
                for n, g in grads.items():
                    assert max_rel(g, ref_grads[n]) < 1e-12, (where, n)
        finally:
            kernels.set_enabled(None)


def test_unpacked_rows_differ(reference):
    """The check above can fail: the same rows without their positions attend across sequences."""
    cfg, weights, seqs, _, ref_logits, _, _ = reference
    x, _, _ = _packed(seqs)
    with ProcessGrid(tp=1, comm=MPI.COMM_SELF) as g:
        model = _load(GPT(cfg, g, dtype="float64", init=False), weights)
        logits = model(x).data
        later = [(r, at, ids, ref) for (r, at, ids, _), ref in zip(seqs, ref_logits) if at > 0]
        assert later and all(max_rel(logits[r, at:at + len(ids)], ref) > 1e-3 for r, at, ids, ref in later)


def test_positions_are_checked():
    good = np.array([[0, 1, 2, 0, 1, 0]])
    assert (Packing(check_positions(good, (1, 6), 8)).starts == [[0, 0, 0, 3, 3, 5]]).all()
    for bad, says in (([[1, 2, 3, 0, 1, 2]], "start each row at 0"), ([[0, 1, 3, 0, 1, 2]], "count up by one"),
                      ([[0, 1, 2, 3, 4, 5]], "beyond block_size=4"), ([[0.0] * 6], "integers")):
        with pytest.raises(ValueError, match=says):
            check_positions(np.array(bad), (1, 6), 4 if "block" in says else 8)
    with pytest.raises(ValueError, match="shape"):
        check_positions(good, (2, 3), 8)
