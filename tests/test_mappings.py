"""The differentiable collectives against their dense formulas.

Every rank builds the same global arrays from seeds (x_r, the upstream gradient G_r of
rank r, for every r), so each rank can compute the expected forward value and input
gradient locally: sums over ranks, blocks along an axis, concatenations. Each call is
also counted: the collectives of forward and of backward, their calls and bytes.
"""

import numpy as np
import pytest
from _mpi import grids
from conftest import world
from mpi4py import MPI

from mpisplit.autograd.tensor import Tensor
from mpisplit.parallel.comm import Communicator
from mpisplit.parallel.mappings import (
    all_gather_from_sp,
    copy_to_tp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_tp,
)

pytestmark = pytest.mark.mpi

KINDS = ("allreduce", "allgather", "reduce_scatter", "bcast")


def _arr(shape, *seed):
    return np.random.default_rng([7, *seed]).standard_normal(shape)


def _block(a, axis, r, p):
    n = a.shape[axis] // p
    return np.take(a, np.arange(r * n, (r + 1) * n), axis=axis)


def _counts(comm, **expected):
    """comm.stats() with only the kinds given (calls, bytes) allowed to be non-zero."""
    want = {k: {"calls": 0, "bytes": 0} for k in KINDS}
    for k, (calls, nbytes) in expected.items():
        want[k] = {"calls": calls, "bytes": nbytes}
    return want


def _run(fn, x_np, g_np):
    """Forward fn on a leaf from x_np, stats after forward; backward of sum(y * G); stats after."""
    x = Tensor(x_np.copy(), requires_grad=True)
    y = fn(x)
    comm = fn.comm
    fwd = comm.stats()
    comm.reset_stats()
    (y * Tensor(g_np)).sum().backward()
    return x, y, fwd, comm.stats()


class _Bound:
    """fn(x) = mapping(x, comm, **kw), carrying the comm for the counters."""

    def __init__(self, mapping, comm, **kw):
        self.mapping, self.comm, self.kw = mapping, comm, kw
        comm.reset_stats()

    def __call__(self, x):
        return self.mapping(x, self.comm, **self.kw)


SHAPE = (12, 3, 12)  # the axes that get split (0 and -1) divisible by 1, 2, 3 and 4


def test_copy_to_tp_identity_forward_allreduce_backward():
    for grid in grids():
        comm, p, r = grid.tp_comm, grid.tp, grid.tp_rank
        X = _arr(SHAPE, 0)
        Gs = [_arr(SHAPE, 1, q) for q in range(p)]
        x, y, fwd, bwd = _run(_Bound(copy_to_tp, comm), X, Gs[r])
        assert np.array_equal(y.data, X)
        assert np.allclose(x.grad, sum(Gs), rtol=1e-14, atol=1e-14)
        if p > 1:
            assert fwd == _counts(comm)
            assert bwd == _counts(comm, allreduce=(1, X.nbytes))


def test_reduce_from_tp_allreduce_forward_identity_backward():
    for grid in grids():
        comm, p, r = grid.tp_comm, grid.tp, grid.tp_rank
        Xs = [_arr(SHAPE, 2, q) for q in range(p)]
        G = _arr(SHAPE, 3, r)
        x, y, fwd, bwd = _run(_Bound(reduce_from_tp, comm), Xs[r], G)
        assert np.allclose(y.data, sum(Xs), rtol=1e-14, atol=1e-14)
        assert np.array_equal(x.grad, G)
        if p > 1:
            assert fwd == _counts(comm, allreduce=(1, Xs[r].nbytes))
            assert bwd == _counts(comm)


@pytest.mark.parametrize("axis", [-1, 1, 0])
def test_gather_from_tp_concatenates_and_backward_keeps_the_block(axis):
    for grid in grids():
        comm, p, r = grid.tp_comm, grid.tp, grid.tp_rank
        shape = list(SHAPE)
        shape[axis] *= p  # global along axis; rank r holds block r
        X = _arr(tuple(shape), 4)
        G = _arr(tuple(shape), 5)
        x, y, fwd, bwd = _run(_Bound(gather_from_tp, comm, axis=axis), _block(X, axis, r, p), G)
        assert np.array_equal(y.data, X)
        assert np.array_equal(x.grad, _block(G, axis, r, p))
        if p > 1:
            assert fwd == _counts(comm, allgather=(1, X.nbytes))
            assert bwd == _counts(comm)


