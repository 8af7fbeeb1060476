"""The DP gradient reduction overlapped with backward (mpisplit.training.overlap).

References: the blocking reduction of today (optim.average_gradients, the sharded optimizer's
reduce_scatter_gradients) on the same model and batch, bit for bit (the same calls on the same
elements), and float64 training runs with --overlap-grads on against off, histories and
checkpoints bit for bit, with the pieces made small so that a 2-layer model's block is many
buckets (the ring and MPI's Allreduce; plain, sharded, TP with sequence parallelism, pipeline
stages with the tied embedding, replicated key/value heads, micro-batches, recomputation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import world
from mpi4py import MPI

from mpisplit.models.config import GPTConfig
from mpisplit.models.gpt import GPT
from mpisplit.parallel import comm as comm_module
from mpisplit.parallel.grid import ProcessGrid
from mpisplit.training import TrainConfig, sharded_optim, train
from mpisplit.training.checkpoint import CheckpointReader
from mpisplit.training.optim import AdamW, average_gradients
from mpisplit.training.overlap import GradientOverlap, late_params
from mpisplit.training.sharded_optim import ShardedAdamW

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(240), world(min_size=2)]

CFG = GPTConfig(vocab_size=37, block_size=8, n_layer=3, n_head=2, n_embd=16)


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of 512 bytes and the ring from 1 KiB: a few thousand float64 gradients make
    dozens of buckets, each reduced as the blocking path reduces that range."""
    monkeypatch.setattr(comm_module, "HOST_ALLREDUCE_CHUNK_BYTES", 512)
    monkeypatch.setattr(sharded_optim, "HOST_ALLREDUCE_CHUNK_BYTES", 512)
    monkeypatch.setattr(comm_module, "HOST_RING_ALLREDUCE_MIN_BYTES", 1024)


def _batch(rank: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + rank)  # another batch on every DP rank
    return rng.integers(0, CFG.vocab_size, (2, 8)), rng.integers(0, CFG.vocab_size, (2, 8))


def _model(grid: ProcessGrid, sharded: bool) -> tuple[GPT, AdamW]:
    model = GPT(CFG, grid, dtype="float64", seed=0)
    params = list(model.parameters())
    return model, (ShardedAdamW(params, grid.dp_comm) if sharded else AdamW(params))


@pytest.mark.parametrize("sharded", [False, True], ids=["allreduce", "sharded"])
@pytest.mark.parametrize("algorithm", ["ring", "mpi"])
def test_buckets_go_out_during_backward_with_the_blocking_bits(small_pieces: None, monkeypatch: pytest.MonkeyPatch,
                                                               sharded: bool, algorithm: str) -> None:
    monkeypatch.setenv("MPISPLIT_ALLREDUCE", algorithm)
    world_ = MPI.COMM_WORLD
    grid = ProcessGrid(tp=1, comm=world_)
    x, y = _batch(world_.Get_rank())
    ref_model, ref_opt = _model(grid, sharded)
    ref_model.loss(x, y).backward()
    if sharded:
        ref_opt.reduce_scatter_gradients()
    else:
        average_gradients(ref_model.parameters(), grid.dp_comm)
    model, opt = _model(grid, sharded)
    ov = GradientOverlap(opt.params, grid.dp_comm, late_params(model, grid), opt if sharded else None)
    assert len(ov.order) >= 10
    ov.start(1)
    model.loss(x, y).backward()
    # every bucket was handed to the helper thread inside backward, none by finish()
    assert ov.next == len(ov.order)
    ov.finish()
    ov.close()
    if sharded:
        for got, want in zip(opt.parts, ref_opt.parts):
            lo, m = got.lo, got.m
            np.testing.assert_array_equal(got.grads.flat[lo: lo + m], want.grads.flat[lo: lo + m])
    else:
        for p, q in zip(model.parameters(), ref_model.parameters()):
            np.testing.assert_array_equal(p.grad, q.grad)
    grid.free()


