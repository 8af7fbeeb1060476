"""Vocabulary-parallel embedding and cross-entropy against dense float64 formulas.

Vocabulary sizes that the TP degree does not divide (65, 50257, 5: at tp=4 one rank
holds only padding) and one that every degree up to 4 divides (24). The embedding:
table[ids] and an np.add.at gradient. The loss: log-softmax of the gathered logits and
(softmax - onehot) / count, with padded logits that must never win or count.
"""

import _dense_gpt as dense
import numpy as np
import pytest
from _mpi import all_ranks_equal, gather_grad, gather_slab, grids, max_rel

from mpisplit.autograd.tensor import Tensor
from mpisplit.nn.cross_entropy import vocab_parallel_cross_entropy
from mpisplit.nn.embedding import VocabParallelEmbedding

pytestmark = pytest.mark.mpi

VOCABS = [65, 50257, 24, 5]
TOL = {np.float64: 1e-10, np.float32: 1e-5}


def _embedding(comm, V, h, table, dtype=np.float64):
    emb = VocabParallelEmbedding(V, h, comm, dtype=dtype)
    emb.weight.data[...] = emb.weight.slab_of(table).astype(dtype)
    return emb


def _ids(V, comm, shape=(3, 7), seed=0):
    """Random ids plus the edges: 0, V-1 and the first and last row of every rank's block."""
    n = -(-V // comm.size)
    edges = [0, V - 1] + [min(V - 1, r * n + d) for r in range(comm.size) for d in (0, n - 1)]
    ids = np.random.default_rng(seed).integers(0, V, size=shape).reshape(-1)
    ids[: len(edges)] = edges
    return ids.reshape(shape).astype(np.int64)


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_embedding_lookup_and_gradient(V, dtype):
    h = 4
    rng = np.random.default_rng(V)
    table = rng.standard_normal((V, h))
    for grid in grids():
        comm = grid.tp_comm
        emb = _embedding(comm, V, h, table, dtype)
        assert emb.padded_vocab == -(-V // comm.size) * comm.size
        ids = _ids(V, comm)
        G = np.random.default_rng(1).standard_normal((*ids.shape, h))
        out = emb(ids)
        (out * Tensor(G.astype(dtype))).sum().backward()
        # all other ranks contribute exact zeros: the lookup is exact
        assert np.array_equal(out.data, table[ids].astype(dtype))
        assert all_ranks_equal(comm, np.asarray(out.data))
        expected = np.zeros((V, h))
        np.add.at(expected, ids.reshape(-1), G.reshape(-1, h))
        assert max_rel(gather_grad(emb.weight, comm), expected) < TOL[dtype]
        assert np.array_equal(gather_slab(emb.weight, comm), table.astype(dtype))
        # padded rows (global row >= V) are zero and get zero gradient
        real = max(0, min(emb.local_vocab, V - emb.vocab_start))
        assert np.all(emb.weight.data[real:] == 0)
        assert np.all(emb.weight.grad[real:] == 0)


@pytest.mark.parametrize("V", [65, 24])
def test_embedding_bad_ids_raise_on_every_rank(V):
    for grid in grids():
        comm = grid.tp_comm
        emb = _embedding(comm, V, 3, np.ones((V, 3)))
        comm.reset_stats()
        with pytest.raises(ValueError, match=rf"\[0, {V}\).*\[0, {V}\]"):
            emb(np.array([[0, V]]))
        with pytest.raises(ValueError, match=r"\[-1, 2\]"):
            emb(np.array([[2, -1]]))
        with pytest.raises(TypeError, match="integers"):
            emb(np.array([[0.0, 1.0]]))
        assert all(v["calls"] == 0 for v in comm.stats().values())  # raised before any collective
        comm.barrier()


def _global_logits(N, V, Vp, seed, real_shift=0.0, pad_value=0.0, scale=3.0):
    """(N, Vp) logits: real columns N(shift, scale^2), padded columns `pad_value`."""
    Z = np.full((N, Vp), pad_value, dtype=np.float64)
    Z[:, :V] = real_shift + scale * np.random.default_rng(seed).standard_normal((N, V))
    return Z


def _targets(N, V, seed, ignore=(), ignore_index=-100):
    t = np.random.default_rng(seed).integers(0, V, size=N)
    t[: min(N, 2)] = [V - 1, 0][: min(N, 2)]  # the last real entry (next to the padding) and the first
    t[list(ignore)] = ignore_index
    return t.astype(np.int64)


def _ce(grid, Z, t, V, dtype, ignore_index=-100):
    """vocab_parallel_cross_entropy on this rank's columns of Z; returns loss, gathered grad, stats."""
    comm = grid.tp_comm
    n = Z.shape[1] // comm.size
    start = comm.rank * n
    batch = (2, Z.shape[0] // 2)  # (B, T) rows of logits
    local = Tensor(Z[:, start:start + n].reshape(*batch, n).astype(dtype), requires_grad=True)
    comm.reset_stats()
    loss = vocab_parallel_cross_entropy(
        local, t.reshape(batch), comm, vocab_start=start, vocab_size=V, ignore_index=ignore_index,
    )
    fwd = comm.stats()
    comm.reset_stats()
    loss.backward()
    bwd = comm.stats()
    grad = comm.allgather(np.ascontiguousarray(local.grad).reshape(-1, n), axis=1)  # (N, Vp)
    return loss, grad, fwd, bwd


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cross_entropy_matches_dense_log_softmax(V, dtype):
    N = 4 if V > 1000 else 10
    t = _targets(N, V, 3)
    for grid in grids():
        Vp = -(-V // grid.tp) * grid.tp
        Z = _global_logits(N, V, Vp, 2)
        loss, grad, fwd, bwd = _ce(grid, Z, t, V, dtype)
        assert loss.dtype == dtype and loss.shape == ()
        assert max_rel(loss.data, dense.cross_entropy(Z[:, :V], t)) < TOL[dtype]
        assert max_rel(grad[:, :V], dense.cross_entropy_grad(Z[:, :V], t)) < TOL[dtype]
        assert np.all(grad[:, V:] == 0)  # padded logits get no gradient
        assert all_ranks_equal(grid.tp_comm, np.asarray(loss.data))
        # three all-reduces of N elements forward (max, exp-sum, target logit); none backward
        if grid.tp > 1:
            assert fwd["allreduce"] == {"calls": 3, "bytes": 3 * N * np.dtype(dtype).itemsize}
        assert all(v["calls"] == 0 for k, v in fwd.items() if k != "allreduce" or grid.tp == 1)
        assert all(v["calls"] == 0 for v in bwd.values())


@pytest.mark.parametrize("V", [65, 50257, 5])
@pytest.mark.parametrize("pad_value", [0.0, 1e4])
def test_padded_logits_never_win(V, pad_value):
    """Real logits far below the padded ones: still the softmax over the V real entries only."""
    N = 4 if V > 1000 else 10
    t = _targets(N, V, 5)
    for grid in grids():
        Vp = -(-V // grid.tp) * grid.tp
        Z = _global_logits(N, V, Vp, 4, real_shift=-1e4, pad_value=pad_value, scale=2.0)
        loss, grad, _, _ = _ce(grid, Z, t, V, np.float64)
        ref = dense.cross_entropy(Z[:, :V], t)
        assert np.isfinite(loss.item()) and np.all(np.isfinite(grad))
        assert max_rel(loss.data, ref) < 1e-10
        assert max_rel(grad[:, :V], dense.cross_entropy_grad(Z[:, :V], t)) < 1e-10
        assert np.all(grad[:, V:] == 0)


@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_ignored_rows_do_not_count(ignore_index):
    V, N = 65, 10
    t = _targets(N, V, 6, ignore=(2, 5, 9), ignore_index=ignore_index)
    for grid in grids():
        Vp = -(-V // grid.tp) * grid.tp
        Z = _global_logits(N, V, Vp, 7)
        loss, grad, _, _ = _ce(grid, Z, t, V, np.float64, ignore_index=ignore_index)
        ref = dense.cross_entropy(Z[:, :V], t, ignore_index)
        assert abs(ref - dense.cross_entropy(np.delete(Z[:, :V], [2, 5, 9], 0), np.delete(t, [2, 5, 9]))) < 1e-14
        assert max_rel(loss.data, ref) < 1e-10
        assert max_rel(grad[:, :V], dense.cross_entropy_grad(Z[:, :V], t, ignore_index)) < 1e-10
        assert np.all(grad[[2, 5, 9]] == 0)


def test_all_targets_ignored_gives_zero_loss_and_gradient():
    V, N = 65, 10
    t = np.full(N, -100, dtype=np.int64)
    for grid in grids():
        Vp = -(-V // grid.tp) * grid.tp
        loss, grad, _, _ = _ce(grid, _global_logits(N, V, Vp, 8), t, V, np.float64)
        assert loss.item() == 0.0
        assert np.all(grad == 0)


def test_cross_entropy_bad_targets_raise_on_every_rank():
    V = 65
    for grid in grids():
        comm = grid.tp_comm
        n = -(-V // comm.size)
        logits = Tensor(np.zeros((2, 3, n)), requires_grad=True)
        kw = {"vocab_start": comm.rank * n, "vocab_size": V}
        comm.reset_stats()
        with pytest.raises(ValueError, match=r"\[0, 65\)"):
            vocab_parallel_cross_entropy(logits, np.full((2, 3), V), comm, **kw)
        with pytest.raises(ValueError, match=r"\[0, 65\)"):
            vocab_parallel_cross_entropy(logits, np.full((2, 3), -2), comm, **kw)
        with pytest.raises(ValueError, match=r"targets shape \(3, 2\)"):
            vocab_parallel_cross_entropy(logits, np.zeros((3, 2), dtype=np.int64), comm, **kw)
        with pytest.raises(TypeError, match="integers"):
            vocab_parallel_cross_entropy(logits, np.zeros((2, 3)), comm, **kw)
        assert all(v["calls"] == 0 for v in comm.stats().values())
        comm.barrier()
