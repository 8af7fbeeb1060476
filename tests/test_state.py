"""Model and AdamW state through sharded checkpoints, resharded between TP degrees.

    mpiexec -n N python -m pytest --with-mpi -q tests/test_state.py     (N = 1, 2, 3, 4)

A GPT with 12 heads (split at tp = 1, 2, 3, 4) and vocabulary 65 (padded to 66 at tp = 2, 3
and to 68 at tp = 4) is trained 2 AdamW steps, saved at every tp that divides the world, and
loaded at every such tp and alone on COMM_SELF. Reference: the full parameters and moments
gathered before saving; every one must come back bitwise.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _mpi import divisors, grids
from conftest import tp_params
from mpi4py import MPI

import mpisplit as ms
from mpisplit.parallel.grid import ProcessGrid
from mpisplit.training.checkpoint import CheckpointReader, save_checkpoint
from mpisplit.training.optim import AdamW, average_gradients
from mpisplit.training.state import (
    load_model,
    load_optimizer,
    resolve_checkpoint,
    save_training_state,
    training_shards,
)

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(120)]

COMM = MPI.COMM_WORLD
CFG = {"vocab_size": 65, "block_size": 8, "n_layer": 2, "n_head": 12, "n_embd": 24}
STEPS = 2
MOMENTS = ("exp_avg", "exp_avg_sq")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A temporary folder every rank sees (rank 0 creates it and broadcasts the path)."""
    path = tempfile.mkdtemp(prefix="mpisplit-state-") if COMM.rank == 0 else None
    path = Path(COMM.bcast(path, root=0))
    yield path
    COMM.Barrier()
    if COMM.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


def gather(p: ms.Parameter, local: Any, grid: ProcessGrid) -> np.ndarray:
    """The logical global array of `local` (laid out like p's slab), gathered over TP."""
    view = np.asarray(local).reshape(p.view_shape)
    if p.split_axis is not None and grid.tp > 1:
        view = np.concatenate(grid.tp_comm.mpi.allgather(view), axis=p.split_axis)
    return view[tuple(slice(0, n) for n in p.global_shape)].copy()


def snapshot(model: ms.GPT, opt: AdamW, grid: ProcessGrid) -> dict[str, np.ndarray]:
    """Every parameter and moment as its full logical array, by checkpoint name."""
    out = {}
    moments = opt.state_arrays()
    for i, (name, p) in enumerate(model.named_parameters()):
        assert opt.params[i] is p
        out[f"model/{name}"] = gather(p, p.data, grid)
        for kind in MOMENTS:
            out[f"optim/{kind}/{name}"] = gather(p, moments[kind][i], grid)
    return out


def padding_of(p: ms.Parameter, local: Any) -> np.ndarray:
    """The part of a slab past the logical length along the split axis (empty if none)."""
    if p.split_axis is None:
        return np.empty(0)
    view = np.asarray(local).reshape(p.view_shape)
    real = max(0, p.global_shape[p.split_axis] - p.start)
    return np.take(
        view, np.arange(min(real, view.shape[p.split_axis]), view.shape[p.split_axis]), p.split_axis
    )


def trained(grid: ProcessGrid, cfg: ms.GPTConfig | None = None) -> tuple[ms.GPT, AdamW]:
    """GPT + AdamW after STEPS steps on a fixed batch (the same global batch at every layout)."""
    cfg = cfg or ms.GPTConfig(**CFG)
    model = ms.GPT(cfg, grid, dtype="float64", seed=3)
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        tokens = rng.integers(0, cfg.vocab_size, size=(4, cfg.block_size + 1))
        per = len(tokens) // grid.dp  # this DP rank's rows of the global batch
        mine = tokens[grid.dp_rank * per : (grid.dp_rank + 1) * per]
        model.loss(mine[:, :-1], mine[:, 1:]).backward()
        average_gradients(model.parameters(), grid.dp_comm)
        opt.step()
        opt.zero_grad()
    return model, opt


def fresh(grid: ProcessGrid) -> tuple[ms.GPT, AdamW]:
    """Another model (other seed) whose slabs and moments, padding included, hold NaN:
    loading must overwrite every element."""
    model = ms.GPT(ms.GPTConfig(**CFG), grid, dtype="float64", seed=99)
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for p in model.parameters():
        p.data[...] = np.nan
    for arrays in opt.state_arrays().values():
        for a in arrays:
            a[...] = np.nan
    return model, opt


