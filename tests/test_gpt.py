"""The whole GPT at every process grid that the world size allows.

References: the dense float64 forward of tests/_dense_gpt.py (logits, loss); the tp=1
model built in-process on COMM_SELF with the same weights (gradients) and central finite
differences of its loss (a sample of gradient entries); the tp=1 grid of the world
(training over dp x tp layouts, generation). Also: the collectives of one training step
against the formula of the spec, dropout that keeps replicated activations equal on the
TP ranks, and input checks that raise on every rank before any collective.
"""

import zlib
from types import SimpleNamespace

import _dense_gpt as dense
import numpy as np
import pytest
from _mpi import all_ranks_equal, grids, max_rel
from mpi4py import MPI

from mpisplit.autograd.tensor import no_grad
from mpisplit.models.config import GPTConfig
from mpisplit.models.gpt import GPT
from mpisplit.parallel.grid import ProcessGrid
from mpisplit.training.optim import AdamW, average_gradients, clip_grad_norm, cosine_lr

pytestmark = pytest.mark.mpi

# 12 heads: tp = 1, 2, 3 and 4 all divide them.
CFG = {"block_size": 16, "n_layer": 2, "n_head": 12, "n_embd": 24, "dropout": 0.0}
B, T = 2, 6


def _cfg(V=65, **kw):
    return GPTConfig(vocab_size=V, **{**CFG, **kw})


def _self_grid():
    return ProcessGrid(tp=1, comm=MPI.COMM_SELF)


def _global_weights(cfg, seed=1):
    """Full float64 weights of a random global model under the parameter names, in the shard
    view of each parameter: LayerNorm weights near 1, non-zero biases, and weights large
    enough that attention is peaked (the default init leaves these paths nearly idle)."""
    with _self_grid() as g:
        shapes = [(name, p.global_shape) for name, p in GPT(cfg, g, dtype="float64", init=False).named_parameters()]
    out = {}
    for name, shape in shapes:
        full = np.random.default_rng([seed, zlib.crc32(name.encode())]).standard_normal(shape)
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            full = 1.0 + 0.1 * full
        elif name.startswith(("wte", "wpe")):
            full *= 0.5
        elif name.endswith("bias"):
            full *= 0.1
        else:
            full *= 1.0 / np.sqrt(shape[0])
        out[name] = full
    return out


def _load(model, weights):
    """Every rank keeps its slab of the global weights."""
    for name, p in model.named_parameters():
        p.data[...] = p.slab_of(weights[name]).astype(p.dtype)
    return model


def _dense_params(weights):
    """The fused QKV from its shard view (h, 3, h) to GPT-2's (h, 3h) layout."""
    out = dict(weights)
    for name, w in weights.items():
        if name.endswith("attn.c_attn.weight"):
            out[name] = w.reshape(w.shape[0], -1)
        elif name.endswith("attn.c_attn.bias"):
            out[name] = w.reshape(-1)
    return out


def _gather(local, p, comm):
    """The full logical array of `local` (a slab shaped like p) over the TP group (buffer all-gather)."""
    local = np.ascontiguousarray(local).reshape(p.view_shape)
    full = local if p.split_axis is None or comm.size == 1 else comm.allgather(local, axis=p.split_axis)
    return full[tuple(slice(0, n) for n in p.global_shape)]


def _batch(V, seed=0, b=B, t=T):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, size=(b, t)), rng.integers(0, V, size=(b, t))


def _grads(model, comm):
    return {name: _gather(p.grad, p, comm) for name, p in model.named_parameters()}


def _reference_grads(cfg, weights, idx, targets):
    with _self_grid() as g:
        ref = _load(GPT(cfg, g, dtype="float64", init=False), weights)
        loss = ref.loss(idx, targets)
        loss.backward()
        return loss.item(), _grads(ref, g.tp_comm)


@pytest.mark.parametrize("V", [65, 50257])
def test_logits_and_loss_match_dense(V):
    cfg = _cfg(V)
    idx, targets = _batch(V)
    targets[0, 1] = -100  # an ignored position
    weights = _global_weights(cfg)
    params = _dense_params(weights)
    ref_logits = dense.logits(params, idx, cfg.n_layer, cfg.n_head)
    for grid in grids():
        model = _load(GPT(cfg, grid, dtype="float64", init=False), weights)
        for name, p in model.named_parameters():
            assert np.array_equal(_gather(p.data, p, grid.tp_comm), weights[name]), name
        logits = model(idx)
        assert logits.shape == (B, T, V)
        assert max_rel(logits.data, ref_logits) < 1e-10
        loss = model.loss(idx, targets)
        assert abs(loss.item() - dense.cross_entropy(ref_logits, targets)) < 1e-10 * abs(loss.item())
        assert all_ranks_equal(grid.tp_comm, loss.item())
        assert model.num_parameters() == sum(a.size for a in params.values())


