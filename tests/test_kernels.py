"""The fused CPU kernels (mpisplit.kernels) against the NumPy path they replace, against float64
formulas, and through the autograd Functions against central finite differences."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import clean_mpi_env

pytest.importorskip("numba")

from mpisplit import kernels
from mpisplit.autograd import ops
from mpisplit.autograd.gradcheck import gradcheck
from mpisplit.autograd.tensor import Tensor
from mpisplit.nn.attention import _HeadAttention
from mpisplit.nn.module import Parameter
from mpisplit.training.optim import AdamW

TOL = {np.float32: 2e-6, np.float64: 1e-13}


@pytest.fixture(autouse=True)
def _restore_kernels():
    yield
    kernels.set_enabled(None)


def both_paths(fn):
    """fn() with the fused kernels, then with the NumPy path: (fused, numpy)."""
    out = []
    for on in (True, False):
        kernels.set_enabled(on)
        out.append(fn())
    return out


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def run_grad(fn, arrays, dtype, seed=0):
    """Output and input gradients of fn(*tensors) contracted with fixed random weights."""
    ts = [Tensor(np.array(a, dtype=dtype), requires_grad=True) for a in arrays]
    out = fn(*ts)
    w = np.random.default_rng(seed).standard_normal(out.shape).astype(dtype)
    (out * Tensor(w)).sum().backward()
    return [out.data] + [t.grad for t in ts]


def attention_of(qkv):
    return _HeadAttention.apply(qkv)


CASES = {
    "gelu": (ops.gelu, [(7, 33)], 3.0),
    "layer_norm": (lambda x, w, b: ops.layer_norm(x, w, b, eps=1e-5), [(2, 5, 40), (40,), (40,)], 1.0),
    "attention": (attention_of, [(2, 9, 3, 2, 4)], 1.0),
    "cross_entropy": (lambda z: ops.cross_entropy(z, np.arange(12) % 17), [(12, 17)], 4.0),
    "rms_norm": (lambda x, w: ops.rms_norm(x, w, eps=1e-5), [(2, 5, 40), (40,)], 1.0),
    "swiglu": (ops.swiglu, [(7, 33), (7, 33)], 3.0),
}


def case_inputs(name, seed=3):
    rng = np.random.default_rng(seed)
    fn, shapes, scale = CASES[name]
    return fn, [scale * rng.standard_normal(s) for s in shapes]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_equals_numpy_path(name, dtype):
    fn, inputs = case_inputs(name)
    fused, ref = both_paths(lambda: run_grad(fn, inputs, dtype))
    for i, (a, b) in enumerate(zip(fused, ref)):
        assert a.dtype == b.dtype == dtype
        assert a.shape == b.shape
        assert rel(a, b) < TOL[dtype] * (20 if dtype == np.float32 else 1), (name, i, rel(a, b))


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_gradients_match_finite_differences(name):
    fn, inputs = case_inputs(name)
    kernels.set_enabled(True)
    assert gradcheck(fn, inputs) < 1e-6


def test_the_kernels_are_what_runs():
    x = Tensor(np.ones((4, 8), np.float32), requires_grad=True)
    kernels.set_enabled(True)
    assert ops.gelu(x)._ctx.saved[1] is None  # fused: only x kept
    kernels.set_enabled(False)
    assert ops.gelu(x)._ctx.saved[1] is not None  # NumPy: x and tanh kept


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rope_rows_are_the_numpy_rotation_bit_for_bit(dtype):
    """kernels/rope.py against autograd/rotary.py's NumPy form: contiguous rows and the strided
    views of a fused q/k/v product, one and several sequences."""
    from mpisplit.autograd.rotary import rotary_array

    rng = np.random.default_rng(2)
    cos, sin = (rng.standard_normal((5, 16)).astype(dtype) for _ in range(2))
    fused = rng.standard_normal((2, 5, 3 * 4 * 16)).astype(dtype)
    for x in (rng.standard_normal((1, 5, 3, 16)).astype(dtype), fused[..., 16: 16 + 4 * 16].reshape(2, 5, 4, 16)):
        got, want = both_paths(lambda x=x: rotary_array(x, cos, sin))
        assert got.dtype == dtype and np.array_equal(got, want)


def test_gelu_float32_against_float64_formula():
    from mpisplit.kernels.gelu import gelu_backward, gelu_forward

    x = np.linspace(-12, 12, 100_001).astype(np.float32)
    x64 = x.astype(np.float64)
    t = np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3))
    ref = 0.5 * x64 * (1 + t)
    dref = 0.5 * (1 + t) + 0.5 * x64 * (1 - t * t) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x64**2)
    out, dout = np.empty_like(x), np.empty_like(x)
    gelu_forward(x, out)
    gelu_backward(x, np.ones_like(x), dout)
    assert np.abs(out - ref).max() <= 1e-6 * np.maximum(1.0, np.abs(ref)).max()
    # the NumPy float32 path is within 1.2e-6 of dref here; tanh32's 4e-7 is amplified by x c u'
    assert np.abs(dout - dref).max() < 6e-6
    nan_out = np.empty(1, np.float32)
    gelu_forward(np.array([np.nan], np.float32), nan_out)
    assert np.isnan(nan_out[0])  # a NaN is not clamped away


def test_tanh32_error_bound():
    import numba

    from mpisplit.kernels.tanh32 import tanh32

    @numba.njit
    def apply(x, out):
        for i in range(x.size):
            out[i] = tanh32(x[i])

    x = np.linspace(-20, 20, 400_001).astype(np.float32)
    out = np.empty_like(x)
    apply(x, out)
    err = np.abs(out.astype(np.float64) - np.tanh(x.astype(np.float64)))
    assert err.max() < 4e-7
    assert np.all(np.abs(out) <= 1.0)
    assert out[0] == -1.0 and out[-1] == 1.0 and out[len(out) // 2] == 0.0  # clamped tails, odd


def test_exp32_error_bound_and_edges():
    import numba

    from mpisplit.kernels.exp32 import exp_nonpositive

    @numba.njit
    def apply(x, out):
        for i in range(x.size):
            out[i] = exp_nonpositive(x[i])

    x = np.linspace(-87, 0, 1_000_001).astype(np.float32)
    out = np.empty_like(x)
    apply(x, out)
    ref = np.exp(x.astype(np.float64))
    assert out.dtype == np.float32
    assert (np.abs(out - ref) / ref).max() < 1.5e-7  # NumPy's float32 exp: 2e-7 here
    edges = np.array([0.0, -0.0, -1e-30, -87.5, -1e4, -np.inf, np.nan], np.float32)
    e_out = np.empty_like(edges)
    apply(edges, e_out)
    assert list(e_out[:6]) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert np.isnan(e_out[6])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("real", [0, 1, 300, 301])
def test_cross_entropy_rows_against_float64(dtype, real):
    from mpisplit.kernels import cross_entropy as ce

    rows, n = 1000, 301  # more rows than one block holds, so the blocks' seams are crossed
    assert rows > ce._BLOCK_BYTES // (n * np.dtype(dtype).itemsize)
    z = (5 * np.random.default_rng(1).standard_normal((rows, n))).astype(dtype)
    m = np.empty(rows, dtype)
    ce.row_max(z, real, m)
    z64 = z[:, :real].astype(np.float64)
    assert np.array_equal(m, z64.max(axis=1).astype(dtype) if real else np.full(rows, -np.inf))
    if real == 0:
        return
    e, s = np.full_like(z, 7.0), np.empty(rows)
    ce.exp_rows(z, real, m, e, s)
    ref = np.exp(z64 - z64.max(axis=1, keepdims=True))
    assert np.all(e[:, real:] == 0.0)
    assert np.abs(e[:, :real] - ref).max() < TOL[dtype]
    assert np.abs(s - ref.sum(axis=1)).max() / ref.sum(axis=1).min() < TOL[dtype]
    ce.exp_rows(z, real, m, z, s)  # in place gives the same
    assert np.array_equal(z, e)


def test_causal_softmax_rows_are_exact_zeros_after_the_diagonal():
    from mpisplit.kernels.softmax import causal_softmax_forward

    s = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    ref = s.astype(np.float64) * 0.5
    ref[..., np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] = -np.inf
    ref = np.exp(ref - ref.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    causal_softmax_forward(s, 0.5)
    assert np.all(s[..., np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] == 0.0)
    assert np.abs(s - ref).max() < 1e-6


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_adamw_is_bitwise_the_numpy_update(dtype):
    rng = np.random.default_rng(7)
    shapes = [(64, 33), (33,), (5, 7, 3)]
    start = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(4)]

    def train():
        params = [Parameter(a.copy()) for a in start]
        opt = AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.copy()
            opt.step()
        return [p.data for p in params] + opt.exp_avg + opt.exp_avg_sq

    fused, ref = both_paths(train)
    for a, b in zip(fused, ref):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(fused[0], start[0])


def test_float16_takes_the_numpy_path():
    kernels.set_enabled(True)
    assert not kernels.applies(np.ones(4, np.float16))
    assert not kernels.applies(np.ones((4, 4), np.float32)[:, ::2])  # not contiguous
    assert kernels.applies(np.ones(4, np.float32), np.ones(2, np.float32))
    assert not kernels.applies(np.ones(4, np.float32), np.ones(2, np.float64))


def _mode_in_child(value):
    code = "from mpisplit import kernels; print(kernels.backend_name())"
    env = {**clean_mpi_env(), "MPISPLIT_KERNELS": value}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def test_environment_selects_the_path():
    assert _mode_in_child("numpy").stdout.strip() == "numpy"
    assert _mode_in_child("numba").stdout.strip() == "numba"
    bad = _mode_in_child("fast")
    assert bad.returncode != 0 and "MPISPLIT_KERNELS must be one of auto, numba, numpy" in bad.stderr


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_overwriting_the_logits_gives_the_same_loss_and_gradient(fused, dtype):
    from mpi4py import MPI

    from mpisplit.nn.cross_entropy import vocab_parallel_cross_entropy
    from mpisplit.parallel.comm import Communicator

    kernels.set_enabled(fused)
    rng = np.random.default_rng(2)
    z = (3 * rng.standard_normal((4, 6, 13))).astype(dtype)
    t = rng.integers(0, 11, (4, 6))  # 11 real entries, 2 of padding
    t[0, 0] = -100
    results = []
    with Communicator(MPI.COMM_SELF) as comm:
        for overwrite in (False, True):
            logits = Tensor(z.copy(), requires_grad=True)
            loss = vocab_parallel_cross_entropy(logits, t, comm, vocab_start=0, vocab_size=11,
                                                overwrite_logits=overwrite)
            loss.backward()
            results.append((float(loss.data), logits.grad.copy(), logits.data))
    (l0, g0, d0), (l1, g1, _) = results
    assert l0 == l1
    np.testing.assert_array_equal(g0, g1)
    np.testing.assert_array_equal(d0, z)  # left alone without the option


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("id_dtype", [np.int64, np.int32])
def test_scatter_rows_is_bitwise_numpy_add_at(dtype, id_dtype):
    from mpisplit.kernels.scatter import scatter_add_rows
    from mpisplit.runtime.backend import scatter_add

    rng = np.random.default_rng(5)
    table = rng.standard_normal((13, 7)).astype(dtype)
    ids = np.array([3, 3, -1, 0, 12, 3, -13, 5], id_dtype)  # repeats and negative indices
    rows = rng.standard_normal((ids.size, 7)).astype(dtype)
    ref = table.copy()
    np.add.at(ref, ids, rows)
    got = table.copy()
    scatter_add_rows(got, ids, rows)
    assert np.array_equal(got, ref)
    kernels.set_enabled(True)
    via = table.copy()
    scatter_add(via, ids, rows)
    assert np.array_equal(via, ref)
    for bad in (13, -14):
        with pytest.raises(IndexError):
            scatter_add_rows(table.copy(), np.array([0, bad], id_dtype), rows[:2])