def assert_bitwise(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (
        what,
        got.dtype,
        got.shape,
        want.shape,
    )
    assert got.tobytes() == want.tobytes(), what


def check_loaded(path: Path, grid: ProcessGrid, want: dict[str, np.ndarray]) -> None:
    model, opt = fresh(grid)
    reader = CheckpointReader(path, grid.world)
    load_model(reader, model)
    load_optimizer(reader, model, opt)
    reader.close()
    assert opt.step_count == STEPS
    got = snapshot(model, opt, grid)
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert_bitwise(got[name], value, f"{name} at tp={grid.tp} (size {grid.world.size})")
    # Padded rows (vocabulary 65 at tp = 2, 3, 4): zero in the weight and in both moments.
    wte = model.wte.weight
    i = opt.params.index(wte)
    for local in (wte.data, opt.exp_avg[i], opt.exp_avg_sq[i]):
        pad = padding_of(wte, local)
        n = wte.shape[0]
        assert pad.shape[0] == n - max(0, min(n, 65 - wte.start))
        assert np.all(pad == 0)
    if grid.tp > 1 and grid.tp_rank == grid.tp - 1:
        assert padding_of(wte, wte.data).shape[0] == model.wte.padded_vocab - 65 > 0


@pytest.mark.parametrize("save_tp", tp_params(1, 2, 3, 4))
def test_reshard_model_and_adamw_bitwise(shared_dir: Path, save_tp: int) -> None:
    with ProcessGrid(tp=save_tp) as grid:
        model, opt = trained(grid)
        want = snapshot(model, opt, grid)
        # Two steps moved every weight and filled both moments.
        assert all(np.any(v != 0) for k, v in want.items() if "exp_avg" in k and "wte" in k)
        path = save_training_state(
            shared_dir, STEPS, model, opt, grid, meta={"config": model.config.to_dict()}
        )
    assert path == shared_dir / f"step-{STEPS:08d}"
    assert CheckpointReader(path, COMM).tp == save_tp
    for grid in grids():  # every tp dividing the world, save_tp included
        check_loaded(path, grid, want)
    with ProcessGrid(tp=1, comm=MPI.COMM_SELF) as alone:
        check_loaded(path, alone, want)


def test_loaded_model_continues_like_the_original(shared_dir: Path) -> None:
    """One more step after loading at tp=1 on COMM_SELF equals one more step of the model that
    was saved at tp=1: the optimizer's step count and moments came back, not only weights."""
    with ProcessGrid(tp=1, comm=MPI.COMM_SELF) as alone:
        model, opt = trained(alone)
        path = save_training_state(shared_dir / f"r{COMM.rank}", STEPS, model, opt, alone, meta={})
        copy, copy_opt = fresh(alone)
        reader = CheckpointReader(path, alone.world)
        load_model(reader, copy)
        load_optimizer(reader, copy, copy_opt)
        tokens = np.random.default_rng(5).integers(0, 65, size=(2, 9))
        for m, o in ((model, opt), (copy, copy_opt)):
            m.loss(tokens[:, :-1], tokens[:, 1:]).backward()
            o.step()
        for (name, a), b in zip(model.named_parameters(), copy.parameters()):
            assert_bitwise(b.data, a.data, name)


def agreed_raise(exc: type[Exception], fn: Callable[..., object], *args: object) -> str:
    """fn(*args) raises `exc` on this rank (so on every rank, each running this) with the
    agreed "rank r: ..." prefix; returns the message."""
    with pytest.raises(exc) as info:
        fn(*args)
    message = str(info.value)
    assert re.match(r"rank \d+: ", message), message
    assert all(m == message for m in COMM.allgather(message)), "ranks disagree on the message"
    return message


def test_other_shape_raises_naming_both(shared_dir: Path) -> None:
    grid = ProcessGrid(tp=COMM.size)
    model, opt = trained(grid)
    path = save_training_state(shared_dir, STEPS, model, opt, grid, meta={})
    for tp in divisors(COMM.size):
        with ProcessGrid(tp=tp) as g:
            other = ms.GPT(ms.GPTConfig(**{**CFG, "vocab_size": 70}), g, dtype="float64")
            reader = CheckpointReader(path, g.world)
            message = agreed_raise(ValueError, load_model, reader, other)
            assert "model/wte.weight" in message
            assert "(65, 24)" in message and "(70, 24)" in message, message
            deeper = ms.GPT(ms.GPTConfig(**{**CFG, "n_embd": 36}), g, dtype="float64")
            message = agreed_raise(ValueError, load_model, reader, deeper)
            assert "(65, 24)" in message and "(65, 36)" in message, message
    grid.free()


def test_missing_tensor_raises_everywhere(shared_dir: Path) -> None:
    grid = ProcessGrid(tp=COMM.size)
    model, opt = trained(grid)
    for dropped in ("model/h.1.ln_2.weight", "optim/exp_avg_sq/h.0.mlp.c_fc.weight"):
        shards = training_shards(model, opt)
        assert dropped in shards
        del shards[dropped]
        path = save_checkpoint(
            shared_dir / dropped.replace("/", "_"), 1, shards, grid=grid, meta={}
        )
        target, target_opt = fresh(grid)
        reader = CheckpointReader(path, grid.world)
        if dropped.startswith("model/"):
            message = agreed_raise(ValueError, load_model, reader, target)
        else:
            load_model(reader, target)
            message = agreed_raise(ValueError, load_optimizer, reader, target, target_opt)
        assert repr(dropped) in message and "not in checkpoint" in message, message
    grid.free()


def test_resolve_checkpoint(shared_dir: Path) -> None:
    with ProcessGrid(tp=COMM.size) as grid:
        model = ms.GPT(ms.GPTConfig(**CFG), grid, dtype="float64")
        for step in (3, 12, 7):  # "latest" follows the last save, 7
            save_training_state(shared_dir / "run", step, model, None, grid, meta={}, keep_last=5)
    run = shared_dir / "run"
    assert resolve_checkpoint(run) == run / "step-00000007"
    assert resolve_checkpoint(str(run)) == run / "step-00000007"
    assert resolve_checkpoint(run / "step-00000012") == run / "step-00000012"
    # Without the "latest" file: the highest complete step.
    COMM.Barrier()
    if COMM.rank == 0:
        (run / "latest").unlink()
    COMM.Barrier()
    assert resolve_checkpoint(run) == run / "step-00000012"
    with pytest.raises(FileNotFoundError, match=re.escape(str(shared_dir / "absent"))):
        resolve_checkpoint(shared_dir / "absent")
    empty = shared_dir / "empty"
    COMM.Barrier()
    if COMM.rank == 0:
        empty.mkdir()
    COMM.Barrier()
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        resolve_checkpoint(empty)