def test_same_seed_gives_same_global_model_at_every_tp():
    cfg = _cfg(65)
    with _self_grid() as g:
        ref = GPT(cfg, g, dtype="float64", seed=3)
        expected = {name: _gather(p.data, p, g.tp_comm).copy() for name, p in ref.named_parameters()}
    for grid in grids():
        model = GPT(cfg, grid, dtype="float64", seed=3)
        for name, p in model.named_parameters():
            assert np.array_equal(_gather(p.data, p, grid.tp_comm), expected[name]), name
        n = model.wte.local_vocab
        real = max(0, min(n, cfg.vocab_size - model.wte.vocab_start))
        assert np.all(model.wte.weight.data[real:] == 0)  # padded vocabulary rows


@pytest.mark.parametrize("V", [65, 50257])
def test_gradients_at_every_tp_match_tp1(V):
    cfg = _cfg(V)
    idx, targets = _batch(V, seed=1)
    weights = _global_weights(cfg)
    ref_loss, ref = _reference_grads(cfg, weights, idx, targets)
    for grid in grids():
        model = _load(GPT(cfg, grid, dtype="float64", init=False), weights)
        loss = model.loss(idx, targets)
        loss.backward()
        assert abs(loss.item() - ref_loss) < 1e-10 * ref_loss
        got = _grads(model, grid.tp_comm)
        for name, p in model.named_parameters():
            assert max_rel(got[name], ref[name]) < 1e-10, name
            if p.is_replicated:  # identical on the TP ranks without any gradient all-reduce
                assert all_ranks_equal(grid.tp_comm, np.asarray(p.grad)), name
        real = max(0, min(model.wte.local_vocab, V - model.wte.vocab_start))
        assert np.all(model.wte.weight.grad[real:] == 0)  # padded rows get no gradient


def test_tp1_gradients_match_finite_differences():
    """Two entries of every parameter; the entries are shared out over the world ranks."""
    cfg = _cfg(65)
    idx, targets = _batch(65, seed=2)
    world = MPI.COMM_WORLD
    eps = 1e-6
    rows = []
    with _self_grid() as g:
        model = _load(GPT(cfg, g, dtype="float64", init=False), _global_weights(cfg))
        model.loss(idx, targets).backward()
        entries = []
        for name, p in model.named_parameters():
            pick = np.random.default_rng(zlib.crc32(name.encode())).choice(p.size, 2, replace=False)
            entries += [(name, p, int(i)) for i in pick]
        for k, (name, p, i) in enumerate(entries):
            if k % world.Get_size() != world.Get_rank():
                continue
            flat = p.data.reshape(-1)
            old = flat[i]
            with no_grad():
                flat[i] = old + eps
                plus = model.loss(idx, targets).item()
                flat[i] = old - eps
                minus = model.loss(idx, targets).item()
            flat[i] = old
            rows.append((name, i, float(p.grad.reshape(-1)[i]), (plus - minus) / (2 * eps)))
    rows = [r for part in world.allgather(rows) for r in part]
    assert len(rows) == 2 * len(list(model.named_parameters()))
    bad = [r for r in rows if abs(r[2] - r[3]) > 1e-8 + 1e-6 * abs(r[3])]
    assert not bad, bad
    assert max(abs(r[3]) for r in rows) > 1e-2  # the sample holds real gradients, not only zeros


def _train(grid, cfg, data, steps):
    """AdamW + clipping + cosine schedule; DP rank d trains on its rows of each batch.

    Returns the full-batch losses (mean of the DP losses), the pre-clip norms, the model."""
    model = GPT(cfg, grid, dtype="float64", seed=7)
    opt = AdamW(model.parameters(), lr=0.0, betas=(0.9, 0.95), weight_decay=0.1)
    b = data.shape[1] // grid.dp
    mine = slice(grid.dp_rank * b, (grid.dp_rank + 1) * b)
    losses, norms = [], []
    for step in range(steps):
        opt.lr = cosine_lr(step, max_lr=3e-2, warmup=4, total=steps, min_lr=3e-3)
        idx, targets = data[step, mine, :-1], data[step, mine, 1:]
        loss = model.loss(idx, targets)
        loss.backward()
        average_gradients(model.parameters(), grid.dp_comm)
        norms.append(clip_grad_norm(model.parameters(), 1.5, grid.tp_comm))
        opt.step()
        opt.zero_grad()
        losses.append(float(grid.dp_comm.allreduce(np.array([loss.item()]))[0]) / grid.dp)
    return np.array(losses), np.array(norms), model


