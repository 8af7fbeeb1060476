"""The sharded AdamW (mpisplit.training.sharded_optim) against the unsharded one.

References: the unsharded run of the same layout (float64 losses, weights and moments of 20
steps, relative 1e-12 of the tensor's largest value), the mean of the ranks' gradients built
on every rank, the byte and call formula of the reduce-scatter and all-gather, the uninterrupted
unsharded run for a run resumed across sharded/unsharded and dp sizes (float64, and float32
with float16 compute), the unsharded AdamW + MixedPrecision bit for bit for sharded master
weights, and each DP rank's share of the block for what it writes to a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import world
from mpi4py import MPI

import mpisplit as ms
from mpisplit.nn.module import Parameter
from mpisplit.parallel.comm import Communicator
from mpisplit.runtime.faults import FAULT_ENV
from mpisplit.training import TrainConfig, sharded_optim, train
from mpisplit.training.amp import MixedPrecision
from mpisplit.training.checkpoint import LATEST_NAME, CheckpointReader
from mpisplit.training.optim import AdamW, average_gradients, clip_grad_norm

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(240)]

TEXT = "the quick brown fox jumps over the lazy dog; " * 40
STEPS = 20


def _config(out: Path, data: Path, **kw: object) -> TrainConfig:
    # 12 heads and a batch of 12: tp, dp = 1, 2, 3, 4 divide them; clipping at 0.5 is active
    fields = {
        "layers": 2, "hidden": 24, "heads": 12, "seq_len": 16, "batch_size": 12, "steps": STEPS, "warmup": 5,
        "lr": 1e-2, "dtype": "float64", "eval_every": 0, "eval_iters": 1, "log_every": 1, "sample_len": 0,
        "progress": False, "plot": False, "collective_timeout": 0, "data": str(data), "out": str(out),
        "save_every": 10, "grad_clip": 0.5, "tp": 1,  # dp = the world size / pp unless a layout says tp
    }
    return TrainConfig(**{**fields, **kw})


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    world = MPI.COMM_WORLD
    path = Path(world.bcast(str(tmp_path_factory.mktemp("sharded")) if world.Get_rank() == 0 else None))
    if world.Get_rank() == 0:
        (path / "text.txt").write_text(TEXT, encoding="utf-8")
    world.Barrier()
    return path


def _close(got: np.ndarray, want: np.ndarray, rel: float, what: str) -> None:
    scale = max(float(np.max(np.abs(want))), 1e-300) if want.size else 1.0
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    assert err <= rel * scale, f"{what}: max |difference| {err:.3e} > {rel:g} x max |value| {scale:.3e}"


def _same_histories(got: list[dict], want: list[dict], rel: float) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert abs(g["loss"] - w["loss"]) <= rel * abs(w["loss"]), (g, w)
        assert g.get("skipped") == w.get("skipped"), (g, w)  # amp: the same overflow steps skipped
        if w["grad_norm"] is not None:
            assert abs(g["grad_norm"] - w["grad_norm"]) <= rel * abs(w["grad_norm"]), (g, w)


def _same_checkpoints(got: Path, want: Path, rel: float) -> None:
    """Every model weight and AdamW moment of two checkpoints (whole tensors, any layout)."""
    with CheckpointReader(got) as a, CheckpointReader(want) as b:
        assert sorted(a.names()) == sorted(b.names())
        assert any(n.startswith("optim/exp_avg_sq/") for n in a.names())
        for name in b.names():
            _close(a.read(name), b.read(name), rel, name)


LAYOUTS = {  # name: (world sizes it runs at, extra config)
    "dp": (None, {}),
    "dp_tp_sp_accumulate": (4, {"tp": 2, "sequence_parallel": True, "micro_batches": 2}),
    "dp_pp": (4, {"pp": 2, "micro_batches": 2}),
    "dp_amp": (None, {"dtype": "float32", "amp": "float16"}),
    "dp_llama": (None, {"arch": "llama", "kv_heads": 4}),  # other parameter names, grouped-query attention
    # tp 2 > 1 key/value head: the head replicated on both TP ranks, its gradient norm counted once
    "dp_tp_kv_replicas": (4, {"tp": 2, "arch": "llama", "kv_heads": 1}),
}


@pytest.fixture(scope="module")
def runs(folder: Path) -> dict:
    """Each layout's sharded and unsharded 20-step runs (run once, shared by the tests)."""
    n, out = MPI.COMM_WORLD.Get_size(), {}
    for name, (size, extra) in LAYOUTS.items():
        if size is not None and n != size:
            continue
        for sharded in (False, True):
            cfg = _config(folder / f"{name}-{sharded}", folder / "text.txt", shard_optimizer=sharded, **extra)
            if "amp" in name:  # a float16 overflow on the last rank at step 4: every rank skips it
                os.environ[FAULT_ENV] = f"inf@rank={n - 1},step=4"
            try:
                out[name, sharded] = train(cfg)
            finally:
                os.environ.pop(FAULT_ENV, None)
            assert out[name, sharded].exit_code == 0
    return out


