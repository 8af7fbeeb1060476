"""Gradients in one flat block (mpisplit.training.grad_buffer), the in-place data-parallel
average over it, and the release of forward outputs while backward walks the graph."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
from mpi4py import MPI

from mpisplit.autograd.tensor import Function, Tensor
from mpisplit.models.config import GPTConfig
from mpisplit.models.gpt import GPT
from mpisplit.nn.module import Parameter
from mpisplit.parallel.grid import ProcessGrid
from mpisplit.training import grad_buffer
from mpisplit.training.optim import AdamW, average_gradients

CFG = GPTConfig(vocab_size=37, block_size=8, n_layer=2, n_head=2, n_embd=16)


def _batch(seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, CFG.vocab_size, (2, 8)), rng.integers(0, CFG.vocab_size, (2, 8))


def _grads(model, seed):
    model.loss(*_batch(seed)).backward()
    return [p.grad.copy() for p in model.parameters()]


def test_gradients_land_in_one_block_with_the_same_values():
    grid = ProcessGrid(tp=1, comm=MPI.COMM_SELF)
    plain = GPT(CFG, grid, seed=0)
    ref = _grads(plain, 1)
    model = GPT(CFG, grid, seed=0)
    AdamW(list(model.parameters()))  # attaches the block
    got = _grads(model, 1)
    (buf,) = {id(p.grad_buffer): p.grad_buffer for p in model.parameters()}.values()
    for p, a, b in zip(model.parameters(), got, ref):
        assert p.grad is p.grad_store and np.shares_memory(p.grad, buf.flat)
        np.testing.assert_array_equal(a, b)
    assert buf.flat.size == sum(p.size for p in model.parameters())
    grid.free()


def test_second_backward_without_zero_grad_accumulates_in_place():
    grid = ProcessGrid(tp=1, comm=MPI.COMM_SELF)
    model = GPT(CFG, grid, seed=0)
    opt = AdamW(list(model.parameters()))
    one, two = _grads(model, 1), None
    model.loss(*_batch(2)).backward()
    two = [p.grad.copy() for p in model.parameters()]
    opt.zero_grad()
    alone = _grads(model, 2)
    for a, b, c, p in zip(one, alone, two, model.parameters()):
        np.testing.assert_allclose(c, a + b, rtol=1e-6, atol=1e-7)
        assert p.grad is p.grad_store
    grid.free()


def test_attach_is_idempotent_and_groups_dtypes():
    ps = [Parameter(np.zeros(3, np.float32)), Parameter(np.zeros(2, np.float64)), Parameter(np.zeros(4, np.float32))]
    first = grad_buffer.attach(ps)
    again = grad_buffer.attach(ps)
    assert [b.flat.dtype for b in first] == [np.float32, np.float64]
    assert [b.flat.size for b in first] == [7, 2]
    assert all(a is b for a, b in zip(first, again))


@pytest.mark.mpi(min_size=2)
def test_data_parallel_average_in_place_equals_the_mean():
    world = MPI.COMM_WORLD
    grid = ProcessGrid(tp=1)
    model = GPT(CFG, grid, seed=0)
    params = list(model.parameters())
    AdamW(params)
    model.loss(*_batch(10 + grid.dp_rank)).backward()
    mine = [p.grad.copy() for p in params]
    every = world.allgather(mine)
    average_gradients(params, grid.dp_comm)
    for i, p in enumerate(params):
        assert p.grad is p.grad_store  # averaged in the block, not in a concatenated copy
        expect = np.mean([g[i].astype(np.float64) for g in every], axis=0)
        np.testing.assert_allclose(p.grad, expect, rtol=1e-5, atol=1e-7)
    grid.free()


class _Probe(Function):
    """Identity whose backward records whether a weakly referenced array is still alive."""

    def forward(self, x, ref=None, seen=None):
        self.ref, self.seen = ref, seen
        return x.copy()

    def backward(self, g):
        self.seen.append(self.ref() is not None)
        return g


def test_backward_releases_forward_outputs_it_has_passed():
    # x -> probe -> s = p + 1 -> t = s + 2 -> loss: Add keeps nothing for backward, so once the
    # walk has passed s nothing holds s's array, and by the time the probe's backward runs
    # (after s's) it must be gone, not kept until the walk ends.
    x = Tensor(np.ones((64, 64)), requires_grad=True)
    seen, holder = [], {}
    p = _Probe.apply(x, ref=lambda: holder["ref"](), seen=seen)
    s = p + 1.0
    holder["ref"] = weakref.ref(s.data)
    t = s + 2.0
    del s, p
    t.sum().backward()
    assert seen == [False]
    np.testing.assert_array_equal(x.grad, np.ones((64, 64)))


@pytest.mark.parametrize("with_store", [False, True])
def test_tied_embedding_rows_are_added_into_the_heads_gradient(with_store):
    """The embedding's backward adds its rows into the gradient the tied head already gave the
    table (no dense zero table): same values as the dense sum, in float64."""
    from mpisplit.autograd import ops
    from mpisplit.autograd.shape import Embedding

    rng = np.random.default_rng(4)
    table = Parameter(rng.standard_normal((11, 5)))
    ids = np.array([[1, 3, 3], [10, 1, 0]])
    if with_store:
        AdamW([table])
    seen = []
    real = Embedding.backward

    def spy(self, g):
        out = real(self, g)
        seen.append(out)
        return out

    Embedding.backward = spy
    try:
        x = ops.embedding(table, ids)  # (2, 3, 5)
        loss = (ops.linear_t(x, table) * Tensor(rng.standard_normal((2, 3, 11)))).sum()
        loss.backward()
    finally:
        Embedding.backward = real
    assert seen == [None]  # added in place, nothing returned
    w = np.random.default_rng(4)
    w.standard_normal((11, 5))
    r = w.standard_normal((2, 3, 11))  # the same weights as above
    e = table.data[ids]
    dense = np.einsum("btv,btk->vk", r, e)  # head: d/dW of sum r * (e @ W^T)
    np.add.at(dense, ids.reshape(-1), (r @ table.data).reshape(-1, 5))  # embedding rows
    assert np.allclose(table.grad, dense, rtol=1e-12, atol=1e-12)
    if with_store:
        assert table.grad is table.grad_store
