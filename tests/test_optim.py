"""Optimizers, the schedule and the gradient steps against hand-written float64 formulas.

SGD (momentum, Nesterov, weight decay) and AdamW: two updates each, written out per
element. cosine_lr at its landmarks. The global gradient norm against the norm of the
gathered dense gradient (replicated parameters once, split ones over all TP ranks),
clipping, and the mean over DP ranks.
"""

import itertools
import math
import zlib

import numpy as np
import pytest
from _mpi import all_ranks_equal, gather_grad, grids

from mpisplit.nn.layernorm import LayerNorm
from mpisplit.nn.linear import ColumnParallelLinear, RowParallelLinear
from mpisplit.nn.module import Parameter
from mpisplit.training.optim import (
    SGD,
    AdamW,
    average_gradients,
    clip_grad_norm,
    cosine_lr,
    global_grad_norm,
)

pytestmark = pytest.mark.mpi


def _rand(shape, *seed):
    return np.random.default_rng([11, *seed]).standard_normal(shape)


def _params():
    """A matrix (decayed by the default rule) and a vector (not decayed)."""
    return [Parameter(_rand((3, 4), 0)), Parameter(_rand((4,), 1))]


GRADS = [[_rand((3, 4), 2, s), _rand((4,), 3, s)] for s in range(2)]  # gradients of step 1 and 2


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sgd_two_steps_match_formula(momentum, nesterov, weight_decay):
    lr = 0.05
    params = _params()
    expected = [p.data.copy() for p in params]
    buf = [np.zeros_like(e) for e in expected]
    opt = SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    for grads in GRADS:
        for p, g in zip(params, grads):
            p.grad = g.copy()
        opt.step()
        for i, g in enumerate(grads):
            wd = weight_decay if expected[i].ndim >= 2 else 0.0
            d = g + wd * expected[i]
            if momentum:
                buf[i] = momentum * buf[i] + d  # first step: buf = d
                d = d + momentum * buf[i] if nesterov else buf[i]
            expected[i] = expected[i] - lr * d
        for p, e in zip(params, expected):
            np.testing.assert_allclose(p.data, e, rtol=1e-14, atol=1e-15)
    assert opt.step_count == 2


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_two_steps_match_formula(weight_decay):
    lr, b1, b2, eps = 0.01, 0.9, 0.95, 1e-8
    params = _params()
    expected = [p.data.copy() for p in params]
    m = [np.zeros_like(e) for e in expected]
    v = [np.zeros_like(e) for e in expected]
    opt = AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay)
    for t, grads in enumerate(GRADS, start=1):
        for p, g in zip(params, grads):
            p.grad = g.copy()
        opt.step()
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            wd = weight_decay if expected[i].ndim >= 2 else 0.0  # decoupled, matrices only
            expected[i] = expected[i] - lr * wd * expected[i] - lr * m_hat / (np.sqrt(v_hat) + eps)
        for p, e in zip(params, expected):
            np.testing.assert_allclose(p.data, e, rtol=1e-13, atol=1e-15)


def test_adamw_first_step_is_lr_sized():
    """At t = 1, m_hat / sqrt(v_hat) = g / |g|: every entry moves by lr (up to eps)."""
    p = Parameter(_rand((5,), 4))
    before = p.data.copy()
    p.grad = _rand((5,), 5)
    AdamW([p], lr=0.01).step()
    np.testing.assert_allclose(np.abs(p.data - before), 0.01, rtol=1e-5)


def test_optimizer_skips_parameters_without_gradient_and_rejects_bad_arguments():
    a, b = _params()
    a.grad = np.ones_like(a.data)
    before = b.data.copy()
    AdamW([a, b], lr=0.1).step()
    assert np.array_equal(b.data, before)
    with pytest.raises(ValueError, match="learning rate"):
        SGD([a], lr=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        SGD([a], momentum=1.0)
    with pytest.raises(ValueError, match="betas"):
        AdamW([a], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="empty"):
        AdamW([])
    with pytest.raises(TypeError, match="Parameters"):
        AdamW([np.zeros(3)])


def test_cosine_lr_landmarks():
    kw = {"max_lr": 1e-3, "warmup": 10, "total": 110, "min_lr": 1e-4}
    # linear warm-up: step s (0-based) gives max_lr * (s + 1) / warmup, the peak at the last warm-up step
    assert cosine_lr(0, **kw) == pytest.approx(1e-4, rel=1e-12)
    assert cosine_lr(4, **kw) == pytest.approx(5e-4, rel=1e-12)
    assert cosine_lr(9, **kw) == pytest.approx(1e-3, rel=1e-12)
    assert cosine_lr(10, **kw) == pytest.approx(1e-3, rel=1e-12)  # cosine at progress 0
    assert cosine_lr(60, **kw) == pytest.approx(5.5e-4, rel=1e-12)  # half way: (max + min) / 2
    quarter = 1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi / 4))
    assert cosine_lr(35, **kw) == pytest.approx(quarter, rel=1e-12)
    assert cosine_lr(110, **kw) == pytest.approx(1e-4, rel=1e-12)  # the end
    assert cosine_lr(500, **kw) == pytest.approx(1e-4, rel=1e-12)  # and after it
    decay = [cosine_lr(s, **kw) for s in range(10, 111)]
    assert all(x >= y for x, y in itertools.pairwise(decay))