@pytest.mark.parametrize("layout", [
    pytest.param(name, marks=[] if size is None else world(sizes=(size,)), id=name)
    for name, (size, _) in LAYOUTS.items()])
def test_sharded_run_equals_unsharded(runs: dict, folder: Path, layout: str) -> None:
    rel = 1e-5 if layout == "dp_amp" else 1e-12  # float32 master weights: sums in another order
    plain, sharded = runs[layout, False], runs[layout, True]
    _same_histories(sharded.history, plain.history, rel)
    _same_checkpoints(sharded.checkpoint, plain.checkpoint, rel)
    if "amp" in layout:
        assert 4 in [r["step"] for r in plain.history if r["skipped"]]


def _resume(folder: Path, source: Path, name: str, comm: object, **kw: object) -> list[dict]:
    """Continue `source` (a step folder) to step 20 in a new run folder; its history."""
    rank = MPI.COMM_WORLD.Get_rank()
    out = folder / name
    writer = comm is MPI.COMM_SELF or rank == 0  # alone, every rank has its own folder
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, out / source.name)
        (out / LATEST_NAME).write_text(source.name + "\n")
    MPI.COMM_WORLD.Barrier()
    result = train(_config(out, folder / "text.txt", resume=True, **kw), comm)
    ms.limit_blas_threads(MPI.COMM_WORLD)  # a one-rank run took every core: give them back
    assert result.exit_code == 0 and result.step == STEPS
    return result.history


def test_resume_across_sharded_unsharded_and_dp(runs: dict, folder: Path) -> None:
    world = MPI.COMM_WORLD
    n, rank = world.Get_size(), world.Get_rank()
    plain, sharded = runs["dp", False], runs["dp", True]
    half = lambda run: run.checkpoint.parent / "step-00000010"
    want = plain.history[10:]
    # same layout, switching: exact up to the reduction order of the norm (1e-12)
    _same_histories(_resume(folder, half(sharded), "to-plain", None, shard_optimizer=False), want, 1e-12)
    _same_histories(_resume(folder, half(plain), "to-sharded", None, shard_optimizer=True), want, 1e-12)
    # another dp: one rank alone (dp = 1), sharded into unsharded and the reverse; sums over
    # the batch in another order (1e-10, as test_trainer's dp against one rank)
    got = _resume(folder, half(sharded), f"to-dp1-{rank}", MPI.COMM_SELF, shard_optimizer=False)
    _same_histories(got, want, 1e-10)
    if n > 1 and n % 2 == 0:  # sharded at dp = n into sharded at dp = n / 2, x tp = 2 or x pp = 2
        got = _resume(folder, half(sharded), "to-dp-half-tp", None, shard_optimizer=True, tp=2)
        _same_histories(got, want, 1e-10)
        got = _resume(folder, half(sharded), "to-dp-half-pp", None, shard_optimizer=True, pp=2)
        _same_histories(got, want, 1e-10)


def test_amp_master_weights_resume_across_sharded_unsharded_and_dp(runs: dict, folder: Path) -> None:
    rank = MPI.COMM_WORLD.Get_rank()
    plain, sharded = runs["dp_amp", False], runs["dp_amp", True]
    half = lambda run: run.checkpoint.parent / "step-00000010"
    want, amp = plain.history[10:], {"dtype": "float32", "amp": "float16"}
    # float32 master weights saved in pieces by each DP rank, read whole by the unsharded AdamW
    # and as ranges by the sharded one; within 1e-5 as the runs themselves
    _same_histories(_resume(folder, half(sharded), "amp-to-plain", None, shard_optimizer=False, **amp), want, 1e-5)
    _same_histories(_resume(folder, half(plain), "amp-to-sharded", None, shard_optimizer=True, **amp), want, 1e-5)
    # one rank alone: against the unsharded checkpoint resumed alone (float16 matmuls of a batch
    # of another shape sum in another order, which the dp run is no reference for: 2e-3 apart)
    got = _resume(folder, half(sharded), f"amp-to-dp1-{rank}", MPI.COMM_SELF, shard_optimizer=True, **amp)
    ref = _resume(folder, half(plain), f"amp-plain-to-dp1-{rank}", MPI.COMM_SELF, shard_optimizer=False, **amp)
    _same_histories(got, ref, 1e-5)


