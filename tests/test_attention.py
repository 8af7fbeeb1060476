"""ParallelSelfAttention against the dense float64 reference of tests/_dense_gpt.py.

Forward at every TP degree; gradients of the input and of every weight (slabs gathered;
the fused QKV weight in its shard view (h, 3, h) reshaped to GPT-2's (h, 3h)) against
central finite differences of the dense reference at tp=1 and against the tp=1 layer on
COMM_SELF at tp > 1; the head layout of the fused QKV slab; collective counts; decoding
with a key/value cache against the full causal forward.
"""

import re
from types import SimpleNamespace

import _dense_gpt as dense
import numpy as np
import pytest
from _mpi import all_ranks_equal, gather_grad, gather_slab, grids, max_rel
from mpi4py import MPI

from mpisplit.autograd.gradcheck import numerical_grad
from mpisplit.autograd.tensor import Tensor, no_grad
from mpisplit.nn.attention import ParallelSelfAttention
from mpisplit.parallel.comm import Communicator

pytestmark = pytest.mark.mpi

TOL = {np.float64: 1e-10, np.float32: 1e-5}
HIDDEN, HEADS = 24, 12  # tp = 1, 2, 3, 4 all divide 12 heads
B, T = 2, 5
NAMES = ("c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias")


def _weights(hidden, seed=0):
    """Global float64 weights in the layer's shard view, large enough for a peaked softmax."""
    rng = np.random.default_rng([seed, hidden])
    s = 1.0 / np.sqrt(hidden)
    return {
        "c_attn.weight": rng.standard_normal((hidden, 3, hidden)) * 2 * s,
        "c_attn.bias": rng.standard_normal((3, hidden)) * 0.3,
        "c_proj.weight": rng.standard_normal((hidden, hidden)) * s,
        "c_proj.bias": rng.standard_normal(hidden) * 0.3,
    }


def _dense_args(w):
    """The GPT-2 (h, 3h) layout of the shard-view weights, for the dense reference."""
    h = w["c_proj.weight"].shape[0]
    return (w["c_attn.weight"].reshape(h, 3 * h), w["c_attn.bias"].reshape(3 * h),
            w["c_proj.weight"], w["c_proj.bias"])


def _layer(comm, w, hidden=HIDDEN, heads=HEADS, dtype=np.float64):
    layer = ParallelSelfAttention(hidden, heads, comm, dtype=dtype)
    for name, p in layer.named_parameters():
        p.data[...] = p.slab_of(w[name]).astype(dtype)
    return layer


