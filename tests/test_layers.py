"""Split layers against a dense single-process float64 reference: outputs, input
gradients and every weight gradient (slabs gathered), at every TP degree that
divides the world size, with feature counts that tp divides and that it does not."""

import numpy as np
import pytest
from _mpi import all_ranks_equal, gather_grad, gather_slab, grids, max_rel
from mpi4py import MPI

from mpisplit.autograd import ops
from mpisplit.autograd.tensor import Tensor
from mpisplit.nn.layernorm import LayerNorm
from mpisplit.nn.linear import ColumnParallelLinear, Linear, RowParallelLinear
from mpisplit.nn.mlp import ParallelMLP

TOL = {np.float64: 1e-10, np.float32: 1e-5}
pytestmark = pytest.mark.mpi


def _data(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape)


def _gelu(u):
    return 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))


def _gelu_grad(u):
    c = np.sqrt(2 / np.pi)
    t = np.tanh(c * (u + 0.044715 * u**3))
    return 0.5 * (1 + t) + 0.5 * u * (1 - t * t) * c * (1 + 3 * 0.044715 * u * u)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("out_features", [8, 7])
@pytest.mark.parametrize("gather_output", [True, False])
def test_column_parallel_linear_matches_dense(dtype, out_features, gather_output):
    for grid in grids():
        comm = grid.tp_comm
        layer = ColumnParallelLinear(6, out_features, comm, gather_output=gather_output, dtype=dtype, seed=3)
        layer.bias.data[...] = layer.bias.slab_of(0.1 + np.arange(out_features) * 0.1)  # nonzero bias
        W, b = gather_slab(layer.weight, comm), gather_slab(layer.bias, comm)
        x_np = _data((2, 3, 6), 1)
        G = _data((2, 3, out_features), 2)  # upstream gradient: L = sum(Y * G)
        x = Tensor(x_np.astype(dtype), requires_grad=True)
        y = layer(x)
        if gather_output:
            assert y.shape == (2, 3, out_features)
            y_full = y.data
            (y * Tensor(G.astype(dtype))).sum().backward()
        else:
            n = layer.local_out_features
            lo = comm.rank * n
            Gp = np.zeros((2, 3, n * comm.size))
            Gp[..., :out_features] = G
            (y * Tensor(Gp[..., lo:lo + n].astype(dtype))).sum().backward()
            full = np.concatenate(comm.mpi.allgather(np.asarray(y.data)), axis=-1)
            assert np.all(full[..., out_features:] == 0)  # padded features are exactly zero
            y_full = full[..., :out_features]
        ref = x_np @ W.astype(np.float64) + b
        assert max_rel(y_full, ref) < TOL[dtype]
        assert max_rel(x.grad, G @ W.T.astype(np.float64)) < TOL[dtype]
        assert max_rel(gather_grad(layer.weight, comm), x_np.reshape(-1, 6).T @ G.reshape(-1, out_features)) < TOL[dtype]
        assert max_rel(gather_grad(layer.bias, comm), G.reshape(-1, out_features).sum(0)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("in_features", [8, 7])
@pytest.mark.parametrize("input_is_parallel", [True, False])
def test_row_parallel_linear_matches_dense(dtype, in_features, input_is_parallel):
    for grid in grids():
        comm = grid.tp_comm
        layer = RowParallelLinear(in_features, 5, comm, input_is_parallel=input_is_parallel, dtype=dtype, seed=4)
        layer.bias.data[...] = 0.5
        W = gather_slab(layer.weight, comm)
        x_np, G = _data((3, in_features), 5), _data((3, 5), 6)
        n = layer.local_in_features
        if input_is_parallel:
            xp_full = np.zeros((3, n * comm.size))
            xp_full[:, :in_features] = x_np
            x = Tensor(xp_full[:, comm.rank * n:(comm.rank + 1) * n].astype(dtype), requires_grad=True)
        else:
            x = Tensor(x_np.astype(dtype), requires_grad=True)
        y = layer(x)
        (y * Tensor(G.astype(dtype))).sum().backward()
        assert max_rel(y.data, x_np @ W + 0.5) < TOL[dtype]
        assert all_ranks_equal(comm, np.asarray(y.data))
        gx_ref = G @ W.T
        if input_is_parallel:
            got = np.concatenate(comm.mpi.allgather(np.asarray(x.grad)), axis=-1)[:, :in_features]
        else:
            got = x.grad
        assert max_rel(got, gx_ref) < TOL[dtype]
        assert max_rel(gather_grad(layer.weight, comm), x_np.T @ G) < TOL[dtype]
        assert max_rel(layer.bias.grad, G.sum(0)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("ffn", [16, 10])
def test_parallel_mlp_matches_dense_and_counts_collectives(dtype, ffn):
    h, B, T = 6, 2, 3
    for grid in grids():
        comm = grid.tp_comm
        mlp = ParallelMLP(h, ffn, comm, dtype=dtype, seed=11)
        mlp.c_fc.bias.data[...] = mlp.c_fc.bias.slab_of(0.01 * (1 + np.arange(ffn)))
        mlp.c_proj.bias.data[...] = -0.2
        W1, b1 = gather_slab(mlp.c_fc.weight, comm), gather_slab(mlp.c_fc.bias, comm)
        W2, b2 = gather_slab(mlp.c_proj.weight, comm), gather_slab(mlp.c_proj.bias, comm)
        x_np, G = _data((B, T, h), 7), _data((B, T, h), 8)
        x = Tensor(x_np.astype(dtype), requires_grad=True)
        comm.reset_stats()
        y = mlp(x)
        fwd = comm.stats()
        (y * Tensor(G.astype(dtype))).sum().backward()
        total = comm.stats()
        # dense float64 reference, forward and backward by hand
        u = x_np @ W1 + b1
        a = _gelu(u)
        ref = a @ W2 + b2
        ga = G @ W2.T
        gu = ga * _gelu_grad(u)
        assert max_rel(y.data, ref) < TOL[dtype]
        assert max_rel(x.grad, gu @ W1.T) < TOL[dtype]
        assert max_rel(gather_grad(mlp.c_proj.weight, comm), a.reshape(-1, ffn).T @ G.reshape(-1, h)) < TOL[dtype]
        assert max_rel(gather_grad(mlp.c_proj.bias, comm), G.reshape(-1, h).sum(0)) < TOL[dtype]
        assert max_rel(gather_grad(mlp.c_fc.weight, comm), x_np.reshape(-1, h).T @ gu.reshape(-1, ffn)) < TOL[dtype]
        assert max_rel(gather_grad(mlp.c_fc.bias, comm), gu.reshape(-1, ffn).sum(0)) < TOL[dtype]
        # exactly one all-reduce of (B, T, h) forward and one backward; nothing else
        nbytes = B * T * h * np.dtype(dtype).itemsize
        if comm.size == 1:
            assert fwd == comm.stats() and all(v["calls"] == 0 for v in total.values())
        else:
            assert fwd["allreduce"] == {"calls": 1, "bytes": nbytes}
            assert total["allreduce"] == {"calls": 2, "bytes": 2 * nbytes}
            assert all(v["calls"] == 0 for k, v in total.items() if k != "allreduce")


def test_same_seed_gives_same_global_weights_at_every_tp():
    ref = ParallelMLP(8, 20, _self_comm(), dtype=np.float64, seed=5)
    for grid in grids():
        mlp = ParallelMLP(8, 20, grid.tp_comm, dtype=np.float64, seed=5)
        for (name, p), (_, q) in zip(mlp.named_parameters(), ref.named_parameters()):
            assert np.array_equal(gather_slab(p, grid.tp_comm), q.data), name
    # and the unsplit Linear draws the same weight under the same name
    lin = Linear(8, 20, dtype=np.float64, seed=5)
    col = ColumnParallelLinear(8, 20, _self_comm(), dtype=np.float64, seed=5)
    assert np.array_equal(lin.weight.data, col.weight.data)


def test_layer_norm_replicated_matches_formula():
    x_np = _data((4, 6), 9)
    ln = LayerNorm(6, dtype=np.float64)
    ln.weight.data[...] = np.linspace(0.5, 1.5, 6)
    y = ln(Tensor(x_np))
    ref = (x_np - x_np.mean(-1, keepdims=True)) / np.sqrt(x_np.var(-1, keepdims=True) + 1e-5) * ln.weight.data
    assert max_rel(y.data, ref) < 1e-12


def test_bad_input_raises_on_every_rank():
    for grid in grids():
        comm = grid.tp_comm
        layer = ColumnParallelLinear(4, 8, comm, dtype=np.float64, seed=0)
        with pytest.raises(ValueError, match="last dimension 4"):
            layer(Tensor(np.ones((2, 5))))
        with pytest.raises(TypeError, match="float32 does not match"):
            layer(Tensor(np.ones((2, 4), dtype=np.float32)))
        with pytest.raises(ValueError, match="positive integer"):
            RowParallelLinear(0, 3, comm)
        with pytest.raises(ValueError, match="activation"):
            ParallelMLP(4, 8, comm, activation="swish")
        with pytest.raises(TypeError, match="dtype"):
            ops.linear(Tensor(np.ones((2, 4), dtype=np.float32)), layer.weight)
        comm.barrier()


def _self_comm():
    from mpisplit.parallel.comm import Communicator

    return Communicator(MPI.COMM_SELF)