def _layers(comm):
    """Column-split (padded: 7 features), row-split (replicated bias) and replicated LayerNorm."""
    return [
        ColumnParallelLinear(5, 7, comm, dtype=np.float64),
        RowParallelLinear(7, 5, comm, dtype=np.float64),
        LayerNorm(5, dtype=np.float64),
    ]


def _set_global_grads(layers, seed):
    """Every gradient from one global array (the same on every rank); returns the global arrays."""
    full = []
    for li, layer in enumerate(layers):
        for name, p in layer.named_parameters():
            g = _rand(p.global_shape, seed, li, zlib.crc32(name.encode()))
            p.grad = p.slab_of(g)
            full.append(g)
    return full


def test_global_grad_norm_counts_replicated_once_and_split_over_tp():
    for grid in grids():
        comm = grid.tp_comm
        layers = _layers(comm)
        full = _set_global_grads(layers, 0)
        params = [p for layer in layers for p in layer.parameters()]
        expected = math.sqrt(sum(float((g * g).sum()) for g in full))
        dense = [gather_grad(p, comm) for p in params]  # the gathered dense gradient
        assert math.sqrt(sum(float((g * g).sum()) for g in dense)) == pytest.approx(expected, rel=1e-14)
        comm.reset_stats()
        norm = global_grad_norm(params, comm)
        assert norm == pytest.approx(expected, rel=1e-13)
        assert all_ranks_equal(comm, norm)
        if comm.size > 1:  # one float64 scalar
            assert comm.stats()["allreduce"] == {"calls": 1, "bytes": 8}


def test_clip_grad_norm_scales_to_max_norm_and_returns_the_norm_before():
    for grid in grids():
        comm = grid.tp_comm
        layers = _layers(comm)
        full = _set_global_grads(layers, 1)
        params = [p for layer in layers for p in layer.parameters()]
        norm = math.sqrt(sum(float((g * g).sum()) for g in full))
        before = [p.grad.copy() for p in params]
        assert clip_grad_norm(params, norm * 2, comm) == pytest.approx(norm, rel=1e-13)
        assert all(np.array_equal(p.grad, b) for p, b in zip(params, before))  # under the limit: untouched
        max_norm = norm / 4
        assert clip_grad_norm(params, max_norm, comm) == pytest.approx(norm, rel=1e-13)
        scale = max_norm / (norm + 1e-6)
        for p, b in zip(params, before):
            np.testing.assert_allclose(p.grad, b * scale, rtol=1e-14, atol=0)
        assert global_grad_norm(params, comm) == pytest.approx(max_norm, rel=1e-5)


def test_average_gradients_is_the_mean_over_dp_ranks():
    for grid in grids():
        layers = _layers(grid.tp_comm)
        params = [p for layer in layers for p in layer.parameters()]
        # DP rank d holds gradient slabs drawn from seed d; the expected mean from all of them
        per_rank = []
        for d in range(grid.dp):
            _set_global_grads(layers, 100 + d)
            per_rank.append([p.grad.copy() for p in params])
        _set_global_grads(layers, 100 + grid.dp_rank)
        params[-1].grad = None  # a parameter without gradient is left alone
        grid.dp_comm.reset_stats()
        average_gradients(params, grid.dp_comm)
        for i, p in enumerate(params[:-1]):
            mean = sum(r[i] for r in per_rank) / grid.dp
            np.testing.assert_allclose(p.grad, mean, rtol=1e-14, atol=1e-15)
            assert p.grad.shape == p.shape
        assert params[-1].grad is None
        if grid.dp > 1:  # one all-reduce of one flat buffer
            nbytes = sum(p.size for p in params[:-1]) * 8
            assert grid.dp_comm.stats()["allreduce"] == {"calls": 1, "bytes": nbytes}
        else:
            assert grid.dp_comm.stats()["allreduce"]["calls"] == 0