def _x(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


def _forward_backward(layer, x_np, G, dtype):
    x = Tensor(x_np.astype(dtype), requires_grad=True)
    y = layer(x)
    (y * Tensor(G.astype(dtype))).sum().backward()
    grads = {name: gather_grad(p, layer.comm) for name, p in layer.named_parameters()}
    return y, x, grads


def _self_comm():
    return Communicator(MPI.COMM_SELF)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_forward_matches_dense(dtype):
    w = _weights(HIDDEN)
    x_np = _x((B, T, HIDDEN))
    ref = dense.causal_attention(x_np, *_dense_args(w), HEADS)
    for grid in grids():
        layer = _layer(grid.tp_comm, w, dtype=dtype)
        y = layer(Tensor(x_np.astype(dtype)))
        assert y.dtype == dtype
        assert max_rel(y.data, ref) < TOL[dtype]
        assert all_ranks_equal(grid.tp_comm, np.asarray(y.data))  # replicated output


def test_gradients_match_finite_differences_at_tp1():
    """Every autograd gradient of sum(y * G) vs central differences of the dense reference."""
    hidden, heads = 8, 2
    w = _weights(hidden, seed=3)
    x_np, G = _x((2, 3, hidden), 4), _x((2, 3, hidden), 5)
    comm = _self_comm()
    try:
        layer = _layer(comm, w, hidden, heads)
        _, x, grads = _forward_backward(layer, x_np, G, np.float64)
    finally:
        comm.free()

    def scalar():
        return float((dense.causal_attention(x_np, *_dense_args(w), heads) * G).sum())

    assert max_rel(x.grad, numerical_grad(scalar, x_np)) < 1e-7
    for name in NAMES:
        assert max_rel(grads[name], numerical_grad(scalar, w[name])) < 1e-7, name


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gradients_at_every_tp_match_tp1(dtype):
    w = _weights(HIDDEN)
    x_np, G = _x((B, T, HIDDEN), 6), _x((B, T, HIDDEN), 7)
    comm = _self_comm()
    try:
        _, x_ref, ref = _forward_backward(_layer(comm, w), x_np, G, np.float64)
    finally:
        comm.free()
    for grid in grids():
        _, x, grads = _forward_backward(_layer(grid.tp_comm, w, dtype=dtype), x_np, G, dtype)
        assert max_rel(x.grad, x_ref.grad) < TOL[dtype]
        assert all_ranks_equal(grid.tp_comm, np.asarray(x.grad))  # f operator: the same dX everywhere
        for name in NAMES:
            assert grads[name].shape == w[name].shape
            assert max_rel(grads[name], ref[name]) < TOL[dtype], name


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_one_allreduce_forward_one_backward(dtype):
    w = _weights(HIDDEN)
    x_np, G = _x((B, T, HIDDEN)), _x((B, T, HIDDEN), 2)
    nbytes = B * T * HIDDEN * np.dtype(dtype).itemsize
    for grid in grids():
        comm = grid.tp_comm
        layer = _layer(comm, w, dtype=dtype)
        comm.reset_stats()
        x = Tensor(x_np.astype(dtype), requires_grad=True)
        y = layer(x)
        fwd = comm.stats()
        (y * Tensor(G.astype(dtype))).sum().backward()
        total = comm.stats()
        others = [v["calls"] for k, v in total.items() if k != "allreduce"]
        assert others == [0] * len(others)
        if comm.size == 1:
            assert total["allreduce"] == {"calls": 0, "bytes": 0}
        else:
            assert fwd["allreduce"] == {"calls": 1, "bytes": nbytes}  # after the row-split c_proj
            assert total["allreduce"] == {"calls": 2, "bytes": 2 * nbytes}  # + dX of the column-split QKV


def test_heads_split_fused_qkv_layout():
    """Rank r's slab holds heads [r*H/t, (r+1)*H/t) of Q, of K and of V (not a third of the fused block)."""
    w = _weights(HIDDEN)
    Wd, bd, _, _ = _dense_args(w)
    x_np = _x((B, T, HIDDEN))
    q_ref, k_ref, v_ref = dense.qkv(x_np, Wd, bd, HEADS)  # (B, H, T, hs) each
    for grid in grids():
        layer = _layer(grid.tp_comm, w)
        r, t = grid.tp_rank, grid.tp
        hl = HIDDEN // t
        local = np.asarray(layer.c_attn.weight.data)  # (h, 3*hl) = [Q_r | K_r | V_r]
        assert local.shape == (HIDDEN, 3 * hl)
        for i in range(3):
            assert np.array_equal(local[:, i * hl:(i + 1) * hl], Wd[:, i * HIDDEN + r * hl: i * HIDDEN + (r + 1) * hl])
        assert np.array_equal(gather_slab(layer.c_attn.weight, grid.tp_comm).reshape(HIDDEN, 3 * HIDDEN), Wd)
        # the layer's own projection: local Q/K/V columns are the global ones of its heads
        qkv = (Tensor(x_np) @ layer.c_attn.weight + layer.c_attn.bias).data  # (B, T, 3*hl)
        heads = slice(r * HEADS // t, (r + 1) * HEADS // t)
        for i, ref in enumerate((q_ref, k_ref, v_ref)):
            got = dense.split_heads(qkv[..., i * hl:(i + 1) * hl], HEADS // t)
            assert max_rel(got, ref[:, heads]) < 1e-13


def test_same_seed_gives_same_global_weights_at_every_tp():
    comm = _self_comm()
    try:
        ref = ParallelSelfAttention(HIDDEN, HEADS, comm, dtype=np.float64)
        ref.reset_parameters(5)
        expected = {name: p.data.reshape(p.view_shape).copy() for name, p in ref.named_parameters()}
    finally:
        comm.free()
    assert np.std(expected["c_attn.weight"]) > 0.01
    for grid in grids():
        layer = ParallelSelfAttention(HIDDEN, HEADS, grid.tp_comm, dtype=np.float64)
        layer.reset_parameters(5)
        for name, p in layer.named_parameters():
            assert np.array_equal(gather_slab(p, grid.tp_comm), expected[name]), name


def test_heads_not_divisible_by_tp_raises_listing_valid_degrees():
    # The check is local: a stand-in communicator of any size reaches it at every world size.
    with pytest.raises(ValueError, match=re.escape("tp values that work: [1, 2, 3, 6]")):
        ParallelSelfAttention(12, 6, SimpleNamespace(size=4, rank=0))
    with pytest.raises(ValueError, match="hidden size 10 is not divisible by the number of heads 4"):
        ParallelSelfAttention(10, 4, SimpleNamespace(size=1, rank=0))
    for grid in grids():
        t = grid.tp
        if t == 1:
            continue
        heads = t + 1  # never divisible by t > 1
        valid = [d for d in range(1, heads + 1) if heads % d == 0]
        with pytest.raises(ValueError, match=re.escape(f"tp={t}") + ".*" + re.escape(str(valid))):
            ParallelSelfAttention(2 * heads, heads, grid.tp_comm)
        grid.tp_comm.barrier()  # every rank raised and came back


def test_kv_cache_decoding_equals_full_causal_forward():
    w = _weights(HIDDEN)
    Tn = 7
    x_np = _x((B, Tn, HIDDEN), 8)
    Wd, bd, _, _ = _dense_args(w)
    _, k_ref, v_ref = dense.qkv(x_np, Wd, bd, HEADS)
    for grid in grids():
        layer = _layer(grid.tp_comm, w)
        layer.eval()
        with no_grad():
            full = np.asarray(layer(Tensor(x_np)).data)  # (B, Tn, h)
            cache = layer.new_cache(B, Tn)
            prefill = 3  # a prompt of several positions, then one position at a time
            got = [np.asarray(layer(Tensor(x_np[:, :prefill]), cache=cache).data)]
            for t in range(prefill, Tn):
                got.append(np.asarray(layer(Tensor(x_np[:, t:t + 1]), cache=cache).data))
        assert max_rel(np.concatenate(got, axis=1), full) < 1e-12
        assert cache.length == Tn
        heads = slice(grid.tp_rank * HEADS // grid.tp, (grid.tp_rank + 1) * HEADS // grid.tp)
        assert max_rel(cache.k, k_ref[:, heads]) < 1e-13  # the cache holds this rank's heads only
        assert max_rel(cache.v, v_ref[:, heads]) < 1e-13
        with no_grad(), pytest.raises(ValueError, match="cache holds 7 positions"):
            layer(Tensor(x_np[:, :1]), cache=cache)
        with pytest.raises(RuntimeError, match="no_grad"):
            layer(Tensor(x_np[:, :1]), cache=layer.new_cache(B, Tn))
        grid.tp_comm.barrier()