def test_a_gradient_written_twice_in_a_step_is_an_error(small_pieces: None) -> None:
    grid = ProcessGrid(tp=1, comm=MPI.COMM_WORLD)
    model, opt = _model(grid, False)
    ov = GradientOverlap(opt.params, grid.dp_comm, [])
    ov.start(1)
    x, y = _batch(0)
    model.loss(x, y).backward()
    with pytest.raises(RuntimeError, match="written 2 times in a step of 1 micro-batches"):
        model.loss(x, y).backward()
    ov.finish()
    ov.close()
    grid.free()


TEXT = "the quick brown fox jumps over the lazy dog; " * 40

LAYOUTS = {  # name: (world sizes it runs at, extra config)
    "dp": (None, {"micro_batches": 2}),
    "dp_sharded_recompute": (None, {"shard_optimizer": True, "recompute": "full"}),
    "dp_tp_sp": (4, {"tp": 2, "sequence_parallel": True, "micro_batches": 2}),  # LayerNorms: late
    "dp_pp_sharded": (4, {"pp": 2, "micro_batches": 2, "shard_optimizer": True}),  # the tied wte: late
    "dp_tp_kv_replicas": (4, {"tp": 2, "arch": "llama", "kv_heads": 1}),  # replicated heads: late
}


def _config(out: Path, data: Path, **kw: object) -> TrainConfig:
    fields = {
        "layers": 2, "hidden": 24, "heads": 12, "seq_len": 16, "batch_size": 24, "steps": 6, "warmup": 2,
        "lr": 1e-2, "dtype": "float64", "eval_every": 0, "eval_iters": 1, "log_every": 1, "sample_len": 0,
        "progress": False, "plot": False, "collective_timeout": 0, "data": str(data), "out": str(out),
        "save_every": 0, "grad_clip": 0.5, "tp": 1,
    }
    return TrainConfig(**{**fields, **kw})


@pytest.mark.parametrize("layout", [
    pytest.param(name, marks=[] if size is None else world(sizes=(size,)), id=name)
    for name, (size, _) in LAYOUTS.items()])
def test_training_with_overlap_equals_blocking_bit_for_bit(small_pieces: None, tmp_path_factory: pytest.TempPathFactory,
                                                           layout: str) -> None:
    world_ = MPI.COMM_WORLD
    folder = Path(world_.bcast(str(tmp_path_factory.mktemp("overlap")) if world_.Get_rank() == 0 else None))
    if world_.Get_rank() == 0:
        (folder / "text.txt").write_text(TEXT, encoding="utf-8")
    world_.Barrier()
    extra = LAYOUTS[layout][1]
    runs = {mode: train(_config(folder / mode, folder / "text.txt", overlap_grads=mode, **extra))
            for mode in ("off", "on")}
    assert runs["on"].exit_code == runs["off"].exit_code == 0
    assert [(r["loss"], r["grad_norm"]) for r in runs["on"].history] == \
           [(r["loss"], r["grad_norm"]) for r in runs["off"].history]
    with CheckpointReader(runs["on"].checkpoint) as a, CheckpointReader(runs["off"].checkpoint) as b:
        assert sorted(a.names()) == sorted(b.names())
        for name in b.names():
            np.testing.assert_array_equal(a.read(name), b.read(name), err_msg=name)


def test_overlap_on_with_amp_is_an_error_on_every_rank(tmp_path_factory: pytest.TempPathFactory) -> None:
    world_ = MPI.COMM_WORLD
    folder = Path(world_.bcast(str(tmp_path_factory.mktemp("overlap-amp")) if world_.Get_rank() == 0 else None))
    if world_.Get_rank() == 0:
        (folder / "text.txt").write_text(TEXT, encoding="utf-8")
    world_.Barrier()
    cfg = _config(folder / "run", folder / "text.txt", overlap_grads="on", dtype="float32", amp="float16")
    with pytest.raises(ValueError, match="--overlap-grads on cannot run with --amp"):
        train(cfg)
