"""Checkpoints across pipeline layouts: model and AdamW state saved at any (tp, dp, pp) load at
any other, and alone on COMM_SELF (the pp = 1 model that generation uses).

Reference: the full logical parameters and moments gathered (over TP, then over the stages)
before saving; every one must come back bitwise.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI
from test_state import gather

from mpisplit.models.config import GPTConfig
from mpisplit.models.gpt import GPT
from mpisplit.parallel.grid import ProcessGrid
from mpisplit.training.checkpoint import CheckpointReader
from mpisplit.training.optim import AdamW, average_gradients
from mpisplit.training.state import load_model, load_optimizer, save_training_state
from mpisplit.training.step import StepRunner

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(120)]

COMM = MPI.COMM_WORLD
CFG = GPTConfig(vocab_size=23, block_size=8, n_layer=4, n_head=4, n_embd=16)
B, T = 4, 6


def layouts(size: int) -> list[tuple[int, int, int]]:
    return [(tp, size // (tp * pp), pp) for tp in (1, 2, 4) for pp in (1, 2, 3, 4) if size % (tp * pp) == 0]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    path = tempfile.mkdtemp(prefix="mpisplit-pp-state-") if COMM.rank == 0 else None
    path = Path(COMM.bcast(path, root=0))
    yield path
    COMM.Barrier()
    if COMM.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


def snapshot(model: GPT, opt: AdamW, grid: ProcessGrid) -> dict[str, np.ndarray]:
    """Every parameter and moment of the whole model, by checkpoint name, on every rank."""
    mine = {}
    moments = opt.state_arrays()
    for i, (name, p) in enumerate(model.named_parameters()):
        assert opt.params[i] is p
        if p.pipeline_copy:
            continue
        mine[f"model/{name}"] = gather(p, p.data, grid)
        for kind in ("exp_avg", "exp_avg_sq"):
            mine[f"optim/{kind}/{name}"] = gather(p, moments[kind][i], grid)
    out = {}
    for part in grid.pp_comm.mpi.allgather(mine):
        assert not set(part) & set(out)
        out.update(part)
    return out


def trained(grid: ProcessGrid) -> tuple[GPT, AdamW]:
    model = GPT(CFG, grid, dtype="float64", seed=3)
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    runner = StepRunner(model, grid, 2)
    rng = np.random.default_rng(0)
    for _ in range(2):
        idx, targets = rng.integers(0, CFG.vocab_size, size=(2, B * grid.dp, T))
        rows = slice(grid.dp_rank * B, (grid.dp_rank + 1) * B)
        runner.forward_backward(idx[rows], targets[rows])
        average_gradients(model.parameters(), grid.dp_comm)
        opt.step()
        opt.zero_grad()
    return model, opt


def loaded(path: Path, grid: ProcessGrid) -> tuple[GPT, AdamW]:
    model = GPT(CFG, grid, dtype="float64", init=False)
    opt = AdamW(model.parameters(), lr=1e-2)
    with CheckpointReader(path, grid.world) as reader:
        load_model(reader, model)
        load_optimizer(reader, model, opt)
    return model, opt


def test_save_at_any_layout_load_at_any_other(shared_dir: Path) -> None:
    size = COMM.size
    for tp, dp, pp in layouts(size):
        if pp == 1 and tp != size:
            continue  # pp = 1 -> pp = 1 is tested in test_state.py; keep one pp = 1 source
        with ProcessGrid(tp=tp, dp=dp, pp=pp) as grid:
            model, opt = trained(grid)
            expected = snapshot(model, opt, grid)
            path = save_training_state(shared_dir / f"tp{tp}pp{pp}", 2, model, opt, grid, meta={"step": 2})
            # The last stage's copy of the tied head holds exactly the first stage's table.
            if grid.embed_comm is not None:
                tables = grid.embed_comm.mpi.allgather(np.asarray(model.wte.weight.data))
                assert np.array_equal(tables[0], tables[1])
        with CheckpointReader(path, COMM) as reader:
            assert (reader.tp, reader.dp, reader.pp) == (tp, dp, pp)
            assert sorted(n for n in reader.names() if n.startswith("model/")) == sorted(
                n for n in expected if n.startswith("model/"))
        for tp2, dp2, pp2 in layouts(size):
            with ProcessGrid(tp=tp2, dp=dp2, pp=pp2) as grid2:
                got = snapshot(*loaded(path, grid2), grid2)
                assert sorted(got) == sorted(expected)
                for name, value in expected.items():
                    assert np.array_equal(got[name], value), (tp, pp, "->", tp2, pp2, name)
        with ProcessGrid(tp=1, comm=MPI.COMM_SELF) as alone:  # the whole model, as generation loads it
            got = snapshot(*loaded(path, alone), alone)
            assert all(np.array_equal(got[n], v) for n, v in expected.items()) and sorted(got) == sorted(expected)