def test_training_gives_the_same_losses_at_every_dp_and_tp():
    """The first grid is tp=1 with the batch split over dp = world size ranks; every other
    grid (e.g. at world 4: dp=2 x tp=2, dp=1 x tp=4) must give its losses and weights."""
    cfg = _cfg(65)
    steps, batch = 20, 12  # 12 rows: dp = 1, 2, 3, 4 all divide the batch
    # learnable rows: x_j = (s + 3 j) mod 65 from a random start s
    starts = np.random.default_rng(5).integers(0, 65, size=(steps, batch, 1))
    data = (starts + 3 * np.arange(T + 1)) % 65
    ref = None
    for grid in grids():
        losses, norms, model = _train(grid, cfg, data, steps)
        params = {name: _gather(p.data, p, grid.tp_comm) for name, p in model.named_parameters()}
        for name, p in model.named_parameters():
            if p.is_replicated:  # the replicas took identical updates
                assert all_ranks_equal(grid.tp_comm, np.asarray(p.data)), name
        for p in model.parameters():  # and the DP replicas too
            assert all_ranks_equal(grid.dp_comm, np.asarray(p.data))
        if ref is None:
            assert grid.tp == 1
            ref = (losses, norms, params)
            assert losses[-1] < losses[0] - 0.5  # it learns
            assert (norms > 1.5).any() and (norms < 1.5).any()  # steps with and without clipping
            continue
        assert max_rel(losses, ref[0]) < 1e-9, (grid.dp, grid.tp)
        assert max_rel(norms, ref[1]) < 1e-9, (grid.dp, grid.tp)
        for name, full in params.items():
            assert max_rel(full, ref[2][name]) < 1e-8, name


def test_greedy_generation_same_at_every_tp_and_with_or_without_cache():
    """The first grid (tp=1) gives the reference tokens for the others."""
    cfg = _cfg(65, block_size=8)
    prompt = np.random.default_rng(3).integers(0, 65, size=(2, 3))
    weights = _global_weights(cfg)
    ref = None
    for grid in grids():
        model = _load(GPT(cfg, grid, dtype="float64", init=False), weights)
        short = [model.generate(prompt, 5, use_cache=c) for c in (False, True)]  # 8 positions: all fit
        long = model.generate(prompt, 10, use_cache=True)  # past block_size: the cache is rebuilt
        assert model.training  # generate() restores the mode
        assert np.array_equal(short[0], short[1])
        assert np.array_equal(long[:, :8], short[0])
        if ref is None:
            assert grid.tp == 1
            ref = (short[0], long)
            assert len(np.unique(long[:, 3:])) > 2  # not a single repeated token
            continue
        assert np.array_equal(short[0], ref[0])
        assert np.array_equal(long, ref[1])


def _zero(stats, but=()):
    return all(v["calls"] == 0 and v["bytes"] == 0 for k, v in stats.items() if k not in but)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_collectives_of_one_training_step_match_the_formula(dtype):
    """TP group: forward 1 + 2L all-reduces of (b,T,h) and 3 of (b,T) for the loss; backward
    2L + 1 of (b,T,h); one float64 scalar for the gradient norm. DP group: one all-reduce of
    every local gradient. Nothing else, on any communicator."""
    cfg = _cfg(65)
    L, h = cfg.n_layer, cfg.n_embd
    batch = 12
    idx, targets = _batch(65, seed=4, b=batch)
    item = np.dtype(dtype).itemsize
    for grid in grids():
        model = GPT(cfg, grid, dtype=dtype, seed=0)
        b = batch // grid.dp
        mine = slice(grid.dp_rank * b, (grid.dp_rank + 1) * b)
        for c in (grid.tp_comm, grid.dp_comm, grid.world):
            c.reset_stats()
        loss = model.loss(idx[mine], targets[mine])
        fwd = grid.tp_comm.stats()
        loss.backward()
        average_gradients(model.parameters(), grid.dp_comm)
        clip_grad_norm(model.parameters(), 1.0, grid.tp_comm)
        tp, dp = grid.tp_comm.stats(), grid.dp_comm.stats()
        act, row = b * T * h * item, b * T * item
        if grid.tp > 1:
            assert fwd["allreduce"] == {"calls": 1 + 2 * L + 3, "bytes": (1 + 2 * L) * act + 3 * row}
            assert tp["allreduce"] == {
                "calls": (1 + 2 * L + 3) + (2 * L + 1) + 1,
                "bytes": (1 + 2 * L) * act + 3 * row + (2 * L + 1) * act + 8,
            }
        assert _zero(tp, but=("allreduce",) if grid.tp > 1 else ())
        if grid.dp > 1:
            n_local = sum(p.size for p in model.parameters())
            assert dp["allreduce"] == {"calls": 1, "bytes": n_local * item}
        assert _zero(dp, but=("allreduce",) if grid.dp > 1 else ())
        assert _zero(grid.world.stats())