@pytest.mark.parametrize("axis", [-1, 0])
def test_scatter_to_tp_keeps_the_block_and_backward_gathers(axis):
    for grid in grids():
        comm, p, r = grid.tp_comm, grid.tp, grid.tp_rank
        X = _arr(SHAPE, 6)
        # upstream gradient of each rank's block: G_q is rank q's (block-shaped) gradient
        Gs = [_arr(_block(X, axis, 0, p).shape, 7, q) for q in range(p)]
        x, y, fwd, bwd = _run(_Bound(scatter_to_tp, comm, axis=axis), X, Gs[r])
        assert np.array_equal(y.data, _block(X, axis, r, p))
        assert np.array_equal(x.grad, np.concatenate(Gs, axis=axis))
        if p > 1:
            assert fwd == _counts(comm)
            assert bwd == _counts(comm, allgather=(1, X.nbytes))


@pytest.mark.parametrize("axis", [0, 1])
def test_reduce_scatter_to_sp_sums_then_splits(axis):
    for grid in grids():
        comm, p, r = grid.tp_comm, grid.tp, grid.tp_rank
        shape = list(SHAPE)
        shape[axis] = 12  # divisible by 1..4
        Xs = [_arr(tuple(shape), 8, q) for q in range(p)]
        Gs = [_arr(_block(Xs[0], axis, 0, p).shape, 9, q) for q in range(p)]
        x, y, fwd, bwd = _run(_Bound(reduce_scatter_to_sp, comm, axis=axis), Xs[r], Gs[r])
        assert np.allclose(y.data, _block(sum(Xs), axis, r, p), rtol=1e-14, atol=1e-14)
        assert np.array_equal(x.grad, np.concatenate(Gs, axis=axis))
        if p > 1:
            assert fwd == _counts(comm, reduce_scatter=(1, Xs[r].nbytes))
            assert bwd == _counts(comm, allgather=(1, Xs[r].nbytes))


@pytest.mark.parametrize("axis", [0, 1])
def test_all_gather_from_sp_concatenates_then_backward_reduce_scatters(axis):
    for grid in grids():
        comm, p, r = grid.tp_comm, grid.tp, grid.tp_rank
        shape = list(SHAPE)
        shape[axis] = 12
        X = _arr(tuple(shape), 10)
        Gs = [_arr(tuple(shape), 11, q) for q in range(p)]  # full-size upstream gradient per rank
        x, y, fwd, bwd = _run(_Bound(all_gather_from_sp, comm, axis=axis), _block(X, axis, r, p), Gs[r])
        assert np.array_equal(y.data, X)
        assert np.allclose(x.grad, _block(sum(Gs), axis, r, p), rtol=1e-14, atol=1e-14)
        if p > 1:
            assert fwd == _counts(comm, allgather=(1, X.nbytes))
            assert bwd == _counts(comm, reduce_scatter=(1, X.nbytes))


MAPPINGS = [copy_to_tp, reduce_from_tp, gather_from_tp, scatter_to_tp, reduce_scatter_to_sp, all_gather_from_sp]


@pytest.mark.parametrize("mapping", MAPPINGS, ids=lambda m: m.__name__)
def test_single_rank_returns_the_input_itself(mapping):
    comm = Communicator(MPI.COMM_SELF)
    try:
        x = Tensor(_arr((3, 5), 12), requires_grad=True)  # 5: not even divisible by anything > 1
        assert mapping(x, comm) is x
        assert comm.stats() == _counts(comm)
    finally:
        comm.free()


@pytest.mark.parametrize("mapping", [scatter_to_tp, reduce_scatter_to_sp], ids=lambda m: m.__name__)
@world(min_size=2)  # a TP group of more than one rank
def test_non_divisible_axis_raises_on_every_rank(mapping):
    for grid in _tp_grids():
        comm = grid.tp_comm
        n = comm.size * 3 + 1
        x = Tensor(np.ones((n, comm.size * 2)), requires_grad=True)
        with pytest.raises(ValueError, match=f"length {n}.*not divisible by {comm.size}"):
            mapping(x, comm, axis=0)
        assert comm.stats() == _counts(comm)
        comm.barrier()  # every rank got here: nobody is stuck in a collective


def _tp_grids():
    for grid in grids():
        if grid.tp > 1:
            yield grid