def _safetensors_data_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - header


@pytest.mark.parametrize("layout", ["dp", "dp_amp"])
def test_sharded_save_writes_each_ranks_range_only(runs: dict, layout: str) -> None:
    """Each DP rank's file holds its part of the block: elements [d m, (d + 1) m) of the n
    parameters (m = n / dp rounded up) of each moment, and of the float32 master weights under
    amp; the model's own weights (not amp) are written once, by DP rank 0."""
    dp, d = MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank()
    path = runs[layout, True].checkpoint
    index = json.loads((path / "index.json").read_text())
    tensors = index["tensors"]
    n = sum(int(np.prod(t["global_shape"])) for name, t in tensors.items() if name.startswith("model/"))
    m = -(-n // dp)
    share = min(n, (d + 1) * m) - min(n, d * m)
    mine = (f"dp{d:02d}-of-{dp:02d}-" if d else "") + "tp00-of-01.safetensors"
    in_pieces = [name for name in tensors if name.startswith("optim/") or layout == "dp_amp"]
    assert index["version"] == 2 and len(in_pieces) == (3 if layout == "dp_amp" else 2) * len(tensors) // 3
    elements = {}
    for name in in_pieces:
        assert all("elements" in s for s in tensors[name]["shards"]), name
        held = [s["elements"] for s in tensors[name]["shards"] if s["file"] == mine]
        kind = name.split("/")[1] if name.startswith("optim/") else "master"
        elements[kind] = elements.get(kind, 0) + sum(hi - lo for lo, hi in held)
    assert elements == {kind: share for kind in elements}
    plain_elements = sum(int(np.prod(t["global_shape"])) for name, t in tensors.items() if name not in in_pieces)
    itemsize = 8 if layout == "dp" else 4
    want = (len(elements) * share + (plain_elements if d == 0 else 0)) * itemsize
    assert _safetensors_data_bytes(path / mine) == want


def test_amp_master_weights_sharded_equal_unsharded_bitwise() -> None:
    """ShardedAdamW.shard_master_weights against AdamW + MixedPrecision.update_model: the 16-bit
    weights and the float32 master weights bit for bit (gradients whose DP sums are exact), with
    3 float32 arrays of 1/dp of the block (moments and master) as the whole optimizer state."""
    grid = ms.ProcessGrid(tp=1, comm=MPI.COMM_WORLD)
    cfg = ms.GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=10)  # 1,730 parameters
    runs = {}
    for sharded in (False, True):
        master = ms.GPT(cfg, grid, dtype="float32", seed=0)
        mp = MixedPrecision(ms.GPT(cfg, grid, dtype="float32", init=False), master, "float16", grid.world)
        kw = {"lr": 1e-2, "weight_decay": 0.1}
        params = master.parameters()
        opt = sharded_optim.ShardedAdamW(params, grid.dp_comm, **kw) if sharded else AdamW(params, **kw)
        if sharded:
            opt.shard_master_weights(mp)
            m = opt.parts[0].m
            assert opt.state_bytes() == 3 * m * 4 and m == -(-sum(p.size for p in params) // grid.dp)
            assert all(np.shares_memory(p.data, opt.parts[0].data) and p.dtype == np.float16
                       for p in mp.model.parameters())
        for step in range(3):
            for p, g in zip(params, _rank_grads(grid.dp_rank + 10 * step, params)):
                p.grad_store[...] = g.astype(np.float32)
                p.grad = p.grad_store
            if sharded:
                opt.reduce_scatter_gradients()
            else:
                average_gradients(params, grid.dp_comm)
            opt.step()
            mp.update_model()  # nothing to do when sharded: the step wrote the 16-bit model
            opt.zero_grad()
        runs[sharded] = (opt, [p.data.copy() for p in mp.model.parameters()], [p.data for p in params])
    (_, low, masters), (opt, low_sharded, _) = runs[False], runs[True]
    for a, b in zip(low, low_sharded):
        assert a.dtype == b.dtype == np.float16 and np.array_equal(a, b)
    for (lo, hi, got), want in zip(opt.state_pieces()["master"], masters):
        assert got.dtype == np.float32 and np.array_equal(got, want.reshape(-1)[lo:hi])
    grid.free()


# ------------------------------------------------------------------ the collectives alone


def _params(dtype: type = np.float64) -> list[Parameter]:
    # 38 elements: not a multiple of 3 or 4, so the block is padded at those dp sizes
    rng = np.random.default_rng(0)
    return [Parameter(rng.standard_normal(shape).astype(dtype)) for shape in ((7, 5), (3,))]


def _rank_grads(rank: int, params: list[Parameter]) -> list[np.ndarray]:
    rng = np.random.default_rng(100 + rank)
    return [(rng.integers(-64, 64, p.shape) / 8).astype(p.dtype) for p in params]  # exact sums


def test_reduce_scatter_all_gather_counts_bytes_and_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sharded_optim, "HOST_ALLREDUCE_CHUNK_BYTES", 64)  # pieces of 64 / 8 / dp elements
    dp_comm, tp_comm = Communicator(MPI.COMM_WORLD), Communicator(MPI.COMM_SELF)
    dp, r = dp_comm.size, dp_comm.rank
    ps, ref = _params(), _params()
    opt = sharded_optim.ShardedAdamW(ps, dp_comm, lr=1e-2, weight_decay=0.1)
    plain = AdamW(ref, lr=1e-2, weight_decay=0.1)
    n, m = 38, -(-38 // dp)
    assert opt.parts[0].grads.flat.size == dp * m and opt.state_bytes() == 2 * m * 8
    for step in range(3):
        for p, q, g in zip(ps, ref, _rank_grads(r + 10 * step, ps)):
            p.grad_store[...] = g
            p.grad = p.grad_store
            q.grad = g.copy()
        dp_comm.reset_stats()
        opt.reduce_scatter_gradients()
        norm = opt.clip_grad_norm(1.0, tp_comm)
        opt.step()
        stats = dp_comm.stats()
        average_gradients(ref, dp_comm)
        unsharded = dp_comm.stats()["allreduce"]["bytes"] - stats["allreduce"]["bytes"]
        want_norm = clip_grad_norm(ref, 1.0, tp_comm)
        plain.step()
        assert abs(norm - want_norm) <= 1e-12 * want_norm
        for p, q in zip(ps, ref):
            _close(p.data, q.data, 1e-12, "parameter")
        if dp > 1:
            pieces = -(-m // max(1, 64 // 8 // dp))
            assert stats["reduce_scatter"] == {"calls": pieces, "bytes": dp * m * 8}
            assert stats["allgather"] == {"calls": pieces, "bytes": dp * m * 8}
            assert unsharded == n * 8  # one all-reduce of the unpadded block: the same bytes when dp divides n
            assert stats["allreduce"]["calls"] == 1  # the norm's two squares, nothing else
    pieces = opt.state_pieces()  # this rank's range of each moment: the unsharded moments there
    for kind, arrays in plain.state_arrays().items():
        for (lo, hi, got), want in zip(pieces[kind], arrays):
            _close(got, want.reshape(-1)[lo:hi], 1e-12, kind)
    # the ranks' ranges tile every parameter once
    for i, p in enumerate(ps):
        ranges = sorted(r for r in MPI.COMM_WORLD.allgather(opt.local_range(i)) if r[1] > r[0])
        assert [lo for lo, _ in ranges] == [0] + [hi for _, hi in ranges[:-1]] and ranges[-1][1] == p.size
    dp_comm.free()
    tp_comm.free()


def test_sharded_adamw_needs_a_communicator() -> None:
    with pytest.raises(TypeError, match="ShardedAdamW takes the DP Communicator .grid.dp_comm., got Intracomm"):
        sharded_optim.ShardedAdamW(_params(), MPI.COMM_WORLD)


def test_shard_optimizer_needs_adamw(folder: Path) -> None:
    with pytest.raises(ValueError, match="--shard-optimizer shards AdamW's moments: use it with --optimizer adamw"):
        train(_config(folder / "bad", folder / "text.txt", shard_optimizer=True, optimizer="sgd"))