def test_dropout_keeps_replicated_activations_equal_on_tp_ranks():
    cfg = _cfg(65, dropout=0.1)
    idx, targets = _batch(65, seed=6)
    for grid in grids():
        model = GPT(cfg, grid, dtype="float64", seed=0)
        model.train()
        hidden = np.asarray(model.hidden_states(idx).data)
        assert all_ranks_equal(grid.tp_comm, hidden)
        loss = model.loss(idx, targets)
        loss.backward()
        assert all_ranks_equal(grid.tp_comm, loss.item())
        for name, p in model.named_parameters():
            if p.is_replicated:
                assert all_ranks_equal(grid.tp_comm, np.asarray(p.grad)), name
        # dropout is really on: another draw gives another loss, eval mode none of it
        with no_grad():
            again = model.loss(idx, targets).item()
            model.eval()
            clean = model.loss(idx, targets).item()
            assert model.loss(idx, targets).item() == clean
        assert again != loss.item() and clean != loss.item()
        assert all_ranks_equal(grid.tp_comm, again)


def test_bad_input_raises_on_every_rank_before_any_collective():
    cfg = _cfg(65)
    for grid in grids():
        model = GPT(cfg, grid, dtype="float64", seed=0)
        comm = grid.tp_comm
        comm.reset_stats()
        with pytest.raises(ValueError, match="17 positions exceeds block_size=16"):
            model.loss(np.zeros((2, 17), dtype=np.int64), np.zeros((2, 17), dtype=np.int64))
        with pytest.raises(ValueError, match="17 positions exceeds block_size=16"):
            model(np.zeros((1, 17), dtype=np.int64))
        with pytest.raises(ValueError, match=r"\[0, 65\).*\[65, 65\]"):
            model(np.full((2, 4), 65))
        with pytest.raises(TypeError, match="integers"):
            model(np.zeros((2, 4)))
        with pytest.raises(ValueError, match=r"targets shape \(2, 3\)"):
            model.loss(np.zeros((2, 4), dtype=np.int64), np.zeros((2, 3), dtype=np.int64))
        with pytest.raises(ValueError, match="2-d"):
            model(np.zeros(4, dtype=np.int64))
        with pytest.raises(ValueError, match="exceeds block_size"):
            model.generate(np.zeros((1, 17), dtype=np.int64), 1)
        assert _zero(comm.stats())
        comm.barrier()


@pytest.mark.parametrize("targets, error", [
    (np.full((2, 4), 70), ValueError),  # >= vocab_size
    (np.full((2, 4), -3), ValueError),  # negative and not ignore_index
    (np.zeros((2, 4)), TypeError),  # float targets
])
def test_bad_targets_raise_before_any_collective(targets, error):
    """Targets are as checkable as idx before the forward starts: no all-reduce may run first."""
    cfg = _cfg(65)
    for grid in grids():
        model = GPT(cfg, grid, dtype="float64", seed=0)
        comm = grid.tp_comm
        comm.reset_stats()
        with pytest.raises(error, match=r"\[0, 65\)|integers"):
            model.loss(np.zeros((2, 4), dtype=np.int64), targets)
        assert _zero(comm.stats()), comm.stats()
        comm.barrier()


def test_config_errors_name_the_values():
    with pytest.raises(ValueError, match=r"tp=5.*\[1, 2, 3, 4, 6, 12\]"):
        GPT(_cfg(65), SimpleNamespace(tp=5))  # checked before the grid is used
    with pytest.raises(ValueError, match="n_embd=25 must be a multiple of n_head=12"):
        _cfg(65, n_embd=25).validate()
    with pytest.raises(ValueError, match="dropout"):
        _cfg(65, dropout=1.0).validate()
    with pytest.raises(ValueError, match="vocab_size must be a positive integer"):
        _cfg(0).validate()
