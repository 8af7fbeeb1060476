"""Mixed precision on NumPy float16, at every process grid the world size allows.

References: float64 NumPy formulas (layer norm, cross-entropy, gradient norm); a float32
AdamW step on float32 copies of the master weights fed the unscaled float16 gradients (must
match bit for bit); the float32 run of the same tiny GPT (a float16 run must track its loss);
the loss-scaling rules of mpisplit/training/amp.py's docstring.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _mpi import all_ranks_equal, grids
from mpi4py import MPI

from mpisplit.autograd import ops
from mpisplit.autograd.tensor import Tensor
from mpisplit.models.config import GPTConfig
from mpisplit.models.gpt import GPT
from mpisplit.nn.cross_entropy import vocab_parallel_cross_entropy
from mpisplit.nn.module import Parameter
from mpisplit.parallel.comm import Communicator
from mpisplit.parallel.grid import ProcessGrid
from mpisplit.training.amp import LossScaler, MixedPrecision, cast_module_, compute_dtype
from mpisplit.training.optim import AdamW, global_grad_norm

pytestmark = pytest.mark.mpi

# 12 heads: every tp of 1-4 divides them; vocabulary 29 is padded at tp = 2, 3 and 4.
CFG = {"vocab_size": 29, "block_size": 16, "n_layer": 2, "n_head": 12, "n_embd": 48, "dropout": 0.0}


def _batch(seed: int, b: int = 4, t: int = 12) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(seed).integers(0, CFG["vocab_size"], size=(b, t + 1))
    return ids[:, :-1], ids[:, 1:]


def _pair(grid: ProcessGrid, seed: int = 3, **scaler) -> tuple[GPT, GPT, MixedPrecision]:
    master = GPT(GPTConfig(**CFG), grid, seed=seed)
    net = GPT(GPTConfig(**CFG), grid, init=False)
    return master, net, MixedPrecision(net, master, "float16", grid.world, scaler=LossScaler(**scaler))


# ---- loss scale rules -----------------------------------------------------------------------


def test_loss_scaler_grows_after_good_steps_and_halves_on_overflow() -> None:
    s = LossScaler(2.0**10, growth_interval=3)
    for _ in range(2):
        s.update(False)
    assert s.scale == 2.0**10 and s.good_steps == 2
    s.update(False)
    assert s.scale == 2.0**11 and s.good_steps == 0
    s.update(True)
    assert s.scale == 2.0**10 and s.skipped_steps == 1 and s.good_steps == 0
    s.update(False)
    s.update(True)  # an overflow resets the count of good steps
    s.update(False)
    s.update(False)
    assert s.scale == 2.0**9 and s.good_steps == 2
    low = LossScaler(2.0, min_scale=1.0)
    low.update(True)
    low.update(True)
    assert low.scale == 1.0  # clamped at min_scale
    high = LossScaler(2.0**24, growth_interval=1)
    high.update(False)
    assert high.scale == 2.0**24  # clamped at max_scale
    fixed = LossScaler(8.0, dynamic=False, growth_interval=1)
    fixed.update(True)
    fixed.update(False)
    assert fixed.scale == 8.0 and fixed.skipped_steps == 1
    state = s.state_dict()
    t = LossScaler()
    t.load_state_dict(state)
    assert t.state_dict() == state == {"scale": 512.0, "good_steps": 2, "skipped_steps": 2}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"init_scale": 1000.0}, "init_scale must be a positive power of two"),
        ({"init_scale": -4.0}, "init_scale must be a positive power of two"),
        ({"growth_factor": 3.0}, "growth_factor must be a positive power of two"),
        ({"backoff_factor": 2.0}, "growth_factor > 1 > backoff_factor"),
        ({"growth_interval": 0}, "growth_interval must be a positive integer"),
        ({"init_scale": 2.0**30}, "min_scale <= init_scale <= max_scale"),
    ],
)
def test_loss_scaler_rejects_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LossScaler(**kwargs)


def test_compute_dtypes() -> None:
    assert compute_dtype("float16") == np.float16
    assert compute_dtype(np.dtype(np.float16)) == np.float16
    with pytest.raises(ValueError, match="NumPy has no bfloat16"):
        compute_dtype("bfloat16", np)
    with pytest.raises(ValueError, match=r"unknown mixed-precision dtype 'float32'.*'float16', 'bfloat16'"):
        compute_dtype("float32")


def _train_module():
    from mpisplit.cli import train

    return train


def test_train_flags_are_checked_before_anything_runs() -> None:
    train = _train_module()

    def check(*argv: str) -> None:
        train.validate_args(train.parse_args(list(argv)), 2)

    check("--amp", "float16")  # float16 runs on the CPU
    check("--device", "gpu", "--comm", "nccl", "--amp", "bfloat16")
    with pytest.raises(ValueError, match="--amp bfloat16 needs --device gpu: NumPy has no bfloat16"):
        check("--amp", "bfloat16")
    with pytest.raises(ValueError, match="use it with --dtype float32, not float64"):
        check("--amp", "float16", "--dtype", "float64")
    with pytest.raises(ValueError, match="--comm staged applies to --device gpu"):
        check("--comm", "staged")


def test_mixed_precision_checks_its_models() -> None:
    with ProcessGrid(tp=1, comm=MPI.COMM_SELF) as g:
        master = GPT(GPTConfig(**CFG), g, dtype="float64", seed=0)
        with pytest.raises(TypeError, match="master parameter wte.weight is float64"):
            MixedPrecision(GPT(GPTConfig(**CFG), g, init=False), master, "float16")
        other = GPT(GPTConfig(**{**CFG, "n_layer": 1}), g, init=False)
        with pytest.raises(ValueError, match=r"model and master differ in parameters: \['h.1"):
            MixedPrecision(other, GPT(GPTConfig(**CFG), g), "float16")


# ---- float32 reductions inside float16 ops ----------------------------------------------------


def test_layer_norm_statistics_in_float32() -> None:
    # Mean 300, spread 0.1: in float16 (spacing 0.25 at 300) the input holds only a few
    # distinct values; a float16 variance of them would be 0 or garbage. In float32 the
    # result is the float64 layer norm of the same (rounded) float16 input.
    rng = np.random.default_rng(0)
    x16 = (300 + 0.1 * rng.standard_normal((4, 64))).astype(np.float16)
    w16 = (1 + 0.1 * rng.standard_normal(64)).astype(np.float16)
    b16 = (0.1 * rng.standard_normal(64)).astype(np.float16)
    x, w, b = (Tensor(a, requires_grad=True) for a in (x16, w16, b16))
    y = ops.layer_norm(x, w, b)
    assert y.dtype == np.float16
    x64 = x16.astype(np.float64)
    xhat = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    ref = xhat * w16 + b16
    np.testing.assert_allclose(y.data.astype(np.float64), ref, rtol=2e-3, atol=2e-3)
    g = rng.standard_normal((4, 64)).astype(np.float16)
    y.backward(g)
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == np.float16
    np.testing.assert_allclose(b.grad.astype(np.float64), g.astype(np.float64).sum(0), rtol=2e-3)
    np.testing.assert_allclose(w.grad.astype(np.float64), (g * xhat).sum(0), rtol=5e-3, atol=5e-3)


def test_vocab_parallel_cross_entropy_in_float32() -> None:
    with Communicator(MPI.COMM_WORLD) as comm:
        V, n = 37, -(-37 // comm.size)
        rng = np.random.default_rng(5)
        logits = (20 * rng.standard_normal((3, 5, V))).astype(np.float16)  # exp(20) overflows float16
        targets = rng.integers(0, V, size=(3, 5))
        padded = np.full((3, 5, n * comm.size), -np.inf, dtype=np.float16)
        padded[..., :V] = logits
        local = Tensor(np.ascontiguousarray(padded[..., comm.rank * n: (comm.rank + 1) * n]), requires_grad=True)
        loss = vocab_parallel_cross_entropy(local, targets, comm, vocab_start=comm.rank * n, vocab_size=V)
        assert loss.dtype == np.float32  # the loss of 16-bit logits is float32
        z = logits.astype(np.float64)
        m = z.max(-1, keepdims=True)
        lse = np.log(np.exp(z - m).sum(-1)) + m[..., 0]
        ref = (lse - np.take_along_axis(z, targets[..., None], -1)[..., 0]).mean()
        assert abs(float(loss.data) - ref) < 1e-5 * max(1.0, abs(ref))
        loss.backward()
        assert local.grad.dtype == np.float16
        p = np.exp(z - lse[..., None])
        p[np.arange(3)[:, None], np.arange(5)[None, :], targets] -= 1
        ref_grad = np.zeros((3, 5, n * comm.size))
        ref_grad[..., :V] = p / 15
        block = ref_grad[..., comm.rank * n: (comm.rank + 1) * n]
        np.testing.assert_allclose(local.grad.astype(np.float64), block, atol=1e-4)


def test_gradient_norm_of_float16_gradients_in_float32() -> None:
    # 300^2 = 90000 overflows float16 (max 65504): the squares must be summed in float32.
    with Communicator(MPI.COMM_WORLD) as tp:
        p = Parameter(np.zeros(8, dtype=np.float16), split_axis=0, global_shape=(8 * tp.size,))
        p.grad = np.full(8, 300.0, dtype=np.float16)
        q = Parameter(np.zeros(3, dtype=np.float16))  # replicated: counted once
        q.grad = np.full(3, 400.0, dtype=np.float16)
        norm = global_grad_norm([p, q], tp)
        assert math.isclose(norm, math.sqrt(8 * tp.size * 300.0**2 + 3 * 400.0**2), rel_tol=1e-12)


# ---- the update -----------------------------------------------------------------------------


def test_master_update_equals_float32_adamw_on_the_unscaled_gradient() -> None:
    for grid in grids():
        master, net, mp = _pair(grid)
        assert all(p.dtype == np.float16 for p in net.parameters())
        for (name, p), m in zip(net.named_parameters(), master.parameters()):
            np.testing.assert_array_equal(p.data, m.data.astype(np.float16), err_msg=name)
        opt = AdamW(master.parameters(), lr=1e-2, weight_decay=0.1)
        refs = [Parameter(m.data.copy(), split_axis=m.split_axis, global_shape=m.global_shape) for m in master.parameters()]
        ref_opt = AdamW(refs, lr=1e-2, weight_decay=0.1)
        for step in range(2):
            x, y = _batch(step)
            mp.backward(net.loss(x, y))
            grads16 = [p.grad.copy() for p in net.parameters()]
            assert all(g.dtype == np.float16 for g in grads16)
            assert mp.unscale_()
            for r, g in zip(refs, grads16):
                r.grad = g.astype(np.float32) / np.float32(mp.scale)
            for m, r in zip(master.parameters(), refs):
                np.testing.assert_array_equal(m.grad, r.grad)
            opt.step()
            ref_opt.step()
            mp.update_model()
            mp.update_scale(False)
            mp.zero_grad()
            ref_opt.zero_grad()
            for (name, m), r, p in zip(master.named_parameters(), refs, net.parameters()):
                assert m.dtype == np.float32
                np.testing.assert_array_equal(m.data, r.data, err_msg=name)
                np.testing.assert_array_equal(p.data, m.data.astype(np.float16), err_msg=name)


def test_overflow_skips_the_step_on_every_rank_and_halves_the_scale() -> None:
    for grid in grids():
        master, net, mp = _pair(grid)
        opt = AdamW(master.parameters(), lr=1e-2)
        before = [m.data.copy() for m in master.parameters()]
        x, y = _batch(1)
        mp.backward(net.loss(x, y))
        if grid.rank == grid.world.size - 1:  # one rank alone overflows, in one slab
            net.h[1].mlp.c_fc.weight.grad[0, 0] = np.inf
        result = mp.step(opt, dp_comm=grid.dp_comm, tp_comm=grid.tp_comm, max_norm=1.0)
        assert result["skipped"] and math.isnan(result["grad_norm"]) and result["scale"] == 2.0**16
        assert all_ranks_equal(grid.world, result["skipped"])
        assert mp.scale == 2.0**15 and mp.scaler.skipped_steps == 1 and opt.step_count == 0
        for m, b in zip(master.parameters(), before):
            np.testing.assert_array_equal(m.data, b)
        assert all(p.grad is None for p in net.parameters()) and all(m.grad is None for m in master.parameters())
        # nan is an overflow too; the next clean step goes through at the halved scale.
        mp.backward(net.loss(x, y))
        if grid.rank == 0:
            net.wte.weight.grad[0, 0] = np.nan
        assert mp.step(opt, dp_comm=grid.dp_comm, tp_comm=grid.tp_comm)["skipped"]
        assert mp.scale == 2.0**14
        mp.backward(net.loss(x, y))
        result = mp.step(opt, dp_comm=grid.dp_comm, tp_comm=grid.tp_comm, max_norm=1.0)
        assert not result["skipped"] and math.isfinite(result["grad_norm"]) and opt.step_count == 1
        assert any(not np.array_equal(m.data, b) for m, b in zip(master.parameters(), before))


def test_float16_gpt_trains_like_float32() -> None:
    for grid in grids():
        ref = GPT(GPTConfig(**CFG), grid, seed=7)
        ref_opt = AdamW(ref.parameters(), lr=3e-3)
        master, net, mp = _pair(grid, seed=7, init_scale=16.0, growth_interval=2)
        opt = AdamW(master.parameters(), lr=3e-3)
        losses32, losses16, scales = [], [], []
        x, y = _batch(100)  # one batch, learnt by heart: the loss must fall
        for _ in range(8):
            loss = ref.loss(x, y)
            loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            losses32.append(float(loss.data))
            loss = net.loss(x, y)
            mp.backward(loss)
            result = mp.step(opt, dp_comm=grid.dp_comm, tp_comm=grid.tp_comm)
            assert not result["skipped"]
            losses16.append(float(loss.data))
            scales.append(result["scale"])
        assert np.max(np.abs(np.array(losses16) - losses32)) < 2e-2, (losses16, losses32)
        assert losses16[-1] < losses16[0] - 0.1
        assert scales == [16.0, 16.0, 32.0, 32.0, 64.0, 64.0, 128.0, 128.0]
        assert all_ranks_equal(grid.world, np.array(losses16))


def test_cast_module_changes_every_layer_dtype() -> None:
    with ProcessGrid(tp=1, comm=MPI.COMM_SELF) as g:
        model = cast_module_(GPT(GPTConfig(**CFG), g, seed=0), np.float16)
        assert all(p.dtype == np.float16 for p in model.parameters())
        dtypes = {m.dtype for m in model.modules() if hasattr(m, "dtype")}
        assert dtypes == {np.dtype(np.float16)}
        logits = model(_batch(0)[0])
        assert logits.dtype == np.float16 and np.isfinite(logits.data).all()
